//! The mapper against a STAND-IN EdgeCore (`support/standin.rs`, written from the same DMI
//! definitions) and a FAKE agent (`support/fake.rs`), both on real Unix sockets with real
//! gRPC, and the report queue in a real SQLite file. The same scenarios against the real agent
//! are in `tests/tests/kubeedge.rs`.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lichen_kubeedge::Running;
use lichen_kubeedge::host::Health;
use lichen_kubeedge::mapper::MapperConfig;
use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::{ConfigValue, customized_value};
use lichen_kubeedge::queue::ReportQueue;
use lichen_kubeedge::workload::{Level, workload_name};
use support::fake::FakeAgent;
use support::queue::WatchedQueue;
use support::standin::{EdgeCoreState, StandInEdgeCore};
use support::{DIGEST, led_device, led_model};
use tonic::Code;

/// Longest wait for anything in these tests (2 shared cores; never a timing assertion).
const DEADLINE: Duration = Duration::from_secs(30);

fn config(dir: &Path) -> MapperConfig {
    MapperConfig {
        edgecore_socket: dir.join("dmi.sock"),
        mapper_socket: dir.join("lichen.sock"),
        health_every: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        probe_every: Duration::from_millis(50),
        ..MapperConfig::default()
    }
}

async fn start(
    dir: &Path,
    agent: &FakeAgent,
) -> (Running<FakeAgent, WatchedQueue>, Arc<WatchedQueue>) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_test_writer()
        .try_init();
    let queue = Arc::new(
        WatchedQueue::open(&dir.join("kubeedge.db"), 10_000, agent.change_counter()).unwrap(),
    );
    let running = Running::start(agent.clone(), queue.clone(), config(dir))
        .await
        .expect("the mapper starts");
    (running, queue)
}

/// Waits until `done` holds, looking again at every call to the fake agent (the mapper reads
/// its health every `health_every`), every change of the report queue and every call to the
/// stand-in EdgeCore; panics naming `what` after [`DEADLINE`].
async fn wait_until(
    what: &str,
    agent: &FakeAgent,
    edgecore: &EdgeCoreState,
    mut done: impl FnMut() -> bool,
) {
    let mut agent_changes = agent.changes();
    let mut edgecore_changes = edgecore.changes();
    let ok = tokio::time::timeout(DEADLINE, async {
        while !done() {
            tokio::select! {
                changed = agent_changes.changed() => changed.expect("the fake agent outlives the wait"),
                changed = edgecore_changes.changed() => changed.expect("the stand-in's state outlives the wait"),
            }
        }
    })
    .await;
    assert!(ok.is_ok(), "{what} did not happen within {DEADLINE:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_at_start_and_again_after_the_stand_in_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    let state = EdgeCoreState::default();
    // The mapper starts first and waits for EdgeCore.
    let (running, _) = start(dir.path(), &agent).await;
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    state
        .wait_for("the first registration", DEADLINE, |r| {
            r.registrations.len() == 1
        })
        .await;
    let info = state.with(|r| r.registrations[0].clone());
    assert_eq!(info.protocol, "lichen");
    assert_eq!(info.api_version, "v1beta1");
    assert_eq!(
        info.address,
        dir.path()
            .join("lichen.sock")
            .as_os_str()
            .as_encoded_bytes()
    );
    // EdgeCore restarts while the link is idle (no device, nothing to report).
    edgecore.stop().await;
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    state
        .wait_for("registration after the restart", DEADLINE, |r| {
            r.registrations.len() == 2
        })
        .await;
    wait_until(
        "the mapper counted both registrations",
        &agent,
        &state,
        || {
            running
                .mapper
                .stats()
                .registrations
                .load(std::sync::atomic::Ordering::Relaxed)
                == 2
        },
    )
    .await;
    running.shutdown().await;
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_over_dmi_runs_its_function_and_its_twin_follows_the_desired_value() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    let (running, _) = start(dir.path(), &agent).await;
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .expect("the model is created");
    let reply = dmi
        .register_device(pb::RegisterDeviceRequest {
            device: Some(led_device("led-1", "GPIO22", "on", 100)),
        })
        .await
        .expect("the device is registered")
        .into_inner();
    assert_eq!(
        (reply.device_name.as_str(), reply.device_namespace.as_str()),
        ("led-1", "default")
    );

    // The Device became a workload with its grants, and the desired value reached it.
    let workload = workload_name("default", "led-1");
    assert!(agent.workloads().contains(&workload));
    let spec = agent.state.lock().unwrap().workloads[&workload]
        .spec
        .clone()
        .unwrap();
    assert_eq!(spec.module, format!("sha256:{DIGEST}"));
    assert_eq!(spec.gpio[1].pin, "GPIO22");
    assert_eq!(spec.triggers[0].gpio_edge.as_deref(), Some("button"));
    wait_until("set-led delivered", &agent, &state, || {
        agent
            .state
            .lock()
            .unwrap()
            .commands
            .iter()
            .any(|(w, c, p)| *w == workload && c == "set-led" && p == "on")
    })
    .await;
    // The function's answer comes back as the twin's reported value, with the desired value
    // it observed, and the device is online.
    state
        .wait_for("led reported on", DEADLINE, |r| {
            r.twins.iter().any(|t| {
                t.device_name == "led-1"
                    && t.reported_device.as_ref().unwrap().twins.iter().any(|tw| {
                        tw.property_name == "led"
                            && tw.reported.as_ref().is_some_and(|v| v.value == "on")
                            && tw
                                .observed_desired
                                .as_ref()
                                .is_some_and(|v| v.value == "on")
                    })
            })
        })
        .await;
    state
        .wait_for("online", DEADLINE, |r| {
            r.states.iter().any(|s| s.state == "online")
        })
        .await;
    // Telemetry from the function becomes the reported value of its property's stream.
    agent.publish(&workload, "presses", "3");
    state
        .wait_for("presses reported", DEADLINE, |r| {
            r.twins
                .iter()
                .flat_map(|t| t.reported_device.iter().flat_map(|s| s.twins.iter()))
                .any(|tw| {
                    tw.property_name == "presses"
                        && tw.reported.as_ref().is_some_and(|v| v.value == "3")
                })
        })
        .await;
    // A new desired value from the cloud (UpdateDevice) reaches the function and comes back.
    dmi.update_device(pb::UpdateDeviceRequest {
        device: Some(led_device("led-1", "GPIO22", "off", 100)),
    })
    .await
    .expect("the device is updated");
    wait_until("led reported off", &agent, &state, || {
        state.reported("led-1", "led").last().map(String::as_str) == Some("off")
    })
    .await;
    assert_eq!(
        state.reported("led-1", "led"),
        vec!["on", "off"],
        "each value once, in order"
    );
    // GetDevice answers the twins.
    let got = dmi
        .get_device(pb::GetDeviceRequest {
            device_name: "led-1".into(),
            device_namespace: "default".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    let twins = got.status.unwrap().twins;
    let led = twins.iter().find(|t| t.property_name == "led").unwrap();
    assert_eq!(led.reported.as_ref().unwrap().value, "off");
    assert_eq!(led.observed_desired.as_ref().unwrap().value, "off");
    // The function fails: the device goes offline.
    agent.set_health(&workload, Health::Down("trapped".into()));
    state
        .wait_for("offline", DEADLINE, |r| {
            r.states.iter().any(|s| s.state == "offline")
        })
        .await;
    running.shutdown().await;
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_device_stops_its_function_and_leaves_its_pins_in_their_safe_state() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    let (running, _) = start(dir.path(), &agent).await;
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .unwrap();
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(led_device("led-1", "GPIO22", "on", 100)),
    })
    .await
    .unwrap();
    let workload = workload_name("default", "led-1");
    wait_until("led on", &agent, &state, || {
        agent
            .state
            .lock()
            .unwrap()
            .workloads
            .get(&workload)
            .is_some_and(|w| w.values.get("led").map(String::as_str) == Some("on"))
    })
    .await;
    dmi.remove_device(pb::RemoveDeviceRequest {
        device_name: "led-1".into(),
        device_namespace: "default".into(),
    })
    .await
    .expect("the device is removed");
    assert!(
        !agent.workloads().contains(&workload),
        "its function was stopped"
    );
    assert_eq!(
        agent.state.lock().unwrap().outputs["GPIO22"],
        Level::Low,
        "the LED output is back at its safe level"
    );
    let err = dmi
        .get_device(pb::GetDeviceRequest {
            device_name: "led-1".into(),
            device_namespace: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("deviceName"), "{}", err.message());
    // The pin is free again for another device.
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(led_device("led-2", "GPIO22", "on", 100)),
    })
    .await
    .expect("GPIO22 is free again");
    running.shutdown().await;
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgecore_away_reports_are_kept_durably_and_delivered_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    let state = EdgeCoreState::default();
    let socket = dir.path().join("dmi.sock");
    let edgecore = StandInEdgeCore::start(&socket, state.clone()).await;
    let (running, queue) = start(dir.path(), &agent).await;
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .unwrap();
    let device = led_device("counter-1", "GPIO22", "on", 100);
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(device.clone()),
    })
    .await
    .unwrap();
    // EdgeCore keeps the device in its database, and lists it at the next registration.
    state.with(|r| {
        r.models.push(led_model());
        r.devices.push(device);
    });
    state
        .wait_for("online", DEADLINE, |r| {
            r.states.iter().any(|s| s.state == "online")
        })
        .await;
    wait_until(
        "led reported and nothing left to send",
        &agent,
        &state,
        || state.reported("counter-1", "led") == ["on"] && queue.len().unwrap() == 0,
    )
    .await;
    let workload = workload_name("default", "counter-1");

    // EdgeCore goes away. The function keeps publishing; each value is reported on its cycle
    // and waits in the queue.
    edgecore.stop().await;
    let mut published = Vec::new();
    for n in 1..=8 {
        let before = queue.len().unwrap();
        agent.publish(&workload, "presses", &n.to_string());
        published.push(n.to_string());
        wait_until("the report queued", &agent, &state, || {
            queue.len().unwrap() > before
        })
        .await;
    }
    // The mapper itself restarts while EdgeCore is away: the queue is in its file.
    running.shutdown().await;
    let waiting = queue.len().unwrap();
    drop(queue);
    let (running, queue) = start(dir.path(), &agent).await;
    assert_eq!(
        queue.len().unwrap(),
        waiting,
        "nothing lost across the restart"
    );
    assert!(state.reported("counter-1", "presses").is_empty());

    // EdgeCore returns: the mapper registers again and delivers everything, in order, once.
    let edgecore = StandInEdgeCore::start(&socket, state.clone()).await;
    wait_until("queue drained", &agent, &state, || {
        queue.len().unwrap() == 0
    })
    .await;
    assert_eq!(state.reported("counter-1", "presses"), published);
    assert!(state.with(|r| r.registrations.len()) >= 2);
    assert_eq!(queue.dropped().unwrap(), 0);
    running.shutdown().await;
    edgecore.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_devices_are_refused_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    // The operator's deployment already drives GPIO17.
    agent.operator_workload("blinky", &["GPIO17"]);
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    let (running, _) = start(dir.path(), &agent).await;
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .unwrap();
    let workloads_before = agent.workloads();

    let mut modbus = led_device("bad", "GPIO22", "on", 100);
    modbus
        .spec
        .as_mut()
        .unwrap()
        .protocol
        .as_mut()
        .unwrap()
        .protocol_name = "modbus".into();
    let mut unknown_model = led_device("bad", "GPIO22", "on", 100);
    unknown_model.spec.as_mut().unwrap().device_model_reference = "no-such-model".into();
    let mut malformed = led_device("bad", "GPIO22", "on", 100);
    malformed
        .spec
        .as_mut()
        .unwrap()
        .protocol
        .as_mut()
        .unwrap()
        .config_data = Some(customized_value([
        ("module", ConfigValue::Text(format!("sha256:{DIGEST}"))),
        (
            "gpio",
            ConfigValue::Text("[{\"name\": \"led\", \"pin\": 17}]".into()),
        ),
    ]));
    let cases = [
        (
            modbus,
            Code::InvalidArgument,
            "spec.protocol.protocolName",
            "\"modbus\"",
        ),
        (
            led_device("bad", "GPIO99", "on", 100),
            Code::InvalidArgument,
            "spec.protocol.configData.gpio[1].pin",
            "not on board \"sim\"",
        ),
        (
            led_device("bad", "GPIO17", "on", 100),
            Code::InvalidArgument,
            "spec.protocol.configData.gpio[1].pin",
            "already granted to workload \"blinky\"",
        ),
        (
            malformed,
            Code::InvalidArgument,
            "spec.protocol.configData.gpio[0]",
            "invalid type",
        ),
        (
            unknown_model,
            Code::NotFound,
            "spec.deviceModelReference",
            "default/no-such-model",
        ),
    ];
    for (device, code, field, text) in cases {
        let err = dmi
            .register_device(pb::RegisterDeviceRequest {
                device: Some(device),
            })
            .await
            .expect_err("a bad device is refused");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{}",
            err.message()
        );
        assert!(err.message().contains(text), "{}", err.message());
        // Nothing changed: no device, no workload, the operator's pin untouched.
        assert!(running.mapper.devices().await.is_empty());
        assert_eq!(agent.workloads(), workloads_before);
        let get = dmi
            .get_device(pb::GetDeviceRequest {
                device_name: "bad".into(),
                device_namespace: "default".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(get.code(), Code::NotFound);
    }
    assert!(
        agent.state.lock().unwrap().outputs.is_empty(),
        "no pin was driven"
    );
    // A model update for an unknown model is NotFound, naming the field.
    let mut other = led_model();
    other.name = "other".into();
    let err = dmi
        .update_device_model(pb::UpdateDeviceModelRequest { model: Some(other) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().starts_with("model.name: "),
        "{}",
        err.message()
    );
    running.shutdown().await;
    edgecore.stop().await;
}

#[tokio::test]
async fn a_registration_list_read_before_a_device_arrived_does_not_remove_it() {
    let agent = FakeAgent::new(&[DIGEST]);
    let queue = Arc::new(lichen_kubeedge::queue::MemoryQueue::new(100));
    let mapper =
        lichen_kubeedge::mapper::Mapper::new(agent.clone(), queue, MapperConfig::default());
    mapper.create_model(led_model()).await.unwrap();
    let plain = |name: &str| {
        support::device_with(
            name,
            vec![("module", ConfigValue::Text(format!("sha256:{DIGEST}")))],
            "on",
            100,
        )
    };
    let old = plain("old");
    mapper.register_device(old.clone()).await.unwrap();
    // MapperRegister starts; meanwhile EdgeCore registers a new device over DMI.
    let epoch = mapper.epoch().await;
    mapper.register_device(plain("new")).await.unwrap();
    // The list (read before "new" came) lists neither: "old" goes, "new" stays.
    mapper.reconcile(vec![led_model()], vec![], epoch).await;
    let names: Vec<String> = mapper
        .devices()
        .await
        .into_iter()
        .map(|(id, _)| id.name)
        .collect();
    assert_eq!(names, vec!["new"]);
    assert!(!agent.workloads().contains(&workload_name("default", "old")));
    // A later list that omits "new" removes it.
    let epoch = mapper.epoch().await;
    mapper.reconcile(vec![], vec![old], epoch).await;
    let names: Vec<String> = mapper
        .devices()
        .await
        .into_iter()
        .map(|(id, _)| id.name)
        .collect();
    assert_eq!(names, vec!["old"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_attached_to_a_deployed_workload_talks_to_it_and_leaves_it_running() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::new(&[DIGEST]);
    agent.operator_workload("thermostat", &[]);
    let state = EdgeCoreState::default();
    let edgecore = StandInEdgeCore::start(&dir.path().join("dmi.sock"), state.clone()).await;
    let (running, _) = start(dir.path(), &agent).await;
    state
        .wait_for("registration", DEADLINE, |r| !r.registrations.is_empty())
        .await;
    let mut dmi = edgecore.mapper().await;
    dmi.create_device_model(pb::CreateDeviceModelRequest {
        model: Some(led_model()),
    })
    .await
    .unwrap();
    let attached = |workload: &str| {
        support::device_with(
            "thermo-1",
            vec![("workload", ConfigValue::Text(workload.into()))],
            "on",
            100,
        )
    };
    // A workload that is not deployed is refused, naming the key.
    let err = dmi
        .register_device(pb::RegisterDeviceRequest {
            device: Some(attached("heater")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .starts_with("spec.protocol.configData.workload: "),
        "{}",
        err.message()
    );
    dmi.register_device(pb::RegisterDeviceRequest {
        device: Some(attached("thermostat")),
    })
    .await
    .expect("the device attaches to the operator's workload");
    wait_until("set-led delivered to thermostat", &agent, &state, || {
        agent
            .state
            .lock()
            .unwrap()
            .commands
            .iter()
            .any(|(w, c, p)| w == "thermostat" && c == "set-led" && p == "on")
    })
    .await;
    agent.publish("thermostat", "presses", "7");
    wait_until("presses reported", &agent, &state, || {
        state.reported("thermo-1", "presses") == ["7"]
    })
    .await;
    dmi.remove_device(pb::RemoveDeviceRequest {
        device_name: "thermo-1".into(),
        device_namespace: "default".into(),
    })
    .await
    .unwrap();
    assert!(
        agent.workloads().contains(&"thermostat".to_owned()),
        "the operator's workload keeps running"
    );
    assert_eq!(
        agent.state.lock().unwrap().applies,
        0,
        "the mapper never deployed anything"
    );
    running.shutdown().await;
    edgecore.stop().await;
}
