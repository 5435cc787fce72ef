//! The mysimbdp workbench: runs scenarios against the real platform through its public HTTP
//! API and writes latency reports; the raw driver ceiling is measured in the same run.

pub mod accounting;
pub mod deploy;
pub mod faults;
pub mod load;
pub mod progress;
pub mod report;
pub mod scenario;

pub use report::{Report, compare};
pub use scenario::{Scenario, run};

/// Fails when a report shows an offered input neither stored nor logged as failed, a
/// failure of a group that expects success, a load that did not finish, a platform error,
/// or (faults) data lost or stored twice: one line per tenant and path.
pub fn check(report: &std::path::Path) -> anyhow::Result<()> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let problems = accounting::problems(&r);
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "strict: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

/// Fails when the run itself did not complete: a load unfinished at its deadline or a
/// platform error (a component that died, a platform that did not stop). Checked with or
/// without `--strict`.
pub fn completed(report: &std::path::Path) -> anyhow::Result<()> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let mut out: Vec<String> = r["accounting"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some(format!(
                "{} {} {}: {}",
                a["phase"].as_str().unwrap_or("?"),
                a["tenant"].as_str().unwrap_or("?"),
                a["path"].as_str().unwrap_or("?"),
                a["unfinished"].as_str()?
            ))
        })
        .collect();
    for e in r["platform_errors"].as_array().into_iter().flatten() {
        out.push(format!(
            "platform: {}",
            accounting::condense(e.as_str().unwrap_or("?"))
        ));
    }
    if out.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("the run did not complete:\n  {}", out.join("\n  "))
    }
}
