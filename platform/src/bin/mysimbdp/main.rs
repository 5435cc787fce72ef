//! `mysimbdp`: run the platform (`serve`) or talk to it (client subcommands), whose answers
//! are shown for people (`show`) or, with `--json`, as the API's JSON.

mod show;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mysimbdp::Component;
use mysimbdp::client::{Client, query};
use mysimbdp::config::Settings;
use mysimbdp::tenants::AdminPatch;
use show::{Written, print};

#[derive(Parser)]
#[command(version, about = "mysimbdp: multi-tenant big-data ingestion platform")]
struct Cli {
    /// Platform address for client subcommands.
    #[arg(
        long,
        env = "MYSIMBDP_URL",
        default_value = "http://127.0.0.1:8800",
        global = true
    )]
    url: String,
    /// Bearer token: the admin token or a tenant's token.
    #[arg(long, env = "MYSIMBDP_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON answer (for scripts) instead of a table or a summary line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the platform: all components, or one.
    #[command(
        after_help = "Examples:\n  MYSIMBDP_ADMIN_TOKEN=$(openssl rand -hex 16) mysimbdp serve\n  mysimbdp serve batch --set http.coredms_url=http://coredms:8800"
    )]
    Serve {
        #[arg(value_enum, default_value = "all")]
        component: Component,
        /// A TOML settings file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting: section.key=value (repeatable).
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Tenants (admin).
    #[command(after_help = "Example:\n  MYSIMBDP_TOKEN=$ADMIN_TOKEN mysimbdp tenant create alice")]
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Upload a tenant's batch or stream app.
    #[command(after_help = "Example:\n  mysimbdp app alice batch water_app.luau")]
    App {
        tenant: String,
        #[arg(value_parser = ["batch", "stream"])]
        kind: String,
        file: PathBuf,
    },
    /// Staged files and batch ingestion.
    #[command(
        after_help = "Example:\n  mysimbdp file upload alice water.csv --ingest && mysimbdp file status alice water.csv --wait"
    )]
    File {
        #[command(subcommand)]
        cmd: FileCmd,
    },
    /// Publish messages (NDJSON, one per line) from a file or standard input.
    #[command(
        after_help = "Example:\n  echo '{\"site\": \"S1\", \"value\": 7.2}' | mysimbdp publish alice --data-name reading"
    )]
    Publish {
        tenant: String,
        /// A file of NDJSON messages; `-` or nothing for standard input.
        file: Option<PathBuf>,
        #[arg(long, default_value = "message")]
        data_name: String,
    },
    /// Stream consumers of a tenant.
    #[command(
        after_help = "Example:\n  mysimbdp stream start alice --consumers 2 && mysimbdp stream report alice"
    )]
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Download a tenant's ingestion log as a JSON file.
    #[command(
        after_help = "Example:\n  mysimbdp logs alice --out alice-log.json --status failure --since 2026-01-31T00:00:00Z"
    )]
    Logs {
        tenant: String,
        #[arg(long, short)]
        out: PathBuf,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        status: Option<String>,
    },
    /// Log analytics over all tenants (admin).
    #[command(
        after_help = "Example:\n  MYSIMBDP_TOKEN=$ADMIN_TOKEN mysimbdp summary --since 2026-01-31T00:00:00Z --bucket-s 3600"
    )]
    Summary {
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 60)]
        bucket_s: u64,
    },
    /// Write the API document (OpenAPI 3.1, generated from the code; no server needed).
    #[command(
        after_help = "Example (what docs/openapi.json is):\n  mysimbdp openapi --out docs/openapi.json"
    )]
    Openapi {
        /// The file to write; standard output without it.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant; prints its token once.
    #[command(
        after_help = "Example:\n  MYSIMBDP_TOKEN=$ADMIN_TOKEN mysimbdp tenant create alice --max-file-bytes 10485760"
    )]
    Create {
        name: String,
        #[arg(long)]
        max_file_bytes: Option<u64>,
    },
    /// A tenant's profile: its limits, formats and settings.
    #[command(after_help = "Example:\n  mysimbdp tenant show alice")]
    Show { name: String },
}

#[derive(Subcommand)]
enum FileCmd {
    /// Stage a file (and optionally start its ingestion).
    #[command(
        after_help = "Example:\n  mysimbdp file upload alice data/water.csv --name water-2026-01.csv --ingest"
    )]
    Upload {
        tenant: String,
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        ingest: bool,
    },
    /// Re-ingest the records of the file's last run that failed, with the current app (after
    /// fixing it), under the same run: logged under their first ingestion.
    #[command(
        after_help = "Example:\n  mysimbdp app alice batch fixed_app.luau && mysimbdp file replay alice water.csv"
    )]
    Replay { tenant: String, name: String },
    /// Start ingesting a staged file.
    #[command(after_help = "Example:\n  mysimbdp file ingest alice water.csv")]
    Ingest { tenant: String, name: String },
    /// Status of one file, or of all the tenant's files.
    #[command(
        after_help = "Examples:\n  mysimbdp file status alice\n  mysimbdp file status alice water.csv --wait --json"
    )]
    Status {
        tenant: String,
        name: Option<String>,
        /// Wait until the ingestion is done or failed.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum StreamCmd {
    /// Run the tenant's consumers in every stream manager: `--consumers` each, up to
    /// `--max-consumers` while its queue backs up.
    #[command(
        after_help = "Example:\n  mysimbdp stream start alice --consumers 1 --max-consumers 4"
    )]
    Start {
        tenant: String,
        #[arg(long, default_value_t = 1)]
        consumers: u32,
        /// Defaults to `--consumers` (a fixed count).
        #[arg(long)]
        max_consumers: Option<u32>,
    },
    /// The consumers running in the stream manager that answers, the target, and the
    /// tenant's stream ingestions as the log counts them.
    #[command(after_help = "Example:\n  mysimbdp stream status alice")]
    Status { tenant: String },
    /// Stop the tenant's consumers.
    #[command(after_help = "Example:\n  mysimbdp stream stop alice")]
    Stop { tenant: String },
    /// Messages, failures, bytes and ingestion times per period, from the log.
    #[command(after_help = "Example:\n  mysimbdp stream report alice")]
    Report { tenant: String },
    /// List dead-lettered messages with their reasons (they stay in the dead-letter queue).
    #[command(after_help = "Example:\n  mysimbdp stream dead-letters alice --limit 20")]
    DeadLetters {
        tenant: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead-lettered messages back to the queue, for the stream app running now (after
    /// fixing it): each keeps its message id, so it is stored and logged once.
    #[command(
        after_help = "Example:\n  mysimbdp app alice stream fixed_app.luau && mysimbdp stream replay alice"
    )]
    Replay {
        tenant: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.url, cli.token.as_deref());
    let json = cli.json;
    match cli.command {
        Cmd::Serve {
            component,
            config,
            set,
        } => {
            let settings = Settings::load(config.as_deref(), &set)?;
            mysimbdp::serve_component(settings, component).await?;
        }
        Cmd::Tenant { cmd } => match cmd {
            TenantCmd::Create {
                name,
                max_file_bytes,
            } => {
                let limits = AdminPatch {
                    max_file_bytes,
                    ..AdminPatch::default()
                };
                print(&client.create_tenant(&name, limits).await?, json);
            }
            TenantCmd::Show { name } => print(&client.tenant(&name).await?, json),
        },
        Cmd::App { tenant, kind, file } => {
            let src = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            print(&client.upload_app(&tenant, &kind, &src).await?, json);
        }
        Cmd::File { cmd } => match cmd {
            FileCmd::Upload {
                tenant,
                path,
                name,
                ingest,
            } => {
                let name = match name {
                    Some(n) => n,
                    None => path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .context("the file has no usable name; pass --name")?
                        .to_owned(),
                };
                let f = tokio::fs::File::open(&path)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
                print(&client.upload_file(&tenant, &name, body).await?, json);
                if ingest {
                    print(&client.ingest(&tenant, &name).await?, json);
                }
            }
            FileCmd::Ingest { tenant, name } => print(&client.ingest(&tenant, &name).await?, json),
            FileCmd::Replay { tenant, name } => {
                print(&client.replay_file(&tenant, &name).await?, json)
            }
            FileCmd::Status { tenant, name, wait } => match name {
                Some(n) if wait => print(
                    &client
                        .wait_for_file(&tenant, &n, Duration::from_secs(3600))
                        .await?,
                    json,
                ),
                Some(n) => print(&client.file(&tenant, &n).await?, json),
                None => print(&client.files(&tenant).await?, json),
            },
        },
        Cmd::Publish {
            tenant,
            file,
            data_name,
        } => {
            let data = match file {
                Some(p) if p.as_os_str() != "-" => {
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?
                }
                _ => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                    b
                }
            };
            print(&client.publish(&tenant, &data_name, data).await?, json);
        }
        Cmd::Stream { cmd } => match cmd {
            StreamCmd::Start {
                tenant,
                consumers,
                max_consumers,
            } => {
                let max = max_consumers.unwrap_or(consumers);
                print(
                    &client.stream_start_range(&tenant, consumers, max).await?,
                    json,
                )
            }
            StreamCmd::Status { tenant } => print(&client.stream_status(&tenant).await?, json),
            StreamCmd::Stop { tenant } => print(&client.stream_stop(&tenant).await?, json),
            StreamCmd::Report { tenant } => print(&client.stream_report(&tenant).await?, json),
            StreamCmd::DeadLetters { tenant, limit } => {
                print(&client.dead_letters(&tenant, limit).await?, json)
            }
            StreamCmd::Replay { tenant, limit } => {
                print(&client.replay_dead_letters(&tenant, limit).await?, json)
            }
        },
        Cmd::Logs {
            tenant,
            out,
            since,
            until,
            status,
        } => {
            let pairs: Vec<(&str, &str)> =
                [("since", &since), ("until", &until), ("status", &status)]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_deref()?)))
                    .collect();
            let r = client.logs_raw(&tenant, &query(&pairs)).await?;
            std::fs::write(&out, &r.body)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let written = Written {
                out: out.display().to_string(),
                bytes: r.body.len(),
            };
            print(&written, json);
        }
        Cmd::Summary { since, bucket_s } => {
            let bucket_s = bucket_s.to_string();
            let mut pairs = vec![("bucket_s", bucket_s.as_str())];
            if let Some(s) = &since {
                pairs.push(("since", s));
            }
            print(&client.summary(&query(&pairs)).await?, json);
        }
        Cmd::Openapi { out } => {
            let doc = mysimbdp::openapi::document_text();
            match out {
                Some(path) => {
                    std::fs::write(&path, &doc)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    let written = Written {
                        out: path.display().to_string(),
                        bytes: doc.len(),
                    };
                    print(&written, json);
                }
                None => print!("{doc}"),
            }
        }
    }
    Ok(())
}

#[global_allocator]
static ALLOCATOR: mysimbdp::memory::Allocator = mysimbdp::memory::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| mysimbdp::DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    mysimbdp::memory::return_freed_memory();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand, at every depth, with its path (`file upload`).
    fn subcommands(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let p = format!("{path} {}", sub.get_name()).trim().to_owned();
            out.push((p.clone(), sub.clone()));
            subcommands(sub, &p, out);
        }
    }

    #[test]
    fn every_subcommands_help_shows_an_example_that_runs_the_binary() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut all = Vec::new();
        subcommands(&cli, "", &mut all);
        assert!(all.len() >= 20, "{} subcommands", all.len());
        for (path, sub) in all.iter().filter(|(p, _)| !p.ends_with("help")) {
            let after = sub
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(
                after.starts_with("Example") && after.contains("mysimbdp "),
                "`mysimbdp {path} --help` shows no example: {after:?}"
            );
        }
    }
}
