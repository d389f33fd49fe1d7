//! Two daemons on one state directory or one socket: the second exits with a clear message
//! before it opens the store or starts any workload; the first is untouched.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, lichen_bin, one_workload, output_text};

/// Runs `lichen --socket SOCKET run ARGS...` and waits (at most 60 s) for it to exit; a daemon
/// still running then is killed and the test fails.
fn second_daemon(socket: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(lichen_bin())
        .arg("--socket")
        .arg(socket)
        .arg("run")
        .args(args)
        .env("LICHEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lichen runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait works").is_some() {
            return child.wait_with_output().expect("output is read");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output is read");
    panic!(
        "the second daemon kept running for 60 s:\n{}",
        output_text(&out)
    );
}

/// A daemon running `counter` (ticking every 50 ms) from a `--deploy` file.
fn first_daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("first.toml");
    std::fs::write(
        &file,
        one_workload(
            "counter",
            &guest("counter"),
            "triggers = [{ interval = \"50ms\" }]",
        ),
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--deploy", file.to_str().unwrap()], None).unwrap();
    daemon.wait_for("counter", "running", |s| s.state == WorkloadState::Running);
    // Keep the file's directory alive as long as the daemon's.
    std::mem::forget(dir);
    daemon
}

fn deployed_events(daemon: &Daemon) -> usize {
    daemon
        .cli_json(&["events", "--limit", "1000"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "deployed" || e["kind"] == "started")
        .count()
}

#[test]
fn a_second_daemon_on_the_same_state_directory_exits_and_starts_nothing() {
    let first = first_daemon();
    let before = first.status("counter").unwrap();
    let events_before = deployed_events(&first);
    let other = tempfile::tempdir().unwrap();
    let other_socket = other.path().join("second.sock");
    let deploy = other.path().join("second.toml");
    std::fs::write(
        &deploy,
        one_workload(
            "intruder",
            &guest("counter"),
            "triggers = [{ interval = \"50ms\" }]",
        ),
    )
    .unwrap();

    let out = second_daemon(
        &other_socket,
        &[
            "--state-dir",
            first.state_dir().to_str().unwrap(),
            "--deploy",
            deploy.to_str().unwrap(),
        ],
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "another lichen agent is running on the state directory {} (pid {} holds",
            first.state_dir().display(),
            first.pid()
        )),
        "{text}"
    );
    assert!(!other_socket.exists(), "the second daemon bound no socket");
    assert!(!text.contains("intruder"), "{text}");

    // The first daemon runs on, untouched.
    let after = first.wait_for("counter", "more events", |s| {
        s.events_handled > before.events_handled
    });
    assert_eq!(after.state, WorkloadState::Running);
    assert_eq!(after.restarts, 0);
    assert_eq!(after.deployment_version, before.deployment_version);
    assert_eq!(first.ps().len(), 1, "no intruder workload");
    assert_eq!(
        deployed_events(&first),
        events_before,
        "nothing deployed or started"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_exits_before_starting_any_workload() {
    let first = first_daemon();
    let before = first.status("counter").unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_state = other.path().join("state");
    let deploy = other.path().join("second.toml");
    std::fs::write(
        &deploy,
        one_workload(
            "intruder",
            &guest("counter"),
            "triggers = [{ interval = \"50ms\" }]",
        ),
    )
    .unwrap();

    let out = second_daemon(
        &first.socket(),
        &[
            "--state-dir",
            other_state.to_str().unwrap(),
            "--deploy",
            deploy.to_str().unwrap(),
        ],
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "another lichen daemon is already listening on {}",
            first.socket().display()
        )),
        "{text}"
    );
    assert!(
        !other_state.join("lichen.db").exists(),
        "the second daemon opened no state store"
    );
    assert!(!text.contains("intruder"), "{text}");
    assert!(
        first.socket().exists(),
        "the first daemon's socket is still there"
    );
    let after = first.wait_for("counter", "more events", |s| {
        s.events_handled > before.events_handled
    });
    assert_eq!((after.state, after.restarts), (WorkloadState::Running, 0));
    assert_eq!(first.ps().len(), 1);
}

#[test]
fn the_state_directory_and_its_files_are_private_to_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    let first = first_daemon();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let state = first.state_dir();
    assert_eq!(mode(&state), 0o700, "{}", state.display());
    let mut files = vec![
        state.join("lock"),
        state.join("lichen.db"),
        state.join("lichen.db-wal"),
        state.join("lichen.db-shm"),
        first.socket(),
    ];
    for entry in std::fs::read_dir(state.join("artifacts")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(
        files.len() > 5,
        "the counter's artifacts are stored: {files:?}"
    );
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}
