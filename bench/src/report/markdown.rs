//! `report.md`: the figures as tables, for people.

use super::{ORIGINAL_BATCH_MS, ORIGINAL_STREAM_MS, Report, Side};
use crate::schema::Topology;

impl Report {
    pub(super) fn markdown(&self) -> String {
        let e = &self.environment;
        let mut s = format!(
            "# Scenario `{}` — run {}\n\n{}\n\n## Environment\n\n| | |\n|---|---|\n| cores | {} |\n| memory | {:.1} GiB |\n| MongoDB server | {} (buildInfo version {}) |\n| RabbitMQ | {} |\n| commit | {} ({} build) |\n| platform topology | {} |\n| peak RSS | {:.0} MiB ({}) |\n\n## Results\n\n| path | offered | stored | failed | lost | throughput /s | ms per ingestion | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | original ms | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.scenario.name,
            self.run_id,
            self.scenario.description,
            e.cores,
            e.memory_bytes as f64 / (1u64 << 30) as f64,
            e.mongodb_server,
            e.mongodb_version,
            e.rabbitmq,
            e.commit,
            e.build,
            match self.scenario.platform.topology {
                Topology::InProcess => "in-process (one process: platform + load)",
                Topology::Separate =>
                    "separate processes (coredms, batch, stream; the load in the runner)",
            },
            e.peak_rss_bytes as f64 / (1u64 << 20) as f64,
            e.processes
                .iter()
                .map(|(n, b)| format!("{n} {:.0} MiB", *b as f64 / (1u64 << 20) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (name, p, orig) in [
            ("batch", &self.batch, ORIGINAL_BATCH_MS),
            ("stream", &self.stream, ORIGINAL_STREAM_MS),
        ] {
            if let Some(p) = p {
                let l = &p.latency;
                let (offered, lost) = p.accounting.as_ref().map_or(("?".into(), "?".into()), |c| {
                    (c.offered.to_string(), c.lost.to_string())
                });
                s.push_str(&format!(
                    "| {name} | {offered} | {} | {} | {lost} | {:.0} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {orig} | {:.0}× |\n",
                    p.count, p.failures, p.throughput_per_s, p.ms_per_ingestion, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms,
                    orig / p.ms_per_ingestion
                ));
            }
        }
        match self.scenario.stream.as_ref() {
            Some(st) if st.concurrency > 0 => s.push_str(&format!(
                "\nBatch latency: record read → stored. Stream latency: publish → stored, closed loop with {} publishers per tenant (not corrected: a closed loop has no intended schedule)",
                st.concurrency
            )),
            _ => s.push_str("\nBatch latency: record read → stored. Stream latency: publish → stored, corrected for coordinated omission at the offered rate"),
        }
        if let Some(u) = self.stream.as_ref().and_then(|p| p.uncorrected.as_ref()) {
            s.push_str(&format!(
                " (uncorrected p50 {:.2} ms, p99 {:.2} ms)",
                u.p50_ms, u.p99_ms
            ));
        }
        s.push('.');
        if let Some(r) = &self.stream_rate {
            s.push_str(&format!(
                " Offered rate {}/s per tenant: {} of the {:.0} messages/s the platform stored in a closed loop measured first in this run (phase `closed loop` under Groups).",
                r.rate, r.fraction, r.closed_loop_per_s
            ));
            if r.closed_loop_peak_rss_bytes > 0 {
                s.push_str(&format!(
                    " Peak RSS (Environment) is of what followed the closed loop; the closed loop's own: {:.0} MiB.",
                    r.closed_loop_peak_rss_bytes as f64 / (1u64 << 20) as f64
                ));
            } else {
                s.push_str(" Peak RSS (Environment) may include the closed loop's.");
            }
        }
        s.push_str("\n\n\"ms per ingestion\" is wall time divided by ingestions, as the original measured it: it is the platform's capacity only when the offered load exceeds it (the seed scenarios); at a sustainable fixed rate it reflects the rate.\n");
        if let Some(f) = self.batch.as_ref().and_then(|p| p.per_file.as_ref()) {
            s.push_str(&format!(
                "\nPer file (ingest request → done): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n",
                f.p50_ms, f.p99_ms, f.max_ms
            ));
        }
        if let (Some(c), Some(f)) = (&self.ceiling, self.batch_fraction_of_ceiling) {
            let median = self.rounds.iter().find(|r| r.median).map_or(String::new(), |r| {
                format!(
                    "The median round's figures (round {}; every round is under Rounds below). ",
                    r.round
                )
            });
            s.push_str(&format!(
                "\n## Ceiling\n\n{median}Raw driver on the same server in the same run: {:.0} records/s ({}). The platform's batch path reached {:.0}% of it.\n",
                c.records_per_s,
                c.note,
                f * 100.0
            ));
            if let (Some(alone), Some(fa)) = (
                c.data_alone_records_per_s,
                self.batch_fraction_of_data_alone,
            ) {
                s.push_str(&format!(
                    "\nThe records alone, no log (a loader that keeps no record of its inputs): {alone:.0} records/s; the platform, logging every input, reached {:.0}% of that.\n",
                    fa * 100.0
                ));
            }
        }
        s.push_str(&self.rounds_md());
        s.push_str(&self.stream_raw_md());
        s.push_str(if self.rounds.is_empty() {
            "\nEach second of the run (inputs completed, p50 and p99): `series.svg`, and `series` in report.json.\n"
        } else {
            "\nEach second of the median round (inputs completed, p50 and p99): `series.svg`, and `series` in report.json.\n"
        });
        s.push_str(&self.accounting_md());
        s
    }

    /// Each round of a scenario run several times, and the spread of its ratios.
    fn rounds_md(&self) -> String {
        if self.rounds.is_empty() {
            return String::new();
        }
        let mut s = format!(
            "\n## Rounds\n\nThe load ran {} times, each round with tenants of its own, the raw driver's ceilings measured just before and just after it; each round's ratios are to the mean of the two. The figures above are the median round's, by its ratio to the records alone.\n\n| round | platform records/s | raw, same writes (before / after) | raw, records alone (before / after) | ratio to same writes | ratio to records alone |\n|---|---|---|---|---|---|\n",
            self.rounds.len()
        );
        for r in &self.rounds {
            s.push_str(&format!(
                "| {}{} | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.2} |\n",
                r.round,
                if r.median { " (median)" } else { "" },
                r.records_per_s,
                r.ceiling_records_per_s.0,
                r.ceiling_records_per_s.1,
                r.data_alone_records_per_s.0,
                r.data_alone_records_per_s.1,
                r.fraction_of_ceiling,
                r.fraction_of_data_alone
            ));
        }
        let spread = |f: fn(&super::Round) -> f64| {
            let mut v: Vec<f64> = self.rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            // The lower middle of an even count, as the median round is chosen.
            let median = v[(v.len() - 1) / 2];
            format!("median {median:.2}, {:.2}–{:.2}", v[0], v[v.len() - 1])
        };
        s.push_str(&format!(
            "\nOver the rounds, the ratio to the records alone: {}; to the same writes: {} (each median taken on its own: the median round by the first need not be the median by the second). Each ceiling is the arithmetic mean of its two measurements, which is at least their harmonic mean (the rate of the two taken as one run): if anything it sets the ceiling high.\n",
            spread(|r| r.fraction_of_data_alone),
            spread(|r| r.fraction_of_ceiling)
        ));
        s
    }

    /// The raw stream pipeline and the stream path's ratios to it.
    fn stream_raw_md(&self) -> String {
        let (Some(r), Some(v)) = (&self.stream_raw, &self.stream_vs_raw) else {
            return String::new();
        };
        format!(
            "\n## Raw stream pipeline\n\nThe same messages on the same schedule in the same run, without the platform ({}).\n\n| | stored | throughput /s | p50 ms | p99 ms | p99.9 ms | uncorrected p99 ms |\n|---|---|---|---|---|---|---|\n| raw pipeline | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |\n\nThe platform's stream path: {:.2}× the raw throughput; p50 {:.2}× ({:+.2} ms); p99 {:.2}×.\n",
            r.note,
            r.messages,
            r.throughput_per_s,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.uncorrected.p99_ms,
            v.throughput_ratio,
            v.p50_ratio,
            v.p50_excess_ms,
            v.p99_ratio
        )
    }

    /// The groups (with both phases, side by side), every tenant's accounting, the problems.
    fn accounting_md(&self) -> String {
        let mut s = String::new();
        let grouped = self.phases.len() > 1 || self.phases.iter().any(|p| p.groups.len() > 1);
        if !self.baseline.is_empty() {
            s.push_str("\n## Well-behaved tenants alone and beside the others\n\nThe groups that expect success, first alone (phase `baseline`), then with every other group running at the same time (phase `mixed`), in the same run.\n\n| group | path | alone stored/s | alone p99 ms | mixed stored/s | mixed p99 ms | throughput mixed/alone | p99 mixed/alone |\n|---|---|---|---|---|---|---|---|\n");
            let fin = |x: &Side| if x.finished { "" } else { " (unfinished)" };
            for r in &self.baseline {
                s.push_str(&format!(
                    "| {} | {} | {:.0}{} | {:.2} | {:.0}{} | {:.2} | {:.2} | {:.2} |\n",
                    r.group,
                    r.path,
                    r.alone.throughput_per_s,
                    fin(&r.alone),
                    r.alone.p99_ms,
                    r.mixed.throughput_per_s,
                    fin(&r.mixed),
                    r.mixed.p99_ms,
                    r.throughput_ratio,
                    r.p99_ratio
                ));
            }
        }
        if grouped {
            s.push_str("\n## Groups\n\n| phase | group | expect | tenants | path | offered | stored | failed | lost | stored/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            for p in &self.phases {
                for g in &p.groups {
                    for (path, st) in [("batch", &g.batch), ("stream", &g.stream)] {
                        let Some(st) = st else { continue };
                        let c = st.accounting.clone().unwrap_or_default();
                        s.push_str(&format!(
                            "| {} | {} | {} | {} | {path} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} |\n",
                            p.name,
                            g.group,
                            g.expect.as_str(),
                            g.tenants,
                            c.offered,
                            c.stored,
                            c.failed,
                            c.lost,
                            st.throughput_per_s,
                            st.latency.p50_ms,
                            st.latency.p99_ms
                        ));
                    }
                }
            }
        }
        if !self.accounting.is_empty() {
            s.push_str("\n## Accounting\n\nPer tenant and path: offered (accepted by the platform: rows of the files whose ingestion it started, messages whose publish it confirmed), refused (turned away at the door), stored (inputs with a document in the tenant's database), failed (failure entries in its log), lost = offered − stored − failed (negative: counted twice), documents found and success/duplicate log entries.\n\n| phase | tenant | expect | path | offered | refused | stored | failed | lost | documents | logged stored | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            for a in &self.accounting {
                let c = &a.counts;
                let mut notes: Vec<String> = Vec::new();
                if let Some(u) = &a.unfinished {
                    notes.push(format!("unfinished: {u}"));
                }
                notes.extend(a.files_failed.iter().map(|f| format!("file {f}")));
                notes.extend(a.errors.iter().cloned());
                notes.extend(a.refusals.iter().cloned());
                if let Some((r, n)) = a.reasons.first() {
                    notes.push(format!("top failure ({n}×): {r}"));
                }
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    a.phase,
                    a.tenant,
                    a.expect.as_str(),
                    a.path,
                    c.offered,
                    c.refused,
                    c.stored,
                    c.failed,
                    c.lost,
                    c.documents,
                    c.logged_stored,
                    notes.join("; ").replace('|', "\\|").replace('\n', " ")
                ));
            }
        }
        if !self.platform_errors.is_empty() {
            s.push_str("\n## Platform errors\n\n");
            for e in &self.platform_errors {
                s.push_str(&format!("```\n{e}\n```\n"));
            }
        }
        s.push_str("\n## Strict check\n\n");
        if self.problems.is_empty() {
            s.push_str("Pass: every offered input was stored or, for groups that expect failures, logged as failed.\n");
        } else {
            for p in &self.problems {
                s.push_str(&format!("- {}\n", p.replace('\n', " ")));
            }
        }
        s
    }
}
