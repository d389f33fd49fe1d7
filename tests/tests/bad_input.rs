//! Bad deployments are refused with an error naming file, line and field, and change nothing.

use lichen_agent::api::types::WorkloadState;
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
    daemon.wait_for("counter", "running", |s| s.state == WorkloadState::Running);
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

#[test]
fn an_interval_of_500000000000_years_is_refused_naming_the_field() {
    let daemon = daemon_with_good_deployment();
    let text = one_workload(
        "years",
        &guest("counter"),
        "triggers = [{ interval = \"500000000000y\" }]",
    );
    let message = refused(&daemon, "years.toml", &text);
    assert!(
        message.contains("years.toml:4:")
            && message.contains("workloads[0].triggers[0].interval")
            && message.contains("at most 1year"),
        "{message}"
    );
}

#[test]
fn a_queue_of_4000000000000000000_is_refused_naming_the_field() {
    let daemon = daemon_with_good_deployment();
    let text = one_workload(
        "deep",
        &guest("counter"),
        "[workloads.limits]\nqueue = 4000000000000000000",
    );
    let message = refused(&daemon, "deep.toml", &text);
    assert!(
        message.contains("deep.toml:5:")
            && message.contains("workloads[0].limits.queue")
            && message.contains("at most 4096 events"),
        "{message}"
    );
}

#[test]
fn a_huge_microvm_boot_timeout_is_refused_naming_the_field() {
    let daemon = daemon_with_good_deployment();
    let text = "[[workloads]]\nname = \"vm\"\nkind = \"microvm\"\nkernel = \"vmlinuz\"\n\
                initramfs = \"initrd\"\nboot-timeout = \"500000000000y\"\n";
    let message = refused(&daemon, "vm.toml", text);
    assert!(
        message.contains("vm.toml:6:")
            && message.contains("workloads[0].boot-timeout")
            && message.contains("at most 1h"),
        "{message}"
    );
}

#[test]
fn a_50_mb_deployment_file_gets_a_size_limit_message() {
    let daemon = daemon_with_good_deployment();
    let mut text = one_workload("big", &guest("counter"), "");
    text.push_str(&format!("# {}\n", "x".repeat(50 << 20)));
    let message = refused(&daemon, "big.toml", &text);
    let size = text.len();
    assert!(
        message.contains(&format!(
            "is {size} bytes, more than the 4MiB (4194304 bytes) accepted here"
        )),
        "{message}"
    );
    assert!(!message.contains("error writing a body"), "{message}");
}

#[test]
fn an_api_request_over_the_body_limit_is_refused_naming_it() {
    use std::io::{Read, Write};
    let daemon = daemon_with_good_deployment();
    let mut stream = std::os::unix::net::UnixStream::connect(daemon.socket()).unwrap();
    write!(
        stream,
        "POST /v1/deploy HTTP/1.1\r\nHost: lichen\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        50 << 20
    )
    .unwrap();
    // The body is sent from another thread: the daemon stops reading it past its limit and
    // answers, and this thread reads the answer.
    let mut writer = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..50 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let n = stream.read(&mut buffer).expect("the daemon answers");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sending.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("the request body is larger than the local API's limit of 16MiB"),
        "{answer}"
    );
    assert_eq!(daemon.status("counter").unwrap().deployment_version, 1);
}

#[test]
fn names_with_newlines_or_right_to_left_overrides_are_escaped_in_errors() {
    let daemon = daemon_with_good_deployment();
    let text = format!(
        "[[workloads]]\nname = \"evil\\u202Egnp.exe\\nINFO all good\"\nmodule = \"{}\"\n",
        guest("counter").display()
    );
    let message = refused(&daemon, "names.toml", &text);
    assert!(
        message.contains("invalid workload name \"evil\\u{202e}gnp.exe\\nINFO all good\""),
        "{message}"
    );
    assert!(!message.contains('\u{202e}'), "{message:?}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message:?}");
}

#[test]
fn module_paths_naming_a_fifo_or_dev_zero_are_refused_at_once() {
    let daemon = daemon_with_good_deployment();
    let fifo = daemon.dir.path().join("fifo.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let message = refused(&daemon, "fifo.toml", &one_workload("x", &fifo, ""));
    assert!(
        message.contains("workloads[0].module") && message.contains("is a FIFO"),
        "{message}"
    );
    let message = refused(
        &daemon,
        "zero.toml",
        &one_workload("x", std::path::Path::new("/dev/zero"), ""),
    );
    assert!(message.contains("is a character device"), "{message}");
}

#[test]
fn more_wasm_workloads_than_the_pool_has_slots_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[wasm]\nmax-instances = 4\nmax-memory = \"32MiB\"\nmemory-guard = \"64KiB\"\n",
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--config", config.to_str().unwrap()], None).unwrap();
    let text: String = (0..5)
        .map(|i| one_workload(&format!("w{i}"), &guest("counter"), ""))
        .collect();
    let message = refused(&daemon, "five.toml", &text);
    assert!(
        message.contains("five.toml: workloads: 5 Wasm workloads need 5 instance slots")
            && message.contains("has 4 (`wasm.max-instances` in the agent config)"),
        "{message}"
    );
    assert!(daemon.ps().is_empty());
}
