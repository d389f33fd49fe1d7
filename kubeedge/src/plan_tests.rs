use super::*;
use crate::proto::{ConfigValue, customized_value};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn model() -> Model {
    plan_model(&pb::DeviceModel {
        name: "led-model".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceModelSpec {
            properties: vec![
                pb::ModelProperty {
                    name: "led".into(),
                    r#type: "string".into(),
                    access_mode: "ReadWrite".into(),
                    ..Default::default()
                },
                pb::ModelProperty {
                    name: "level".into(),
                    r#type: "int".into(),
                    access_mode: "ReadWrite".into(),
                    minimum: "0".into(),
                    maximum: "100".into(),
                    ..Default::default()
                },
                pb::ModelProperty {
                    name: "temperature".into(),
                    r#type: "float".into(),
                    access_mode: "ReadOnly".into(),
                    ..Default::default()
                },
            ],
            commands: vec![],
        }),
    })
    .unwrap()
}

fn device(data: Vec<(&str, ConfigValue)>, props: Vec<pb::DeviceProperty>) -> pb::Device {
    pb::Device {
        name: "led-1".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: "led-model".into(),
            protocol: Some(pb::ProtocolConfig {
                protocol_name: "lichen".into(),
                config_data: Some(customized_value(data)),
            }),
            properties: props,
            methods: vec![],
        }),
        status: None,
    }
}

fn prop(name: &str, desired: &str) -> pb::DeviceProperty {
    pb::DeviceProperty {
        name: name.into(),
        desired: Some(pb::TwinProperty {
            value: desired.into(),
            metadata: Default::default(),
        }),
        report_to_cloud: true,
        ..Default::default()
    }
}

fn t(s: &str) -> ConfigValue {
    ConfigValue::Text(s.into())
}

fn plan(d: &pb::Device) -> Result<DevicePlan, DmiError> {
    let m = model();
    plan_device(d, |id| (id == &m.id).then(|| m.clone()))
}

fn invalid_field(result: Result<DevicePlan, DmiError>) -> (String, String) {
    match result {
        Err(DmiError::Invalid { field, message }) => (field, message),
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

#[test]
fn a_lichen_device_becomes_its_own_workload_with_its_grants_and_properties() {
    let d = device(
        vec![
            ("module", t(DIGEST)),
            (
                "gpio",
                t(
                    r#"[{"name":"button","pin":"GPIO27","mode":"input","bias":"pull-up"},{"name":"led","pin":"GPIO17","mode":"output","initial":"low"}]"#,
                ),
            ),
            (
                "triggers",
                t(r#"[{"gpio-edge":"button","edge":"both","debounce":"5ms"}]"#),
            ),
            ("config.step", ConfigValue::Float(2.0)),
            ("memory", t("4MiB")),
            ("queue", ConfigValue::Int(16)),
        ],
        vec![
            pb::DeviceProperty {
                visitors: Some(pb::VisitorConfig {
                    protocol_name: "lichen".into(),
                    config_data: Some(customized_value([("get", t("led"))])),
                }),
                report_cycle: 500,
                ..prop("led", "on")
            },
            prop("temperature", "99"),
        ],
    );
    let p = plan(&d).unwrap();
    let Function::Own(w) = &p.function else {
        panic!("expected an own workload: {:?}", p.function)
    };
    assert!(w.name.starts_with("ke-led-1-"), "{}", w.name);
    assert_eq!(w.module, DIGEST);
    assert_eq!(w.gpio.len(), 2);
    assert_eq!(w.gpio[1].pin, "GPIO17");
    assert_eq!(w.config["step"], "2");
    assert_eq!(w.limits.memory.as_deref(), Some("4MiB"));
    assert_eq!(w.limits.queue, Some(16));
    assert_eq!(w.triggers[0].gpio_edge.as_deref(), Some("button"));
    // The agent labels the workload with its Device (`lichen ps`).
    assert_eq!(
        w.device,
        crate::workload::DeviceLabels {
            namespace: "default".into(),
            name: "led-1".into(),
            model: "led-model".into(),
        }
    );
    let led = &p.properties[0];
    assert_eq!(led.desired.as_deref(), Some("on"));
    assert_eq!(led.set_command, "set-led");
    assert_eq!(led.get_command.as_deref(), Some("led"));
    assert_eq!(led.stream, "led");
    assert_eq!(led.report_cycle, Duration::from_millis(500));
    assert_eq!(led.collect_cycle, Duration::from_millis(500));
    // A read-only property is reported, never written.
    assert_eq!(p.properties[1].desired, None);
    assert_eq!(p.properties[1].report_cycle, DEFAULT_CYCLE);
}

#[test]
fn a_device_may_attach_to_a_deployed_workload_but_not_set_its_grants() {
    let p = plan(&device(vec![("workload", t("thermostat"))], vec![])).unwrap();
    assert_eq!(p.function, Function::Attached("thermostat".into()));
    let (field, message) = invalid_field(plan(&device(
        vec![("workload", t("thermostat")), ("gpio", t("[]"))],
        vec![],
    )));
    assert_eq!(field, "spec.protocol.configData.gpio");
    assert!(message.contains("belong to that workload"), "{message}");
}

#[test]
fn an_unknown_protocol_is_refused_naming_the_protocol_field() {
    let mut d = device(vec![("module", t(DIGEST))], vec![]);
    d.spec
        .as_mut()
        .unwrap()
        .protocol
        .as_mut()
        .unwrap()
        .protocol_name = "modbus".into();
    let (field, message) = invalid_field(plan(&d));
    assert_eq!(field, "spec.protocol.protocolName");
    assert!(message.contains("\"modbus\""), "{message}");
}

#[test]
fn an_unknown_model_is_not_found_naming_the_model_reference() {
    let mut d = device(vec![("module", t(DIGEST))], vec![]);
    d.spec.as_mut().unwrap().device_model_reference = "nope".into();
    match plan(&d) {
        Err(DmiError::NotFound { field, message }) => {
            assert_eq!(field, "spec.deviceModelReference");
            assert!(message.contains("default/nope"), "{message}");
        }
        other => panic!("expected not-found, got {other:?}"),
    }
}

#[test]
fn malformed_config_data_is_refused_naming_the_key_or_element() {
    type Case<'a> = (Vec<(&'a str, ConfigValue)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], "spec.protocol.configData.module", "missing"),
        (
            vec![("module", t("counter.wasm"))],
            "spec.protocol.configData.module",
            "64 hex",
        ),
        (
            vec![("module", ConfigValue::Int(3))],
            "spec.protocol.configData.module",
            "must be a string",
        ),
        (
            vec![("module", t(DIGEST)), ("modul", t("x"))],
            "spec.protocol.configData.modul",
            "unknown key",
        ),
        (
            vec![("module", t(DIGEST)), ("gpio", t("{not json"))],
            "spec.protocol.configData.gpio",
            "not a JSON list",
        ),
        (
            vec![
                ("module", t(DIGEST)),
                (
                    "gpio",
                    t(
                        r#"[{"name":"led","pin":"GPIO17","mode":"output"},{"name":"b","pinn":"GPIO27","mode":"input"}]"#,
                    ),
                ),
            ],
            "spec.protocol.configData.gpio[1]",
            "unknown field `pinn`",
        ),
        (
            vec![
                ("module", t(DIGEST)),
                (
                    "gpio",
                    t(r#"[{"name":"led","pin":"GPIO17","mode":"sideways"}]"#),
                ),
            ],
            "spec.protocol.configData.gpio[0]",
            "sideways",
        ),
        (
            vec![
                ("module", t(DIGEST)),
                ("triggers", t(r#"[{"interval":"soon"}]"#)),
            ],
            "spec.protocol.configData.triggers[0].interval",
            "not a duration",
        ),
        (
            vec![("module", t(DIGEST)), ("queue", ConfigValue::Int(0))],
            "spec.protocol.configData.queue",
            "at least 1",
        ),
        (
            vec![("module", t(DIGEST)), ("workload", t("x"))],
            "spec.protocol.configData.workload",
            "not both",
        ),
    ];
    for (data, want_field, want_text) in cases {
        let (field, message) = invalid_field(plan(&device(data, vec![])));
        assert_eq!(field, want_field, "{message}");
        assert!(message.contains(want_text), "{field}: {message}");
    }
}

#[test]
fn properties_are_checked_against_the_model() {
    let base = || vec![("module", t(DIGEST))];
    let (field, message) = invalid_field(plan(&device(base(), vec![prop("colour", "red")])));
    assert_eq!(field, "spec.properties[0].name");
    assert!(
        message.contains("not in DeviceModel default/led-model"),
        "{message}"
    );
    let (field, message) = invalid_field(plan(&device(
        base(),
        vec![prop("led", "on"), prop("level", "101")],
    )));
    assert_eq!(field, "spec.properties[1].desired.value");
    assert!(message.contains("above the maximum 100"), "{message}");
    let (field, _) = invalid_field(plan(&device(base(), vec![prop("level", "high")])));
    assert_eq!(field, "spec.properties[0].desired.value");
    let (field, _) = invalid_field(plan(&device(
        base(),
        vec![prop("led", "on"), prop("led", "off")],
    )));
    assert_eq!(field, "spec.properties[1].name");
    let fast = pb::DeviceProperty {
        report_cycle: 5,
        ..prop("led", "on")
    };
    let (field, message) = invalid_field(plan(&device(base(), vec![fast])));
    assert_eq!(field, "spec.properties[0].reportCycle");
    assert!(message.contains("100 ms"), "{message}");
    let bad_visitor = pb::DeviceProperty {
        visitors: Some(pb::VisitorConfig {
            protocol_name: String::new(),
            config_data: Some(customized_value([("set", t("set led"))])),
        }),
        ..prop("led", "on")
    };
    let (field, _) = invalid_field(plan(&device(base(), vec![bad_visitor])));
    assert_eq!(field, "spec.properties[0].visitors.configData.set");
}

#[test]
fn models_are_checked_naming_the_property_field() {
    let bad = pb::DeviceModel {
        name: "m".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceModelSpec {
            properties: vec![pb::ModelProperty {
                name: "x".into(),
                r#type: "complex".into(),
                ..Default::default()
            }],
            commands: vec![],
        }),
    };
    match plan_model(&bad) {
        Err(DmiError::Invalid { field, .. }) => assert_eq!(field, "model.spec.properties[0].type"),
        other => panic!("{other:?}"),
    }
    let unnamed = pb::DeviceModel::default();
    assert_eq!(
        plan_model(&unnamed).unwrap_err().field(),
        Some("model.name")
    );
}
