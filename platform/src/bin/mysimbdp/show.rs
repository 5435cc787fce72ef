//! The client subcommands' answers as people read them: a line, a few lines, or a table.
//! `--json` prints the API's JSON answer instead (for scripts).

use mysimbdp::api::{
    AppUploaded, Consumers, CreatedTenant, DeadLetters, FileList, IngestStarted, Published,
    Replayed, StreamReportAnswer, StreamStatus, SummaryAnswer,
};
use mysimbdp::logs::status_str;
use mysimbdp::model::FileRecord;
use mysimbdp::tenants::Profile;

/// An answer with a view for people.
pub trait Show: serde::Serialize {
    fn show(&self) -> String;
}

/// Prints `answer`: its JSON with `json`, else its view.
pub fn print(answer: &impl Show, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
    } else {
        print!("{}", answer.show());
    }
}

/// Columns padded to their widest cell, two spaces apart, a header row first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A long text cut to `max` characters for a table cell.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

impl Show for CreatedTenant {
    fn show(&self) -> String {
        format!(
            "tenant {} created, database {}\ntoken (shown once): {}\n",
            self.name, self.database, self.token
        )
    }
}

impl Show for Profile {
    fn show(&self) -> String {
        let c = &self.constraints;
        let formats: Vec<String> = c.formats.iter().map(ToString::to_string).collect();
        let a = &c.app_limits;
        format!(
            "tenant        {}\ndatabase      {}\ndescription   {}\nauto_ingest   {}\nfiles         at most {} staged, {} bytes each, formats {}\napp limits    {} bytes of memory, {} ms, {} instructions, {} emits, {} bytes per document\ncreated       {}\n",
            self.name,
            self.database,
            self.description,
            self.auto_ingest,
            c.max_staged_files,
            c.max_file_bytes,
            formats.join(", "),
            a.memory_bytes,
            a.time_ms,
            a.instructions,
            a.max_emits,
            a.max_doc_bytes,
            self.created_at
        )
    }
}

impl Show for AppUploaded {
    fn show(&self) -> String {
        let defines: Vec<&str> = [
            ("map", self.functions.map),
            ("ingest", self.functions.ingest),
        ]
        .into_iter()
        .filter_map(|(name, has)| has.then_some(name))
        .collect();
        format!(
            "{} app version {} is active (defines {})\n",
            self.kind.as_str(),
            self.version,
            defines.join(" and ")
        )
    }
}

impl Show for FileRecord {
    fn show(&self) -> String {
        let error = self
            .error
            .as_deref()
            .map(|e| format!("; error: {e}"))
            .unwrap_or_default();
        format!(
            "{}: {}, {} bytes of {} into `{}`; records {} ok, {} failed, {} skipped, {} duplicate; documents {} stored{error}\n",
            self.name,
            self.state.as_str(),
            self.bytes,
            self.format,
            self.collection,
            self.records_ok,
            self.records_failed,
            self.records_skipped,
            self.records_duplicate,
            self.documents_stored,
        )
    }
}

impl Show for FileList {
    fn show(&self) -> String {
        if self.files.is_empty() {
            return "no staged files\n".into();
        }
        let rows: Vec<Vec<String>> = self
            .files
            .iter()
            .map(|f| {
                vec![
                    f.name.clone(),
                    f.state.as_str().into(),
                    f.format.to_string(),
                    f.bytes.to_string(),
                    f.records_ok.to_string(),
                    f.records_failed.to_string(),
                    f.records_skipped.to_string(),
                    f.records_duplicate.to_string(),
                    f.documents_stored.to_string(),
                    f.updated_at.clone(),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "STATE",
                "FORMAT",
                "BYTES",
                "OK",
                "FAILED",
                "SKIPPED",
                "DUPLICATE",
                "DOCUMENTS",
                "UPDATED",
            ],
            &rows,
        )
    }
}

impl Show for IngestStarted {
    fn show(&self) -> String {
        format!("ingesting {} (run {})\n", self.job, self.file.job)
    }
}

impl Show for Published {
    fn show(&self) -> String {
        format!("published {} messages\n", self.published)
    }
}

impl Show for Consumers {
    fn show(&self) -> String {
        format!("{} consumers running\n", self.consumers)
    }
}

impl Show for StreamStatus {
    fn show(&self) -> String {
        let target = match self.target {
            Some(t) if t.min == t.max => format!("{} per stream manager", t.min),
            Some(t) => format!("{} to {} per stream manager", t.min, t.max),
            None => "none (stopped)".into(),
        };
        let l = &self.logged;
        format!(
            "{} consumers running here; target: {target}\nlogged: {} stored, {} duplicates, {} failed, {} skipped\n",
            self.consumers, l.stored, l.duplicates, l.failed, l.skipped
        )
    }
}

impl Show for StreamReportAnswer {
    fn show(&self) -> String {
        let mut out = periods_table(self);
        if !self.scaling.is_empty() {
            let rows: Vec<Vec<String>> = self
                .scaling
                .iter()
                .map(|d| {
                    vec![
                        d.at.clone(),
                        d.replica.clone(),
                        format!("{} -> {}", d.from, d.to),
                        d.queue_depth.to_string(),
                        d.reason.clone(),
                    ]
                })
                .collect();
            out.push_str("\nconsumer changes:\n");
            out.push_str(&table(
                &["AT", "MANAGER", "CONSUMERS", "QUEUE", "WHY"],
                &rows,
            ));
        }
        out
    }
}

/// The report's periods as a table.
fn periods_table(r: &StreamReportAnswer) -> String {
    if r.periods.is_empty() {
        return format!("no stream ingestion logged for {}\n", r.tenant);
    }
    let rows: Vec<Vec<String>> = r
        .periods
        .iter()
        .map(|p| {
            vec![
                p.period_start.clone(),
                p.messages.to_string(),
                p.failures.to_string(),
                p.duplicates.to_string(),
                p.skipped.to_string(),
                p.bytes.to_string(),
                format!("{:.2}", p.avg_ingestion_ms),
                format!("{:.2}", p.p99_ingestion_ms),
            ]
        })
        .collect();
    table(
        &[
            "PERIOD",
            "MESSAGES",
            "FAILURES",
            "DUPLICATES",
            "SKIPPED",
            "BYTES",
            "AVG_MS",
            "P99_MS",
        ],
        &rows,
    )
}

impl Show for DeadLetters {
    fn show(&self) -> String {
        if self.dead_letters.is_empty() {
            return "no dead letters\n".into();
        }
        let rows: Vec<Vec<String>> = self
            .dead_letters
            .iter()
            .map(|d| {
                vec![
                    d.message_id.clone().unwrap_or_default(),
                    d.data_name.clone().unwrap_or_default(),
                    d.bytes.to_string(),
                    d.replays.to_string(),
                    clip(d.reason.as_deref().unwrap_or(""), 80),
                ]
            })
            .collect();
        let mut out = table(
            &["MESSAGE_ID", "DATA_NAME", "BYTES", "REPLAYS", "REASON"],
            &rows,
        );
        if self.more {
            out.push_str("(more dead letters follow: raise --limit)\n");
        }
        out
    }
}

impl Show for Replayed {
    fn show(&self) -> String {
        format!("moved {} dead letters back to the queue\n", self.replayed)
    }
}

impl Show for SummaryAnswer {
    fn show(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.bucket.clone(),
                    g.tenant.clone(),
                    status_str(g.status).into(),
                    g.count.to_string(),
                    g.bytes.to_string(),
                    clip(g.reason.as_deref().unwrap_or(""), 60),
                ]
            })
            .collect();
        let mut out = format!("{} log entries\n", self.entries);
        if !rows.is_empty() {
            out.push_str(&table(
                &["BUCKET", "TENANT", "STATUS", "COUNT", "BYTES", "REASON"],
                &rows,
            ));
        }
        out
    }
}

/// What `logs` did: the file it wrote.
#[derive(serde::Serialize)]
pub struct Written {
    pub out: String,
    pub bytes: usize,
}

impl Show for Written {
    fn show(&self) -> String {
        format!("wrote {} bytes to {}\n", self.bytes, self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_to_the_widest_cell() {
        let t = table(
            &["NAME", "N"],
            &[
                vec!["a".into(), "10".into()],
                vec!["long".into(), "2".into()],
            ],
        );
        assert_eq!(t, "NAME  N\na     10\nlong  2\n");
    }

    #[test]
    fn long_cells_are_clipped() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }
}
