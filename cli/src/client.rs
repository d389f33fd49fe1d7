//! The command line: verbs, their options, and human or JSON output.
//!
//! `lichen run` starts the daemon (the binary implements it with [`RunArgs`]); `lichen hub ...`
//! talks to an MQTT broker, not to the daemon (`lichen-operator`, feature `operator`);
//! `lichen bench` measures (`lichen-bench`, feature `bench`); the other verbs are clients of the
//! daemon's local API, run by [`run_client`]. Every verb prints a human view
//! by default (aligned tables) and, with `--json`, exactly the API's JSON: one document, or one
//! document per line (NDJSON) for the `--follow` modes.
//!
//! Exit codes: 0 success; 1 failure (daemon unreachable, unknown workload, a workload that
//! failed during `deploy`, an internal error); 2 the input was refused as invalid and nothing
//! changed (a usage error found by clap, or an `invalid` answer from the daemon, such as a
//! deployment file that does not validate).
//!
//! The human views (tables and lines) are in `client/output.rs`.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};

use lichen_agent::api::client::{Client, ClientError};
use lichen_agent::api::types::{DeployRequest, DoctorReport, ErrorCode};
pub use lichen_agent::daemon::RunArgs;
use lichen_agent::render::{EXIT_FAILURE, EXIT_INVALID, emit, push_json};

mod output;

use output::{
    push_json_line, write_deploy, write_doctor, write_event_row, write_events, write_kv,
    write_log_line, write_ps, write_reply,
};

/// Input the CLI refuses itself, before asking the daemon (exit code 2, as for an `invalid`
/// answer).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputRefused(pub String);

/// How often `events --follow` asks the daemon for new events.
pub const EVENTS_POLL: Duration = Duration::from_millis(500);
/// Events asked for per request when paging through the event log.
const EVENTS_PAGE: usize = 1000;

/// The operator's parts built into this binary, as `--version` names them after the flavour.
#[cfg(all(feature = "operator", feature = "bench"))]
macro_rules! operator_parts {
    () => {
        "; operator, bench"
    };
}
#[cfg(all(feature = "operator", not(feature = "bench")))]
macro_rules! operator_parts {
    () => {
        "; operator"
    };
}
#[cfg(all(not(feature = "operator"), feature = "bench"))]
macro_rules! operator_parts {
    () => {
        "; bench"
    };
}
#[cfg(not(any(feature = "operator", feature = "bench")))]
macro_rules! operator_parts {
    () => {
        ""
    };
}

/// `lichen --version`: `0.1.0 (full node)` for the node as it ships, `0.1.0 (full node;
/// operator, bench)` when the operator's tool and the benches are built in (the default
/// workspace build). `lichen bench size` tells a shipped node from a developer's build by it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    lichen_agent::flavour_name!(),
    operator_parts!(),
    ")"
);

/// `lichen`: runs WebAssembly device functions on an edge board.
#[derive(Debug, Parser)]
#[command(name = "lichen", version = VERSION, about, propagate_version = true)]
pub struct Cli {
    /// Socket of the daemon's local API [default: /run/lichen/lichen.sock as root, else
    /// $XDG_RUNTIME_DIR/lichen.sock or /tmp/lichen-$UID.sock].
    #[arg(
        long,
        global = true,
        env = "LICHEN_SOCKET",
        value_name = "PATH",
        default_value_os_t = default_socket_path(),
        hide_default_value = true
    )]
    pub socket: PathBuf,
    /// Print the API's JSON (one document; NDJSON for --follow) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the daemon: host the deployed workloads and serve the local API.
    Run(RunArgs),
    /// Validate a deployment file and apply it atomically (an invalid one changes nothing).
    Deploy {
        /// The deployment file (TOML, or JSON when it ends in .json).
        file: PathBuf,
    },
    /// List workloads with their state and counters.
    Ps,
    /// Print a workload's log lines.
    Logs {
        /// The workload.
        name: String,
        /// Keep printing new lines as they are written (until interrupted).
        #[arg(long, short)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(long, short = 'n', value_name = "N", default_value_t = 100)]
        tail: usize,
    },
    /// Print a workload's key-value state, or one key of its default bucket.
    Kv {
        /// The workload.
        name: String,
        /// Only this key (of the default bucket).
        key: Option<String>,
    },
    /// Print the lifecycle event log (deploys, starts, reloads, traps, ...).
    Events {
        /// Only events with an id greater than this one [default: the last --limit events].
        #[arg(long, value_name = "ID")]
        after: Option<i64>,
        /// At most this many events.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Keep printing new events as they happen (polls every 500 ms, until interrupted).
        #[arg(long, short)]
        follow: bool,
    },
    /// Send a command to a workload and print its reply.
    Send {
        /// The workload.
        name: String,
        /// Command name.
        command: String,
        /// Command payload (text, JSON by convention).
        #[arg(default_value = "")]
        payload: String,
    },
    /// Stop a workload (it stays stopped until the next deploy).
    Stop {
        /// The workload.
        name: String,
    },
    /// Check what this host can run (Wasm, containers, microVMs, devices) and why.
    Doctor(DoctorArgs),
    /// Measure the agent on this host: start-up, event throughput, reload, density.
    #[cfg(feature = "bench")]
    Bench(lichen_bench::BenchArgs),
    /// Apply a system update bundle (A/B boards): write the inactive slot, then reboot into it once.
    Update(lichen_agent::update::UpdateArgs),
    /// Verify a deployment bundle (from `lichen hub bundle`) and apply it, with no network.
    Import {
        /// The bundle: a directory or a .tar file.
        bundle: PathBuf,
    },
    /// Operate nodes through an MQTT hub: sign and publish deployments, read reported state.
    #[cfg(feature = "operator")]
    Hub {
        /// The hub verb.
        #[command(subcommand)]
        command: lichen_operator::HubCommand,
    },
}

/// Options of `lichen doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Also check this agent configuration (its `[hub]` section: trusted keys, insecure-dev).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The API socket used when neither `--socket` nor `LICHEN_SOCKET` names one.
///
/// As root (the systemd service), `/run/lichen/lichen.sock`, the runtime directory a service
/// owns. As any other user, `$XDG_RUNTIME_DIR/lichen.sock` (a private per-user directory on
/// systemd hosts), else `/tmp/lichen-$UID.sock` so that two users of one host do not collide.
/// Daemon and client compute the same path, so a user's `lichen run` and `lichen ps` meet.
pub fn default_socket_path() -> PathBuf {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if uid == Some(0) {
        return PathBuf::from("/run/lichen/lichen.sock");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("lichen.sock");
    }
    match uid {
        Some(uid) => PathBuf::from(format!("/tmp/lichen-{uid}.sock")),
        None => PathBuf::from("/tmp/lichen.sock"),
    }
}

/// Runs a client verb against the daemon on `socket`, printing its output (JSON if `json`) to
/// stdout and any error as `error: ...` to stderr; returns the exit code (see the module docs).
///
/// `run` and `bench` are not client verbs: the binary handles them. `doctor` here asks the
/// daemon; [`print_doctor`] prints a report the binary made locally.
pub async fn run_client(command: Command, socket: &Path, json: bool) -> ExitCode {
    match execute(command, socket, json).await {
        Ok(code) => code,
        Err(err) => report_error(&err),
    }
}

/// Prints `error: ` and the error chain to stderr and returns the matching exit code: 2 for an
/// `invalid` answer of the daemon, else 1. A closed stdout (`lichen logs -f | head`) is not an
/// error: nothing is printed and the code is 0.
pub fn report_error(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::BrokenPipe);
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "error: {}",
        lichen_agent::util::escape_unprintable(&format!("{err:#}"))
    );
    let invalid = err.chain().any(|cause| {
        cause.is::<InputRefused>()
            || cause.downcast_ref::<ClientError>().is_some_and(|client| {
                client
                    .api_error()
                    .is_some_and(|api| api.code == ErrorCode::Invalid)
            })
    });
    ExitCode::from(if invalid { EXIT_INVALID } else { EXIT_FAILURE })
}

/// Prints a doctor report: a table of checks, or the report's JSON.
pub fn print_doctor(report: &DoctorReport, json: bool) {
    let mut out = Vec::new();
    if json {
        push_json(&mut out, report);
    } else {
        write_doctor(&mut out, report);
    }
    if let Err(err) = emit(&out)
        && err.kind() != io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing to stdout: {err}");
    }
}

async fn execute(command: Command, socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(socket.to_path_buf());
    match command {
        Command::Run(_) | Command::Update(_) => Err(not_a_client_verb()),
        #[cfg(feature = "bench")]
        Command::Bench(_) => Err(not_a_client_verb()),
        #[cfg(feature = "operator")]
        Command::Hub { .. } => Err(not_a_client_verb()),
        Command::Deploy { file } => deploy(&client, &file, json).await,
        Command::Import { bundle } => import(&client, &bundle, json).await,
        Command::Ps => {
            let workloads = client.ps().await.context("listing workloads")?;
            let mut out = Vec::new();
            if json {
                push_json(&mut out, &workloads);
            } else {
                write_ps(&mut out, &workloads);
            }
            emit(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { name, follow, tail } => {
            if follow {
                follow_logs(&client, &name, tail, json).await
            } else {
                let lines = client
                    .logs(&name, tail)
                    .await
                    .with_context(|| format!("reading the logs of {name}"))?;
                let mut out = Vec::new();
                if json {
                    push_json(&mut out, &lines);
                } else {
                    lines.iter().for_each(|line| write_log_line(&mut out, line));
                }
                emit(&out)?;
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Kv { name, key } => {
            let entries = client
                .kv(&name, key.as_deref())
                .await
                .with_context(|| format!("reading the key-value state of {name}"))?;
            let mut out = Vec::new();
            if json {
                push_json(&mut out, &entries);
            } else {
                write_kv(&mut out, &entries);
            }
            emit(&out)?;
            match key {
                Some(key) if entries.is_empty() => Err(anyhow!(
                    "workload {name} has no key {key:?} in its default bucket"
                )),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Events {
            after,
            limit,
            follow,
        } => events(&client, after, limit, follow, json).await,
        Command::Send {
            name,
            command,
            payload,
        } => {
            let reply = client
                .send(&name, &command, &payload)
                .await
                .with_context(|| format!("sending {command} to {name}"))?;
            let mut out = Vec::new();
            if json {
                push_json(&mut out, &reply);
            } else {
                write_reply(&mut out, &reply);
            }
            emit(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop { name } => {
            client
                .stop(&name)
                .await
                .with_context(|| format!("stopping {name}"))?;
            if json {
                emit(b"{}\n")?;
            } else {
                emit(format!("stopped {name}\n").as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor(_) => {
            let report = client
                .doctor()
                .await
                .context("asking the daemon for its checks")?;
            print_doctor(&report, json);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn not_a_client_verb() -> anyhow::Error {
    anyhow!("`run`, `bench`, `hub` and `update` are not client verbs; the binary runs them itself")
}

/// `lichen import BUNDLE`: asks the daemon to verify and apply a bundle on this host's disk.
pub async fn import(client: &Client, bundle: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let path = std::fs::canonicalize(bundle)
        .with_context(|| format!("cannot find bundle {}", bundle.display()))?;
    let path_text = path
        .to_str()
        .with_context(|| format!("bundle path {} is not valid UTF-8", path.display()))?;
    let report = client
        .import(&lichen_agent::hub::ImportRequest {
            path: path_text.to_owned(),
        })
        .await
        .with_context(|| format!("importing {}", bundle.display()))?;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &report);
    } else {
        let _ = writeln!(
            out,
            "imported desired state version {} for node {} (signed by key {}); {} artifact(s) added; local deployment version {}",
            report.version,
            report.node,
            report.signer,
            report.artifacts.len(),
            report.deployment.version
        );
    }
    emit(&out)?;
    if report.deployment.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow!(
            "bundle applied, but {} workload(s) failed to start or reload",
            report.deployment.failures.len()
        ))
    }
}

/// Reads the deployment file, sends it, prints the report; exit 1 if a workload failed.
async fn deploy(client: &Client, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let max = lichen_agent::deployment::DeploymentSpec::MAX_TEXT_BYTES;
    let text =
        match lichen_agent::files::read_text_bounded(file, max.try_into().unwrap_or(u64::MAX)) {
            Ok(text) => text,
            // Refused before anything is sent, as the daemon would refuse it: exit code 2.
            Err(
                error @ (lichen_agent::files::ReadError::TooLarge { .. }
                | lichen_agent::files::ReadError::NotRegular { .. }
                | lichen_agent::files::ReadError::NotUtf8 { .. }),
            ) => {
                return Err(anyhow::Error::new(InputRefused(format!(
                    "{error}; a deployment file is a regular UTF-8 file of at most {}",
                    lichen_agent::deployment::show_bytes(max.try_into().unwrap_or(u64::MAX))
                )))
                .context(format!("cannot deploy {}", file.display())));
            }
            Err(error) => return Err(error).context("cannot read the deployment file"),
        };
    let absolute = std::fs::canonicalize(file)
        .with_context(|| format!("resolving the path of {}", file.display()))?;
    let base_dir = absolute.parent().unwrap_or(Path::new("/"));
    let base_dir = base_dir
        .to_str()
        .with_context(|| format!("the directory of {} is not valid UTF-8", file.display()))?;
    let req = DeployRequest {
        file_name: file.display().to_string(),
        text,
        base_dir: base_dir.to_string(),
    };
    let report = client
        .deploy(&req)
        .await
        .with_context(|| format!("deploying {}", file.display()))?;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &report);
    } else {
        write_deploy(&mut out, &report);
    }
    emit(&out)?;
    match report.failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        n => Err(anyhow!(
            "deployment version {} applied, but {n} workload{} failed to start or reload",
            report.version,
            if n == 1 { "" } else { "s" }
        )),
    }
}

async fn follow_logs(
    client: &Client,
    name: &str,
    tail: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut lines = client
        .follow_logs(name, tail)
        .await
        .with_context(|| format!("following the logs of {name}"))?;
    while let Some(line) = lines.recv().await {
        let line = line.with_context(|| format!("following the logs of {name}"))?;
        let mut out = Vec::new();
        if json {
            push_json_line(&mut out, &line);
        } else {
            write_log_line(&mut out, &line);
        }
        emit(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn events(
    client: &Client,
    after: Option<i64>,
    limit: usize,
    follow: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let context = "reading the event log";
    let (first, mut last_id) = match after {
        Some(after) => {
            let batch = client.events(after, limit).await.context(context)?;
            let last = batch.last().map_or(after, |e| e.id);
            (batch, last)
        }
        None => {
            // The API pages forward from an id; keep the last `limit` of all pages.
            let mut kept = VecDeque::with_capacity(limit.min(EVENTS_PAGE));
            let mut cursor = 0;
            loop {
                let page = client.events(cursor, EVENTS_PAGE).await.context(context)?;
                let full = page.len() >= EVENTS_PAGE;
                for event in page {
                    cursor = event.id;
                    kept.push_back(event);
                    if kept.len() > limit {
                        kept.pop_front();
                    }
                }
                if !full {
                    break;
                }
            }
            (Vec::from(kept), cursor)
        }
    };
    let mut out = Vec::new();
    match (json, follow) {
        (true, false) => push_json(&mut out, &first),
        (true, true) => first
            .iter()
            .for_each(|event| push_json_line(&mut out, event)),
        (false, false) => write_events(&mut out, &first),
        (false, true) => {
            write_event_row(&mut out, None);
            first
                .iter()
                .for_each(|event| write_event_row(&mut out, Some(event)));
        }
    }
    emit(&out)?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let batch = client.events(last_id, EVENTS_PAGE).await.context(context)?;
        let mut out = Vec::new();
        for event in &batch {
            last_id = event.id;
            if json {
                push_json_line(&mut out, event);
            } else {
                write_event_row(&mut out, Some(event));
            }
        }
        emit(&out)?;
        if batch.len() < EVENTS_PAGE {
            tokio::time::sleep(EVENTS_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests;
