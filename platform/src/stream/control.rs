//! The elastic controller: how many consumers of a tenant's queue one stream manager runs,
//! within the tenant's target, from what it sees at each look (every `stream.reconcile_ms`):
//! the queue's ready messages and the slowest batch's publish-to-stored latency.
//!
//! Hysteresis: a consumer is added after `scale_up_ticks` busy looks in a row and removed
//! after `scale_down_ticks` idle ones (more by default), one at a time, and the counts start
//! over after each change; between the busy and the idle thresholds nothing moves.

use crate::api::ConsumerTarget;
use crate::config::StreamSettings;

/// What a manager saw of a tenant at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Ready messages in the queue; `None` when the broker did not say.
    pub depth: Option<u64>,
    /// The highest publish-to-stored latency of this manager's batches since the last look.
    pub max_latency_ms: u64,
}

/// One tenant's controller state in one manager.
#[derive(Debug, Default, Clone)]
pub struct Control {
    busy: u32,
    idle: u32,
}

/// A change of consumers and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub to: u32,
    pub reason: String,
}

impl Control {
    /// The change to make to `running` consumers, if any.
    pub fn step(
        &mut self,
        running: u32,
        target: ConsumerTarget,
        seen: Seen,
        s: &StreamSettings,
    ) -> Option<Change> {
        let within = running.clamp(target.min, target.max);
        if within != running {
            *self = Self::default();
            return Some(Change {
                to: within,
                reason: format!("target {}..{}", target.min, target.max),
            });
        }
        let Some(depth) = seen.depth else {
            // Nothing is known of the queue: hold, and count again from nothing.
            *self = Self::default();
            return None;
        };
        let slow = seen.max_latency_ms > s.scale_up_latency_ms;
        if depth > s.scale_up_depth || slow {
            self.busy += 1;
            self.idle = 0;
        } else if depth <= s.scale_down_depth {
            self.idle += 1;
            self.busy = 0;
        } else {
            *self = Self::default();
        }
        if self.busy >= s.scale_up_ticks && running < target.max {
            *self = Self::default();
            let why = if slow {
                format!(
                    "a batch took {} ms from publish to stored (over {} ms)",
                    seen.max_latency_ms, s.scale_up_latency_ms
                )
            } else {
                format!(
                    "{depth} messages waiting (over {}) at {} looks in a row",
                    s.scale_up_depth, s.scale_up_ticks
                )
            };
            return Some(Change {
                to: running + 1,
                reason: why,
            });
        }
        if self.idle >= s.scale_down_ticks && running > target.min {
            *self = Self::default();
            return Some(Change {
                to: running - 1,
                reason: format!(
                    "at most {} messages waiting at {} looks in a row",
                    s.scale_down_depth, s.scale_down_ticks
                ),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StreamSettings {
        StreamSettings {
            scale_up_depth: 100,
            scale_up_latency_ms: 1000,
            scale_up_ticks: 2,
            scale_down_depth: 5,
            scale_down_ticks: 3,
            ..StreamSettings::default()
        }
    }

    fn seen(depth: u64) -> Seen {
        Seen {
            depth: Some(depth),
            max_latency_ms: 0,
        }
    }

    /// Runs the controller over `depths` from `running` consumers, applying each change;
    /// the consumers after each look.
    fn run(running: u32, target: ConsumerTarget, looks: &[Seen]) -> Vec<u32> {
        let s = settings();
        let mut c = Control::default();
        let mut n = running;
        looks
            .iter()
            .map(|&l| {
                if let Some(ch) = c.step(n, target, l, &s) {
                    n = ch.to;
                }
                n
            })
            .collect()
    }

    const RANGE: ConsumerTarget = ConsumerTarget { min: 1, max: 3 };

    #[test]
    fn a_backlog_adds_one_consumer_per_two_busy_looks_up_to_the_max() {
        let looks = [seen(500); 8];
        assert_eq!(run(1, RANGE, &looks), [1, 2, 2, 3, 3, 3, 3, 3]);
    }

    #[test]
    fn an_empty_queue_removes_one_per_three_idle_looks_down_to_the_min() {
        let looks = [seen(0); 8];
        assert_eq!(run(3, RANGE, &looks), [3, 3, 2, 2, 2, 1, 1, 1]);
    }

    #[test]
    fn a_queue_between_the_thresholds_or_of_unknown_depth_holds_and_resets_the_counts() {
        let unknown = Seen {
            depth: None,
            max_latency_ms: 0,
        };
        // busy, in-between, busy: never two busy looks in a row.
        let looks = [seen(500), seen(50), seen(500), unknown, seen(500), seen(0)];
        assert_eq!(run(1, RANGE, &looks), [1; 6]);
        let looks = [
            seen(0),
            seen(0),
            seen(50),
            seen(0),
            seen(0),
            unknown,
            seen(0),
        ];
        assert_eq!(run(2, RANGE, &looks), [2; 7]);
    }

    #[test]
    fn slow_batches_add_consumers_even_with_a_short_queue() {
        let slow = Seen {
            depth: Some(10),
            max_latency_ms: 5000,
        };
        let s = settings();
        let mut c = Control::default();
        assert_eq!(c.step(1, RANGE, slow, &s), None);
        let ch = c.step(1, RANGE, slow, &s).expect("a change");
        assert_eq!(ch.to, 2);
        assert!(ch.reason.contains("5000 ms"), "{}", ch.reason);
    }

    #[test]
    fn counts_outside_the_target_are_brought_into_it_at_once() {
        let fixed = ConsumerTarget { min: 2, max: 2 };
        assert_eq!(run(0, fixed, &[seen(0)]), [2]);
        assert_eq!(run(5, fixed, &[seen(9999)]), [2]);
        let ch = Control::default()
            .step(0, RANGE, seen(0), &settings())
            .expect("a change");
        assert_eq!(
            ch,
            Change {
                to: 1,
                reason: "target 1..3".into()
            }
        );
    }

    #[test]
    fn a_load_that_comes_and_goes_every_look_does_not_make_consumers_flap() {
        let looks: Vec<Seen> = (0..20)
            .map(|i| if i % 2 == 0 { seen(500) } else { seen(0) })
            .collect();
        assert_eq!(run(2, RANGE, &looks), vec![2; 20]);
    }
}
