//! Many instances fit in a Raspberry Pi's 39-bit address space: the agent starts and runs
//! 200 device functions under `ulimit -v 256 GiB` (the benchmark does 1000). Under a limit
//! too small for the configured pool it starts with a smaller pool and says so, in its log
//! and in `lichen doctor`.

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, lichen_bin, output_text};

#[test]
fn two_hundred_instances_start_under_a_256_gib_address_space_limit() {
    let daemon = Daemon::start_with(&[], Some("ulimit -v 268435456")).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon_pid(&daemon)))
        .unwrap_or_default();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max address space") && l.contains("274877906944")),
        "the daemon runs under the limit:\n{limits}"
    );
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!(
            "[[workloads]]\nname = \"c{i}\"\nmodule = \"{}\"\n\n",
            guest("counter").display()
        ));
    }
    let out = daemon.deploy("many.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    for i in (0..200).step_by(20) {
        let out = daemon.cli(&["send", &format!("c{i}"), "get"]);
        assert!(out.status.success(), "c{i}: {}", output_text(&out));
    }
    let rows = daemon.ps();
    assert_eq!(rows.len(), 200);
    assert!(
        rows.iter().all(|w| w.state == WorkloadState::Running),
        "{:?}",
        rows.iter().find(|w| w.state != WorkloadState::Running)
    );
}

fn daemon_pid(daemon: &Daemon) -> u32 {
    daemon.pid()
}

/// The instance count in "the pool holds N instances".
fn pool_holds(text: &str) -> Option<u32> {
    let rest = text.split("the pool holds ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn under_a_64_gib_limit_the_agent_starts_with_a_pool_that_fits_and_says_so() {
    // 1024 slots of 2 x 32 MiB memories reserve ~66 GiB: more than the limit allows.
    let limit = "ulimit -v 67108864";
    let daemon = Daemon::start_with(&[], Some(limit)).unwrap();
    let log = daemon.log();
    assert!(
        log.contains("wasm.max-instances = 1024 does not fit"),
        "the daemon says the pool was lowered:\n{log}"
    );
    let held = pool_holds(&log).expect("the log says how many instances the pool holds");
    assert!((100..1024).contains(&held), "pool of {held} instances");
    assert!(log.contains("ulimit -v 64.0 GiB"), "{log}");

    // It works: a few counters start and answer.
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            "[[workloads]]\nname = \"c{i}\"\nmodule = \"{}\"\n\n",
            guest("counter").display()
        ));
    }
    let out = daemon.deploy("some.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = daemon.cli(&["send", "c7", "get"]);
    assert!(out.status.success(), "{}", output_text(&out));

    // `lichen doctor` under the same limit gives the same figure, as a warning.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{limit}; exec \"$0\" doctor"))
        .arg(lichen_bin())
        .output()
        .unwrap();
    let text = output_text(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("address space"))
        .unwrap_or_else(|| panic!("doctor has an address space line:\n{text}"));
    assert!(line.contains("warn"), "{line}");
    let doctor_held = pool_holds(line).expect("doctor says how many instances fit");
    assert!((100..1024).contains(&doctor_held), "{line}");
}
