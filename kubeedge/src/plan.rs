//! Plain decisions from DMI messages to what Lichen does: a DeviceModel checked into a
//! [`Model`]; a Device of protocol `lichen` and its model checked into a [`DevicePlan`] (the
//! function it runs, as a [`DeviceWorkload`] or the name of a deployed workload, and how each
//! property travels between twin and function). Every refusal is a [`DmiError`] naming the
//! field, and nothing is planned.
//!
//! The rules a DeviceModel must satisfy are in `plan/model.rs`, those of a Device's function
//! (its configData) in `plan/function.rs`; this file holds the Device and its properties. The
//! tests of all three are in `plan_tests.rs`.
//!
//! Bounds (refused above them, naming the field): [`MAX_PROPERTIES`] properties per Device or
//! model, [`MAX_GRANTS`] grants of each kind, [`MAX_TRIGGERS`] triggers, [`MAX_CONFIG`]
//! configuration values, [`MAX_NAME`] bytes per name, [`MAX_VALUE`] bytes per twin value, report
//! and collect cycles within [`MIN_CYCLE`]..=[`MAX_CYCLE`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::error::DmiError;
use crate::proto::v1beta1 as pb;
use crate::proto::{ConfigValue, decode_any};
use crate::workload::{CONFIG_DATA, DeviceLabels, DeviceWorkload};

mod function;
mod model;

use function::plan_function;
pub use model::{Model, ModelProperty, ValueType, plan_model};

/// The protocol name Lichen registers and serves.
pub const PROTOCOL: &str = "lichen";
/// Most properties of one Device or DeviceModel.
pub const MAX_PROPERTIES: usize = 64;
/// Most grants of one kind (gpio, spi, i2c) of one Device.
pub const MAX_GRANTS: usize = 32;
/// Most triggers of one Device's function.
pub const MAX_TRIGGERS: usize = 8;
/// Most `config.*` values of one Device's function.
pub const MAX_CONFIG: usize = 64;
/// Longest name (device, namespace, model, property, command, stream), in bytes.
pub const MAX_NAME: usize = 253;
/// Longest twin value, in bytes (EdgeCore's twin value limit is 512 characters).
pub const MAX_VALUE: usize = 512;
/// Shortest report or collect cycle.
pub const MIN_CYCLE: Duration = Duration::from_millis(100);
/// Longest report or collect cycle.
pub const MAX_CYCLE: Duration = Duration::from_secs(24 * 3600);
/// Report and collect cycle when the Device gives none (KubeEdge's mapper default).
pub const DEFAULT_CYCLE: Duration = Duration::from_secs(1);

/// A Device's or model's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    /// Namespace (may be empty).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ResourceId {
    /// `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Checks both parts (`field` names the name's field, `namespace_field` the namespace's).
    pub fn check(&self, field: &str, namespace_field: &str) -> Result<(), DmiError> {
        check_name(field, &self.name)?;
        if self.namespace.len() > MAX_NAME || self.namespace.chars().any(char::is_control) {
            return Err(DmiError::invalid(
                namespace_field,
                format!("namespace {:?} is not a valid name", self.namespace),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn check_name(field: &str, name: &str) -> Result<(), DmiError> {
    if name.is_empty() {
        return Err(DmiError::invalid(field, "is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(DmiError::invalid(
            field,
            format!("has {} bytes; at most {MAX_NAME}", name.len()),
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(DmiError::invalid(
            field,
            format!("{name:?} holds whitespace or control characters"),
        ));
    }
    Ok(())
}

/// The function a Device runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Function {
    /// Its own workload, added and removed with the Device.
    Own(Box<DeviceWorkload>),
    /// A workload of the operator's deployment, which the Device only talks to.
    Attached(String),
}

impl Function {
    /// The workload's name.
    pub fn workload(&self) -> &str {
        match self {
            Function::Own(w) => &w.name,
            Function::Attached(name) => name,
        }
    }
}

/// How one property travels between its twin and the function.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyPlan {
    /// Property name.
    pub name: String,
    /// Type, access and range from the model.
    pub model: ModelProperty,
    /// The desired value, if the twin has one and the property is writable.
    pub desired: Option<String>,
    /// Command that delivers a desired value (payload: the value); default `set-<name>`.
    pub set_command: String,
    /// Command sent every collect cycle whose reply is the reported value; none by default.
    pub get_command: Option<String>,
    /// Telemetry stream whose records carry the reported value; default the property name.
    pub stream: String,
    /// Key of the value in a telemetry or reply JSON object; `None`: the whole payload (or its
    /// `value` key when it is an object).
    pub field: Option<String>,
    /// How often the reported value goes to EdgeCore (when it changed).
    pub report_cycle: Duration,
    /// How often `get_command` is sent.
    pub collect_cycle: Duration,
    /// Whether the twin is reported at all (KubeEdge's `reportToCloud`).
    pub report_to_cloud: bool,
}

/// What Lichen does for one Device.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    /// The Device.
    pub id: ResourceId,
    /// Its model.
    pub model: ResourceId,
    /// The function it runs or talks to.
    pub function: Function,
    /// Its properties, in the Device's order.
    pub properties: Vec<PropertyPlan>,
}

/// Device-level `configData` keys.
const DEVICE_KEYS: &[&str] = &[
    "module",
    "workload",
    "gpio",
    "spi",
    "i2c",
    "triggers",
    "restart",
    "memory",
    "time-slice",
    "queue",
];
/// Keys that only a Device with its own function (`module`) may have.
const OWN_KEYS: &[&str] = &[
    "gpio",
    "spi",
    "i2c",
    "triggers",
    "restart",
    "memory",
    "time-slice",
    "queue",
];
/// Property-level (visitor) `configData` keys.
const VISITOR_KEYS: &[&str] = &["set", "get", "stream", "field"];

/// Checks a Device of protocol `lichen` against its model (looked up by `model_of`) and plans
/// it.
pub fn plan_device(
    device: &pb::Device,
    model_of: impl Fn(&ResourceId) -> Option<Model>,
) -> Result<DevicePlan, DmiError> {
    let id = ResourceId::new(&device.namespace, &device.name);
    id.check("metadata.name", "metadata.namespace")?;
    let spec = device
        .spec
        .as_ref()
        .ok_or_else(|| DmiError::invalid("spec", "the Device has no spec"))?;
    let protocol = spec.protocol.as_ref().map_or("", |p| &p.protocol_name);
    if protocol != PROTOCOL {
        return Err(DmiError::invalid(
            "spec.protocol.protocolName",
            format!(
                "protocol {protocol:?} is not served here: this mapper serves protocol {PROTOCOL:?}"
            ),
        ));
    }
    if spec.device_model_reference.is_empty() {
        return Err(DmiError::invalid(
            "spec.deviceModelReference",
            "names no DeviceModel",
        ));
    }
    let model_id = ResourceId::new(&device.namespace, &spec.device_model_reference);
    let model = model_of(&model_id).ok_or_else(|| {
        DmiError::not_found(
            "spec.deviceModelReference",
            format!("DeviceModel {model_id} is not known to this mapper (create it first)"),
        )
    })?;
    let empty = pb::CustomizedValue::default();
    let data = spec
        .protocol
        .as_ref()
        .and_then(|p| p.config_data.as_ref())
        .unwrap_or(&empty);
    let mut function = plan_function(&id, data)?;
    if let Function::Own(workload) = &mut function {
        workload.device = DeviceLabels {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            model: model_id.name.clone(),
        };
    }
    if spec.properties.len() > MAX_PROPERTIES {
        return Err(DmiError::invalid(
            "spec.properties",
            format!(
                "{} properties; at most {MAX_PROPERTIES}",
                spec.properties.len()
            ),
        ));
    }
    let mut properties: Vec<PropertyPlan> = Vec::with_capacity(spec.properties.len());
    for (i, p) in spec.properties.iter().enumerate() {
        let plan =
            plan_property(p, &model).map_err(|e| e.under(&format!("spec.properties[{i}]")))?;
        if properties.iter().any(|q| q.name == plan.name) {
            return Err(DmiError::invalid(
                format!("spec.properties[{i}].name"),
                format!("property {:?} is listed twice", plan.name),
            ));
        }
        properties.push(plan);
    }
    Ok(DevicePlan {
        id,
        model: model_id,
        function,
        properties,
    })
}

/// The device-level `configData` as a map of decoded values, refusing unknown keys.
fn decode_data(
    data: &pb::CustomizedValue,
    known: &[&str],
    prefix: &str,
    allow_config: bool,
) -> Result<BTreeMap<String, ConfigValue>, DmiError> {
    let mut out = BTreeMap::new();
    for (key, any) in &data.data {
        let field = format!("{prefix}.{key}");
        let is_config = allow_config && key.starts_with("config.") && key.len() > "config.".len();
        if !is_config && !known.contains(&key.as_str()) {
            return Err(DmiError::invalid(
                field,
                format!(
                    "unknown key {key:?}; the keys are {}{}",
                    known.join(", "),
                    if allow_config {
                        " and config.<name>"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let value = decode_any(any).map_err(|e| DmiError::invalid(&field, e.to_string()))?;
        out.insert(key.clone(), value);
    }
    Ok(out)
}

fn text<'a>(
    values: &'a BTreeMap<String, ConfigValue>,
    key: &str,
    prefix: &str,
) -> Result<Option<&'a str>, DmiError> {
    match values.get(key) {
        None => Ok(None),
        Some(v) => v.as_text().map(Some).ok_or_else(|| {
            DmiError::invalid(
                format!("{prefix}.{key}"),
                format!("must be a string, not {}", v.to_text()),
            )
        }),
    }
}

/// Parses a JSON list of `T` from a `configData` string, naming the element at fault.
fn json_list<T: serde::de::DeserializeOwned>(
    values: &BTreeMap<String, ConfigValue>,
    key: &str,
    max: usize,
) -> Result<Vec<T>, DmiError> {
    let field = format!("{CONFIG_DATA}.{key}");
    let Some(text) = text(values, key, CONFIG_DATA)? else {
        return Ok(Vec::new());
    };
    let items: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        DmiError::invalid(&field, format!("is not a JSON list ({e}); write it as in a deployment file, e.g. [{{\"name\": ...}}]"))
    })?;
    if items.len() > max {
        return Err(DmiError::invalid(
            &field,
            format!("{} entries; at most {max}", items.len()),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            serde_json::from_value(item)
                .map_err(|e| DmiError::invalid(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

fn cycle(field: &str, ms: i64) -> Result<Duration, DmiError> {
    if ms == 0 {
        return Ok(DEFAULT_CYCLE);
    }
    let d = u64::try_from(ms)
        .map(Duration::from_millis)
        .map_err(|_| DmiError::invalid(field, format!("{ms} ms is negative")))?;
    if d < MIN_CYCLE || d > MAX_CYCLE {
        return Err(DmiError::invalid(
            field,
            format!(
                "{ms} ms is outside {} ms ..= {} ms",
                MIN_CYCLE.as_millis(),
                MAX_CYCLE.as_millis()
            ),
        ));
    }
    Ok(d)
}

fn command_name(field: String, name: &str) -> Result<String, DmiError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(DmiError::invalid(
            field,
            format!("{name:?} is not 1 to 64 ASCII letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(name.to_owned())
}

/// Plans one property; fields are relative to the property (`desired.value`).
fn plan_property(p: &pb::DeviceProperty, model: &Model) -> Result<PropertyPlan, DmiError> {
    check_name("name", &p.name)?;
    let mp = model.properties.get(&p.name).cloned().ok_or_else(|| {
        DmiError::invalid(
            "name",
            format!("property {:?} is not in DeviceModel {}", p.name, model.id),
        )
    })?;
    let desired = p
        .desired
        .as_ref()
        .map(|d| d.value.clone())
        .filter(|v| !v.is_empty() && mp.writable);
    if let Some(v) = &desired {
        mp.check_value(v)
            .map_err(|e| DmiError::invalid("desired.value", e.to_string()))?;
    }
    let visitors = p.visitors.as_ref();
    let vproto = visitors.map_or("", |v| &v.protocol_name);
    if !vproto.is_empty() && vproto != PROTOCOL {
        return Err(DmiError::invalid(
            "visitors.protocolName",
            format!("protocol {vproto:?} is not {PROTOCOL:?}"),
        ));
    }
    let empty = pb::CustomizedValue::default();
    let data = visitors
        .and_then(|v| v.config_data.as_ref())
        .unwrap_or(&empty);
    let values = decode_data(data, VISITOR_KEYS, "visitors.configData", false)?;
    let prefix = "visitors.configData";
    let set_command = match text(&values, "set", prefix)? {
        Some(c) => command_name(format!("{prefix}.set"), c)?,
        None => format!("set-{}", p.name),
    };
    let get_command = text(&values, "get", prefix)?
        .map(|c| command_name(format!("{prefix}.get"), c))
        .transpose()?;
    let stream = match text(&values, "stream", prefix)? {
        Some(s) => command_name(format!("{prefix}.stream"), s)?,
        None => p.name.clone(),
    };
    let field = text(&values, "field", prefix)?
        .map(|f| command_name(format!("{prefix}.field"), f))
        .transpose()?;
    let report_cycle = cycle("reportCycle", p.report_cycle)?;
    let collect_cycle = if p.collect_cycle == 0 {
        report_cycle
    } else {
        cycle("collectCycle", p.collect_cycle)?
    };
    Ok(PropertyPlan {
        name: p.name.clone(),
        model: mp,
        desired,
        set_command,
        get_command,
        stream,
        field,
        report_cycle,
        collect_cycle,
        report_to_cloud: p.report_to_cloud,
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
