//! Lichen as a KubeEdge device mapper, end to end: the real `lichen` daemon with a
//! `[kubeedge]` section, the real `button-led` function on the simulated board, and a
//! STAND-IN EdgeCore (`kubeedge/tests/support/standin.rs`, written from the same DMI
//! definitions; EdgeCore cannot be installed here).
//!
//! Ignored until the agent runs the mapper: `lichen-kubeedge`'s `DeviceHost` needs the
//! restructured supervisor (issue 9) to add and remove a device's workload beside the
//! operator's deployment. The same scenarios run now against a fake agent in
//! `kubeedge/tests/dmi.rs`. Remove the `ignore` attributes when `lichen run` reads
//! `[kubeedge]`.

#[path = "../../kubeedge/tests/support/objects.rs"]
mod objects;
#[path = "../../kubeedge/tests/support/standin.rs"]
mod standin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::{ConfigValue, customized_value};
use lichen_kubeedge::workload::workload_name;
use lichen_tests::{Daemon, guest, output_text};
use sha2::{Digest, Sha256};
use standin::{EdgeCoreState, StandInEdgeCore};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

/// The daemon with a `[kubeedge]` section pointing at sockets in `dir`, and the button-led
/// component in its artifact store (deployed once by path, then the deployment emptied).
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
    let out = daemon.deploy("empty.toml", "workloads = []\n");
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
#[ignore = "needs the agent to run the KubeEdge mapper (DeviceHost in the restructured supervisor, issue 9)"]
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
    daemon.wait_for(&workload, "running", |w| w.state == "running");
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
#[ignore = "needs the agent to run the KubeEdge mapper (DeviceHost in the restructured supervisor, issue 9)"]
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
    daemon.wait_for(&workload, "running", |w| w.state == "running");
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
    while state.reported("led-1", "led") != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reported {:?}, expected {expected:?}\n{}",
            state.reported("led-1", "led"),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the agent to run the KubeEdge mapper (DeviceHost in the restructured supervisor, issue 9)"]
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
