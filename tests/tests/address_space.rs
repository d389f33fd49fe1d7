//! Many instances fit in a Raspberry Pi's 39-bit address space: the agent starts and runs
//! 200 device functions under `ulimit -v 256 GiB` (the benchmark does 1000).

use lichen_tests::{Daemon, guest, output_text};

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
        rows.iter().all(|w| w.state == "running"),
        "{:?}",
        rows.iter().find(|w| w.state != "running")
    );
}

fn daemon_pid(daemon: &Daemon) -> u32 {
    daemon.pid()
}
