//! `scenario compare`: the headline figures of two reports side by side.

use std::path::Path;

use anyhow::{Context, Result};

/// A table of B/A ratios for the headline figures of two reports.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let load = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(p).with_context(
            || format!("cannot read {}", p.display()),
        )?)?)
    };
    let (ra, rb) = (load(a)?, load(b)?);
    let mut out = format!("{:<34} {:>14} {:>14} {:>9}\n", "figure", "A", "B", "B/A");
    for path in ["batch", "stream"] {
        for (field, label) in [
            ("throughput_per_s", "throughput /s"),
            ("ms_per_ingestion", "ms per ingestion"),
        ] {
            if let (Some(x), Some(y)) = (ra[path][field].as_f64(), rb[path][field].as_f64()) {
                out.push_str(&format!(
                    "{:<34} {x:>14.4} {y:>14.4} {:>9.3}\n",
                    format!("{path} {label}"),
                    y / x
                ));
            }
        }
        for (field, label) in [
            ("offered", "offered"),
            ("stored", "stored"),
            ("failed", "failed"),
            ("lost", "lost"),
        ] {
            if let (Some(x), Some(y)) = (
                ra[path]["accounting"][field].as_i64(),
                rb[path]["accounting"][field].as_i64(),
            ) {
                let ratio = if x == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.3}", y as f64 / x as f64)
                };
                out.push_str(&format!(
                    "{:<34} {x:>14} {y:>14} {ratio:>9}\n",
                    format!("{path} {label}")
                ));
            }
        }
        for q in ["p50_ms", "p99_ms", "p999_ms", "max_ms"] {
            if let (Some(x), Some(y)) = (
                ra[path]["latency"][q].as_f64(),
                rb[path]["latency"][q].as_f64(),
            ) {
                out.push_str(&format!(
                    "{:<34} {x:>14.3} {y:>14.3} {:>9.3}\n",
                    format!("{path} latency {q}"),
                    y / x.max(1e-9)
                ));
            }
        }
    }
    Ok(out)
}
