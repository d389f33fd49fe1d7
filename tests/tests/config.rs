//! The agent config through the real binary: `lichen run --print-config` prints the effective
//! configuration, each `[wasm]` key is optional on its own, a key out of bounds stops the
//! daemon before it starts anything.

use lichen_tests::{Daemon, lichen, output_text};

#[test]
fn print_config_shows_the_defaults_filled_in_around_a_partial_wasm_section() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[wasm]\nmax-instances = 8\n").unwrap();
    let state = dir.path().join("state");
    let out = lichen(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--print-config",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", output_text(&out));
    for line in [
        &format!("state-dir = \"{}\"", state.display()),
        "board = \"sim\"",
        "[wasm]",
        "max-instances = 8",
        "max-memory = \"32MiB\"",
        "memory-guard = \"64KiB\"",
        "[logs]",
        "ring-lines = 500",
        "level = \"info\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
    }
    assert!(
        !state.exists(),
        "--print-config starts nothing, creates nothing"
    );

    // The printed configuration is a configuration the daemon runs with.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    let daemon = Daemon::start_with(&["--config", printed.to_str().unwrap()], None).unwrap();
    assert!(daemon.ps().is_empty());
}

#[test]
fn a_config_key_out_of_bounds_stops_the_daemon_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[wasm]\nmax-instances = 4000000000\n").unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("lichen.sock");
    let out = lichen(&[
        "--socket",
        socket.to_str().unwrap(),
        "run",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("wasm.max-instances: 4000000000 is out of bounds: expected 1 to 16384"),
        "{text}"
    );
    assert!(!state.exists() && !socket.exists(), "nothing was created");
}
