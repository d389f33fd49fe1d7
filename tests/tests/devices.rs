//! Device functions on the simulated board: GPIO, SPI and I2C from Wasm through the grants of
//! the deployment, and deployments whose grants the board cannot satisfy refused whole.

use std::time::{Duration, Instant};

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, output_text};

/// A workload `name` running guest `module` with `extra` lines (grants, triggers).
fn workload(name: &str, module: &str, extra: &str) -> String {
    format!(
        "[[workloads]]\nname = \"{name}\"\nmodule = \"{}\"\n{extra}\n\n",
        guest(module).display()
    )
}

fn deployed(daemon: &Daemon, text: &str) {
    let out = daemon.deploy("devices.toml", text);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// `lichen send`, expecting success; returns the reply text.
fn send(daemon: &Daemon, workload: &str, command: &str, payload: &str) -> String {
    let mut args = vec!["send", workload, command];
    if !payload.is_empty() {
        args.push(payload);
    }
    let out = daemon.cli(&args);
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The last telemetry payload of `workload` on `stream`, read from the outbox.
fn last_telemetry(daemon: &Daemon, workload: &str, stream: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        daemon.state_dir().join("lichen.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    db.query_row(
        "SELECT CAST(payload AS TEXT) FROM outbox WHERE workload = ?1 AND stream = ?2 \
         ORDER BY id DESC LIMIT 1",
        [workload, stream],
        |r| r.get(0),
    )
    .ok()
}

/// Deploys `text`, expects exit code 2 and returns the error text; checks that the running
/// workloads did not change.
fn refused(daemon: &Daemon, text: &str) -> String {
    let before = daemon.ps();
    let out = daemon.deploy("bad.toml", text);
    let message = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "deploy should be refused: {message}"
    );
    let after = daemon.ps();
    let shape = |rows: &[lichen_agent::api::types::WorkloadStatus]| {
        rows.iter()
            .map(|w| {
                (
                    w.name.clone(),
                    w.module_digest.clone(),
                    w.deployment_version,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shape(&before),
        shape(&after),
        "a refused deployment changed the workloads"
    );
    message
}

/// A daemon running blinky (version 1), to check that refused deployments change nothing.
fn daemon_with_blinky() -> Daemon {
    let daemon = Daemon::start().unwrap();
    deployed(
        &daemon,
        &workload(
            "blinky",
            "blinky",
            "triggers = [{ interval = \"20ms\" }]\n\
             gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }]",
        ),
    );
    daemon.wait_for("blinky", "running", |s| s.state == WorkloadState::Running);
    daemon
}

#[test]
fn blinky_toggles_its_granted_output_on_the_sim_board() {
    let daemon = daemon_with_blinky();
    daemon.wait_for("blinky", "ticks", |s| s.events_handled >= 4);
    let toggles: u64 = daemon
        .kv("blinky", "toggles")
        .and_then(|t| t.parse().ok())
        .expect("blinky counts its toggles");
    assert!(toggles >= 4, "toggled {toggles} times");
    // The pin, read back through the host, takes both levels over time.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 && Instant::now() < deadline {
        seen.insert(send(&daemon, "blinky", "level", ""));
        std::thread::sleep(Duration::from_millis(7));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["high", "low"],
        "the led toggles"
    );
    let status = daemon.status("blinky").unwrap();
    assert_eq!((status.state, status.traps), (WorkloadState::Running, 0));
}

#[test]
fn adc_sampler_publishes_the_sim_adc_value() {
    let daemon = Daemon::start().unwrap();
    deployed(
        &daemon,
        &workload(
            "adc-sampler",
            "adc-sampler",
            "triggers = [{ interval = \"20ms\" }]\n\
             spi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }]",
        ),
    );
    daemon.wait_for("adc-sampler", "samples", |s| s.events_handled >= 2);
    assert_eq!(daemon.kv("adc-sampler", "code").as_deref(), Some("512"));
    assert_eq!(send(&daemon, "adc-sampler", "read", ""), "512");
    let record = last_telemetry(&daemon, "adc-sampler", "adc").expect("a telemetry record");
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["channel"], 0);
    assert_eq!(record["code"], 512);
}

#[test]
fn env_sensor_publishes_the_sim_temperature() {
    let daemon = Daemon::start().unwrap();
    deployed(
        &daemon,
        &workload(
            "env-sensor",
            "env-sensor",
            "triggers = [{ interval = \"20ms\" }]\n\
             i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }]",
        ),
    );
    daemon.wait_for("env-sensor", "samples", |s| s.events_handled >= 2);
    assert_eq!(daemon.kv("env-sensor", "celsius").as_deref(), Some("21.5"));
    let record = last_telemetry(&daemon, "env-sensor", "temperature").expect("a telemetry record");
    assert_eq!(record, "{\"celsius\":21.5}");
}

#[test]
fn an_i2c_address_outside_the_grant_gets_address_not_allowed_not_a_trap() {
    let daemon = Daemon::start().unwrap();
    deployed(
        &daemon,
        &workload(
            "env-sensor",
            "env-sensor",
            "i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }]",
        ),
    );
    daemon.wait_for("env-sensor", "running", |s| {
        s.state == WorkloadState::Running
    });
    assert_eq!(send(&daemon, "env-sensor", "read-at", "0x48"), "21.5");
    assert_eq!(
        send(&daemon, "env-sensor", "read-at", "0x49"),
        "address-not-allowed(73)"
    );
    let status = daemon.status("env-sensor").unwrap();
    assert_eq!((status.state, status.traps), (WorkloadState::Running, 0));
}

#[test]
fn a_pin_the_workload_never_declared_gets_pin_not_allowed_not_a_trap() {
    let daemon = daemon_with_blinky();
    let reply = send(&daemon, "blinky", "open", "button");
    assert_eq!(
        reply,
        "pin-not-allowed: no output pin named \"button\" is granted to workload \"blinky\""
    );
    let status = daemon.status("blinky").unwrap();
    assert_eq!((status.state, status.traps), (WorkloadState::Running, 0));
}

#[test]
fn a_workload_without_grants_may_use_no_pin() {
    let daemon = Daemon::start().unwrap();
    deployed(
        &daemon,
        &workload("blinky", "blinky", "restart = \"never\""),
    );
    let status = daemon.wait_for("blinky", "failed", |s| s.state == WorkloadState::Failed);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("init failed: pin-not-allowed: no output pin named \"led\""),
        "{error}"
    );
}

#[test]
fn a_pin_not_on_the_board_is_refused_and_nothing_changes() {
    let daemon = daemon_with_blinky();
    let message = refused(
        &daemon,
        &workload(
            "lamp",
            "blinky",
            "gpio = [{ name = \"led\", pin = \"GPIO99\", mode = \"output\" }]",
        ),
    );
    assert!(
        message.contains("bad.toml:4:") && message.contains("workloads[0].gpio[0].pin"),
        "{message}"
    );
    assert!(
        message.contains("pin \"GPIO99\" is not on board \"sim\""),
        "{message}"
    );
}

#[test]
fn a_pin_granted_twice_as_output_is_refused_and_nothing_changes() {
    let daemon = daemon_with_blinky();
    let text = format!(
        "{}{}",
        workload(
            "blinky",
            "blinky",
            "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]"
        ),
        workload(
            "lamp",
            "blinky",
            "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]"
        ),
    );
    let message = refused(&daemon, &text);
    assert!(
        message.contains("bad.toml:9:") && message.contains("workloads[1].gpio[0].pin"),
        "{message}"
    );
    assert!(
        message.contains("already granted as an output to workload \"blinky\""),
        "{message}"
    );
}

#[test]
fn an_spi_clock_above_the_bus_limit_is_refused_and_nothing_changes() {
    let daemon = daemon_with_blinky();
    let message = refused(
        &daemon,
        &workload(
            "adc-sampler",
            "adc-sampler",
            "spi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 20000000 }]",
        ),
    );
    assert!(
        message.contains("bad.toml:4:") && message.contains("workloads[0].spi[0].max-hz"),
        "{message}"
    );
    assert!(
        message.contains("20000000 Hz is above the 3600000 Hz"),
        "{message}"
    );
}

#[test]
fn granted_devices_are_opened_again_when_the_agent_restarts() {
    let mut daemon = daemon_with_blinky();
    daemon.wait_for("blinky", "ticks", |s| s.events_handled >= 2);
    daemon.stop().unwrap();
    daemon.restart().unwrap();
    let before = daemon
        .kv("blinky", "toggles")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0);
    daemon.wait_for("blinky", "running again", |s| {
        s.state == WorkloadState::Running
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = daemon
            .kv("blinky", "toggles")
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        if now >= before + 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blinky toggles after the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = daemon.status("blinky").unwrap();
    assert_eq!(status.traps, 0, "{status:?}");
}

/// The device nodes of this host that the Linux-board test below needs absent: any gpiochip
/// (a chip may carry a line named GPIO17, which the test would drive), `/dev/spidev0.0` and
/// `/dev/i2c-0` (the profile's buses). Other SPI or I2C nodes do not matter.
fn colliding_device_nodes() -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    name.starts_with("gpiochip") || name == "spidev0.0" || name == "i2c-0"
                })
                .map(|name| format!("/dev/{name}"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[test]
fn on_a_linux_board_a_missing_device_fails_only_its_workload_naming_the_node() {
    // On a host with these nodes the workloads would open real hardware and the "not found"
    // errors would not hold: that is a failure to report, not a pass, unless the opt-out
    // variable says this machine may skip it.
    let collisions = colliding_device_nodes();
    if !collisions.is_empty()
        && !lichen_tests::tools::missing(
            "device-free-host",
            &format!(
                "this host has {}; the test needs none of them",
                collisions.join(", ")
            ),
        )
    {
        return;
    }
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("lichen.toml");
    std::fs::write(&config, "board = \"qemu-x86-test\"\n").unwrap();
    let daemon = Daemon::start_with(&["--config", config.to_str().unwrap()], None).unwrap();
    let text = format!(
        "{}{}{}{}",
        workload(
            "blinky",
            "blinky",
            "restart = \"never\"\n\
             gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }]"
        ),
        workload(
            "adc-sampler",
            "adc-sampler",
            "spi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }]"
        ),
        workload(
            "env-sensor",
            "env-sensor",
            "restart = \"never\"\n\
             i2c = [{ name = \"env\", bus = \"i2c-0\", addresses = [0x48] }]"
        ),
        workload("counter", "counter", "triggers = [{ interval = \"20ms\" }]"),
    );
    // The board check passes (every pin and bus is on the profile); the devices are missing
    // only when the workloads start.
    let out = daemon.deploy("devices.toml", &text);
    assert_ne!(out.status.code(), Some(2), "{}", output_text(&out));

    let blinky = daemon.wait_for("blinky", "failed", |s| s.state == WorkloadState::Failed);
    let error = blinky.last_error.unwrap_or_default();
    assert!(
        error.contains(
            "cannot open pin GPIO17 for grant \"led\": line \"GPIO17\" not found on any gpiochip (this host has no gpiochip)"
        ),
        "{error}"
    );
    let sampler = daemon.wait_for("adc-sampler", "backoff", |s| {
        s.state == WorkloadState::Backoff && s.last_error.is_some()
    });
    let error = sampler.last_error.unwrap_or_default();
    assert!(
        error.contains(
            "cannot open SPI device spi0.0 for grant \"adc\": /dev/spidev0.0: no such device node"
        ),
        "{error}"
    );
    let sensor = daemon.wait_for("env-sensor", "failed", |s| s.state == WorkloadState::Failed);
    let error = sensor.last_error.unwrap_or_default();
    assert!(
        error.contains(
            "cannot open I2C bus i2c-0 for grant \"env\": /dev/i2c-0: no such device node"
        ),
        "{error}"
    );
    // The workload without devices runs on, and so does the agent.
    let counter = daemon.wait_for("counter", "ticks", |s| {
        s.state == WorkloadState::Running && s.events_handled >= 3
    });
    assert_eq!(counter.traps, 0);
    let ps = daemon.cli(&["ps"]);
    assert!(ps.status.success(), "{}", output_text(&ps));
}
