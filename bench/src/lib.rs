//! The mysimbdp workbench: runs scenarios against the real platform through its public HTTP
//! API and writes latency reports; the raw driver ceiling is measured in the same run.

pub mod deploy;
pub mod faults;
pub mod progress;
pub mod report;
pub mod scenario;

pub use report::{Report, compare};
pub use scenario::{Scenario, run};

/// Fails when a report shows failed ingestions, or lost or duplicated data.
pub fn check(report: &std::path::Path) -> anyhow::Result<()> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let mut problems = Vec::new();
    for path in ["batch", "stream"] {
        if let Some(f) = r[path]["failures"].as_u64().filter(|f| *f > 0) {
            problems.push(format!("{path}: {f} failed ingestions"));
        }
    }
    for f in r["faults"].as_array().into_iter().flatten() {
        for key in ["stream_lost", "stream_duplicated", "batch_lost"] {
            if let Some(n) = f[key].as_u64().filter(|n| *n > 0) {
                problems.push(format!(
                    "{}: {key} = {n}",
                    f["fault"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", problems.join("; "))
    }
}
