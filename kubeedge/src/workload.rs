//! The workload a `lichen` Device runs, in the schema of Lichen's deployment files, and the
//! way back from a field of that workload to the field of the Device it came from.
//!
//! The mapper does not validate grants against the board: the agent does, in its normal
//! deployment path (the same checks as `lichen deploy`). When the agent refuses a workload it
//! names the workload's field (`gpio[0].pin`); [`device_field`] turns that into the Device's
//! (`spec.protocol.configData.gpio[0].pin`), so the gRPC status names what the user wrote.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of every field of the Device's `configData`.
pub const CONFIG_DATA: &str = "spec.protocol.configData";

/// Direction of a granted GPIO pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpioMode {
    /// The function drives the pin.
    Output,
    /// The function reads the pin.
    Input,
}

/// An output's level at start and in its safe state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Low.
    Low,
    /// High.
    High,
}

/// An input's pull resistor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    /// No pull.
    Disabled,
    /// Pull up.
    PullUp,
    /// Pull down.
    PullDown,
}

/// Which edges of an input are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edge {
    /// Low to high.
    Rising,
    /// High to low.
    Falling,
    /// Both.
    Both,
}

/// A GPIO grant, as in a deployment file: `{"name":"led","pin":"GPIO17","mode":"output"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GpioGrant {
    /// Logical name the function asks for.
    pub name: String,
    /// The board profile's pin name.
    pub pin: String,
    /// Output or input.
    pub mode: GpioMode,
    /// Outputs: level at start and on stop (the safe state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<Level>,
    /// Inputs: pull resistor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<Bias>,
    /// Inputs: edges reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<Edge>,
    /// Inputs: debounce period (`"5ms"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<String>,
}

/// An SPI grant: `{"name":"adc","bus":"spi0.0","max-hz":1000000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SpiGrant {
    /// Logical name the function asks for.
    pub name: String,
    /// The board profile's SPI device.
    pub bus: String,
    /// Highest clock in Hz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hz: Option<u32>,
}

/// An I2C grant: `{"name":"env","bus":"i2c-1","addresses":[72]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct I2cGrant {
    /// Logical name the function asks for.
    pub name: String,
    /// The board profile's I2C bus.
    pub bus: String,
    /// 7-bit addresses the function may talk to.
    pub addresses: Vec<u16>,
}

/// A trigger, as in a deployment file: `{"interval":"1s"}` or
/// `{"gpio-edge":"button","edge":"both","debounce":"5ms"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Trigger {
    /// A tick every period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An edge on the granted input of this logical name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpio_edge: Option<String>,
    /// `gpio-edge` only: which edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<Edge>,
    /// `gpio-edge` only: debounce period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<String>,
}

/// Restart policy of the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Always.
    Always,
    /// After a failure only (the agent's default).
    OnFailure,
    /// Never.
    Never,
}

/// Resource limits of the function; `None` is the agent's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Limits {
    /// Linear memory (`"16MiB"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Longest call (`"100ms"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_slice: Option<String>,
    /// Queued events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u64>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// The workload a Device owns: one entry of a deployment's `workloads` list. Its JSON form
/// ([`DeviceWorkload::to_json`]) is the deployment file schema, so the agent validates it with
/// the same code as `lichen deploy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceWorkload {
    /// Workload name ([`workload_name`] of the Device).
    pub name: String,
    /// The function: `sha256:<64 hex digits>` of a component in the agent's artifact store.
    pub module: String,
    /// Restart policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// Configuration handed to the function.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Triggers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    /// Limits.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// GPIO grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpio: Vec<GpioGrant>,
    /// SPI grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spi: Vec<SpiGrant>,
    /// I2C grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub i2c: Vec<I2cGrant>,
    /// The Device it runs for, as the agent labels it (`lichen ps`); not part of the
    /// deployment file schema.
    #[serde(skip)]
    pub device: DeviceLabels,
}

/// Which Device a workload runs for: shown by `lichen ps` beside the workload's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceLabels {
    /// The Device's namespace.
    pub namespace: String,
    /// The Device's name.
    pub name: String,
    /// Its DeviceModel's name (same namespace).
    pub model: String,
}

impl DeviceWorkload {
    /// The workload as one entry of a deployment file's `workloads` (JSON).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a DeviceWorkload always serializes to JSON")
    }

    /// A whole deployment document (JSON) listing these workloads, for an agent that applies
    /// deployments whole.
    pub fn deployment_json<'a>(workloads: impl IntoIterator<Item = &'a DeviceWorkload>) -> String {
        serde_json::json!({
            "description": "devices managed by KubeEdge",
            "workloads": workloads.into_iter().map(DeviceWorkload::to_json).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// The Device field a workload field came from: `gpio[0].pin` ->
/// `spec.protocol.configData.gpio[0].pin`, `limits.memory` -> `...configData.memory`,
/// `name` -> `metadata.name`.
pub fn device_field(workload_field: &str) -> String {
    let field = workload_field
        .strip_prefix("workloads[0].")
        .unwrap_or(workload_field);
    if field == "name" {
        return "metadata.name".to_owned();
    }
    if let Some(limit) = field.strip_prefix("limits.") {
        return format!("{CONFIG_DATA}.{limit}");
    }
    if field.is_empty() {
        return CONFIG_DATA.to_owned();
    }
    format!("{CONFIG_DATA}.{field}")
}

/// Most bytes of a workload name (the agent's `[a-z0-9][a-z0-9-]{0,62}`).
const MAX_WORKLOAD_NAME: usize = 63;

/// The workload name of Device `namespace/name`: `ke-` + the name made of lowercase letters,
/// digits and `-` (cut to fit) + `-` + 8 hex digits of the SHA-256 of `namespace/name`, so that
/// two Devices never share a name however their names are cut or folded.
pub fn workload_name(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = hex::encode(&Sha256::digest(format!("{namespace}/{name}").as_bytes())[..4]);
    let mut base: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    // "ke-" + base + "-" + 8 hex digits.
    base.truncate(MAX_WORKLOAD_NAME - 3 - 1 - 8);
    let base = base.trim_matches('-');
    if base.is_empty() {
        format!("ke-{hash}")
    } else {
        format!("ke-{base}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_fields_map_back_to_the_device_fields_they_came_from() {
        assert_eq!(
            device_field("gpio[1].pin"),
            "spec.protocol.configData.gpio[1].pin"
        );
        assert_eq!(
            device_field("workloads[0].spi[0].max-hz"),
            "spec.protocol.configData.spi[0].max-hz"
        );
        assert_eq!(
            device_field("limits.memory"),
            "spec.protocol.configData.memory"
        );
        assert_eq!(device_field("name"), "metadata.name");
        assert_eq!(device_field("module"), "spec.protocol.configData.module");
    }

    #[test]
    fn workload_names_fit_the_agent_pattern_and_never_collide() {
        let a = workload_name("a-b", "c");
        let b = workload_name("a", "b-c");
        assert_ne!(a, b);
        let long = workload_name("default", &"Very.Long.Name".repeat(20));
        assert!(long.len() <= 63, "{long}");
        for name in [a, b, long, workload_name("x", "...")] {
            assert!(name.starts_with("ke-"), "{name}");
            assert!(
                name.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "{name}"
            );
            assert!(!name.ends_with('-'), "{name}");
        }
    }

    #[test]
    fn the_json_form_is_the_deployment_file_schema() {
        let w = DeviceWorkload {
            name: "ke-led-0011aabb".into(),
            module: format!("sha256:{}", "ab".repeat(32)),
            restart: Some(Restart::Always),
            config: BTreeMap::from([("step".into(), "2".into())]),
            triggers: vec![Trigger {
                interval: None,
                gpio_edge: Some("button".into()),
                edge: Some(Edge::Both),
                debounce: Some("5ms".into()),
            }],
            limits: Limits {
                memory: Some("4MiB".into()),
                ..Limits::default()
            },
            device: DeviceLabels::default(),
            gpio: vec![GpioGrant {
                name: "led".into(),
                pin: "GPIO17".into(),
                mode: GpioMode::Output,
                initial: Some(Level::Low),
                bias: None,
                edge: None,
                debounce: None,
            }],
            spi: vec![SpiGrant {
                name: "adc".into(),
                bus: "spi0.0".into(),
                max_hz: Some(1_000_000),
            }],
            i2c: vec![],
        };
        let json = w.to_json();
        assert_eq!(json["triggers"][0]["gpio-edge"], "button");
        assert_eq!(json["limits"]["memory"], "4MiB");
        assert_eq!(json["gpio"][0]["mode"], "output");
        assert_eq!(json["spi"][0]["max-hz"], 1_000_000);
        assert!(json.get("i2c").is_none());
        let back: DeviceWorkload = serde_json::from_value(json).unwrap();
        assert_eq!(back, w);
    }
}
