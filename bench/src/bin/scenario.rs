//! `scenario`: run a workload scenario against the platform and write its report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "mysimbdp workbench: scenarios, latency reports, comparisons"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file; needs MONGODB_URI and AMQP_URI (or Docker).
    Run {
        scenario: PathBuf,
        #[arg(long, default_value = "reports")]
        out: PathBuf,
        /// Exit non-zero if any ingestion failed, or any record or message was lost or
        /// stored twice (CI runs scenarios this way).
        #[arg(long)]
        strict: bool,
    },
    /// List the scenarios in a folder.
    List {
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
    },
    /// Ratios between two report.json files (B/A).
    Compare { a: PathBuf, b: PathBuf },
    /// Run one platform component exactly as `mysimbdp serve` does: the runner starts the
    /// `separate` topology this way, so it needs no second binary.
    #[command(hide = true)]
    Serve {
        #[arg(value_enum)]
        component: mysimbdp::Component,
        #[arg(long = "set")]
        set: Vec<String>,
    },
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run {
            scenario,
            out,
            strict,
        } => {
            let dir = mysimbdp_bench::run(&scenario, &out).await?;
            let md = std::fs::read_to_string(dir.join("report.md")).unwrap_or_default();
            println!("{md}\nreport written to {}", dir.display());
            let report = dir.join("report.json");
            if strict {
                mysimbdp_bench::check(&report)?;
            }
            mysimbdp_bench::completed(&report)?;
        }
        Cmd::List { dir } => {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            entries.sort();
            for p in entries {
                match mysimbdp_bench::Scenario::load(&p) {
                    Ok(s) => println!("{:<40} {}", p.display(), s.description),
                    Err(e) => println!("{:<40} INVALID: {e:#}", p.display()),
                }
            }
        }
        Cmd::Compare { a, b } => print!("{}", mysimbdp_bench::compare(&a, &b)?),
        Cmd::Serve { component, set } => {
            let settings = mysimbdp::config::Settings::load(None, &set)?;
            mysimbdp::serve_component(settings, component).await?;
        }
    }
    Ok(())
}

#[global_allocator]
static ALLOCATOR: mysimbdp::memory::Allocator = mysimbdp::memory::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A component run by the runner logs like `mysimbdp serve`; the runner itself, quietly.
    let default = match cli.command {
        Cmd::Serve { .. } => mysimbdp::DEFAULT_LOG_FILTER,
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    mysimbdp::memory::return_freed_memory();
    let serving = matches!(cli.command, Cmd::Serve { .. });
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    if serving {
        return ExitCode::from(code);
    }
    // The report is written: exit now rather than wait, as dropping the runtime would, for
    // an in-process platform's worker still running tenant code that was never stopped.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code))
}
