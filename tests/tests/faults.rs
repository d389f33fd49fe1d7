//! Misbehaving guests are contained: traps, endless loops, memory hogs and log floods hurt
//! only themselves, and the healthy workload beside them keeps running.

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, output_text};

/// A deployment of a healthy `counter` plus `misbehave` in `mode`, with `extra` lines for the
/// misbehaving workload (before its config table).
fn deployment(mode: &str, extra: &str) -> String {
    format!(
        "[[workloads]]\nname = \"healthy\"\nmodule = \"{counter}\"\ntriggers = [{{ interval = \"20ms\" }}]\n\n\
         [[workloads]]\nname = \"bad\"\nmodule = \"{misbehave}\"\ntriggers = [{{ interval = \"20ms\" }}]\n{extra}\n\
         [workloads.config]\nmode = \"{mode}\"\n",
        counter = guest("counter").display(),
        misbehave = guest("misbehave").display(),
    )
}

fn deploy(daemon: &Daemon, text: &str) {
    let out = daemon.deploy("deploy.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Checks that the healthy workload keeps handling events.
fn healthy_keeps_running(daemon: &Daemon) {
    let now = daemon.status("healthy").unwrap().events_handled;
    daemon.wait_for("healthy", "more events", |s| {
        s.events_handled >= now + 5 && s.traps == 0
    });
}

#[test]
fn a_guest_that_traps_in_init_is_restarted_with_back_off() {
    let daemon = Daemon::start().unwrap();
    deploy(&daemon, &deployment("trap-in-init", ""));
    let status = daemon.wait_for("bad", "two restarts", |s| s.restarts >= 2);
    assert_ne!(status.state, WorkloadState::Running);
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("init trapped"), "{error}");
    healthy_keeps_running(&daemon);
    let events = daemon.cli_json(&["events"]).unwrap().to_string();
    assert!(events.contains("start-failed"), "{events}");
    assert!(
        events.contains("init trapped: wasm trap: wasm `unreachable` instruction executed;"),
        "{events}"
    );
    assert!(events.contains("restarting in"), "{events}");
}

#[test]
fn a_guest_whose_init_fails_with_restart_never_stays_failed() {
    let daemon = Daemon::start().unwrap();
    deploy(&daemon, &deployment("fail-init", "restart = \"never\""));
    let status = daemon.wait_for("bad", "failed", |s| s.state == WorkloadState::Failed);
    assert_eq!(status.restarts, 0);
    assert!(
        status
            .last_error
            .unwrap_or_default()
            .contains("init refused: fail-init mode"),
        "the guest's own message is shown"
    );
    let out = daemon.cli(&["send", "bad", "ping"]);
    assert!(!out.status.success(), "a failed workload takes no commands");
    assert!(
        output_text(&out).contains("is failed"),
        "{}",
        output_text(&out)
    );
    healthy_keeps_running(&daemon);
}

#[test]
fn a_guest_in_an_endless_loop_is_preempted_and_the_others_keep_running() {
    let daemon = Daemon::start().unwrap();
    deploy(
        &daemon,
        &deployment("loop-forever", "[workloads.limits]\ntime-slice = \"50ms\""),
    );
    let status = daemon.wait_for("bad", "two preemptions", |s| s.traps >= 2);
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("preempted"), "{error}");
    assert!(error.contains("50ms"), "{error}");
    healthy_keeps_running(&daemon);
}

#[test]
fn a_guest_that_grows_memory_past_its_limit_traps_with_a_clear_reason() {
    let daemon = Daemon::start().unwrap();
    deploy(
        &daemon,
        &deployment("grow-memory", "[workloads.limits]\nmemory = \"4MiB\""),
    );
    let status = daemon.wait_for("bad", "a trap", |s| s.traps >= 1);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("memory limit of 4194304 bytes reached"),
        "{error}"
    );
    healthy_keeps_running(&daemon);
}

#[test]
fn a_guest_that_logs_in_a_tight_loop_is_rate_limited() {
    let mut daemon = Daemon::start().unwrap();
    deploy(&daemon, &deployment("log-flood", ""));
    daemon.wait_for("bad", "ten floods", |s| s.events_handled >= 10);
    healthy_keeps_running(&daemon);
    let logs = output_text(&daemon.cli(&["logs", "bad", "--tail", "1000"]));
    assert!(
        logs.contains("rate limit"),
        "the agent says lines were dropped: {logs}"
    );
    let shown = logs.lines().count();
    assert!(
        shown <= 500,
        "the in-memory ring is bounded, got {shown} lines"
    );

    daemon.stop().unwrap();
    let db = rusqlite::Connection::open(daemon.state_dir().join("lichen.db")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM guest_logs WHERE workload = 'bad'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Ten floods are 200000 lines; the rate limit lets a few hundred through and the store
    // keeps at most the last 1000 per workload.
    assert!(stored <= 1000, "{stored} lines persisted");
    assert!(stored > 0);
}

#[test]
fn a_trap_discards_the_writes_and_telemetry_of_its_event() {
    let mut daemon = Daemon::start().unwrap();
    deploy(&daemon, &deployment("write-then-trap", ""));
    daemon.wait_for("bad", "two traps", |s| s.traps >= 2);
    assert_eq!(
        daemon.kv("bad", "partial"),
        None,
        "the trapped event's write was discarded"
    );
    daemon.stop().unwrap();
    let db = rusqlite::Connection::open(daemon.state_dir().join("lichen.db")).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE workload = 'bad'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0, "the trapped event's telemetry was discarded");
}
