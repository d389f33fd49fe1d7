//! KubeEdge objects for the button-led example (a DeviceModel and Devices of protocol
//! `lichen`), as EdgeCore sends them over DMI. Shared with `tests/tests/kubeedge.rs`.

#![allow(dead_code)]

use lichen_kubeedge::proto::v1beta1 as pb;
use lichen_kubeedge::proto::{ConfigValue, customized_value};

/// A digest the fake agent's store holds (the button-led function).
pub const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The DeviceModel of the button-led example: `led` (ReadWrite string), `button` (ReadOnly).
pub fn led_model() -> pb::DeviceModel {
    pb::DeviceModel {
        name: "button-led-model".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceModelSpec {
            properties: vec![
                pb::ModelProperty {
                    name: "led".into(),
                    description: "the LED on GPIO22".into(),
                    r#type: "string".into(),
                    access_mode: "ReadWrite".into(),
                    ..Default::default()
                },
                pb::ModelProperty {
                    name: "presses".into(),
                    r#type: "int".into(),
                    access_mode: "ReadOnly".into(),
                    ..Default::default()
                },
            ],
            commands: vec![],
        }),
    }
}

/// A button-led Device: its own function (`module`), button on GPIO27, LED on `led_pin`,
/// desired LED `desired`, reported every `cycle_ms`.
pub fn led_device(name: &str, led_pin: &str, desired: &str, cycle_ms: i64) -> pb::Device {
    let gpio = format!(
        r#"[{{"name":"button","pin":"GPIO27","mode":"input","bias":"pull-up"}},{{"name":"led","pin":"{led_pin}","mode":"output","initial":"low"}}]"#
    );
    device_with(
        name,
        vec![
            ("module", ConfigValue::Text(format!("sha256:{DIGEST}"))),
            ("gpio", ConfigValue::Text(gpio)),
            (
                "triggers",
                ConfigValue::Text(
                    r#"[{"gpio-edge":"button","edge":"both","debounce":"5ms"}]"#.into(),
                ),
            ),
        ],
        desired,
        cycle_ms,
    )
}

/// A Device of protocol `lichen` with `config_data`, model `button-led-model`, property `led`
/// (desired `desired`, get command `led`) and `presses` (from telemetry stream `presses`).
pub fn device_with(
    name: &str,
    config_data: Vec<(&str, ConfigValue)>,
    desired: &str,
    cycle_ms: i64,
) -> pb::Device {
    pb::Device {
        name: name.into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: "button-led-model".into(),
            protocol: Some(pb::ProtocolConfig {
                protocol_name: "lichen".into(),
                config_data: Some(customized_value(config_data)),
            }),
            properties: vec![
                pb::DeviceProperty {
                    name: "led".into(),
                    desired: Some(pb::TwinProperty {
                        value: desired.into(),
                        metadata: [("type".to_owned(), "string".to_owned())].into(),
                    }),
                    visitors: Some(pb::VisitorConfig {
                        protocol_name: "lichen".into(),
                        config_data: Some(customized_value([(
                            "get",
                            ConfigValue::Text("led".into()),
                        )])),
                    }),
                    report_cycle: cycle_ms,
                    collect_cycle: cycle_ms,
                    report_to_cloud: true,
                    push_method: None,
                },
                pb::DeviceProperty {
                    name: "presses".into(),
                    report_cycle: cycle_ms,
                    report_to_cloud: true,
                    ..Default::default()
                },
            ],
            methods: vec![],
        }),
        status: None,
    }
}
