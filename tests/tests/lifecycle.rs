//! Deploying, running, commanding and stopping device functions through the real daemon.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, one_workload, output_text};

#[test]
fn deploy_runs_counter_and_its_state_survives_a_restart() {
    let mut daemon = Daemon::start().expect("daemon starts");
    let out = daemon.deploy(
        "deploy.toml",
        &one_workload(
            "counter",
            &guest("counter"),
            "triggers = [{ interval = \"20ms\" }]",
        ),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("counter"),
        "deploy names what it started"
    );

    daemon.wait_for("counter", "3 events", |s| s.events_handled >= 3);
    let before: u64 = daemon
        .kv("counter", "count")
        .expect("count is set")
        .parse()
        .unwrap();
    assert!(before >= 3);

    daemon.stop().expect("SIGTERM stops the daemon");
    daemon.restart().expect("daemon restarts on the same state");
    let status = daemon.wait_for("counter", "running again", |s| {
        s.state == WorkloadState::Running
    });
    assert_eq!(status.kind, "wasm");
    daemon.wait_for("counter", "more events", |s| s.events_handled > before + 2);
    let after: u64 = daemon.kv("counter", "count").unwrap().parse().unwrap();
    assert!(
        after > before,
        "the count went on from {before} (now {after})"
    );
}

#[test]
fn commands_reach_the_function_and_its_reply_comes_back() {
    let daemon = Daemon::start().unwrap();
    let text = one_workload(
        "thermostat",
        &guest("thermostat"),
        "[workloads.config]\ntarget = \"20\"",
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("thermostat", "running", |s| {
        s.state == WorkloadState::Running
    });

    let out = daemon.cli(&["send", "thermostat", "set-target", "23.5"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("23.5"), "{}", output_text(&out));
    let status = daemon.cli_json(&["send", "thermostat", "status"]).unwrap();
    let reply: serde_json::Value =
        serde_json::from_str(status["reply"].as_str().expect("status replies")).unwrap();
    assert_eq!(reply["target"], 23.5);
    assert_eq!(daemon.kv("thermostat", "target").as_deref(), Some("23.5"));

    let out = daemon.cli(&["send", "thermostat", "no-such-command"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("unknown command"),
        "{}",
        output_text(&out)
    );
    let out = daemon.cli(&["send", "nobody", "status"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("no workload named \"nobody\""),
        "{}",
        output_text(&out)
    );
}

#[test]
fn stop_ends_a_workload_and_the_next_deploy_starts_it_again() {
    let daemon = Daemon::start().unwrap();
    // A second counter on the same trigger is the clock: while it handles ten events, a
    // counter that still ran would handle some too.
    let text = format!(
        "{}{}",
        one_workload(
            "counter",
            &guest("counter"),
            "triggers = [{ interval = \"20ms\" }]",
        ),
        one_workload(
            "clock",
            &guest("counter"),
            "triggers = [{ interval = \"20ms\" }]",
        )
    );
    assert!(daemon.deploy("deploy.toml", &text).status.success());
    daemon.wait_for("counter", "an event", |s| s.events_handled >= 1);
    let out = daemon.cli(&["stop", "counter"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let stopped = daemon.status("counter").unwrap();
    assert_eq!(stopped.state, WorkloadState::Stopped);
    let clock = daemon.status("clock").unwrap().events_handled;
    daemon.wait_for("clock", "ten more events", |s| {
        s.events_handled >= clock + 10
    });
    assert_eq!(
        daemon.status("counter").unwrap().events_handled,
        stopped.events_handled,
        "a stopped workload handles nothing"
    );
    let log = output_text(&daemon.cli(&["logs", "counter"]));
    assert!(
        log.contains("stop"),
        "the function logged its stop event: {log}"
    );

    assert!(daemon.deploy("deploy.toml", &text).status.success());
    daemon.wait_for("counter", "running again", |s| {
        s.state == WorkloadState::Running
    });
}

#[test]
fn a_wasi_preview1_command_runs_and_its_output_reaches_the_logs() {
    let daemon = Daemon::start().unwrap();
    let text = one_workload(
        "hello",
        &guest("hello-wasi"),
        "[workloads.config]\ngreeting = \"hi there\"",
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("hello", "completed", |s| {
        s.state == WorkloadState::Completed
    });
    assert_eq!(status.kind, "wasi-command");
    let logs = output_text(&daemon.cli(&["logs", "hello"]));
    assert!(logs.contains("hello from wasi"), "{logs}");
    assert!(logs.contains("LICHEN_GREETING=hi there"), "{logs}");
}

#[test]
fn a_wasi_cli_component_runs_and_its_output_and_exit_code_reach_the_agent() {
    let daemon = Daemon::start().unwrap();
    let text = one_workload(
        "hello",
        &guest("hello-wasi-cli"),
        "[workloads.config]\ngreeting = \"hi there\"",
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = daemon.wait_for("hello", "completed", |s| {
        s.state == WorkloadState::Completed
    });
    assert_eq!(status.kind, "wasi-command");
    let logs = output_text(&daemon.cli(&["logs", "hello"]));
    assert!(logs.contains("hello from wasi"), "{logs}");
    assert!(logs.contains("LICHEN_GREETING=hi there"), "{logs}");

    let text = one_workload(
        "hello",
        &guest("hello-wasi-cli"),
        "[workloads.config]\nexit = \"3\"",
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    // WASI 0.2's exit carries ok or err only: exit(3) reaches the agent as code 1.
    let status = daemon.wait_for("hello", "failed", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("exited with code 1"))
    });
    assert_ne!(status.state, WorkloadState::Completed);
}

#[test]
fn the_socket_is_private_and_metrics_are_served() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let daemon = Daemon::start_with(&["--metrics", &addr.to_string()], None).unwrap();
    let mode = std::fs::metadata(daemon.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode is {:o}", mode & 0o777);

    let text = one_workload(
        "counter",
        &guest("counter"),
        "triggers = [{ interval = \"20ms\" }]",
    );
    assert!(daemon.deploy("deploy.toml", &text).status.success());
    daemon.wait_for("counter", "events", |s| s.events_handled >= 2);

    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener is up");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for metric in [
        "lichen_instances 1",
        "lichen_events_handled_total",
        "lichen_traps_total 0",
        "lichen_handle_seconds_bucket",
        "lichen_instantiate_seconds_count 1",
        "lichen_process_resident_memory_bytes",
        "lichen_queue_depth",
    ] {
        assert!(body.contains(metric), "missing {metric} in:\n{body}");
    }
}

#[test]
fn telemetry_goes_to_the_outbox_with_the_state_it_came_from() {
    let mut daemon = Daemon::start().unwrap();
    let text = one_workload(
        "counter",
        &guest("counter"),
        "triggers = [{ interval = \"20ms\" }]",
    );
    assert!(daemon.deploy("deploy.toml", &text).status.success());
    daemon.wait_for("counter", "events", |s| s.events_handled >= 5);
    daemon.stop().unwrap();

    let db = rusqlite::Connection::open(daemon.state_dir().join("lichen.db")).unwrap();
    let count: String = db
        .query_row(
            "SELECT CAST(value AS TEXT) FROM kv WHERE workload = 'counter' AND key = 'count'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let last: String = db
        .query_row(
            "SELECT CAST(payload AS TEXT) FROM outbox WHERE workload = 'counter' AND stream = 'count' ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE workload = 'counter'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        last["count"].as_u64().unwrap().to_string(),
        count,
        "the last telemetry record carries the committed count"
    );
    assert_eq!(
        rows.to_string(),
        count,
        "one record per committed increment"
    );
}

#[test]
fn logs_follow_streams_new_lines_as_they_are_written() {
    use std::io::BufRead;
    let daemon = Daemon::start().unwrap();
    let text = one_workload(
        "thermostat",
        &guest("thermostat"),
        "triggers = [{ interval = \"20ms\" }]\n[workloads.config]\ntarget = \"40\"",
    );
    assert!(daemon.deploy("deploy.toml", &text).status.success());
    daemon.wait_for("thermostat", "running", |s| {
        s.state == WorkloadState::Running
    });
    let mut follower = std::process::Command::new(lichen_tests::lichen_bin())
        .arg("--socket")
        .arg(daemon.socket())
        .args(["--json", "logs", "thermostat", "--follow", "--tail", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let message = |line: &str| -> String {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["workload"], "thermostat");
        value["message"].as_str().unwrap_or_default().to_owned()
    };
    // Lines written before the follower subscribed are not part of its stream: setting the
    // target it already has logs a line without changing anything, until one comes through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    'subscribed: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower streamed nothing within 30 s"
        );
        assert!(
            daemon
                .cli(&["send", "thermostat", "set-target", "40"])
                .status
                .success()
        );
        while let Ok(line) = lines.recv_timeout(std::time::Duration::from_millis(500)) {
            if message(&line).contains("target set to 40") {
                break 'subscribed;
            }
        }
    }
    // The command changes the target, so the heater switches and the function logs it.
    assert!(
        daemon
            .cli(&["send", "thermostat", "set-target", "5"])
            .status
            .success()
    );
    let mut seen = Vec::new();
    let switched = lines.iter().take(20).any(|line| {
        let switched = message(&line).contains("heater off");
        seen.push(line);
        switched
    });
    assert!(switched, "the heater switch was streamed: {seen:?}");
    follower.kill().unwrap();
    follower.wait().unwrap();
}
