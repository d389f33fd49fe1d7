//! `reload`: hot reloads of a workload that is answering a stream of commands; how long each
//! reload takes, and whether any acknowledged command was lost or handled twice.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    Samples, Table, WorkloadText, api, deployment_text, fmt_count, fmt_duration, open_agent,
};
use crate::api::control::Control;
use crate::api::types::SendRequest;
use crate::cli::BenchArgs;
use crate::embedded::guest_path;

/// The workload's name.
const NAME: &str = "echo";
/// Pause between two reloads, so commands flow between them.
const PAUSE: Duration = Duration::from_millis(10);

/// What the command stream saw.
#[derive(Default)]
struct Stream {
    acked: u64,
    wrong_reply: u64,
    errors: u64,
    first_error: Option<String>,
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let reloads = args.iterations.unwrap_or(50).max(1);
    let path = guest_path("misbehave").context("this build has no misbehave guest")?;
    let bytes = std::fs::read(path).with_context(|| {
        format!("cannot read the misbehave guest {path} (it is in the build tree, so run this from the build machine)")
    })?;
    let agent = open_agent(dir, None).await?;
    let artifact = agent
        .artifacts()
        .add(bytes)
        .await
        .context("cannot add the misbehave guest")?;
    let digest = artifact.digest().to_string();
    let text_for = |generation: usize| {
        let generation = if generation.is_multiple_of(2) {
            "a"
        } else {
            "b"
        };
        deployment_text(
            "bench reload",
            &[WorkloadText {
                name: NAME,
                digest: &digest,
                config: &[("mode", "echo"), ("generation", generation)],
            }],
        )
    };
    agent
        .deploy_text("bench-reload.toml", &text_for(0), Path::new("/"))
        .await
        .map_err(api)?;

    // Commands back to back, each awaited, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let agent = agent.clone();
        let stop = stop.clone();
        async move {
            let mut stream = Stream::default();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let payload = format!("command {i}");
                let reply = agent
                    .send(
                        NAME,
                        SendRequest {
                            command: "echo".into(),
                            payload: payload.clone(),
                        },
                    )
                    .await;
                match reply {
                    Ok(reply) => {
                        stream.acked += 1;
                        if reply.reply.as_deref() != Some(payload.as_str()) {
                            stream.wrong_reply += 1;
                        }
                    }
                    Err(err) => {
                        stream.errors += 1;
                        stream.first_error.get_or_insert(err.error);
                    }
                }
            }
            stream
        }
    });

    // Let the stream start before the first reload.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut durations = Vec::with_capacity(reloads);
    let mut not_reloaded = 0u64;
    for generation in 1..=reloads {
        let text = text_for(generation);
        let began = Instant::now();
        let report = agent
            .deploy_text("bench-reload.toml", &text, Path::new("/"))
            .await
            .map_err(api)?;
        durations.push(began.elapsed());
        if !report.reloaded.iter().any(|n| n == NAME) {
            not_reloaded += 1;
        }
        tokio::time::sleep(PAUSE).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let stream = sender.await.context("the command task failed")?;
    let elapsed = started.elapsed();

    let counted = agent
        .kv(NAME, Some("events"))
        .await
        .map_err(api)?
        .first()
        .and_then(|entry| entry.value.parse::<u64>().ok())
        .unwrap_or(0);
    let confirmed = agent.metrics().reloads.load(Ordering::Relaxed);
    let failed = agent.metrics().reload_failures.load(Ordering::Relaxed);
    agent.shutdown().await;

    let lost = stream.acked.saturating_sub(counted);
    let twice = counted.saturating_sub(stream.acked);
    let durations = Samples::new(durations);
    let mut table = Table::new(format!(
        "reload: {reloads} hot reloads of a misbehave (echo) workload under a command stream"
    ));
    table.row(
        "reload (deploy call: parse, record, instantiate + init, switch), p50",
        fmt_duration(durations.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "reload, p99",
        fmt_duration(durations.percentile(99.0)),
        "-",
        "-",
    );
    table.row("reload, max", fmt_duration(durations.max()), "-", "-");
    table.row(
        "commands acknowledged during the run",
        format!(
            "{} ({:.0}/s)",
            fmt_count(stream.acked),
            stream.acked as f64 / elapsed.as_secs_f64()
        ),
        "-",
        "-",
    );
    table.row(
        "events lost (acknowledged, not counted in kv `events`)",
        fmt_count(lost),
        "0",
        "-",
    );
    table.row(
        "handled twice (counted more than acknowledged)",
        fmt_count(twice),
        "0",
        "-",
    );
    table.row(
        "commands that failed / replied wrongly",
        format!("{} / {}", stream.errors, stream.wrong_reply),
        "0 / 0",
        "-",
    );
    table.row(
        "reloads switched / confirmed / failed",
        format!("{} / {confirmed} / {failed}", reloads as u64 - not_reloaded),
        format!("{reloads} / {reloads} / 0"),
        "-",
    );
    table.note(format!(
        "one task sends `echo` commands back to back, each awaited, while the main task deploys {reloads} times, alternating config `generation` so each deploy is a reload, {PAUSE:?} apart; kv `events` ({counted}) is compared with the acknowledged commands"
    ));
    table.note(
        "a reload holds the deploy lock while it instantiates and inits the new version, so commands wait for it: their latency, not their count, is what a reload costs",
    );
    if let Some(error) = &stream.first_error {
        table.note(format!("the first failed command: {error}"));
    }
    table.print();
    Ok(vec![format!(
        "- Hot reload under load: p50 {}, p99 {} over {reloads} reloads; {} commands acknowledged meanwhile, {lost} lost, {twice} handled twice (target 0 and 0).",
        fmt_duration(durations.percentile(50.0)),
        fmt_duration(durations.percentile(99.0)),
        fmt_count(stream.acked),
    )])
}
