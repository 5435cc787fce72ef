//! One phase: its tenants provisioned, their load driven on every path at once, then each
//! tenant's path accounted for and the groups' figures added up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mysimbdp::client::Client;
use mysimbdp::tenants::AdminPatch;

use super::PhaseSpec;
use super::look::{Looked, look};
use crate::accounting::{self, Counts, Tally, TenantAccount};
use crate::dataset::GroupFiles;
use crate::load::{self, PathRun, TenantCtx};
use crate::progress::Progress;
use crate::report::{GroupReport, PathParts, PhaseReport};
use crate::schema::{Expect, GroupPlan, PathKind, Scenario};

/// One phase's figures.
pub(super) struct PhaseOutcome {
    pub(super) report: PhaseReport,
    pub(super) accounts: Vec<TenantAccount>,
    /// The groups that expect success, added up.
    pub(super) batch: Option<PathParts>,
    pub(super) stream: Option<PathParts>,
}

pub(super) async fn run_phase(
    sc: &Scenario,
    plans: &[GroupPlan],
    ph: &PhaseSpec,
    admin: &Client,
    db: &mongodb::Client,
) -> Result<PhaseOutcome> {
    let tenants = tenants(plans, ph, admin).await?;
    let (runs, load_elapsed) = drive(sc, plans, ph, &tenants).await?;
    let looked = look(&tenants, plans, &runs, db).await;
    Ok(account(plans, ph, &tenants, runs, &looked, load_elapsed))
}

/// The phase's tenants, each with its group's app, as (group index, tenant).
async fn tenants(
    plans: &[GroupPlan],
    ph: &PhaseSpec,
    admin: &Client,
) -> Result<Vec<(usize, TenantCtx)>> {
    let mut tenants: Vec<(usize, TenantCtx)> = Vec::new();
    for &gi in &ph.groups {
        let g = &plans[gi];
        for i in 0..g.count {
            let name = format!("{}{}{}{i}", ph.prefix, g.name, g.separator);
            let t = load::bounded(
                Duration::from_secs(60),
                admin.create_tenant(&name, AdminPatch::default()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot create tenant {name}: {e}"))?;
            let client = admin.with_token(Some(&t.token));
            let mut whole_file = false;
            if let Some(src) = g.app.source() {
                for kind in ["batch", "stream"] {
                    let v = load::bounded(
                        Duration::from_secs(60),
                        client.upload_app(&t.name, kind, src),
                    )
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("group `{}`: the {kind} app was not accepted: {e}", g.name)
                    })?;
                    if kind == "batch" {
                        whole_file = !v.functions.map;
                    }
                }
            }
            tenants.push((
                gi,
                TenantCtx {
                    name: t.name,
                    database: t.database,
                    client,
                    whole_file,
                },
            ));
        }
    }
    Ok(tenants)
}

/// Every tenant's load on every path at once, bounded by the scenario's timeout: what each
/// did, and how long the load took.
async fn drive(
    sc: &Scenario,
    plans: &[GroupPlan],
    ph: &PhaseSpec,
    tenants: &[(usize, TenantCtx)],
) -> Result<(Vec<(usize, PathKind, PathRun)>, Duration)> {
    let mut files = HashMap::new();
    for &gi in &ph.groups {
        if let Some(b) = &plans[gi].batch {
            files.insert(gi, Arc::new(GroupFiles::new(b, b.files)?));
        }
    }
    let (mut batch_total, mut stream_total) = (0u64, 0u64);
    for (gi, t) in tenants {
        if let Some(f) = files.get(gi) {
            batch_total += if t.whole_file {
                f.records.len() as u64
            } else {
                f.records.iter().sum()
            };
        }
        if let Some(s) = &plans[*gi].stream {
            stream_total += u64::from(s.messages);
        }
    }
    let mut tracks = Vec::new();
    if files.values().next().is_some() {
        tracks.push(("batch", batch_total));
    }
    if ph.groups.iter().any(|&gi| plans[gi].stream.is_some()) {
        tracks.push(("stream", stream_total));
    }
    if ph.name != "main" {
        eprintln!(
            "phase {}: {} tenants ({})",
            ph.name,
            tenants.len(),
            ph.groups
                .iter()
                .map(|&gi| format!("{} {}", plans[gi].count, plans[gi].name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let progress = Progress::new(&tracks);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(sc.timeout_s);
    let mut drivers = Vec::new();
    // The batch tenants ask for their first ingestion together, once all have uploaded.
    let batch_tenants = tenants.iter().filter(|(gi, _)| files.contains_key(gi));
    let uploaded = load::UploadGate::new(batch_tenants.count());
    for (ti, (gi, t)) in tenants.iter().enumerate() {
        if let Some(f) = files.get(gi) {
            let fut = load::drive_batch(
                t.clone(),
                f.clone(),
                uploaded.arrival(),
                (started, deadline),
                progress.clone(),
            );
            drivers.push((ti, PathKind::Batch, tokio::spawn(fut)));
        }
        if let Some(s) = &plans[*gi].stream {
            let fut = load::drive_stream(t.clone(), s.clone(), started, deadline, progress.clone());
            drivers.push((ti, PathKind::Stream, tokio::spawn(fut)));
        }
    }
    let mut runs: Vec<(usize, PathKind, PathRun)> = Vec::new();
    for (ti, kind, d) in drivers {
        let run = d.await.unwrap_or_else(|e| PathRun {
            errors: vec![format!("the load driver failed: {e}")],
            unfinished: Some("the load driver failed".into()),
            ..PathRun::default()
        });
        runs.push((ti, kind, run));
    }
    progress.finish();
    Ok((runs, started.elapsed()))
}

/// Each tenant's path accounted for from what was found, and the figures of the groups and
/// of the groups that expect success added up.
fn account(
    plans: &[GroupPlan],
    ph: &PhaseSpec,
    tenants: &[(usize, TenantCtx)],
    runs: Vec<(usize, PathKind, PathRun)>,
    looked: &[Looked],
    load_elapsed: Duration,
) -> PhaseOutcome {
    let mut accounts = Vec::new();
    let mut parts: Vec<(usize, PathKind, PathParts)> = Vec::new();
    for (ti, kind, r) in runs {
        let (gi, t) = &tenants[ti];
        let g = &plans[*gi];
        let (found, log) = &looked[ti];
        let mut errors = r.errors.clone();
        let empty = Tally::default();
        let tally = match (log, kind) {
            (Ok(l), PathKind::Batch) => &l.batch,
            (Ok(l), PathKind::Stream) => &l.stream,
            (Err(e), _) => {
                errors.push(format!("cannot read its log: {e}"));
                &empty
            }
        };
        let (stored, documents) = match (found, kind) {
            (Ok(f), PathKind::Batch) => (f.batch_stored, f.batch_documents),
            (Ok(f), PathKind::Stream) => (f.stream_stored, f.stream_documents),
            (Err(e), _) => {
                errors.push(format!("cannot read its database: {e}"));
                (0, 0)
            }
        };
        let counts = Counts {
            offered: r.offered,
            refused: r.refused,
            stored,
            failed: tally.failure,
            skipped: tally.skipped,
            lost: 0,
            documents,
            logged_stored: tally.success + tally.duplicate,
        }
        .settle();
        // Timed from where the work could begin to the last input logged: see
        // `PathParts::timed`. Uploads, all made before the first ingest request, are the
        // client's, as a loader's reading of its file is not timed.
        let span = r.started_ms.zip(tally.last_ms);
        let elapsed = PathParts::timed(r.elapsed, span);
        let a = TenantAccount {
            phase: ph.name.clone(),
            group: g.name.clone(),
            tenant: t.name.clone(),
            path: kind.as_str().into(),
            expect: g.expect,
            counts: counts.clone(),
            files_failed: accounting::failed_files(&r.files),
            unfinished: r.unfinished.clone(),
            errors,
            refusals: r.refusals.clone(),
            reasons: tally.top_reasons(3),
            elapsed_s: elapsed.as_secs_f64(),
        };
        if let Some(u) = &a.unfinished {
            eprintln!("  {} {}: unfinished: {u}", a.tenant, a.path);
        }
        accounts.push(a);
        let p = PathParts {
            counts,
            ran: r.elapsed,
            span,
            latency: tally.latency.clone(),
            per_file: r.file_hist,
            uncorrected: (kind == PathKind::Stream).then(|| tally.uncorrected.clone()),
            series: tally.series.clone(),
        };
        match parts.iter_mut().find(|(x, k, _)| *x == *gi && *k == kind) {
            Some((_, _, q)) => q.add(&p),
            None => parts.push((*gi, kind, p)),
        }
    }
    let mut headline: [Option<PathParts>; 2] = [None, None];
    for (gi, kind, p) in &parts {
        if plans[*gi].expect != Expect::Success {
            continue;
        }
        let slot = &mut headline[usize::from(*kind == PathKind::Stream)];
        match slot {
            Some(h) => h.add(p),
            None => *slot = Some(p.clone()),
        }
    }
    let groups = ph
        .groups
        .iter()
        .map(|&gi| {
            let stats = |k: PathKind| {
                parts
                    .iter()
                    .find(|(x, kind, _)| *x == gi && *kind == k)
                    .map(|(_, _, p)| p.stats())
            };
            GroupReport {
                group: plans[gi].name.clone(),
                expect: plans[gi].expect,
                tenants: plans[gi].count,
                batch: stats(PathKind::Batch),
                stream: stats(PathKind::Stream),
            }
        })
        .collect();
    let [batch, stream] = headline;
    PhaseOutcome {
        report: PhaseReport {
            name: ph.name.clone(),
            elapsed_s: load_elapsed.as_secs_f64(),
            groups,
        },
        accounts,
        batch,
        stream,
    }
}
