//! Lichen as a KubeEdge device mapper, end to end: the real `lichen` daemon with a
//! `[kubeedge]` section, the real `button-led` function on the simulated board, and a
//! STAND-IN EdgeCore (`kubeedge/tests/support/standin.rs`, written from the same DMI
//! definitions; EdgeCore cannot be installed here).
//!
//! The device functions are workloads of the agent's `devices` source, beside the
//! operator's deployment; the reports wait in the agent's state store while EdgeCore is away.
//! The same scenarios run against a fake agent in `kubeedge/tests/dmi.rs`.

#[path = "../../kubeedge/tests/support/objects.rs"]
mod objects;
#[path = "../../kubeedge/tests/support/standin.rs"]
mod standin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lichen_agent::api::types::WorkloadState;
use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::{ConfigValue, customized_value};
use lichen_kubeedge::workload::workload_name;
use lichen_tests::{Daemon, guest, output_text};
use sha2::{Digest, Sha256};
use standin::{EdgeCoreState, StandInEdgeCore};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

/// The daemon with a `[kubeedge]` section pointing at sockets in `dir`, and the button-led
/// component in its artifact store: deployed by path as the operator's workload `store`, on
/// pins the Devices do not use, which keeps it there (the artifact store removes what no
/// workload of any source uses).
fn daemon(dir: &Path) -> (Daemon, String) {
    let config = dir.join("lichen.toml");
    std::fs::write(
        &config,
        format!(
            "[kubeedge]\nedgecore-socket = \"{}\"\nmapper-socket = \"{}\"\n",
            dir.join("dmi.sock").display(),
            dir.join("lichen.sock").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--config", config.to_str().unwrap()], None).unwrap();
    let module = guest("button-led");
    let digest = hex::encode(Sha256::digest(std::fs::read(&module).unwrap()));
    let out = daemon.deploy(
        "store.toml",
        &format!(
            "[[workloads]]\nname = \"store\"\nmodule = \"{}\"\ngpio = [{{ name = \"button\", pin = \"GPIO5\", mode = \"input\" }}, {{ name = \"led\", pin = \"GPIO6\", mode = \"output\" }}]\n",
            module.display()
        ),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    (daemon, digest)
}

fn button_led(name: &str, digest: &str, led_pin: &str, desired: &str) -> pb::Device {
    let gpio = format!(
        r#"[{{"name":"button","pin":"GPIO27","mode":"input","bias":"pull-up"}},{{"name":"led","pin":"{led_pin}","mode":"output","initial":"low"}}]"#
    );
    objects::device_with(
        name,
        vec![
            ("module", ConfigValue::Text(format!("sha256:{digest}"))),
            ("gpio", ConfigValue::Text(gpio)),
            (
                "triggers",
                ConfigValue::Text(
                    r#"[{"gpio-edge":"button","edge":"both","debounce":"5ms"}]"#.into(),
                ),
            ),
        ],
        desired,
        200,
    )
}

fn edgecore_socket(dir: &Path) -> PathBuf {
    dir.join("dmi.sock")
}

async fn registered(state: &EdgeCoreState) {
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_over_dmi_runs_on_the_sim_board_and_its_twin_follows_the_desired_value() {
    let dir = tempfile::tempdir().unwrap();
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&edgecore_socket(dir.path()), state.clone()).await;
    let (daemon, digest) = daemon(dir.path());
    registered(&state).await;
    assert_eq!(
        state.with(|r| r.registrations[0].protocol.clone()),
        "lichen"
    );
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(objects::led_model()),
    })
    .await
    .unwrap();
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(button_led("led-1", &digest, "GPIO22", "on")),
    })
    .await
    .expect("the device is registered");
    let workload = workload_name("default", "led-1");
    daemon.wait_for(&workload, "running", |w| w.state == WorkloadState::Running);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while state.reported("led-1", "led").last().map(String::as_str) != Some("on") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "led never reported on\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = daemon.cli(&["send", &workload, "led"]);
    assert!(output_text(&out).contains("on"), "{}", output_text(&out));
    dmi.update_device(pb::UpdateDeviceRequest {
        device: Some(button_led("led-1", &digest, "GPIO22", "off")),
    })
    .await
    .unwrap();
    while state.reported("led-1", "led").last().map(String::as_str) != Some("off") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "led never reported off\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state
        .wait_for("online", DEADLINE, |r| {
            r.states.iter().any(|s| s.state == "online")
        })
        .await;

    // Removing the device stops its function (its LED output returns to its safe level,
    // which the agent's own stop tests check).
    dmi.remove_device(pb::RemoveDeviceRequest {
        device_name: "led-1".into(),
        device_namespace: "default".into(),
    })
    .await
    .unwrap();
    assert!(daemon.status(&workload).is_none(), "{:?}", daemon.ps());
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgecore_away_reports_wait_in_the_agent_across_a_kill_and_arrive_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = EdgeCoreState::default();
    let socket = edgecore_socket(dir.path());
    let edgecore = StandInEdgeCore::start(&socket, state.clone()).await;
    let (mut daemon, digest) = daemon(dir.path());
    registered(&state).await;
    let mut dmi = edgecore.mapper().await;
    let device = button_led("led-1", &digest, "GPIO22", "off");
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(objects::led_model()),
    })
    .await
    .unwrap();
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(device.clone()),
    })
    .await
    .unwrap();
    state.with(|r| {
        r.models.push(objects::led_model());
        r.devices.push(device);
    });
    let workload = workload_name("default", "led-1");
    daemon.wait_for(&workload, "running", |w| w.state == WorkloadState::Running);
    // The desired value's report reaches EdgeCore before it goes away (a value changed within
    // one report cycle is reported once, as its latest).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while state.reported("led-1", "led").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "led never reported\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state.reported("led-1", "led"), ["off"]);
    edgecore.stop().await;
    // Offline: the LED is switched from the node; each change is reported on its cycle.
    let mut expected = vec!["off".to_owned()];
    for value in ["on", "off", "on", "off"] {
        let out = daemon.cli(&["send", &workload, "set-led", value]);
        assert!(out.status.success(), "{}", output_text(&out));
        expected.push(value.to_owned());
        // One report cycle (200 ms) for the get command to see it.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    daemon.kill9().unwrap();
    daemon.restart().unwrap();
    let edgecore = StandInEdgeCore::start(&socket, state.clone()).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while state.reported("led-1", "led").len() < expected.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reported {:?}, expected {expected:?}\n{}",
            state.reported("led-1", "led"),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // In order, none lost, none twice; after them only the current value may come again:
    // the registration after the restart hands the device back to the mapper with a fresh
    // twin, which reports its value once (values, not deltas: `docs/kubeedge.md`).
    let reported = state.reported("led-1", "led");
    assert_eq!(reported[..expected.len()], expected[..], "{reported:?}");
    assert!(
        reported[expected.len()..].iter().all(|v| v == "off"),
        "{reported:?}"
    );
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_devices_are_refused_naming_the_field_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&edgecore_socket(dir.path()), state.clone()).await;
    let (daemon, digest) = daemon(dir.path());
    let blinky = guest("blinky");
    let out = daemon.deploy(
        "blinky.toml",
        &format!(
            "[[workloads]]\nname = \"blinky\"\nmodule = \"{}\"\ntriggers = [{{ interval = \"1h\" }}]\ngpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }}]\n",
            blinky.display()
        ),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    registered(&state).await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(objects::led_model()),
    })
    .await
    .unwrap();
    let before = daemon.ps().into_iter().map(|w| w.name).collect::<Vec<_>>();
    let mut modbus = button_led("bad", &digest, "GPIO22", "on");
    modbus
        .spec
        .as_mut()
        .unwrap()
        .protocol
        .as_mut()
        .unwrap()
        .protocol_name = "modbus".into();
    let mut unknown_model = button_led("bad", &digest, "GPIO22", "on");
    unknown_model.spec.as_mut().unwrap().device_model_reference = "nope".into();
    let mut malformed = button_led("bad", &digest, "GPIO22", "on");
    malformed
        .spec
        .as_mut()
        .unwrap()
        .protocol
        .as_mut()
        .unwrap()
        .config_data = Some(customized_value([(
        "module",
        ConfigValue::Text("counter.wasm".into()),
    )]));
    let cases = [
        (modbus, Code::InvalidArgument, "spec.protocol.protocolName"),
        (
            button_led("bad", &digest, "GPIO99", "on"),
            Code::InvalidArgument,
            "spec.protocol.configData.gpio[1].pin",
        ),
        (
            button_led("bad", &digest, "GPIO17", "on"),
            Code::InvalidArgument,
            "spec.protocol.configData.gpio[1].pin",
        ),
        (
            malformed,
            Code::InvalidArgument,
            "spec.protocol.configData.module",
        ),
        (unknown_model, Code::NotFound, "spec.deviceModelReference"),
    ];
    for (device, code, field) in cases {
        let err = dmi
            .register_device(pb::RegisterDeviceRequest {
                device: Some(device),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{}",
            err.message()
        );
        assert_eq!(
            daemon.ps().into_iter().map(|w| w.name).collect::<Vec<_>>(),
            before
        );
    }
    edgecore.stop().await;
}

/// An I2C address is owned by one workload across sources, like a pin: a Device asking for
/// the address the operator's workload holds is refused naming the field and the owner, and
/// the operator's deployment asking for a Device's address is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_i2c_address_is_owned_by_one_workload_across_the_operator_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&edgecore_socket(dir.path()), state.clone()).await;
    let (daemon, digest) = daemon(dir.path());
    let module = guest("button-led");
    let operator = |address: &str| {
        format!(
            "[[workloads]]\nname = \"store\"\nmodule = \"{}\"\ngpio = [{{ name = \"button\", pin = \"GPIO5\", mode = \"input\" }}, {{ name = \"led\", pin = \"GPIO6\", mode = \"output\" }}]\ni2c = [{{ name = \"env\", bus = \"i2c-1\", addresses = [{address}] }}]\n",
            module.display()
        )
    };
    let out = daemon.deploy("store.toml", &operator("0x48"));
    assert!(out.status.success(), "{}", output_text(&out));
    registered(&state).await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(objects::led_model()),
    })
    .await
    .unwrap();
    let with_i2c = |name: &str, address: u16| {
        let mut device = button_led(name, &digest, "GPIO22", "on");
        let mut data = device
            .spec
            .as_ref()
            .unwrap()
            .protocol
            .as_ref()
            .unwrap()
            .config_data
            .clone()
            .unwrap();
        let extra = customized_value([(
            "i2c",
            ConfigValue::Text(format!(
                r#"[{{"name":"env","bus":"i2c-1","addresses":[{address}]}}]"#
            )),
        )]);
        data.data.extend(extra.data);
        device
            .spec
            .as_mut()
            .unwrap()
            .protocol
            .as_mut()
            .unwrap()
            .config_data = Some(data);
        device
    };
    let before = daemon.ps().into_iter().map(|w| w.name).collect::<Vec<_>>();
    let err = dmi
        .register_device(pb::RegisterDeviceRequest {
            device: Some(with_i2c("env-1", 0x48)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message()
            .starts_with("spec.protocol.configData.i2c[0].addresses[0]: "),
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("workload \"store\" of source operator"),
        "{}",
        err.message()
    );
    assert_eq!(
        daemon.ps().into_iter().map(|w| w.name).collect::<Vec<_>>(),
        before
    );

    // Another address on the same bus is the Device's; `lichen ps` labels its function with
    // the Device and its model.
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(with_i2c("env-1", 0x49)),
    })
    .await
    .expect("a free address");
    let workload = workload_name("default", "env-1");
    daemon.wait_for(&workload, "running", |w| w.state == WorkloadState::Running);
    let status = daemon.status(&workload).unwrap();
    assert_eq!(status.labels["device"], "env-1", "{status:?}");
    assert_eq!(status.labels["model"], "button-led-model", "{status:?}");
    assert_eq!(status.labels["namespace"], "default", "{status:?}");
    let out = daemon.cli(&["ps"]);
    assert!(
        output_text(&out).contains("devices:device=env-1,model=button-led-model"),
        "{}",
        output_text(&out)
    );

    // The operator's deployment may not take the Device's address; nothing changes.
    let out = daemon.deploy("store.toml", &operator("0x48, 0x49"));
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains(&format!(
            "workloads[0].i2c[0].addresses[1]: address 0x49 on I2C bus \"i2c-1\" is already granted to workload \"{workload}\" of source devices"
        )),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        daemon.status("store").unwrap().state,
        WorkloadState::Running,
        "{:?}",
        daemon.ps()
    );
    edgecore.stop().await;
}
