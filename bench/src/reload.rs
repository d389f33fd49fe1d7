//! `reload`: hot reloads of a workload that is answering a stream of commands; how long each
//! reload takes, and how many acknowledged commands were lost and how many handled twice,
//! counted apart: each command carries a sequence number the guest tallies (misbehave's `count`
//! command: the highest number handled, the numbers skipped, the numbers seen again), so one
//! lost and one duplicated command read as 1 lost and 1 twice, not as a net 0.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::devices::add_guest;
use super::{
    Samples, Table, WorkloadText, api, deployment_text, fmt_count, fmt_duration, open_agent,
};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::SendRequest;

/// The workload's name.
const NAME: &str = "echo";
/// Pause between two reloads, so commands flow between them.
const PAUSE: Duration = Duration::from_millis(10);

/// What the command stream saw.
#[derive(Default)]
struct Stream {
    acked: u64,
    /// Highest sequence number sent.
    sent: u64,
    /// Sequence numbers whose command failed (not acknowledged).
    failed: std::collections::BTreeSet<u64>,
    wrong_reply: u64,
    errors: u64,
    first_error: Option<String>,
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let reloads = args.iterations.unwrap_or(50).max(1);
    let agent = open_agent(dir, None).await?;
    let digest = add_guest(&agent, "misbehave").await?;
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
                stream.sent = i;
                let payload = i.to_string();
                let reply = agent
                    .send(
                        NAME,
                        SendRequest {
                            command: "count".into(),
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
                        stream.failed.insert(i);
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

    let read = |key: &'static str| {
        let agent = agent.clone();
        async move {
            agent
                .kv(NAME, Some(key))
                .await
                .map_err(api)
                .map(|rows| rows.first().map(|entry| entry.value.clone()))
        }
    };
    let number = |value: Option<String>| value.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let counted = number(read("events").await?);
    let last = number(read("count-last").await?);
    let twice = number(read("count-twice").await?);
    let skipped: std::collections::BTreeSet<u64> = read("count-skipped")
        .await?
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let unlisted = number(read("count-skipped-more").await?);
    let confirmed = agent.metrics().reloads.load(Ordering::Relaxed);
    let failed = agent.metrics().reload_failures.load(Ordering::Relaxed);
    agent.shutdown().await;

    let lost = lost(stream.sent, &stream.failed, last, &skipped, unlisted);
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
        "commands lost (acknowledged, their effect not kept)",
        fmt_count(lost),
        "0",
        "-",
    );
    table.row(
        "commands handled twice (a sequence number seen again)",
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
        "one task sends `count` commands numbered 1, 2, ... back to back, each awaited, while the main task deploys {reloads} times, alternating config `generation` so each deploy is a reload, {PAUSE:?} apart; the guest's tally (highest number {last}, {} skipped, {twice} seen again; kv `events` {counted}) is compared with the acknowledged numbers, so losses and duplicates are counted apart",
        skipped.len() as u64 + unlisted
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

/// Commands acknowledged (sequence numbers 1..=`sent` but the `failed` ones) whose effect the
/// guest's tally does not hold: skipped (`skipped`) or beyond its highest number (`last`).
/// Skipped numbers past the guest's list (`unlisted`) count as lost too (an upper bound).
fn lost(
    sent: u64,
    failed: &std::collections::BTreeSet<u64>,
    last: u64,
    skipped: &std::collections::BTreeSet<u64>,
    unlisted: u64,
) -> u64 {
    let listed = (1..=sent)
        .filter(|i| !failed.contains(i) && (*i > last || skipped.contains(i)))
        .count();
    u64::try_from(listed)
        .unwrap_or(u64::MAX)
        .saturating_add(unlisted)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::lost;

    #[test]
    fn one_lost_and_one_duplicated_command_read_as_one_of_each() {
        // The guest handled 1, 2, 4, 5 and 5 again (count-twice 1): 3 was skipped.
        let skipped = BTreeSet::from([3]);
        assert_eq!(lost(5, &BTreeSet::new(), 5, &skipped, 0), 1);
        // A failed (unacknowledged) command that was never handled is not lost.
        assert_eq!(lost(5, &BTreeSet::from([3]), 5, &skipped, 0), 0);
        // Acknowledged commands past the highest number handled are lost.
        assert_eq!(lost(7, &BTreeSet::new(), 5, &skipped, 0), 3);
        assert_eq!(lost(5, &BTreeSet::new(), 5, &BTreeSet::new(), 0), 0);
    }
}
