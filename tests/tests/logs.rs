//! `lichen logs` across a restart, and the daemon's own log output when it is not a terminal.

use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, one_workload, output_text};

/// Waits until the state database holds a log line of `workload` containing `text`.
fn wait_persisted(daemon: &Daemon, workload: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let db = daemon.state_dir().join("lichen.db");
    while Instant::now() < deadline {
        let found = rusqlite::Connection::open(&db).ok().and_then(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM guest_logs WHERE workload = ?1 AND message LIKE ?2",
                rusqlite::params![workload, format!("%{text}%")],
                |row| row.get::<_, i64>(0),
            )
            .ok()
        });
        if found.is_some_and(|n| n > 0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no log line of {workload} with {text:?} was persisted within 60 s");
}

/// Waits until `lichen logs` shows a line containing `text`; returns the whole output.
fn wait_logged(daemon: &Daemon, workload: &str, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = output_text(&daemon.cli(&["logs", workload, "--tail", "100"]));
        if out.contains(text) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn logs_show_the_lines_from_before_a_restart_then_the_new_ones() {
    let mut daemon = Daemon::start().expect("daemon starts");
    let text = one_workload(
        "counter",
        &guest("counter"),
        "triggers = [{ interval = \"1s\" }]\n[workloads.config]\nstep = 2",
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    // A line only the first process writes (the restored workload logs "counting by" again).
    let out = daemon.cli(&["send", "counter", "reset"]);
    assert!(out.status.success(), "{}", output_text(&out));
    wait_persisted(&daemon, "counter", "count reset to 0");
    daemon.stop().expect("daemon stops");

    daemon.restart().expect("daemon starts again");
    let out = daemon.cli(&["send", "counter", "get"]);
    assert!(out.status.success(), "{}", output_text(&out));
    // The restored counter's init line, written by the new process.
    let logs = wait_logged(&daemon, "counter", "count reset to 0");
    let old = logs
        .find("count reset to 0")
        .unwrap_or_else(|| panic!("the line from before the restart is missing:\n{logs}"));
    let new = logs
        .rfind("counting by 2")
        .unwrap_or_else(|| panic!("the line of the new process is missing:\n{logs}"));
    assert!(old < new, "the older line comes first:\n{logs}");
    assert_eq!(
        logs.matches("count reset to 0").count(),
        1,
        "a persisted line is shown once:\n{logs}"
    );
}

#[test]
fn the_daemon_log_has_no_colour_codes_when_it_is_not_a_terminal() {
    let daemon = Daemon::start().expect("daemon starts");
    let out = daemon.deploy(
        "deploy.toml",
        &one_workload("counter", &guest("counter"), ""),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("counter", "running", |s| s.state == WorkloadState::Running);
    let log = daemon.log();
    assert!(
        log.contains("INFO"),
        "the daemon logged at info level (the test needs some output): {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log written to a file: {log:?}"
    );
}
