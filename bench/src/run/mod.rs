//! Running a scenario: the platform deployed, each phase's load driven and accounted for,
//! the ceiling measured, the report written. The top of the workbench: the only module
//! that imports the others.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use mysimbdp::infra::ServerVersions;

use crate::deploy::Deployment;
use crate::report::{Ceiling, Ceilings, Environment, Report, Results, Round, StreamRate};
use crate::schema::{ClosedLoopRate, Expect, Scenario};
use crate::{accounting, ceiling, cost, faults, host, load, replicas};

mod look;
mod phase;

/// A phase: its name, the prefix of its tenants' names, the groups it runs.
struct PhaseSpec {
    name: String,
    prefix: String,
    groups: Vec<usize>,
}

/// Runs a scenario and writes its report under `out/<name>/<run-id>/`.
pub async fn run(path: &Path, out: &Path) -> Result<PathBuf> {
    let sc = Scenario::load(path)?;
    let run_id = time::OffsetDateTime::now_utc().format(&time::format_description::parse(
        "[year][month][day]T[hour][minute][second]Z",
    )?)?;
    if let Some(f) = &sc.faults {
        return faults::run(&sc.name, &sc.description, f, out, &run_id).await;
    }
    if let Some(c) = &sc.cost {
        return cost::run(&sc, c, out, &run_id).await;
    }
    if let Some(r) = &sc.replicas {
        return replicas::run(&sc, r, out, &run_id).await;
    }
    let plans = sc.plans()?;
    let ns = format!("sc{:06x}_", crate::host::rand_u32() & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-scenario-{ns}"));
    let admin = format!("scenario-admin-{:08x}", crate::host::rand_u32());
    let overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("batch.batch_size={}", sc.platform.batch_size),
        format!("batch.workers={}", sc.platform.batch_workers),
        format!("stream.batch_size={}", sc.platform.stream_batch_size),
        format!("stream.prefetch={}", sc.platform.prefetch),
        format!("stream.linger_ms={}", sc.platform.stream_linger_ms),
        format!("mongodb.write_concern=\"{}\"", sc.platform.write_concern),
        format!("mongodb.journal={}", sc.platform.journal),
        "mongodb.max_pool_size=4".into(),
        "limits.max_file_bytes=1000000000".into(),
        // The run's queues go from the broker some time after it.
        mysimbdp::testing::expiring_queues(),
    ];
    eprintln!(
        "scenario {}: provisioning, platform {}",
        sc.name, sc.platform.topology
    );
    let deployment = Deployment::start(sc.platform.topology, overrides, &admin).await?;
    let versions = deployment.versions.clone();
    let mongodb_uri = deployment.mongodb_uri.clone();
    let amqp_uri = deployment.amqp_uri.clone();
    let admin = deployment.admin.clone();
    let phases = if sc.rounds > 1 {
        (1..=sc.rounds)
            .map(|r| PhaseSpec {
                name: format!("round {r}"),
                prefix: format!("r{r}-"),
                groups: (0..plans.len()).collect(),
            })
            .collect()
    } else if sc.baseline {
        vec![
            PhaseSpec {
                name: "baseline".into(),
                prefix: "b-".into(),
                groups: (0..plans.len())
                    .filter(|&i| plans[i].expect == Expect::Success)
                    .collect(),
            },
            PhaseSpec {
                name: "mixed".into(),
                prefix: "m-".into(),
                groups: (0..plans.len()).collect(),
            },
        ]
    } else {
        vec![PhaseSpec {
            name: "main".into(),
            prefix: String::new(),
            groups: (0..plans.len()).collect(),
        }]
    };
    let measured = async {
        if let Some(mb) = sc.platform.memory_limit_mb {
            deployment.limit_memory(mb.saturating_mul(1 << 20))?;
        }
        let db = mongodb::Client::with_uri_str(&mongodb_uri).await?;
        let mut results = Results::default();
        // An offered rate measured, not fixed: the closed loop runs first.
        let rated = match sc
            .stream
            .as_ref()
            .and_then(|s| s.rate_of_closed_loop.as_ref())
        {
            Some(c) => {
                let rated = closed_loop_rate(&sc, c, &admin, &db, &mut results).await?;
                // Memory the closed loop freed is given back to the system within the
                // platform allocator's decay; the reset below starts after that.
                tokio::time::sleep(std::time::Duration::from_millis(
                    2 * mysimbdp::memory::DECAY_MS as u64,
                ))
                .await;
                // The load's peak memory is its own: the closed loop's is kept apart.
                let closed_peak = deployment.reset_peak_rss();
                if closed_peak.is_none() {
                    eprintln!(
                        "cannot reset the peak memory of every process after the closed loop: the report's peak may include it"
                    );
                }
                if let Some(r) = &mut results.stream_rate {
                    r.closed_loop_peak_rss_bytes = closed_peak.unwrap_or(0);
                }
                Some(rated)
            }
            None => None,
        };
        let sc = rated.as_ref().unwrap_or(&sc);
        let replanned;
        let plans = match &rated {
            Some(r) => {
                replanned = r.plans()?;
                &replanned
            }
            None => &plans,
        };
        let mut rounds = Vec::new();
        // The time spent in the phases' loads (with rounds, not their ceilings).
        let mut loaded = std::time::Duration::ZERO;
        for (i, ph) in phases.iter().enumerate() {
            // A round's ceilings are measured just before and just after its load: the
            // server's rate drifts from one minute to the next, and the mean of the two
            // is what it could do while the platform ran.
            let before = if sc.rounds > 1 {
                batch_ceiling(sc, &mongodb_uri, &ns, false).await?
            } else {
                None
            };
            let phase_started = Instant::now();
            let o = phase::run_phase(sc, plans, ph, &admin, &db).await?;
            loaded += phase_started.elapsed();
            results.accounting.extend(o.accounts);
            results.phases.push(o.report);
            if sc.rounds > 1 {
                let after = batch_ceiling(sc, &mongodb_uri, &ns, true).await?;
                match (o.batch, before, after) {
                    (Some(parts), Some(before), Some(after)) => {
                        let round = Round::of(i + 1, &parts, &before, &after);
                        eprintln!("{}", round.line());
                        rounds.push((round, parts, Ceiling::around(&before, &after)));
                    }
                    _ => eprintln!(
                        "round {}: no batch figures to set against the ceilings",
                        i + 1
                    ),
                }
            } else {
                (results.batch, results.stream) = (o.batch, o.stream);
            }
        }
        let wall = loaded;
        // The ceiling: the same documents straight into the same server with the raw driver;
        // with rounds, the median round's, beside its platform figures.
        let (rounds, median) = median_round(rounds);
        results.rounds = rounds;
        let batch = match median {
            Some((parts, ceiling)) => {
                results.batch = Some(parts);
                Some(ceiling)
            }
            None => batch_ceiling(sc, &mongodb_uri, &ns, false).await?,
        };
        // The raw stream pipeline: the same messages on the same schedule. It mirrors one
        // tenant running the map app on a clean stream load alone; a run of many tenants,
        // groups, poison or a batch load beside it (sharing the database) would be set
        // against a different load, so it has none.
        let mirrored = sc.tenants.count == 1
            && sc.tenants.groups.is_empty()
            && sc.tenants.app == "map"
            && sc.batch.is_none();
        let stream = match &sc.stream {
            Some(s) if mirrored && s.poison_every.is_none() => {
                eprintln!("raw stream pipeline: {} messages", s.messages);
                let raw = ceiling::raw_stream(ceiling::RawStream {
                    amqp_uri: &amqp_uri,
                    mongodb_uri: &mongodb_uri,
                    ns: &ns,
                    load: s,
                    schedule: load::schedule(s),
                    batch_size: sc.platform.stream_batch_size,
                    prefetch: sc.platform.prefetch,
                    write_concern: mysimbdp::config::write_concern(
                        &sc.platform.write_concern,
                        sc.platform.journal,
                    ),
                    timeout: std::time::Duration::from_secs(sc.timeout_s),
                })
                .await;
                // A baseline that failed leaves the platform's run reported, without it.
                raw.map_err(|e| eprintln!("raw stream pipeline: {e:#}"))
                    .ok()
            }
            _ => None,
        };
        let ceiling = Ceilings { batch, stream };
        Ok::<_, anyhow::Error>((results, ceiling, wall))
    }
    .await;
    let processes = deployment.peak_rss();
    let stopped = deployment.stop().await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let (results, ceiling, wall) = match (measured, &stopped) {
        (Ok(m), _) => m,
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(s)) => return Err(e.context(format!("and the platform: {s:#}"))),
    };
    // The scenario as given, so that the report's copy runs again as it ran: a rate measured
    // in the run is in `stream_rate`, not written into it.
    let report = Report::new(
        &sc,
        &run_id,
        environment(versions, processes),
        results,
        ceiling,
        wall,
    )
    .with_platform_errors(
        stopped
            .err()
            .map(|e| accounting::strip_ansi(&format!("{e:#}")))
            .into_iter()
            .collect(),
    );
    let dir = out.join(&sc.name).join(&run_id);
    report.write(&dir)?;
    Ok(dir)
}

/// The scenario with its stream's rate set to `c.fraction` of the messages per second the
/// platform stored under the closed-loop load `c`, run first as a phase of its own (`closed
/// loop`, its own tenant; its figures and accounting are in the report with the others').
async fn closed_loop_rate(
    sc: &Scenario,
    c: &ClosedLoopRate,
    admin: &mysimbdp::client::Client,
    db: &mongodb::Client,
    results: &mut Results,
) -> Result<Scenario> {
    let stream = sc
        .stream
        .as_ref()
        .context("a rate of the closed loop needs a [stream] load")?;
    let mut closed = sc.clone();
    closed.stream = Some(c.load(stream));
    let plans = closed.plans()?;
    let ph = PhaseSpec {
        name: "closed loop".into(),
        prefix: "cl-".into(),
        groups: (0..plans.len()).collect(),
    };
    eprintln!(
        "closed loop first: {} messages, {} publishers, for the rate to offer",
        c.messages, c.concurrency
    );
    let o = phase::run_phase(&closed, &plans, &ph, admin, db).await?;
    // A closed loop that lost, failed or did not finish inputs measured something else than
    // the platform's capacity: no rate is offered from it.
    let problems: Vec<String> = o
        .accounts
        .iter()
        .filter_map(|a| accounting::account_problem(&serde_json::to_value(a).ok()?))
        .collect();
    if !problems.is_empty() {
        anyhow::bail!(
            "the closed loop that measures the rate to offer did not store every message: {}",
            problems.join("; ")
        );
    }
    let per_s = o
        .stream
        .as_ref()
        .map(|p| p.stats().throughput_per_s)
        .filter(|r| r.is_finite() && *r > 0.0)
        .context("the closed loop stored nothing: no rate to offer")?;
    results.accounting.extend(o.accounts);
    results.phases.push(o.report);
    let rate = ((per_s * c.fraction).round() as u32).max(1);
    let needs_s = f64::from(stream.messages) / f64::from(rate);
    if needs_s > sc.timeout_s as f64 {
        anyhow::bail!(
            "the closed loop stored {per_s:.0} messages/s: {} messages at {} of it ({rate}/s) take {needs_s:.0} s, more than timeout_s ({} s)",
            stream.messages,
            c.fraction,
            sc.timeout_s
        );
    }
    eprintln!(
        "closed loop: {per_s:.0} messages/s; offering {} of it: {rate}/s",
        c.fraction
    );
    let mut rated = sc.clone();
    if let Some(s) = &mut rated.stream {
        s.rate = rate;
    }
    results.stream_rate = Some(StreamRate {
        closed_loop_per_s: per_s,
        fraction: c.fraction,
        rate,
        closed_loop_peak_rss_bytes: 0,
    });
    Ok(rated)
}

/// The raw driver's ceilings for the scenario's batch load, when it has one (`alone_first`:
/// the records alone measured before the same writes as the platform's).
async fn batch_ceiling(
    sc: &Scenario,
    mongodb_uri: &str,
    ns: &str,
    alone_first: bool,
) -> Result<Option<Ceiling>> {
    let Some(b) = &sc.batch else {
        return Ok(None);
    };
    let c = ceiling::raw_ceiling(
        mongodb_uri,
        ns,
        b,
        sc.platform.batch_size,
        &sc.platform.write_concern,
        sc.platform.journal,
        alone_first,
    )
    .await?;
    Ok(Some(c))
}

/// The rounds' figures, the median round marked, and that round's platform figures and
/// ceilings: the round whose ratio to the records alone is the median (the lower one of an
/// even count).
fn median_round<P>(rounds: Vec<(Round, P, Ceiling)>) -> (Vec<Round>, Option<(P, Ceiling)>) {
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| {
        rounds[a]
            .0
            .fraction_of_data_alone
            .total_cmp(&rounds[b].0.fraction_of_data_alone)
    });
    let median = order.len().checked_sub(1).map(|last| order[last / 2]);
    let mut figures = Vec::with_capacity(rounds.len());
    let mut chosen = None;
    for (i, (mut round, parts, ceiling)) in rounds.into_iter().enumerate() {
        if Some(i) == median {
            round.median = true;
            chosen = Some((parts, ceiling));
        }
        figures.push(round);
    }
    (figures, chosen)
}

/// The machine, the servers and each process of the run with its peak resident memory.
fn environment(versions: ServerVersions, processes: Vec<(String, u64)>) -> Environment {
    Environment {
        cores: host::cores(),
        memory_bytes: host::memory_bytes(),
        os: std::env::consts::OS.to_owned(),
        mongodb_version: versions.mongodb,
        mongodb_server: versions.mongodb_server,
        rabbitmq: versions.rabbitmq,
        commit: host::commit(),
        build: host::build().into(),
        peak_rss_bytes: processes.iter().map(|(_, b)| b).sum(),
        processes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: usize, alone: f64) -> (Round, usize, Ceiling) {
        let c = Ceiling {
            documents: 1,
            records_per_s: 1.0,
            data_alone_records_per_s: Some(1.0),
            note: String::new(),
        };
        let r = Round {
            round: n,
            records_per_s: alone,
            ceiling_records_per_s: (1.0, 1.0),
            data_alone_records_per_s: (1.0, 1.0),
            fraction_of_ceiling: alone,
            fraction_of_data_alone: alone,
            median: false,
        };
        (r, n, c)
    }

    #[test]
    fn the_median_round_is_marked_and_its_figures_taken_the_rounds_kept_in_order() {
        let (rounds, chosen) = median_round(vec![
            round(1, 0.9),
            round(2, 1.3),
            round(3, 0.7),
            round(4, 0.8),
            round(5, 1.0),
        ]);
        assert_eq!(chosen.map(|(n, _)| n), Some(1));
        let order: Vec<(usize, bool)> = rounds.iter().map(|r| (r.round, r.median)).collect();
        assert_eq!(
            order,
            [(1, true), (2, false), (3, false), (4, false), (5, false)]
        );
        // Of an even count, the lower of the two middle rounds.
        let (_, chosen) = median_round(vec![
            round(1, 0.9),
            round(2, 0.7),
            round(3, 1.1),
            round(4, 0.8),
        ]);
        assert_eq!(chosen.map(|(n, _)| n), Some(4));
        let (rounds, chosen) = median_round::<usize>(Vec::new());
        assert!(rounds.is_empty() && chosen.is_none());
    }

    #[test]
    fn a_rounds_ceiling_is_the_mean_of_the_one_before_and_the_one_after() {
        let c = |same: f64, alone: f64| Ceiling {
            documents: 24_000,
            records_per_s: same,
            data_alone_records_per_s: Some(alone),
            note: "raw".into(),
        };
        let mean = Ceiling::around(&c(8_000.0, 10_000.0), &c(10_000.0, 6_000.0));
        assert_eq!(mean.records_per_s, 9_000.0);
        assert_eq!(mean.data_alone_records_per_s, Some(8_000.0));
        assert!(mean.note.starts_with("raw; the mean"));
    }
}
