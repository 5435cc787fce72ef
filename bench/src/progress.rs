//! Progress of a scenario run on stderr: one bar per load path, redrawn in place on a
//! terminal, and a plain line every ten seconds otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters the load drivers update; a background task draws them.
pub struct Progress {
    tracks: Vec<Track>,
    started: Instant,
    stop: AtomicBool,
}

pub struct Track {
    name: &'static str,
    done: AtomicU64,
    total: AtomicU64,
    /// Milliseconds from the start to when `done` reached `total`; 0 while running.
    finished_ms: AtomicU64,
    started: Instant,
}

impl Track {
    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        if done >= self.total.load(Ordering::Relaxed) {
            let ms = (self.started.elapsed().as_millis() as u64).max(1);
            let _ = self
                .finished_ms
                .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Adds `n` to the count (several drivers, one per tenant, feed one track).
    pub fn add(&self, n: u64) {
        if n > 0 {
            let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
            self.set(done);
        }
    }

    /// Seconds the track has run: up to now, or up to when it finished.
    fn secs(&self) -> f64 {
        match self.finished_ms.load(Ordering::Relaxed) {
            0 => self.started.elapsed().as_secs_f64(),
            ms => ms as f64 / 1000.0,
        }
        .max(1e-3)
    }
}

const BAR: usize = 24;

impl Progress {
    /// One track per name, each with its total.
    pub fn new(tracks: &[(&'static str, u64)]) -> Arc<Self> {
        let started = Instant::now();
        Arc::new(Self {
            tracks: tracks
                .iter()
                .map(|&(name, total)| Track {
                    name,
                    done: AtomicU64::new(0),
                    total: AtomicU64::new(total),
                    finished_ms: AtomicU64::new(0),
                    started,
                })
                .collect(),
            started,
            stop: AtomicBool::new(false),
        })
    }

    /// The track called `name`. Panics on a name not given to [`Progress::new`], a bug in
    /// the runner.
    pub fn track(&self, name: &str) -> &Track {
        self.tracks
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no progress track `{name}`"))
    }

    /// The current line: per track a bar, count, rate (since the start, frozen once the
    /// track is done) and time left.
    pub fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let parts: Vec<String> = self
            .tracks
            .iter()
            .map(|t| {
                let done = t.done.load(Ordering::Relaxed);
                let total = t.total.load(Ordering::Relaxed).max(1);
                let frac = (done as f64 / total as f64).min(1.0);
                let filled = (frac * BAR as f64).round() as usize;
                let rate = done as f64 / t.secs();
                let eta = if done >= total {
                    format!("done in {}", clock(t.secs()))
                } else if rate > 0.0 {
                    format!("ETA {}", clock((total - done) as f64 / rate))
                } else {
                    "ETA ?".to_owned()
                };
                format!(
                    "{} [{}{}] {:>3.0}% {done}/{total} {rate:.0}/s {eta}",
                    t.name,
                    "#".repeat(filled),
                    "-".repeat(BAR - filled),
                    frac * 100.0
                )
            })
            .collect();
        format!("{} | {}", clock(secs), parts.join(" | "))
    }

    /// Draws until [`Progress::finish`]: in place every half second on a terminal, else a
    /// line every ten seconds.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let every = if tty {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(10)
            };
            let mut next = Instant::now() + every;
            while !me.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if Instant::now() < next {
                    continue;
                }
                next += every;
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r{}\x1b[K", me.line())
                } else {
                    writeln!(err, "{}", me.line())
                };
                let _ = err.flush();
            }
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                writeln!(err, "\r{}\x1b[K", me.line())
            } else {
                writeln!(err, "{}", me.line())
            };
        })
    }

    /// Stops drawing after one last line.
    pub async fn finish(&self, task: tokio::task::JoinHandle<()>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = task.await;
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_each_track_with_its_share_and_count() {
        let p = Progress::new(&[("batch", 200), ("stream", 10)]);
        p.track("batch").set(50);
        p.track("stream").set(10);
        let line = p.line();
        assert!(
            line.contains("batch [######------------------]  25% 50/200"),
            "{line}"
        );
        assert!(
            line.contains("stream [########################] 100% 10/10"),
            "{line}"
        );
        assert!(line.contains("done"), "{line}");
    }

    #[test]
    fn clock_reads_like_a_clock() {
        assert_eq!(clock(5.2), "5s");
        assert_eq!(clock(125.0), "2m05s");
        assert_eq!(clock(3725.0), "1h02m05s");
    }
}
