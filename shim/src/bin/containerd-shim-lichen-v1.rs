//! `containerd-shim-lichen-v1`: the binary containerd runs for runtime `io.containerd.lichen.v1`.
//!
//! A small binary of its own rather than the `lichen` binary answering to this name: containerd
//! runs it for every container's `start` and `delete`, and it needs only a ttrpc client and the
//! mount calls, so it stays a few hundred KB and starts in a millisecond, where the agent's
//! binary (Wasmtime, Cranelift, SQLite, MQTT) is 13-17 MB to map and page in each time.
//!
//! `start` checks that the agent's task server answers, leaves the containerd context in the
//! bundle (see `lichen_shim::bootstrap`) and prints the server's address; containerd then talks
//! to the resident agent. `delete` is containerd's cleanup when it cannot reach the shim: it asks
//! the agent (if it answers) to end and forget the task, unmounts the rootfs and prints a
//! `DeleteResponse`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use containerd_shim_protos::api::{DeleteRequest, DeleteResponse, KillRequest, WaitRequest};
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context;
use lichen_shim::bootstrap::write_context;
use lichen_shim::events::{EventTarget, timestamp};
use lichen_shim::mounts::unmount_rootfs;
use lichen_shim::{DEFAULT_SOCKET, SOCKET_ENV};

/// Deadline of each call `delete` makes to the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// What `delete` reports: the task was killed (128 + SIGKILL), as runc's shim reports.
const KILLED_STATUS: u32 = 137;

/// The flags containerd passes (Go `flag` syntax: `-name value` or `-name=value`).
#[derive(Debug, Default)]
struct Args {
    namespace: String,
    address: String,
    id: String,
    bundle: Option<PathBuf>,
    action: String,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut out = Args::default();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix('-') else {
            if !out.action.is_empty() {
                bail!("unexpected argument {arg:?} after {:?}", out.action);
            }
            out.action = arg;
            continue;
        };
        let flag = flag.strip_prefix('-').unwrap_or(flag);
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if matches!(name, "debug" | "v" | "version") {
            if name != "debug" {
                out.action = "version".into();
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .with_context(|| format!("flag -{name} needs a value"))?,
        };
        match name {
            "namespace" => out.namespace = value,
            "address" => out.address = value,
            "id" => out.id = value,
            "bundle" => out.bundle = Some(PathBuf::from(value)),
            // Known to containerd's shim API; the task server publishes over ttrpc instead.
            "publish-binary" | "socket" => {}
            other => bail!("unknown flag -{other}"),
        }
    }
    Ok(out)
}

fn socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

fn start(args: &Args) -> Result<()> {
    let socket = socket();
    std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!(
            "the Lichen agent's task server does not answer on {} (is the agent running with its containerd task server enabled? {SOCKET_ENV} names another socket)",
            socket.display()
        )
    })?;
    let bundle = std::env::current_dir().context("cannot read the bundle directory (cwd)")?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| format!("{}.ttrpc", args.address));
    write_context(
        &bundle,
        &EventTarget {
            ttrpc_address,
            namespace: args.namespace.clone(),
        },
    )
    .with_context(|| format!("cannot write the shim context into {}", bundle.display()))?;
    let address = format!("unix://{}", socket.display());
    // containerd reads this file to reconnect to the shim after it restarts.
    std::fs::write(bundle.join("address"), &address)
        .with_context(|| format!("cannot write {}/address", bundle.display()))?;
    let mut stdout = std::io::stdout();
    stdout.write_all(address.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

async fn end_in_agent(socket: &Path, id: &str) -> Result<()> {
    let client = Client::connect(&format!("unix://{}", socket.display())).await?;
    let tasks = TaskClient::new(client);
    let ctx = || context::with_timeout(lichen_shim::events::timeout_nanos(CALL_TIMEOUT));
    let kill = KillRequest {
        id: id.to_string(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    // Already ended or unknown is fine: what matters is that it ends and is forgotten.
    let _ = tasks.kill(ctx(), &kill).await;
    let wait = WaitRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let _ = tasks.wait(ctx(), &wait).await;
    let delete = DeleteRequest {
        id: id.to_string(),
        ..Default::default()
    };
    tasks.delete(ctx(), &delete).await?;
    Ok(())
}

fn delete(args: &Args) -> Result<()> {
    let bundle = match &args.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().context("cannot read the bundle directory (cwd)")?,
    };
    let socket = socket();
    if !args.id.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a tokio runtime")?;
        if let Err(e) = runtime.block_on(end_in_agent(&socket, &args.id)) {
            // The agent is down or has forgotten the task: its Wasm ran in the agent's
            // process, so nothing of it is left running.
            eprintln!("lichen shim delete {}: agent: {e:#}", args.id);
        }
    }
    unmount_rootfs(&bundle.join("rootfs"))?;
    let response = DeleteResponse {
        pid: 0,
        exit_status: KILLED_STATUS,
        exited_at: MessageField::some(timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    let bytes = response.write_to_bytes()?;
    let mut stdout = std::io::stdout();
    stdout.write_all(&bytes)?;
    stdout.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|args| match args.action.as_str() {
        "start" => start(&args),
        "delete" => delete(&args),
        "version" => {
            println!("containerd-shim-lichen-v1 {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "" => bail!("no command: containerd runs this shim with `start` or `delete`"),
        other => {
            bail!("unknown command {other:?}: containerd runs this shim with `start` or `delete`")
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-lichen-v1: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn go_style_flags_parse() {
        let args = parse(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id=abc",
            "-debug",
            "start",
        ])
        .unwrap();
        assert_eq!(args.namespace, "k8s.io");
        assert_eq!(args.id, "abc");
        assert_eq!(args.action, "start");
        assert!(
            parse(&["-bogus", "x", "start"])
                .unwrap_err()
                .to_string()
                .contains("-bogus")
        );
        assert!(
            parse(&["-id"])
                .unwrap_err()
                .to_string()
                .contains("needs a value")
        );
    }
}
