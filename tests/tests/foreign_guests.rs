//! The example device functions written in JavaScript (`examples/js-button-led`, componentize-js)
//! and Python (`examples/py-sensor`, componentize-py) on the simulated board: each deploys on
//! the default `[wasm]` pool, its trigger fires and touches the simulated pin or sensor, it
//! answers its commands and keeps its key-value data across a hot reload; and a component
//! importing what Lichen's world does not provide (`wasi:http`) is refused naming the import.
//!
//! The components are built by `scripts/build-foreign-guests` (which `scripts/test` and CI run)
//! into `examples/`, or into the directory `LICHEN_FOREIGN_GUESTS` names. When one is missing
//! the test fails, unless `LICHEN_TEST_ALLOW_MISSING` lists `foreign-guests`.
//!
//! The Python guest and the refusal go through the real `lichen` binary. The button test runs
//! the agent in this process (the same supervisor the binary runs), because the simulated GPIO
//! chip can only be driven from inside the process that owns it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_devices::Level;
use lichen_tests::{Daemon, output_text, tools};

/// Where `scripts/build-foreign-guests` put the component `name` (`py-sensor`,
/// `js-button-led`); `None` (skip, said so) when it is missing and the opt-out allows it.
fn foreign(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("LICHEN_FOREIGN_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"));
    let path = dir.join(format!("{name}.wasm"));
    if path.is_file() {
        return Some(path);
    }
    tools::missing(
        "foreign-guests",
        &format!(
            "{} is missing: build it with scripts/build-foreign-guests (or point LICHEN_FOREIGN_GUESTS at the directory holding it)",
            path.display()
        ),
    );
    None
}

fn deploy_ok(daemon: &Daemon, text: &str) -> String {
    let out = daemon.deploy("guests.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
    output_text(&out)
}

/// `lichen send`, expecting success; the reply parsed as JSON.
fn send_json(daemon: &Daemon, workload: &str, command: &str) -> serde_json::Value {
    let out = daemon.cli(&["send", workload, command]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Every telemetry payload of `workload` on `stream`, oldest first, read from the outbox.
fn telemetry(state_dir: &Path, workload: &str, stream: &str) -> Vec<serde_json::Value> {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        state_dir.join("lichen.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return Vec::new();
    };
    let Ok(mut query) = db.prepare(
        "SELECT CAST(payload AS TEXT) FROM outbox WHERE workload = ?1 AND stream = ?2 ORDER BY id",
    ) else {
        return Vec::new();
    };
    query
        .query_map([workload, stream], |r| r.get::<_, String>(0))
        .map(|rows| {
            rows.filter_map(|r| r.ok())
                .map(|t| serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")))
                .collect()
        })
        .unwrap_or_default()
}

fn py_sensor(module: &Path, interval: &str, address: &str) -> String {
    format!(
        "[[workloads]]\nname = \"py-sensor\"\nmodule = \"{}\"\n\
         triggers = [{{ interval = \"{interval}\" }}]\n\
         i2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }}]\n\
         [workloads.config]\naddress = \"{address}\"\n",
        module.display()
    )
}

#[test]
fn py_sensor_reads_the_sim_tmp102_publishes_and_answers_its_commands() {
    let Some(module) = foreign("py-sensor") else {
        return;
    };
    let daemon = Daemon::start().unwrap();
    deploy_ok(&daemon, &py_sensor(&module, "50ms", "0x48"));
    daemon.wait_for("py-sensor", "three readings", |s| {
        s.state == WorkloadState::Running && s.events_handled >= 3
    });
    // The simulated TMP102 reads 21.5 degC; the guest keeps it and publishes it.
    assert_eq!(daemon.kv("py-sensor", "celsius").as_deref(), Some("21.5"));
    let records = telemetry(&daemon.state_dir(), "py-sensor", "temperature");
    let first = records.first().expect("a temperature record");
    assert_eq!(first["celsius"], 21.5, "{records:?}");
    assert_eq!(first["readings"], 1, "{records:?}");

    let status = send_json(&daemon, "py-sensor", "status");
    assert_eq!(status["celsius"], 21.5, "{status}");
    assert_eq!(status["version"], "1", "{status}");
    assert!(status["readings"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(
        send_json(&daemon, "py-sensor", "reset"),
        serde_json::json!({"readings": 0})
    );
    // An unknown command is the guest's error, with its text, and the guest keeps running.
    let out = daemon.cli(&["send", "py-sensor", "calibrate"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("unknown command 'calibrate' (expected status or reset)"),
        "{}",
        output_text(&out)
    );
    let status = daemon.status("py-sensor").unwrap();
    assert_eq!((status.state, status.traps), (WorkloadState::Running, 0));
}

#[test]
fn py_sensor_keeps_its_readings_across_a_hot_reload_without_losing_a_tick() {
    let Some(module) = foreign("py-sensor") else {
        return;
    };
    let daemon = Daemon::start().unwrap();
    deploy_ok(&daemon, &py_sensor(&module, "20ms", "0x48"));
    let before = daemon.wait_for("py-sensor", "five readings", |s| {
        s.state == WorkloadState::Running && s.events_handled >= 5
    });
    // The same sensor address written in decimal: a changed config, so a hot reload.
    deploy_ok(&daemon, &py_sensor(&module, "20ms", "72"));
    let after = daemon.wait_for("py-sensor", "the new version's readings", |s| {
        s.deployment_version > before.deployment_version && s.events_handled >= 3
    });
    assert_eq!(after.state, WorkloadState::Running);
    // The count kept counting in the key-value store, and every tick, before, during and
    // after the reload, published exactly one record: the published counts are 1, 2, 3, ...
    let handled = usize::try_from(before.events_handled).expect("a count that fits usize");
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let records = telemetry(&daemon.state_dir(), "py-sensor", "temperature");
        if records.len() > handled + 3 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let counts: Vec<u64> = records
        .iter()
        .map(|r| r["readings"].as_u64().expect("a count"))
        .collect();
    assert!(counts.len() > handled + 3, "{counts:?}");
    let expected: Vec<u64> = (1..=counts.len() as u64).collect();
    assert_eq!(counts, expected, "a reading was lost or counted twice");
    assert_eq!(send_json(&daemon, "py-sensor", "status")["celsius"], 21.5);
}

#[test]
fn a_component_importing_wasi_http_is_refused_naming_the_import() {
    let daemon = Daemon::start().unwrap();
    // A component that needs an outgoing HTTP handler, which Lichen's world does not provide.
    let bytes = wat::parse_str(
        r#"(component
             (import "wasi:http/outgoing-handler@0.2.0" (instance (export "handle" (func))))
           )"#,
    )
    .expect("valid component text");
    let module = daemon.dir.path().join("wants-http.wasm");
    std::fs::write(&module, bytes).unwrap();
    let text = format!(
        "[[workloads]]\nname = \"wants-http\"\nmodule = \"{}\"\n",
        module.display()
    );
    let out = daemon.deploy("http.toml", &text);
    let message = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "refused: {message}");
    assert!(
        message.contains("wasi:http/outgoing-handler@0.2.0"),
        "the error names the import: {message}"
    );
    assert!(daemon.ps().is_empty(), "nothing was deployed");
}

/// Waits (deadline 60 s) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "waited 60 s for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn js_button_led(module: &Path, debounce: &str) -> String {
    format!(
        "[[workloads]]\nname = \"js-button-led\"\nmodule = \"{}\"\n\
         triggers = [{{ gpio-edge = \"button\", edge = \"both\", debounce = \"{debounce}\" }}]\n\
         gpio = [{{ name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\" }},\n\
         {{ name = \"led\", pin = \"GPIO22\", mode = \"output\", initial = \"low\" }}]\n",
        module.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_button_led_mirrors_the_sim_button_answers_commands_and_keeps_presses_across_a_reload() {
    use lichen_agent::api::control::Control;
    use lichen_agent::supervisor::{Agent, AgentOptions};

    let Some(module) = foreign("js-button-led") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The default engine options: the default pool must fit a componentize-js guest.
    let agent = Agent::open(AgentOptions {
        state_dir: dir.path().to_path_buf(),
        engine: Default::default(),
        logs: Default::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens");
    let chip = agent.devices().sim().expect("sim board").chip().clone();
    let send = |command: &str, payload: &str| {
        let request = lichen_agent::api::types::SendRequest {
            command: command.into(),
            payload: payload.into(),
        };
        let agent = &agent;
        async move {
            agent
                .send("js-button-led", request)
                .await
                .map(|r| serde_json::from_str::<serde_json::Value>(&r.reply.unwrap_or_default()))
                .map_err(|e| e.error)
        }
    };
    let led = || chip.level("GPIO22").expect("line");
    let presses = || telemetry(dir.path(), "js-button-led", "button");

    agent
        .deploy_text(
            "button.toml",
            &js_button_led(&module, "5ms"),
            Path::new("/"),
        )
        .await
        .expect("deploys");
    eventually("js-button-led to hold the button line", || {
        chip.consumer("GPIO27").ok().flatten().is_some()
    })
    .await;
    assert_eq!(led(), Level::Low, "released button: led off");

    // press(n): the led follows the button down and up, and press n is published.
    let press = |n: u64| {
        let chip = &chip;
        async move {
            chip.drive("GPIO27", Level::Low).expect("press");
            eventually("the led to follow the press", || led() == Level::High).await;
            eventually("the press to be published", || presses().len() as u64 >= n).await;
            chip.drive("GPIO27", Level::High).expect("release");
            eventually("the led to follow the release", || led() == Level::Low).await;
        }
    };
    press(1).await;
    press(2).await;
    let status = send("status", "").await.expect("answers").unwrap();
    assert_eq!(
        status,
        serde_json::json!({"presses": 2, "led": "off", "version": "1"})
    );
    let status = send("set-led", "on").await.expect("answers").unwrap();
    assert_eq!(status["led"], "on", "{status}");
    assert_eq!(led(), Level::High, "the command drove the line");
    let refused = send("set-led", "blue").await.expect_err("refused");
    assert!(
        refused.contains("set-led wants \"on\" or \"off\", got \"blue\""),
        "{refused}"
    );
    send("set-led", "off").await.expect("answers").unwrap();
    assert_eq!(led(), Level::Low);

    // A changed debounce is a hot reload: the count lives on in the key-value store.
    let report = agent
        .deploy_text(
            "button.toml",
            &js_button_led(&module, "2ms"),
            Path::new("/"),
        )
        .await
        .expect("deploys");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.reloaded, ["js-button-led"], "{report:?}");
    press(3).await;
    let records = presses();
    let counts: Vec<u64> = records
        .iter()
        .map(|r| r["presses"].as_u64().expect("a count"))
        .collect();
    assert_eq!(counts, [1, 2, 3], "every press published once, in order");
    let status = send("status", "").await.expect("answers").unwrap();
    assert_eq!(status["presses"], 3, "{status}");
    agent.shutdown().await;
}
