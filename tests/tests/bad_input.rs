//! Bad deployments are refused with an error naming file, line and field, and change nothing.

use lichen_tests::{Daemon, guest, one_workload, output_text};

/// A daemon running one good deployment (version 1), to check that bad ones change nothing.
fn daemon_with_good_deployment() -> Daemon {
    let daemon = Daemon::start().unwrap();
    let text = one_workload(
        "counter",
        &guest("counter"),
        "triggers = [{ interval = \"50ms\" }]",
    );
    let out = daemon.deploy("good.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("counter", "running", |s| s.state == "running");
    daemon
}

/// Deploys `text`, expects exit code 2 and returns the error text; checks nothing changed.
fn refused(daemon: &Daemon, file: &str, text: &str) -> String {
    let before = daemon.ps();
    let events_before = daemon.cli_json(&["events", "--limit", "1000"]).unwrap();
    let out = daemon.deploy(file, text);
    let message = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "deploy should be refused: {message}"
    );
    let after = daemon.ps();
    assert_eq!(
        before
            .iter()
            .map(|w| (&w.name, &w.module_digest, w.deployment_version))
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|w| (&w.name, &w.module_digest, w.deployment_version))
            .collect::<Vec<_>>(),
        "a refused deployment changed the workloads"
    );
    let events_after = daemon.cli_json(&["events", "--limit", "1000"]).unwrap();
    let deployed = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "deployed")
            .count()
    };
    assert_eq!(
        deployed(&events_before),
        deployed(&events_after),
        "no deployment was recorded"
    );
    message
}

#[test]
fn truncated_wasm_is_refused_naming_the_file_line_and_field() {
    let daemon = daemon_with_good_deployment();
    let bytes = std::fs::read(guest("counter")).unwrap();
    let bad = daemon.dir.path().join("truncated.wasm");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let text = format!(
        "# a comment line\n[[workloads]]\nname = \"counter\"\nmodule = \"{}\"\n",
        bad.display()
    );
    let message = refused(&daemon, "bad.toml", &text);
    assert!(message.contains("bad.toml:4:"), "{message}");
    assert!(message.contains("workloads[0].module"), "{message}");
    assert!(message.contains("truncated.wasm"), "{message}");
}

#[test]
fn garbage_bytes_are_not_webassembly() {
    let daemon = daemon_with_good_deployment();
    let bad = daemon.dir.path().join("garbage.wasm");
    std::fs::write(&bad, b"this is not wasm at all").unwrap();
    let message = refused(&daemon, "bad.toml", &one_workload("x", &bad, ""));
    assert!(message.contains("not a WebAssembly binary"), "{message}");
}

#[test]
fn a_core_module_is_refused_where_a_component_is_needed() {
    let daemon = daemon_with_good_deployment();
    let core = daemon.dir.path().join("core.wasm");
    std::fs::write(
        &core,
        wat::parse_str("(module (func (export \"run\")))").unwrap(),
    )
    .unwrap();
    let message = refused(&daemon, "bad.toml", &one_workload("core", &core, ""));
    assert!(
        message.contains("core WebAssembly module, not a component"),
        "{message}"
    );
    assert!(message.contains("wasm32-wasip2"), "{message}");
}

#[test]
fn a_component_without_the_exports_is_refused() {
    let daemon = daemon_with_good_deployment();
    let empty = daemon.dir.path().join("empty.wasm");
    std::fs::write(&empty, wat::parse_str("(component)").unwrap()).unwrap();
    let message = refused(&daemon, "bad.toml", &one_workload("empty", &empty, ""));
    assert!(message.contains("does not have the exports"), "{message}");
    assert!(
        message.contains("lichen:device/device-function"),
        "{message}"
    );
}

#[test]
fn a_component_of_another_world_is_refused() {
    let daemon = daemon_with_good_deployment();
    let other = daemon.dir.path().join("other.wasm");
    let wat = r#"(component (import "acme:robot/arm@1.0.0" (instance (export "grab" (func)))))"#;
    std::fs::write(&other, wat::parse_str(wat).unwrap()).unwrap();
    let message = refused(&daemon, "bad.toml", &one_workload("other", &other, ""));
    assert!(
        message.contains("imports are not all in world"),
        "{message}"
    );
    assert!(message.contains("acme:robot/arm"), "{message}");
}

#[test]
fn a_missing_module_file_is_refused() {
    let daemon = daemon_with_good_deployment();
    let message = refused(
        &daemon,
        "bad.toml",
        "[[workloads]]\nname = \"ghost\"\nmodule = \"/nonexistent/ghost.wasm\"\n",
    );
    assert!(message.contains("bad.toml:3:"), "{message}");
    assert!(message.contains("/nonexistent/ghost.wasm"), "{message}");
}

#[test]
fn toml_syntax_errors_give_line_and_column() {
    let daemon = daemon_with_good_deployment();
    let message = refused(
        &daemon,
        "syntax.toml",
        "[[workloads]]\nname = \"a\"\nmodule = \"a.wasm\nrestart = \"never\"\n",
    );
    assert!(message.contains("syntax.toml:3:"), "{message}");
    assert!(message.contains("TOML"), "{message}");
}

#[test]
fn unknown_fields_are_named_with_their_line() {
    let daemon = daemon_with_good_deployment();
    let text = format!(
        "[[workloads]]\nname = \"a\"\nmodule = \"{}\"\nmodul = \"typo\"\n",
        guest("counter").display()
    );
    let message = refused(&daemon, "unknown.toml", &text);
    assert!(message.contains("unknown.toml:4:"), "{message}");
    assert!(message.contains("modul"), "{message}");
}

#[test]
fn duplicate_workload_names_are_refused() {
    let daemon = daemon_with_good_deployment();
    let module = guest("counter");
    let text = format!(
        "{}{}",
        one_workload("twin", &module, ""),
        one_workload("twin", &module, "")
    );
    let message = refused(&daemon, "dup.toml", &text);
    assert!(message.contains("dup.toml:6:"), "{message}");
    assert!(message.contains("twin"), "{message}");
}

#[test]
fn json_deployments_are_checked_the_same_way() {
    let daemon = daemon_with_good_deployment();
    let text = format!(
        "{{\n  \"workloads\": [\n    {{\n      \"name\": \"a\",\n      \"module\": \"{}\",\n      \"restrat\": \"never\"\n    }}\n  ]\n}}\n",
        guest("counter").display()
    );
    let message = refused(&daemon, "bad.json", &text);
    assert!(message.contains("bad.json:6:"), "{message}");
    assert!(message.contains("restrat"), "{message}");
}

#[test]
fn a_memory_limit_above_the_engine_slot_is_refused() {
    let daemon = daemon_with_good_deployment();
    let text = one_workload(
        "big",
        &guest("counter"),
        "[workloads.limits]\nmemory = \"1GiB\"",
    );
    let message = refused(&daemon, "big.toml", &text);
    assert!(message.contains("workloads[0].limits.memory"), "{message}");
    assert!(message.contains("per-instance maximum"), "{message}");
}
