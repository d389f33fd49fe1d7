use std::path::Path;

use lichen_devices::Level;

use super::*;
use crate::deployment;
use crate::deployment::WorkloadState;

fn parsed(text: &str) -> ParsedDeployment {
    match deployment::parse("deploy.toml", text, Path::new("/srv")) {
        Ok(parsed) => parsed,
        Err(error) => panic!("must parse, got: {error}"),
    }
}

fn parse_error(text: &str) -> DeploymentError {
    match deployment::parse("deploy.toml", text, Path::new("/srv")) {
        Ok(parsed) => panic!("must be rejected, got {:?}", parsed.spec),
        Err(error) => error,
    }
}

fn sim() -> BoardProfile {
    BoardProfile::builtin("sim").expect("the sim profile is built in")
}

fn board_error(text: &str) -> DeploymentError {
    match check(&parsed(text), &sim()) {
        Ok(()) => panic!("must be rejected by the board check:\n{text}"),
        Err(error) => error,
    }
}

fn workload(name: &str, body: &str) -> String {
    format!("[[workloads]]\nname = \"{name}\"\nmodule = \"{name}.wasm\"\n{body}\n")
}

#[test]
fn a_deployment_using_the_sim_boards_devices_passes() {
    let text = workload(
        "all",
        "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"high\" },\n\
         { name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\", edge = \"falling\", debounce = \"5ms\" }]\n\
         spi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }]\n\
         i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }]",
    );
    let parsed = parsed(&text);
    check(&parsed, &sim()).expect("valid on the sim board");
    let spec = &parsed.spec.workloads[0];
    assert_eq!(spec.gpio[0].initial, Level::High);
    assert_eq!(
        spec.gpio[1].debounce,
        Some(std::time::Duration::from_millis(5))
    );
    assert_eq!(spec.spi[0].max_hz, 1_000_000);
    assert_eq!(spec.i2c[0].addresses, vec![0x48]);
}

#[test]
fn a_pin_not_on_the_board_is_rejected_naming_file_line_and_field() {
    let error = board_error(&workload(
        "blinky",
        "gpio = [{ name = \"led\", pin = \"GPIO99\", mode = \"output\" }]",
    ));
    let text = error.to_string();
    assert!(
        text.starts_with("deploy.toml:4:"),
        "located at line 4: {text}"
    );
    assert_eq!(error.field.as_deref(), Some("workloads[0].gpio[0].pin"));
    assert!(
        text.contains("pin \"GPIO99\" is not on board \"sim\""),
        "{text}"
    );
}

#[test]
fn a_pin_granted_as_output_to_two_workloads_is_rejected() {
    let text = format!(
        "{}{}",
        workload(
            "a",
            "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]"
        ),
        workload(
            "b",
            "gpio = [{ name = \"lamp\", pin = \"GPIO17\", mode = \"output\" }]"
        ),
    );
    let error = board_error(&text);
    assert_eq!(error.line, Some(8), "{error}");
    assert_eq!(error.field.as_deref(), Some("workloads[1].gpio[0].pin"));
    assert!(
        error
            .message
            .contains("already granted as an output to workload \"a\""),
        "{error}"
    );
    assert!(error.message.contains("on line 4"), "{error}");
}

#[test]
fn an_spi_clock_above_the_bus_limit_is_rejected() {
    let error = board_error(&workload(
        "adc",
        "spi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 10000000 }]",
    ));
    assert_eq!(error.field.as_deref(), Some("workloads[0].spi[0].max-hz"));
    assert!(
        error
            .message
            .contains("10000000 Hz is above the 3600000 Hz that SPI device \"spi0.0\""),
        "{error}"
    );
}

#[test]
fn unknown_buses_are_rejected_with_what_the_board_has() {
    let error = board_error(&workload(
        "adc",
        "spi = [{ name = \"adc\", bus = \"spi1.0\" }]",
    ));
    assert_eq!(error.field.as_deref(), Some("workloads[0].spi[0].bus"));
    assert!(error.message.contains("(it has spi0.0)"), "{error}");
    let error = board_error(&workload(
        "env",
        "i2c = [{ name = \"env\", bus = \"i2c-7\", addresses = [0x48] }]",
    ));
    assert_eq!(error.field.as_deref(), Some("workloads[0].i2c[0].bus"));
    assert!(
        error.message.contains("I2C bus \"i2c-7\" is not on board"),
        "{error}"
    );
}

#[test]
fn malformed_grants_are_rejected_by_the_parser() {
    let cases = [
        (
            "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"out\" }]",
            "workloads[0].gpio[0].mode",
            "unknown GPIO mode \"out\"",
        ),
        (
            "gpio = [{ name = \"b\", pin = \"GPIO27\", mode = \"input\", initial = \"low\" }]",
            "workloads[0].gpio[0].initial",
            "applies to outputs only",
        ),
        (
            "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", edge = \"both\" }]",
            "workloads[0].gpio[0].edge",
            "applies to inputs only",
        ),
        (
            "i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x80] }]",
            "workloads[0].i2c[0].addresses[0]",
            "0x80 is not a 7-bit address",
        ),
        (
            "gpio = [{ name = \"x\", pin = \"GPIO17\", mode = \"output\" }]\n\
             spi = [{ name = \"x\", bus = \"spi0.0\" }]",
            "workloads[0].spi[0].name",
            "duplicate device name \"x\"",
        ),
        (
            "triggers = [{ gpio-edge = \"button\", edge = \"falling\" }]\n\
             gpio = [{ name = \"button\", pin = \"GPIO27\", mode = \"output\" }]",
            "workloads[0].triggers[0].gpio-edge",
            "no input pin named \"button\"",
        ),
        (
            "triggers = [{ gpio-edge = \"button\", edge = \"down\" }]",
            "workloads[0].triggers[0].edge",
            "unknown edge \"down\"",
        ),
        (
            "triggers = [{ interval = \"1s\", debounce = \"5ms\" }]",
            "workloads[0].triggers[0].debounce",
            "applies to gpio-edge triggers only",
        ),
        (
            "spi = [{ name = \"adc\", bus = \"spi0.0\", speed = 5 }]",
            "workloads[0].spi[0].speed",
            "unknown field `speed`",
        ),
    ];
    for (body, field, words) in cases {
        let error = parse_error(&workload("w", body));
        assert_eq!(error.field.as_deref(), Some(field), "{error}");
        assert!(error.line.is_some(), "{error}");
        assert!(
            error.message.contains(words),
            "{error} should say {words:?}"
        );
    }
}

#[test]
fn opened_outputs_are_shared_by_instances_and_return_to_their_safe_state() {
    let hub = DeviceHub::open("sim").expect("sim board");
    let spec = &parsed(&workload(
        "blinky",
        "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }]",
    ))
    .spec
    .workloads[0];
    let chip = hub.sim().expect("simulated").chip().clone();
    let first = hub.open_grants(spec).expect("pin opens");
    // A second instance of the same workload (a hot reload) shares the open line.
    let second = hub.open_grants(spec).expect("the same line is shared");
    match first.gpio("led") {
        Some(lichen_host_apis::GpioGrant::Output(pin)) => {
            assert_eq!(pin.safe_level(), Level::Low);
        }
        other => panic!("led is an output: {other:?}"),
    }
    assert!(first.set_safe_state().is_empty());
    assert_eq!(chip.level("GPIO17").expect("line"), Level::Low);
    assert_eq!(
        chip.consumer("GPIO17").expect("line").as_deref(),
        Some("lichen:blinky")
    );
    drop(first);
    drop(second);
    assert_eq!(
        chip.consumer("GPIO17").expect("line"),
        None,
        "released with the last instance"
    );
    // Another workload cannot take a line a workload holds.
    let _held = hub.open_grants(spec).expect("free again");
    let other = &parsed(&workload(
        "thief",
        "gpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }]",
    ))
    .spec
    .workloads[0];
    let error = hub.open_grants(other).expect_err("busy").to_string();
    assert!(
        error.contains("cannot open pin GPIO17 for grant \"led\"") && error.contains("in use"),
        "{error}"
    );
}

/// A hot reload that changes a `gpio-edge` trigger's debounce opens the new version's grants
/// while the running version holds the input: the held line is shared and reconfigured in
/// place (a second request would be refused as busy), the edge queued before keeps waiting
/// for whichever version handles it, and opening the old settings again puts them back (what
/// a reload that fails does).
#[test]
fn a_reload_that_changes_an_inputs_debounce_reconfigures_the_held_line_and_keeps_its_edges() {
    let hub = DeviceHub::open("sim").expect("sim board");
    let button = |debounce: &str| {
        parsed(&workload(
            "button",
            &format!(
                "triggers = [{{ gpio-edge = \"button\", edge = \"both\"{debounce} }}]\n\
                 gpio = [{{ name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\" }}]"
            ),
        ))
        .spec
        .workloads[0]
            .clone()
    };
    let (plain, slow) = (button(""), button(", debounce = \"10s\""));
    let chip = hub.sim().expect("simulated").chip().clone();
    let input = |grants: &lichen_host_apis::DeviceGrants| match grants.gpio("button") {
        Some(lichen_host_apis::GpioGrant::Input(pin)) => pin.clone(),
        other => panic!("button is an input: {other:?}"),
    };
    let running = hub.open_grants(&plain).expect("pin opens");
    chip.drive("GPIO27", Level::Low).expect("press");

    let reloaded = hub
        .open_grants(&slow)
        .expect("the held line is reconfigured, not requested again");
    assert!(Arc::ptr_eq(&input(&running), &input(&reloaded)), "one line");
    assert_eq!(
        chip.consumer("GPIO27").expect("line").as_deref(),
        Some("lichen:button")
    );
    let queued = input(&reloaded).try_edge().expect("line").expect("queued");
    assert_eq!(queued.edge, lichen_devices::Edge::Falling, "kept across it");
    // The new settings hold: a release is no edge until it has held for 10 s.
    chip.drive("GPIO27", Level::High).expect("release");
    assert_eq!(input(&reloaded).try_edge().expect("line"), None);
    drop(reloaded);

    // The reload failed: the running version's settings come back, and with no debounce
    // the release counts at once.
    drop(hub.open_grants(&plain).expect("settings restored"));
    let released = input(&running).try_edge().expect("line").expect("released");
    assert_eq!(released.edge, lichen_devices::Edge::Rising);
    drop(running);
    assert_eq!(chip.consumer("GPIO27").expect("line"), None, "released");
}

#[test]
fn the_sim_board_starts_with_plausible_readings() {
    let hub = DeviceHub::open("sim").expect("sim board");
    let sim = hub.sim().expect("simulated");
    assert_eq!(
        sim.mcp3008("spi0.0").and_then(|adc| adc.channel(0)),
        Some(SIM_ADC_CHANNEL0)
    );
    assert!(
        hub.open_grants(&parsed(&workload("none", "")).spec.workloads[0])
            .is_ok_and(|g| g.is_empty())
    );
}

/// Waits until `check` holds, polling every few milliseconds, for at most 30 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_return_to_their_safe_state_on_reload_crash_and_stop() {
    use crate::api::control::Control;
    use crate::api::types::SendRequest;
    use crate::supervisor::{Agent, AgentOptions};

    let dir = tempfile::tempdir().expect("temp dir");
    let agent = Agent::open(AgentOptions {
        state_dir: dir.path().to_path_buf(),
        engine: crate::runtime::wasm::EngineOptions {
            max_instances: 8,
            ..Default::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens");
    let chip = agent.devices().sim().expect("sim board").chip().clone();
    let level = || chip.level("GPIO17").expect("line");
    let blinky = lichen_test_programs::BLINKY;
    // No interval trigger: the pin moves only when a command says so.
    let text = |mark: u32| {
        format!(
            "[[workloads]]\nname = \"blinky\"\nmodule = \"{blinky}\"\nconfig = {{ mark = {mark} }}\n\
             gpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"high\" }}]\n"
        )
    };
    let send = |command: &str| {
        let agent = agent.clone();
        let request = SendRequest {
            command: command.into(),
            payload: String::new(),
        };
        async move { agent.send("blinky", request).await }
    };
    agent
        .deploy_text("blinky.toml", &text(1), Path::new("/"))
        .await
        .expect("deploys");
    let toggled = send("toggle").await.expect("toggles");
    assert_eq!(toggled.reply.as_deref(), Some("low"));
    assert_eq!(level(), Level::Low);

    // Reload: the new version shares the open line, which goes to its safe state at the switch.
    let report = agent
        .deploy_text("blinky.toml", &text(2), Path::new("/"))
        .await
        .expect("reloads");
    assert_eq!(report.reloaded, vec!["blinky".to_string()]);
    assert_eq!(level(), Level::High, "safe state after the reload");

    // Crash: the instance is dropped with its handles, then restarted.
    assert_eq!(
        send("toggle").await.expect("toggles").reply.as_deref(),
        Some("low")
    );
    assert!(send("crash").await.is_err(), "the guest traps");
    // The reply goes out before the worker drops the trapped instance.
    eventually("the safe state after the crash", || level() == Level::High).await;
    eventually("the restart", || {
        chip.consumer("GPIO17").ok().flatten().is_some()
    })
    .await;

    // Stop: safe state, and the line is released.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(reply) = send("toggle").await {
            assert_eq!(reply.reply.as_deref(), Some("low"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "blinky restarted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    agent.stop("blinky").await.expect("stops");
    // A released line floats (the simulator reads it low): the last level driven is the proof.
    let history = chip.history("GPIO17").expect("line");
    assert_eq!(
        history.last().map(|(_, level)| *level),
        Some(Level::High),
        "safe state driven at the stop: {history:?}"
    );
    assert_eq!(chip.consumer("GPIO17").expect("line"), None);
    agent.shutdown().await;
}

#[test]
fn the_example_device_deployment_fits_the_sim_board() {
    let text = include_str!("../../../examples/devices.toml");
    let parsed = parsed(text);
    check(&parsed, &sim()).expect("examples/devices.toml is valid on the sim board");
    let names: Vec<&str> = parsed
        .spec
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["blinky", "adc-sampler", "env-sensor", "button-led"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpio_edge_trigger_delivers_debounced_edges_with_their_timestamps() {
    use crate::supervisor::{Agent, AgentOptions};

    let dir = tempfile::tempdir().expect("temp dir");
    let agent = Agent::open(AgentOptions {
        state_dir: dir.path().to_path_buf(),
        engine: crate::runtime::wasm::EngineOptions {
            max_instances: 8,
            ..Default::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens");
    let chip = agent.devices().sim().expect("sim board").chip().clone();
    let module = lichen_test_programs::BUTTON_LED;
    let text = format!(
        "[[workloads]]\nname = \"button-led\"\nmodule = \"{module}\"\n\
         triggers = [{{ gpio-edge = \"button\", edge = \"both\", debounce = \"5ms\" }}]\n\
         gpio = [{{ name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\" }},\n\
         {{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }}]\n"
    );
    agent
        .deploy_text("button.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    let led = || chip.level("GPIO17").expect("line");
    eventually("button-led to start", || {
        chip.consumer("GPIO27").ok().flatten().is_some()
    })
    .await;
    assert_eq!(led(), Level::Low, "released button: led off");

    // A glitch shorter than the debounce period is no edge.
    chip.drive("GPIO27", Level::Low).expect("press");
    chip.drive("GPIO27", Level::High).expect("release");
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(led(), Level::Low, "a glitch is filtered out");

    let pressed_at = chip.now_ns();
    chip.drive("GPIO27", Level::Low).expect("press");
    eventually("the led to follow the press", || led() == Level::High).await;
    let stamp = || -> Option<u64> {
        let kv = agent.store().load_kv("button-led").ok()?;
        let value = kv.get(&("default".to_string(), "last-edge-ns".to_string()))?;
        std::str::from_utf8(value).ok()?.parse().ok()
    };
    // The event's writes are committed just after the call that drove the led.
    eventually("the edge's timestamp to be stored", || stamp().is_some()).await;
    let stamp = stamp().expect("stored");
    assert!(
        stamp >= pressed_at + 5_000_000,
        "the edge is stamped when the debounce period ended: {stamp} vs pressed at {pressed_at}"
    );

    chip.drive("GPIO27", Level::High).expect("release");
    eventually("the led to follow the release", || led() == Level::Low).await;
    agent.shutdown().await;
}

/// The edge watcher sleeps until the line has an event: across a quiet window nothing reads
/// the line (a polling watcher would read it at every tick), and an edge reaches `on-event`
/// with about one read of the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpio_edge_trigger_waits_for_line_events_without_polling() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sim_agent(dir.path()).await;
    let chip = agent.devices().sim().expect("sim board").chip().clone();
    let module = lichen_test_programs::BUTTON_LED;
    let text = format!(
        "[[workloads]]\nname = \"button-led\"\nmodule = \"{module}\"\n\
         triggers = [{{ gpio-edge = \"button\", edge = \"both\" }}]\n\
         gpio = [{{ name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\" }},\n\
         {{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }}]\n"
    );
    agent
        .deploy_text("button.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    let reads = || chip.event_reads("GPIO27").expect("line");
    // The watcher takes what was queued before it started, then sleeps.
    eventually("the edge watcher's first look at the queue", || {
        reads() >= 1
    })
    .await;
    let before = reads();
    // An observation window, not a synchronisation: nothing happens on the chip, so an
    // event-driven watcher reads nothing; the old 1 ms poll read the line ~200 times.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(reads(), before, "the line was read with no edge: polling");

    let led = || chip.level("GPIO17").expect("line");
    chip.drive("GPIO27", Level::Low).expect("press");
    eventually("the led to follow the press", || led() == Level::High).await;
    chip.drive("GPIO27", Level::High).expect("release");
    eventually("the led to follow the release", || led() == Level::Low).await;
    let used = reads() - before;
    assert!(
        (2..=8).contains(&used),
        "two edges took {used} reads of the event queue (one with the event, one finding it empty, per wake-up)"
    );
    agent.shutdown().await;
}

/// A Linux-backend profile whose line, spidev and i2c-dev node exist on no host.
fn absent_linux_board() -> BoardProfile {
    BoardProfile::from_toml(
        "absent",
        "name = \"absent\"\ndescription = \"devices that exist nowhere\"\nbackend = \"linux\"\n\
         arch = \"x86_64\"\nisolation = [\"wasm\"]\n\
         pins = [{ name = \"LED\", line = \"LICHEN-NO-SUCH-LINE\" },\n\
         { name = \"BUTTON\", line = { chip = \"lichen-no-such-chip\", offset = 3 } }]\n\
         [[spi]]\nname = \"spi9.7\"\ndevice = \"/dev/spidev9.7\"\n\
         [[i2c]]\nname = \"i2c-97\"\ndevice = \"/dev/i2c-97\"\n",
    )
    .expect("a valid profile")
}

fn open_error(hub: &DeviceHub, body: &str) -> String {
    let parsed = parsed(&workload("probe", body));
    check(&parsed, hub.profile()).expect("the grant fits the profile");
    match hub.open_grants(&parsed.spec.workloads[0]) {
        Ok(grants) => panic!("must fail to open, got {grants:?}"),
        Err(error) => error.to_string(),
    }
}

#[cfg(target_os = "linux")]
#[test]
fn on_a_linux_board_a_missing_line_or_node_fails_the_grant_naming_it() {
    let hub = DeviceHub::from_profile(absent_linux_board()).expect("no device is opened yet");
    assert!(hub.sim().is_none(), "the Linux backend serves the board");
    let error = open_error(
        &hub,
        "gpio = [{ name = \"led\", pin = \"LED\", mode = \"output\" }]",
    );
    assert!(
        error.starts_with(
            "cannot open pin LED for grant \"led\": line \"LICHEN-NO-SUCH-LINE\" not found on any gpiochip"
        ),
        "{error}"
    );
    let error = open_error(
        &hub,
        "gpio = [{ name = \"button\", pin = \"BUTTON\", mode = \"input\", edge = \"falling\" }]",
    );
    assert_eq!(
        error,
        "cannot open pin BUTTON for grant \"button\": gpiochip labelled \"lichen-no-such-chip\" not found"
    );
    let error = open_error(
        &hub,
        "spi = [{ name = \"adc\", bus = \"spi9.7\", max-hz = 1000000 }]",
    );
    assert_eq!(
        error,
        "cannot open SPI device spi9.7 for grant \"adc\": /dev/spidev9.7: no such device node"
    );
    let error = open_error(
        &hub,
        "i2c = [{ name = \"env\", bus = \"i2c-97\", addresses = [0x48] }]",
    );
    assert_eq!(
        error,
        "cannot open I2C bus i2c-97 for grant \"env\": /dev/i2c-97: no such device node"
    );
    // Nothing granted, nothing opened: a workload without devices starts on any board.
    assert!(
        hub.open_grants(&parsed(&workload("none", "")).spec.workloads[0])
            .is_ok_and(|g| g.is_empty())
    );
}

#[test]
fn the_test_guest_profile_uses_the_linux_backend() {
    let hub = DeviceHub::open("qemu-x86-test").expect("built-in profile");
    assert!(hub.sim().is_none());
    assert_eq!(hub.profile().name, "qemu-x86-test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chip_unplugged_while_running_gives_the_guest_an_error_and_the_agent_stays_up() {
    use crate::api::control::Control;
    use crate::api::types::SendRequest;
    use crate::supervisor::{Agent, AgentOptions};

    let dir = tempfile::tempdir().expect("temp dir");
    let agent = Agent::open(AgentOptions {
        state_dir: dir.path().to_path_buf(),
        engine: crate::runtime::wasm::EngineOptions {
            max_instances: 8,
            ..Default::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens");
    let chip = agent.devices().sim().expect("sim board").chip().clone();
    let blinky = lichen_test_programs::BLINKY;
    let sampler = lichen_test_programs::ADC_SAMPLER;
    let text = format!(
        "[[workloads]]\nname = \"blinky\"\nmodule = \"{blinky}\"\n\
         gpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }}]\n\n\
         [[workloads]]\nname = \"adc-sampler\"\nmodule = \"{sampler}\"\n\
         spi = [{{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }}]\n"
    );
    agent
        .deploy_text("devices.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    let send = |workload: &'static str, command: &str| {
        let agent = agent.clone();
        let request = SendRequest {
            command: command.into(),
            payload: String::new(),
        };
        async move { agent.send(workload, request).await }
    };
    let reply = send("blinky", "toggle").await.expect("toggles");
    assert_eq!(reply.reply.as_deref(), Some("high"));

    chip.remove();
    let error = send("blinky", "toggle").await.expect_err("the pin is gone");
    assert!(
        error.error.contains("hardware: pin GPIO17:") && error.error.contains("was removed"),
        "{}",
        error.error
    );
    let status = agent
        .ps()
        .await
        .into_iter()
        .find(|w| w.name == "blinky")
        .expect("blinky is known");
    assert_eq!(
        (status.state, status.traps),
        (WorkloadState::Running, 0),
        "a hardware error is the guest's to handle, not a trap"
    );
    // The other workload, on another bus, is not affected.
    let reply = send("adc-sampler", "read").await.expect("reads");
    assert_eq!(reply.reply.as_deref(), Some("512"));
    agent.shutdown().await;
}

/// An agent on the simulated board in `dir`.
async fn sim_agent(dir: &Path) -> crate::supervisor::Agent {
    use crate::supervisor::{Agent, AgentOptions};
    Agent::open(AgentOptions {
        state_dir: dir.to_path_buf(),
        engine: crate::runtime::wasm::EngineOptions {
            max_instances: 8,
            ..Default::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens")
}

/// Sends `command` with `payload` to `workload`; the reply text or the error text.
async fn send_to(
    agent: &crate::supervisor::Agent,
    workload: &str,
    command: &str,
    payload: &str,
) -> Result<String, String> {
    use crate::api::control::Control;
    let request = crate::api::types::SendRequest {
        command: command.into(),
        payload: payload.into(),
    };
    agent
        .send(workload, request)
        .await
        .map(|r| r.reply.unwrap_or_default())
        .map_err(|e| e.error)
}

/// An I2C target that records which thread ran each segment of a transaction on it (and
/// reads as zeros): a probe, not a device model.
#[derive(Clone, Default)]
struct ThreadProbe(Arc<Mutex<Vec<std::thread::ThreadId>>>);

impl lichen_devices::sim::I2cPeer for ThreadProbe {
    fn write(&mut self, _: &[u8]) {
        lock(&self.0).push(std::thread::current().id());
    }

    fn read(&mut self, buf: &mut [u8]) {
        lock(&self.0).push(std::thread::current().id());
        buf.fill(0);
    }
}

/// The test runs on a current-thread runtime, so the test's own thread is the one async
/// worker: a device host call made anywhere else ran off the async workers.
#[tokio::test(flavor = "current_thread")]
async fn device_host_calls_run_off_the_async_workers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sim_agent(dir.path()).await;
    let probe = ThreadProbe::default();
    agent
        .devices()
        .sim()
        .expect("sim board")
        .i2c("i2c-1")
        .expect("bus")
        .attach(0x50, probe.clone())
        .expect("address");
    let sensor = lichen_test_programs::ENV_SENSOR;
    let text = format!(
        "[[workloads]]\nname = \"env-sensor\"\nmodule = \"{sensor}\"\n\
         i2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [0x48, 0x50] }}]\n"
    );
    agent
        .deploy_text("devices.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    let reply = send_to(&agent, "env-sensor", "read-at", "0x50").await;
    assert_eq!(reply.as_deref(), Ok("0"), "the probe reads as zeros");
    let worker = std::thread::current().id();
    let seen = lock(&probe.0).clone();
    assert_eq!(seen.len(), 2, "one write and one read segment: {seen:?}");
    assert!(
        seen.iter().all(|thread| *thread != worker),
        "the I2C transaction ran on the async worker {worker:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_spi_device_unplugged_while_running_gives_the_guest_an_error_and_the_agent_stays_up() {
    use crate::api::control::Control;

    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sim_agent(dir.path()).await;
    let sim = agent.devices().sim().expect("sim board").clone();
    let sampler = lichen_test_programs::ADC_SAMPLER;
    let blinky = lichen_test_programs::BLINKY;
    let text = format!(
        "[[workloads]]\nname = \"adc-sampler\"\nmodule = \"{sampler}\"\n\
         spi = [{{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }}]\n\n\
         [[workloads]]\nname = \"blinky\"\nmodule = \"{blinky}\"\n\
         gpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"low\" }}]\n"
    );
    agent
        .deploy_text("devices.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    assert_eq!(
        send_to(&agent, "adc-sampler", "read", "").await.as_deref(),
        Ok("512")
    );

    sim.remove_spi("spi0.0").expect("on the board");
    let error = send_to(&agent, "adc-sampler", "read", "")
        .await
        .expect_err("the device is gone");
    assert!(
        error.contains("spi0.0: the SPI device was removed"),
        "{error}"
    );
    // Again: the workload keeps running and keeps getting the error, it is not restarted.
    assert!(send_to(&agent, "adc-sampler", "read", "").await.is_err());
    let status = agent
        .ps()
        .await
        .into_iter()
        .find(|w| w.name == "adc-sampler")
        .expect("adc-sampler is known");
    assert_eq!(
        (status.state, status.traps, status.restarts),
        (WorkloadState::Running, 0, 0),
        "a bus error is the guest's to handle, not a trap"
    );
    // Another workload on another device goes on.
    assert_eq!(
        send_to(&agent, "blinky", "toggle", "").await.as_deref(),
        Ok("high")
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_i2c_bus_unplugged_while_running_gives_the_guest_an_error_and_the_agent_stays_up() {
    use crate::api::control::Control;

    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sim_agent(dir.path()).await;
    let sim = agent.devices().sim().expect("sim board").clone();
    let sensor = lichen_test_programs::ENV_SENSOR;
    let sampler = lichen_test_programs::ADC_SAMPLER;
    let text = format!(
        "[[workloads]]\nname = \"env-sensor\"\nmodule = \"{sensor}\"\n\
         i2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }}]\n\n\
         [[workloads]]\nname = \"adc-sampler\"\nmodule = \"{sampler}\"\n\
         spi = [{{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }}]\n"
    );
    agent
        .deploy_text("devices.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    assert_eq!(
        send_to(&agent, "env-sensor", "read-at", "0x48")
            .await
            .as_deref(),
        Ok("21.5")
    );

    sim.remove_i2c("i2c-1").expect("on the board");
    // `read-at` replies with the host's error as the guest saw it.
    let reply = send_to(&agent, "env-sensor", "read-at", "0x48")
        .await
        .expect("the guest handles the error");
    assert_eq!(reply, "bus: i2c-1: the I2C bus was removed");
    let error = send_to(&agent, "env-sensor", "read", "")
        .await
        .expect_err("the bus is gone");
    assert!(error.contains("the I2C bus was removed"), "{error}");
    let status = agent
        .ps()
        .await
        .into_iter()
        .find(|w| w.name == "env-sensor")
        .expect("env-sensor is known");
    assert_eq!(
        (status.state, status.traps, status.restarts),
        (WorkloadState::Running, 0, 0),
        "a bus error is the guest's to handle, not a trap"
    );
    assert_eq!(
        send_to(&agent, "adc-sampler", "read", "").await.as_deref(),
        Ok("512"),
        "another workload on another bus goes on"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_sensor_reads_the_sim_bme280_through_the_datasheet_compensation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sim_agent(dir.path()).await;
    let bme280 = agent
        .devices()
        .sim()
        .expect("sim board")
        .bme280("i2c-1", 0x76)
        .expect("the sim board has a BME280 at 0x76");
    let sensor = lichen_test_programs::ENV_SENSOR;
    let text = format!(
        "[[workloads]]\nname = \"env-sensor\"\nmodule = \"{sensor}\"\nconfig = {{ sensor = \"bme280\" }}\n\
         i2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [0x76] }}]\n"
    );
    agent
        .deploy_text("devices.toml", &text, Path::new("/"))
        .await
        .expect("deploys");
    let read = || send_to(&agent, "env-sensor", "read", "");
    assert_eq!(
        read().await.as_deref(),
        Ok("21.5"),
        "the agent's sim temperature, to the BME280's 0.01 °C"
    );
    bme280.set_celsius(-7.25);
    assert_eq!(read().await.as_deref(), Ok("-7.25"));
    assert_eq!(bme280.measurements(), 2, "one forced measurement per read");
    agent.shutdown().await;
}

#[test]
fn an_i2c_address_granted_to_two_workloads_is_rejected_naming_the_other_owner() {
    let text = format!(
        "{}{}",
        workload(
            "a",
            "i2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }]"
        ),
        workload(
            "b",
            "i2c = [{ name = \"temp\", bus = \"i2c-1\", addresses = [0x40, 0x48] }]"
        ),
    );
    let error = board_error(&text);
    assert_eq!(
        error.field.as_deref(),
        Some("workloads[1].i2c[0].addresses[1]"),
        "{error}"
    );
    assert!(
        error
            .message
            .contains("address 0x48 on I2C bus \"i2c-1\" is already granted to workload \"a\""),
        "{error}"
    );
    // Another address on the same bus is fine.
    let fine = text.replace("[0x40, 0x48]", "[0x40]");
    check(&parsed(&fine), &sim()).expect("distinct addresses share a bus");
}
