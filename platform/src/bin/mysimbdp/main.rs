//! `mysimbdp`: run the platform (`serve`) or talk to it (client subcommands).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mysimbdp::Component;
use mysimbdp::client::{Client, query};
use mysimbdp::config::Settings;
use mysimbdp::tenants::AdminPatch;

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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the platform: all components, or one.
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
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Upload a tenant's batch or stream app.
    App {
        tenant: String,
        #[arg(value_parser = ["batch", "stream"])]
        kind: String,
        file: PathBuf,
    },
    /// Staged files and batch ingestion.
    File {
        #[command(subcommand)]
        cmd: FileCmd,
    },
    /// Publish messages (NDJSON, one per line) from a file or standard input.
    Publish {
        tenant: String,
        /// A file of NDJSON messages; `-` or nothing for standard input.
        file: Option<PathBuf>,
        #[arg(long, default_value = "message")]
        data_name: String,
    },
    /// Stream consumers of a tenant.
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Download a tenant's ingestion log as a JSON file.
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
    Summary {
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 60)]
        bucket_s: u64,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant; prints its token once.
    Create {
        name: String,
        #[arg(long)]
        max_file_bytes: Option<u64>,
    },
    Show {
        name: String,
    },
}

#[derive(Subcommand)]
enum FileCmd {
    /// Stage a file (and optionally start its ingestion).
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
    Replay {
        tenant: String,
        name: String,
    },
    Ingest {
        tenant: String,
        name: String,
    },
    /// Status of one file, or of all the tenant's files.
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
    Start {
        tenant: String,
        #[arg(long, default_value_t = 1)]
        consumers: u32,
    },
    Stop {
        tenant: String,
    },
    Report {
        tenant: String,
    },
    /// List dead-lettered messages with their reasons (they stay in the dead-letter queue).
    DeadLetters {
        tenant: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead-lettered messages back to the queue, for the stream app running now (after
    /// fixing it): each keeps its message id, so it is stored and logged once.
    Replay {
        tenant: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// An answer, as JSON (the wire form of its type).
fn print(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.url, cli.token.as_deref());
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
                let t = client.create_tenant(&name, limits).await?;
                println!("tenant {} created, database {}", t.name, t.database);
                println!("token (shown once): {}", t.token);
            }
            TenantCmd::Show { name } => print(&client.tenant(&name).await?),
        },
        Cmd::App { tenant, kind, file } => {
            let src = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            print(&client.upload_app(&tenant, &kind, &src).await?);
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
                print(&client.upload_file(&tenant, &name, body).await?);
                if ingest {
                    print(&client.ingest(&tenant, &name).await?);
                }
            }
            FileCmd::Ingest { tenant, name } => print(&client.ingest(&tenant, &name).await?),
            FileCmd::Replay { tenant, name } => print(&client.replay_file(&tenant, &name).await?),
            FileCmd::Status { tenant, name, wait } => match name {
                Some(n) if wait => print(
                    &client
                        .wait_for_file(&tenant, &n, Duration::from_secs(3600))
                        .await?,
                ),
                Some(n) => print(&client.file(&tenant, &n).await?),
                None => print(&client.files(&tenant).await?),
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
            let r = client.publish(&tenant, &data_name, data).await?;
            println!("published {} messages", r.published);
        }
        Cmd::Stream { cmd } => match cmd {
            StreamCmd::Start { tenant, consumers } => {
                print(&client.stream_start(&tenant, consumers).await?)
            }
            StreamCmd::Stop { tenant } => print(&client.stream_stop(&tenant).await?),
            StreamCmd::Report { tenant } => print(&client.stream_report(&tenant).await?),
            StreamCmd::DeadLetters { tenant, limit } => {
                print(&client.dead_letters(&tenant, limit).await?)
            }
            StreamCmd::Replay { tenant, limit } => {
                print(&client.replay_dead_letters(&tenant, limit).await?)
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
            println!("wrote {} bytes to {}", r.body.len(), out.display());
        }
        Cmd::Summary { since, bucket_s } => {
            let bucket_s = bucket_s.to_string();
            let mut pairs = vec![("bucket_s", bucket_s.as_str())];
            if let Some(s) = &since {
                pairs.push(("since", s));
            }
            print(&client.summary(&query(&pairs)).await?);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| mysimbdp::DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
