//! Hot reload: a new version starts beside the old one and takes over between two events;
//! state carries over; no event is lost or handled twice; a bad new version never replaces a
//! good one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, output_text};

fn echo(version: &str, mode: &str) -> String {
    format!(
        "[[workloads]]\nname = \"echo\"\nmodule = \"{}\"\n[workloads.config]\nmode = \"{mode}\"\nversion = \"{version}\"\n",
        guest("misbehave").display()
    )
}

fn deploy_ok(daemon: &Daemon, text: &str) -> String {
    let out = daemon.deploy("deploy.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    output_text(&out)
}

#[test]
fn hot_reload_keeps_state_and_drops_no_event() {
    let daemon = Daemon::start().unwrap();
    deploy_ok(&daemon, &echo("0", "echo"));
    daemon.wait_for("echo", "running", |s| s.state == WorkloadState::Running);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let client = daemon.client();
        let acked = acked.clone();
        let done = done.clone();
        runtime.spawn(async move {
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                match client.send("echo", "ping", "x").await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        })
    };
    for version in 1..=8 {
        let report = deploy_ok(&daemon, &echo(&version.to_string(), "echo"));
        assert!(report.contains("echo"), "{report}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    let failures = runtime.block_on(sender).unwrap();
    assert!(
        failures.is_empty(),
        "commands failed during reloads: {failures:?}"
    );

    let acked = acked.load(Ordering::Relaxed);
    assert!(acked > 0);
    let counted: u64 = daemon.kv("echo", "events").unwrap().parse().unwrap();
    assert_eq!(
        counted, acked,
        "every acknowledged event counted exactly once across 8 reloads"
    );
    let status = daemon.status("echo").unwrap();
    assert_eq!(status.restarts, 0);
    assert_eq!(status.traps, 0);
    let events = output_text(&daemon.cli(&["events", "--limit", "1000"]));
    assert_eq!(events.matches("reloaded").count(), 8, "{events}");
}

#[test]
fn a_new_version_whose_init_fails_leaves_the_old_one_running() {
    let daemon = Daemon::start().unwrap();
    let good = format!(
        "[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\ntriggers = [{{ interval = \"20ms\" }}]\n[workloads.config]\nstep = \"1\"\n",
        guest("counter").display()
    );
    deploy_ok(&daemon, &good);
    let before = daemon.wait_for("counter", "events", |s| s.events_handled >= 3);

    let bad = good.replace("step = \"1\"", "step = \"zero\"");
    let out = daemon.deploy("deploy.toml", &bad);
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "the report says the reload failed: {text}"
    );
    assert!(text.contains("init failed"), "{text}");
    assert!(text.contains("previous version keeps running"), "{text}");

    let after = daemon.wait_for("counter", "more events", |s| {
        s.events_handled >= before.events_handled + 5
    });
    assert_eq!(after.state, WorkloadState::Running);
    assert_eq!(
        after.deployment_version, before.deployment_version,
        "the old version runs"
    );
    assert!(
        after
            .last_error
            .unwrap_or_default()
            .contains("reload to version 2 failed")
    );
    let events = output_text(&daemon.cli(&["events"]));
    assert!(events.contains("reload-failed"), "{events}");
}

#[test]
fn a_new_version_that_traps_on_its_first_event_is_rolled_back() {
    let daemon = Daemon::start().unwrap();
    deploy_ok(&daemon, &echo("1", "echo"));
    daemon.wait_for("echo", "running", |s| s.state == WorkloadState::Running);
    for _ in 0..3 {
        assert!(daemon.cli(&["send", "echo", "ping"]).status.success());
    }
    deploy_ok(&daemon, &echo("2", "trap-on-event"));

    // The first event after the switch traps in version 2; version 1 takes it back and
    // answers, so the sender sees one success and the event is counted once.
    let out = daemon.cli(&["send", "echo", "ping", "hello"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("hello"));
    assert_eq!(daemon.kv("echo", "events").as_deref(), Some("4"));

    let status = daemon.status("echo").unwrap();
    assert_eq!(status.state, WorkloadState::Running);
    assert_eq!(status.deployment_version, 1);
    assert_eq!(status.restarts, 0);
    assert!(
        status
            .last_error
            .unwrap_or_default()
            .contains("trapped on its first event")
    );
    assert!(
        daemon.cli(&["send", "echo", "ping"]).status.success(),
        "old version still serves"
    );
    assert_eq!(daemon.kv("echo", "events").as_deref(), Some("5"));
}

#[test]
fn a_corrupt_new_module_never_replaces_a_good_one() {
    let daemon = Daemon::start().unwrap();
    deploy_ok(&daemon, &echo("1", "echo"));
    let bytes = std::fs::read(guest("misbehave")).unwrap();
    let corrupt = daemon.dir.path().join("corrupt.wasm");
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    for b in &mut damaged[middle..middle + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&corrupt, damaged).unwrap();
    let text = format!(
        "[[workloads]]\nname = \"echo\"\nmodule = \"{}\"\n[workloads.config]\nmode = \"echo\"\n",
        corrupt.display()
    );
    let out = daemon.deploy("deploy.toml", &text);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("deploy.toml:3:"));
    let status = daemon.status("echo").unwrap();
    assert_eq!(status.deployment_version, 1);
    assert!(daemon.cli(&["send", "echo", "ping"]).status.success());
}
