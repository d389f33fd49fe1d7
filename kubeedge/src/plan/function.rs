//! The configData of a Device of protocol `lichen`: the function it runs (its own workload, or
//! a workload of the operator's deployment) with its grants, triggers, limits and restart policy.

use std::collections::BTreeMap;

use super::{
    DEVICE_KEYS, Function, MAX_CONFIG, MAX_GRANTS, MAX_TRIGGERS, OWN_KEYS, ResourceId, decode_data,
    json_list, text,
};
use crate::error::DmiError;
use crate::proto::ConfigValue;
use crate::proto::v1beta1 as pb;
use crate::workload::{
    CONFIG_DATA, DeviceLabels, DeviceWorkload, GpioGrant, I2cGrant, Limits, Restart, SpiGrant,
    Trigger, workload_name,
};

fn check_duration(field: String, text: &str) -> Result<(), DmiError> {
    humantime::parse_duration(text)
        .map(drop)
        .map_err(|e| DmiError::invalid(field, format!("{text:?} is not a duration: {e}")))
}

pub(super) fn plan_function(
    id: &ResourceId,
    data: &pb::CustomizedValue,
) -> Result<Function, DmiError> {
    let values = decode_data(data, DEVICE_KEYS, CONFIG_DATA, true)?;
    let module = text(&values, "module", CONFIG_DATA)?;
    let workload = text(&values, "workload", CONFIG_DATA)?;
    let module = match (module, workload) {
        (Some(_), Some(_)) => {
            return Err(DmiError::invalid(
                format!("{CONFIG_DATA}.workload"),
                "give either module (the Device runs its own function) or workload (it talks to a deployed one), not both",
            ));
        }
        (None, None) => {
            return Err(DmiError::invalid(
                format!("{CONFIG_DATA}.module"),
                "missing: name the device function by module (\"sha256:<64 hex digits>\") or workload (a deployed workload's name)",
            ));
        }
        (None, Some(name)) => {
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-');
            if !valid {
                return Err(DmiError::invalid(
                    format!("{CONFIG_DATA}.workload"),
                    format!("{name:?} is not a workload name ([a-z0-9][a-z0-9-]{{0,62}})"),
                ));
            }
            if let Some(key) = values
                .keys()
                .find(|k| OWN_KEYS.contains(&k.as_str()) || k.starts_with("config."))
            {
                return Err(DmiError::invalid(
                    format!("{CONFIG_DATA}.{key}"),
                    "a Device attached to a deployed workload cannot set its grants, triggers, limits or config: they belong to that workload's deployment",
                ));
            }
            return Ok(Function::Attached(name.to_owned()));
        }
        (Some(module), None) => module,
    };
    let digest = module.strip_prefix("sha256:").unwrap_or_default();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DmiError::invalid(
            format!("{CONFIG_DATA}.module"),
            format!("{module:?} is not \"sha256:\" and 64 hex digits"),
        ));
    }
    let gpio: Vec<GpioGrant> = json_list(&values, "gpio", MAX_GRANTS)?;
    for (i, g) in gpio.iter().enumerate() {
        if let Some(d) = &g.debounce {
            check_duration(format!("{CONFIG_DATA}.gpio[{i}].debounce"), d)?;
        }
    }
    let spi: Vec<SpiGrant> = json_list(&values, "spi", MAX_GRANTS)?;
    let i2c: Vec<I2cGrant> = json_list(&values, "i2c", MAX_GRANTS)?;
    let triggers: Vec<Trigger> = json_list(&values, "triggers", MAX_TRIGGERS)?;
    for (i, t) in triggers.iter().enumerate() {
        let field = format!("{CONFIG_DATA}.triggers[{i}]");
        match (&t.interval, &t.gpio_edge) {
            (Some(d), None) if t.edge.is_none() && t.debounce.is_none() => {
                check_duration(format!("{field}.interval"), d)?;
            }
            (None, Some(_)) => {
                if let Some(d) = &t.debounce {
                    check_duration(format!("{field}.debounce"), d)?;
                }
            }
            _ => {
                return Err(DmiError::invalid(
                    field,
                    "a trigger is {\"interval\": PERIOD} or {\"gpio-edge\": INPUT, \"edge\": ..., \"debounce\": ...}",
                ));
            }
        }
    }
    let restart = match text(&values, "restart", CONFIG_DATA)? {
        None => None,
        Some("always") => Some(Restart::Always),
        Some("on-failure") => Some(Restart::OnFailure),
        Some("never") => Some(Restart::Never),
        Some(other) => {
            return Err(DmiError::invalid(
                format!("{CONFIG_DATA}.restart"),
                format!("{other:?} is not always, on-failure or never"),
            ));
        }
    };
    let time_slice = text(&values, "time-slice", CONFIG_DATA)?;
    if let Some(t) = time_slice {
        check_duration(format!("{CONFIG_DATA}.time-slice"), t)?;
    }
    let queue = match values.get("queue") {
        None => None,
        Some(ConfigValue::Int(n)) if *n >= 1 => Some(n.unsigned_abs()),
        // Whole and within 1..1e9, so the float-to-integer conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(ConfigValue::Float(f)) if f.fract() == 0.0 && *f >= 1.0 && *f < 1e9 => Some(*f as u64),
        Some(other) => {
            return Err(DmiError::invalid(
                format!("{CONFIG_DATA}.queue"),
                format!("{} is not a whole number of at least 1", other.to_text()),
            ));
        }
    };
    let limits = Limits {
        memory: text(&values, "memory", CONFIG_DATA)?.map(str::to_owned),
        time_slice: time_slice.map(str::to_owned),
        queue,
    };
    let config: BTreeMap<String, String> = values
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("config.")
                .map(|k| (k.to_owned(), v.to_text()))
        })
        .collect();
    if config.len() > MAX_CONFIG {
        return Err(DmiError::invalid(
            CONFIG_DATA,
            format!("{} config.* values; at most {MAX_CONFIG}", config.len()),
        ));
    }
    Ok(Function::Own(Box::new(DeviceWorkload {
        name: workload_name(&id.namespace, &id.name),
        module: format!("sha256:{}", digest.to_ascii_lowercase()),
        restart,
        config,
        triggers,
        limits,
        gpio,
        spi,
        i2c,
        device: DeviceLabels::default(),
    })))
}
