//! Device grants: GPIO lines, SPI devices and I2C addresses a workload may use, unique logical
//! device names, and `gpio-edge` triggers that watch a granted input.

use std::collections::HashMap;

use super::names::check_device_name;
use super::shape::find;
use super::{Checker, Result};
use crate::spec::{GpioGrantSpec, GpioMode, I2cGrantSpec, SpiGrantSpec, Trigger};
use crate::tree::{Entry, Node, Value};

const GPIO_FIELDS: &[&str] = &["name", "pin", "mode", "initial", "bias", "edge", "debounce"];
const GPIO_INPUT_ONLY: &[&str] = &["bias", "edge", "debounce"];
const SPI_FIELDS: &[&str] = &["name", "bus", "max-hz"];
const I2C_FIELDS: &[&str] = &["name", "bus", "addresses"];
/// SPI clock of a grant that does not say.
const DEFAULT_SPI_HZ: u32 = 1_000_000;
/// Highest 7-bit I2C address.
const MAX_I2C_ADDRESS: i128 = 0x7f;

impl Checker<'_> {
    /// The entries of one grant table, with unknown fields refused, and its `name`.
    pub(super) fn grant_entries<'n>(
        &self,
        item: &'n Node,
        path: &str,
        allowed: &[&str],
        example: &str,
    ) -> Result<(&'n [Entry], String)> {
        let entries = self.table(item, path, &format!(" such as {example}"))?;
        self.deny_unknown(entries, path, allowed, "field")?;
        let name_node = &self
            .required(
                item,
                entries,
                path,
                "name",
                "the logical name the module asks for",
            )?
            .value;
        let name = self.string(name_node, &format!("{path}.name"), "a string")?;
        check_device_name(name).map_err(|why| {
            self.error(
                name_node.span.start,
                &format!("{path}.name"),
                why.to_string(),
            )
        })?;
        Ok((entries, name.to_owned()))
    }

    pub(super) fn gpio_grants(&self, node: &Node, path: &str) -> Result<Vec<GpioGrantSpec>> {
        const EXAMPLE: &str = "{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }";
        let items = self.array(node, path, "a list of GPIO grants")?;
        let mut grants = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let (entries, name) = self.grant_entries(item, &item_path, GPIO_FIELDS, EXAMPLE)?;
            let field = |key: &str| format!("{item_path}.{key}");
            let pin = self.required_string(
                item,
                entries,
                &item_path,
                "pin",
                "the board's pin name, such as \"GPIO17\"",
            )?;
            let mode_node = &self
                .required(item, entries, &item_path, "mode", "\"output\" or \"input\"")?
                .value;
            let mode = match self.string(mode_node, &field("mode"), "a string")? {
                "output" => GpioMode::Output,
                "input" => GpioMode::Input,
                other => {
                    return Err(self.error(
                        mode_node.span.start,
                        &field("mode"),
                        format!("unknown GPIO mode \"{other}\": expected \"output\" or \"input\""),
                    ));
                }
            };
            let mut grant = GpioGrantSpec {
                name,
                pin,
                mode,
                initial: lichen_devices::Level::Low,
                bias: None,
                edge: None,
                debounce: None,
            };
            match mode {
                GpioMode::Output => {
                    if let Some(extra) = entries
                        .iter()
                        .find(|e| GPIO_INPUT_ONLY.contains(&e.key.as_str()))
                    {
                        return Err(self.error(
                            extra.key_span.start,
                            &field(&extra.key),
                            format!(
                                "`{}` applies to inputs only; this pin is an output",
                                extra.key
                            ),
                        ));
                    }
                    if let Some(entry) = find(entries, "initial") {
                        grant.initial =
                            match self.string(&entry.value, &field("initial"), "a string")? {
                                "low" => lichen_devices::Level::Low,
                                "high" => lichen_devices::Level::High,
                                other => {
                                    return Err(self.error(
                                    entry.value.span.start,
                                    &field("initial"),
                                    format!(
                                        "unknown level \"{other}\": expected \"low\" or \"high\""
                                    ),
                                ));
                                }
                            };
                    }
                }
                GpioMode::Input => {
                    if let Some(entry) = find(entries, "initial") {
                        return Err(self.error(
                            entry.key_span.start,
                            &field("initial"),
                            "`initial` applies to outputs only; this pin is an input",
                        ));
                    }
                    if let Some(entry) = find(entries, "bias") {
                        grant.bias = Some(
                            match self.string(&entry.value, &field("bias"), "a string")? {
                                "disabled" => lichen_devices::Bias::Disabled,
                                "pull-up" => lichen_devices::Bias::PullUp,
                                "pull-down" => lichen_devices::Bias::PullDown,
                                other => {
                                    return Err(self.error(
                                    entry.value.span.start,
                                    &field("bias"),
                                    format!("unknown bias \"{other}\": expected \"disabled\", \"pull-up\" or \"pull-down\""),
                                ));
                                }
                            },
                        );
                    }
                    if let Some(entry) = find(entries, "edge") {
                        grant.edge = Some(
                            match self.string(&entry.value, &field("edge"), "a string")? {
                                "rising" => lichen_devices::EdgeDetection::Rising,
                                "falling" => lichen_devices::EdgeDetection::Falling,
                                "both" => lichen_devices::EdgeDetection::Both,
                                other => {
                                    return Err(self.error(
                                    entry.value.span.start,
                                    &field("edge"),
                                    format!("unknown edge \"{other}\": expected \"rising\", \"falling\" or \"both\""),
                                ));
                                }
                            },
                        );
                    }
                    if let Some(entry) = find(entries, "debounce") {
                        grant.debounce = Some(self.duration(
                            &entry.value,
                            &field("debounce"),
                            "debounce",
                            (GpioGrantSpec::MIN_DEBOUNCE, GpioGrantSpec::MAX_DEBOUNCE),
                        )?);
                    }
                }
            }
            grants.push(grant);
        }
        Ok(grants)
    }

    pub(super) fn spi_grants(&self, node: &Node, path: &str) -> Result<Vec<SpiGrantSpec>> {
        const EXAMPLE: &str = "{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }";
        let items = self.array(node, path, "a list of SPI grants")?;
        let mut grants = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let (entries, name) = self.grant_entries(item, &item_path, SPI_FIELDS, EXAMPLE)?;
            let bus = self.required_string(
                item,
                entries,
                &item_path,
                "bus",
                "the board's SPI device, such as \"spi0.0\"",
            )?;
            let max_hz = match find(entries, "max-hz") {
                None => DEFAULT_SPI_HZ,
                Some(entry) => {
                    let field = format!("{item_path}.max-hz");
                    let Value::Integer(hz) = entry.value.value else {
                        return Err(self.expected(&entry.value, &field, "a whole number of Hz"));
                    };
                    match u32::try_from(hz) {
                        Ok(hz) if (1..=SpiGrantSpec::MAX_HZ).contains(&hz) => hz,
                        _ => {
                            return Err(self.error(
                                entry.value.span.start,
                                &field,
                                format!(
                                    "invalid SPI clock {hz} Hz: expected 1 to {} Hz",
                                    SpiGrantSpec::MAX_HZ
                                ),
                            ));
                        }
                    }
                }
            };
            grants.push(SpiGrantSpec { name, bus, max_hz });
        }
        Ok(grants)
    }

    pub(super) fn i2c_grants(&self, node: &Node, path: &str) -> Result<Vec<I2cGrantSpec>> {
        const EXAMPLE: &str = "{ name = \"env\", bus = \"i2c-1\", addresses = [0x48] }";
        let items = self.array(node, path, "a list of I2C grants")?;
        let mut grants = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let (entries, name) = self.grant_entries(item, &item_path, I2C_FIELDS, EXAMPLE)?;
            let bus = self.required_string(
                item,
                entries,
                &item_path,
                "bus",
                "the board's I2C bus, such as \"i2c-1\"",
            )?;
            let list_node = &self
                .required(
                    item,
                    entries,
                    &item_path,
                    "addresses",
                    "the 7-bit target addresses the workload may use, such as [0x48]",
                )?
                .value;
            let list_path = format!("{item_path}.addresses");
            let mut addresses = Vec::new();
            for (at, address) in self
                .array(list_node, &list_path, "a list of addresses")?
                .iter()
                .enumerate()
            {
                let address_path = format!("{list_path}[{at}]");
                let Value::Integer(value) = address.value else {
                    return Err(self.expected(
                        address,
                        &address_path,
                        "a 7-bit address such as 0x48",
                    ));
                };
                if !(0..=MAX_I2C_ADDRESS).contains(&value) {
                    return Err(self.error(
                        address.span.start,
                        &address_path,
                        format!("I2C address {value:#x} is not a 7-bit address (0x00 to 0x7f)"),
                    ));
                }
                let value = u16::try_from(value).expect("checked to be within 0..=0x7f");
                if !addresses.contains(&value) {
                    addresses.push(value);
                }
            }
            grants.push(I2cGrantSpec {
                name,
                bus,
                addresses,
            });
        }
        Ok(grants)
    }

    /// Every `gpio-edge` trigger names an input pin of the workload's grants.
    pub(super) fn edge_triggers_watch_inputs(
        &self,
        entries: &[Entry],
        prefix: &str,
        triggers: &[Trigger],
        gpio: &[GpioGrantSpec],
    ) -> Result<()> {
        let Some(list) = find(entries, "triggers") else {
            return Ok(());
        };
        let Value::Array(items) = &list.value.value else {
            return Ok(());
        };
        for (index, (trigger, item)) in triggers.iter().zip(items).enumerate() {
            let Trigger::GpioEdge(edge) = trigger else {
                continue;
            };
            let is_input = gpio
                .iter()
                .any(|g| g.name == edge.input && g.mode == GpioMode::Input);
            if !is_input {
                let at = match &item.value {
                    Value::Table(fields) => {
                        find(fields, "gpio-edge").map_or(item.span.start, |e| e.value.span.start)
                    }
                    _ => item.span.start,
                };
                return Err(self.error(
                    at,
                    &format!("{prefix}.triggers[{index}].gpio-edge"),
                    format!(
                        "no input pin named \"{}\" in this workload's gpio grants: add \
                         {{ name = \"{}\", pin = \"...\", mode = \"input\" }} to `gpio`",
                        edge.input, edge.input
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Logical device names are unique within a workload, across GPIO, SPI and I2C.
    pub(super) fn unique_device_names(&self, entries: &[Entry], prefix: &str) -> Result<()> {
        let mut seen: HashMap<String, String> = HashMap::new();
        for kind in ["gpio", "spi", "i2c"] {
            let Some(entry) = find(entries, kind) else {
                continue;
            };
            let Value::Array(items) = &entry.value.value else {
                continue;
            };
            for (index, item) in items.iter().enumerate() {
                let Value::Table(fields) = &item.value else {
                    continue;
                };
                let Some(name) = find(fields, "name") else {
                    continue;
                };
                let Value::String(text) = &name.value.value else {
                    continue;
                };
                let here = format!("{kind}[{index}]");
                if let Some(first) = seen.insert(text.clone(), here.clone()) {
                    return Err(self.error(
                        name.value.span.start,
                        &format!("{prefix}.{here}.name"),
                        format!(
                            "duplicate device name \"{text}\": {prefix}.{first} already uses it; \
                             names must be unique within a workload"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
