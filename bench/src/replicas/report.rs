//! The replicas scenario's report: `report.md`'s tables and `elastic.svg`.

use anyhow::Result;
use mysimbdp::infra::ServerVersions;

use crate::host;
use crate::report::{Line, over_time};
use crate::schema::Scenario;

use super::elastic::{ElasticFigures, Sample, timeline};
use super::kill::KillFigures;
use super::throughput::ThroughputStep;

/// An `accounting` entry for each throughput step, and the load step, whose messages did
/// not all reach the log: what `scenario run` fails on.
pub(super) fn unfinished_steps(
    steps: &[ThroughputStep],
    elastic: &ElasticFigures,
) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = steps
        .iter()
        .filter_map(|s| {
            Some(serde_json::json!({
                "phase": format!("throughput, {} stream managers", s.managers),
                "tenant": format!("tp{}", s.managers),
                "path": "stream",
                "unfinished": s.unfinished.as_ref()?,
            }))
        })
        .collect();
    if elastic.logged < elastic.published {
        out.push(serde_json::json!({
            "phase": "elastic",
            "tenant": "elastic",
            "path": "stream",
            "unfinished": format!("{} of {} confirmed messages in the log when sampling ended", elastic.logged, elastic.published),
        }));
    }
    out
}

pub(super) fn environment(
    versions: &ServerVersions,
    sc: &Scenario,
    load_before: Option<f64>,
) -> serde_json::Value {
    serde_json::json!({
        "mongodb_version": versions.mongodb,
        "mongodb_server": versions.mongodb_server,
        "rabbitmq": versions.rabbitmq,
        "cores": host::cores(),
        "memory_bytes": host::memory_bytes(),
        "commit": host::commit(),
        "build": host::build(),
        "stream_batch_size": sc.platform.stream_batch_size,
        "prefetch": sc.platform.prefetch,
        "load_average_before": load_before,
    })
}

/// The queue's depth and the consumers over the load step.
pub(super) fn elastic_svg(e: &ElasticFigures) -> Result<String> {
    let ready: Vec<(f64, f64)> = e
        .samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.ready? as f64)))
        .collect();
    let consumers: Vec<(f64, f64)> = e
        .samples
        .iter()
        .filter_map(|s| Some((s.t_s, f64::from(s.consumers?))))
        .collect();
    over_time(
        "load step: queue depth and consumers",
        &Line {
            name: "messages ready",
            points: &ready,
        },
        &Line {
            name: "consumers (all managers)",
            points: &consumers,
        },
    )
}

pub(super) fn throughput_table(steps: &[ThroughputStep]) -> String {
    let mut md = String::from(
        "| stream managers | consumers | messages | published in s | in the log in s | messages/s | vs 1 manager | load average |\n|---|---|---|---|---|---|---|---|\n",
    );
    let base = steps.first().map_or(0.0, |s| s.per_s);
    for s in steps {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.2}× | {} |\n",
            s.managers,
            s.consumers,
            s.messages,
            s.publish_s,
            s.stored_s,
            s.per_s,
            if base > 0.0 { s.per_s / base } else { 0.0 },
            s.load_average.map_or("?".into(), |l| format!("{l:.1}")),
        ));
    }
    for s in steps {
        for e in &s.errors {
            md.push_str(&format!("\n- {} managers: {e}", s.managers));
        }
        if let Some(u) = &s.unfinished {
            md.push_str(&format!("\n- {} managers: unfinished: {u}", s.managers));
        }
    }
    md
}

pub(super) fn kill_table(f: &KillFigures) -> String {
    let mut md = format!(
        "{}, {:.1} s into the load: {} file(s) ingesting ({} records read), {} of {} confirmed messages in the log. Every input accounted for {:.1} s after the kill; {} publish requests retried on another stream manager.\n\n| path | offered | stored | failed | lost | duplicated | stored, no log entry |\n|---|---|---|---|---|---|---|\n",
        f.fault,
        f.at_kill.after_s,
        f.at_kill.files_ingesting,
        f.at_kill.records_read,
        f.at_kill.messages_logged,
        f.at_kill.messages_confirmed,
        f.recovered_s,
        f.publish_retries,
    );
    for (path, c, dup, unlogged) in [
        ("batch", &f.batch, f.batch_duplicated, f.batch_unlogged),
        ("stream", &f.stream, f.stream_duplicated, f.stream_unlogged),
    ] {
        md.push_str(&format!(
            "| {path} | {} | {} | {} | {} | {dup} | {unlogged} |\n",
            c.offered, c.stored, c.failed, c.lost
        ));
    }
    md.push_str(&format!(
        "\nLog entries written twice: {}. Lost: offered − stored − failed − skipped (negative: counted twice). Duplicated: `duplicate` entries (an input another ingestion had stored). Batch \"no log entry\": records of a file's run that no entry names; stream: stored messages no entry names.\n",
        f.logged_twice
    ));
    md
}

pub(super) fn elastic_tables(e: &ElasticFigures) -> String {
    let s = &e.summary;
    let mut md = format!(
        "{} stream managers ({}), each running {} to {} consumers of the tenant's queue. The queue's consumers, as the broker counts them: from {} to {} (first above where they started at {}, back there after the peak at {}); deepest queue {} ready messages. {} of {} confirmed messages in the log at the end.\n\n",
        e.managers.len(),
        e.managers.join(", "),
        e.min_consumers,
        e.max_consumers,
        s.min_total,
        s.peak_total,
        s.scaled_up_at_s
            .map_or("never".into(), |t| format!("{t:.0} s")),
        s.back_down_at_s
            .map_or("never".into(), |t| format!("{t:.0} s")),
        s.max_ready,
        e.logged,
        e.published,
    );
    md.push_str("The controller's decisions (from `GET …/stream/report`, `scaling`):\n\n| s | manager | consumers | queue depth | reason |\n|---|---|---|---|---|\n");
    for d in &e.decisions {
        md.push_str(&format!(
            "| {:.1} | {} | {} → {} | {} | {} |\n",
            d.t_s,
            d.manager,
            d.decision.from,
            d.decision.to,
            d.decision
                .queue_depth
                .map_or_else(|| "–".to_owned(), |q| q.to_string()),
            d.decision.reason
        ));
    }
    if e.decisions.is_empty() {
        md.push_str("| – | – | – | – | none reported |\n");
    }
    md.push_str(&format!("\nOnce a second: ready (messages waiting in the queue, not those delivered and unacknowledged) and consumers as the broker counts them; consumers per manager ({}) by the managers' own decisions; published and in the log per second, the latter by the stamps of the log's entries:\n\n| s | offered /s | published /s | in the log /s | ready | consumers | per manager | decisions |\n|---|---|---|---|---|---|---|---|\n", e.managers.join(" / ")));
    let rows = timeline(&e.samples, &e.decisions);
    let mut before: Option<&Sample> = None;
    for (smp, ds) in e.samples.iter().zip(rows) {
        let dt = (smp.t_s - before.map_or(0.0, |b| b.t_s)).max(1e-9);
        let published = smp.published - before.map_or(0, |b| b.published);
        let per_s = |n: u64| format!("{:.0}", n as f64 / dt);
        let (published, logged) = (per_s(published), per_s(smp.logged));
        md.push_str(&format!(
            "| {:.0} | {} | {published} | {logged} | {} | {} | {} | {} |\n",
            smp.t_s,
            smp.offered_per_s,
            smp.ready.map_or("?".into(), |r| r.to_string()),
            smp.consumers.map_or("?".into(), |n| n.to_string()),
            smp.per_manager
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            ds.iter()
                .map(|d| format!("{} {}→{}", d.manager, d.decision.from, d.decision.to))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        before = Some(smp);
    }
    for err in &e.errors {
        md.push_str(&format!("\n- {err}"));
    }
    md
}

pub(super) fn markdown(
    sc: &Scenario,
    run_id: &str,
    versions: &ServerVersions,
    steps: &[ThroughputStep],
    killed: &KillFigures,
    elastic: &ElasticFigures,
    load_before: Option<f64>,
) -> String {
    format!(
        "# Scenario `{}` — run {run_id}\n\n{}\n\nPlatform: coredms, batch and stream managers as processes of their own ({} build, commit {}, {} cores); database: {}; broker: {}. Stream batches of {}, prefetch {}; settings: {}. Load average (1 min) before the run: {} (it counts whatever else the machine was running).\n\n## Throughput by stream managers\n\nThe same closed-loop load on a fresh tenant each time; messages/s from the first publish until the log held every confirmed message.\n\n{}\n\n## Managers killed under load\n\n{}\n## The elastic controller under a load step\n\n![queue depth and consumers](elastic.svg)\n\n{}\n",
        sc.name,
        sc.description,
        host::build(),
        host::commit(),
        host::cores(),
        versions.mongodb_server,
        versions.rabbitmq,
        sc.platform.stream_batch_size,
        sc.platform.prefetch,
        sc.replicas
            .as_ref()
            .filter(|r| !r.set.is_empty())
            .map_or_else(
                || "defaults".to_owned(),
                |r| format!("`{}`", r.set.join("`, `"))
            ),
        load_before.map_or("?".into(), |l| format!("{l:.1}")),
        throughput_table(steps),
        kill_table(killed),
        elastic_tables(elastic),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throughput_table_sets_each_count_beside_one_manager() {
        let step = |managers, per_s| ThroughputStep {
            managers,
            consumers: managers as u32,
            messages: 4000,
            publish_s: 1.0,
            stored_s: 4000.0 / per_s,
            per_s,
            load_average: Some(1.5),
            errors: vec![],
            unfinished: None,
        };
        let md = throughput_table(&[step(1, 800.0), step(2, 1200.0), step(3, 1000.0)]);
        let rows: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].ends_with("| 800 | 1.00× | 1.5 |"), "{}", rows[0]);
        assert!(rows[1].ends_with("| 1200 | 1.50× | 1.5 |"), "{}", rows[1]);
        assert!(rows[2].ends_with("| 1000 | 1.25× | 1.5 |"), "{}", rows[2]);
    }
}
