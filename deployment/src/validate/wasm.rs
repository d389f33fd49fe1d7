//! The Wasm kind's own fields: the module reference, the triggers and the config map.

use std::collections::{BTreeMap, HashMap};

use super::shape::find;
use super::{Checker, Result};
use crate::spec::{GpioEdgeTrigger, GpioGrantSpec, ModuleRef, Trigger};
use crate::tree::{Node, Value};

const TRIGGER_KINDS: &[&str] = &["interval", "gpio-edge"];
/// Options a `gpio-edge` trigger takes beside its kind.
const EDGE_TRIGGER_OPTIONS: &[&str] = &["edge", "debounce"];

impl Checker<'_> {
    pub(super) fn module(&self, node: &Node, path: &str) -> Result<ModuleRef> {
        let text = self.string(node, path, "a string")?;
        if let Some(hex) = text.strip_prefix("sha256:") {
            if hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Ok(ModuleRef::Digest(hex.to_ascii_lowercase()));
            }
            return Err(self.error(
                node.span.start,
                path,
                format!(
                    "invalid module digest \"{text}\": expected \"sha256:\" followed by 64 \
                     hexadecimal digits (found {} characters)",
                    hex.chars().count()
                ),
            ));
        }
        if text.trim().is_empty() {
            return Err(self.error(
                node.span.start,
                path,
                "module is empty: expected a path to a .wasm file (relative to the deployment \
                 file) or \"sha256:<64 hex digits>\"",
            ));
        }
        Ok(ModuleRef::Path(self.base_dir.join(text)))
    }

    pub(super) fn triggers(&self, node: &Node, path: &str) -> Result<Vec<Trigger>> {
        let items = self.array(node, path, "a list of triggers")?;
        let mut triggers = Vec::with_capacity(items.len());
        let mut first_interval: Option<usize> = None;
        let mut watched: HashMap<String, usize> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let entries = self.table(item, &item_path, " such as { interval = \"500ms\" }")?;
            self.deny_duplicates(entries, &item_path)?;
            // Keys other than a kind are the options of a `gpio-edge` trigger.
            let mut kinds = entries
                .iter()
                .filter(|entry| !EDGE_TRIGGER_OPTIONS.contains(&entry.key.as_str()));
            let Some(entry) = kinds.next() else {
                return Err(self.error(
                    item.span.start,
                    &item_path,
                    "empty trigger: expected one kind, such as { interval = \"500ms\" }",
                ));
            };
            self.deny_unknown(
                std::slice::from_ref(entry),
                &item_path,
                TRIGGER_KINDS,
                "trigger kind",
            )?;
            if let Some(extra) = kinds.next() {
                return Err(self.error(
                    extra.key_span.start,
                    &format!("{item_path}.{}", extra.key),
                    format!(
                        "a trigger has exactly one kind, found `{}` and `{}`: write one trigger \
                         per kind",
                        entry.key, extra.key
                    ),
                ));
            }
            let entry_path = format!("{item_path}.{}", entry.key);
            if entry.key == "gpio-edge" {
                let input = self.string(&entry.value, &entry_path, "the name of an input pin")?;
                if let Some(first) = watched.insert(input.to_owned(), entry.key_span.start) {
                    return Err(self.error(
                        entry.value.span.start,
                        &entry_path,
                        format!(
                            "input \"{input}\" already has a gpio-edge trigger on line {}",
                            self.line_of(first)
                        ),
                    ));
                }
                let mut trigger = GpioEdgeTrigger {
                    input: input.to_owned(),
                    edge: lichen_devices::EdgeDetection::Both,
                    debounce: None,
                };
                if let Some(option) = find(entries, "edge") {
                    trigger.edge = self.edge(&option.value, &format!("{item_path}.edge"))?;
                }
                if let Some(option) = find(entries, "debounce") {
                    let field = format!("{item_path}.debounce");
                    trigger.debounce = Some(self.duration(
                        &option.value,
                        &field,
                        "debounce",
                        (GpioGrantSpec::MIN_DEBOUNCE, GpioGrantSpec::MAX_DEBOUNCE),
                    )?);
                }
                triggers.push(Trigger::GpioEdge(trigger));
                continue;
            }
            if let Some(option) = entries
                .iter()
                .find(|e| EDGE_TRIGGER_OPTIONS.contains(&e.key.as_str()))
            {
                return Err(self.error(
                    option.key_span.start,
                    &format!("{item_path}.{}", option.key),
                    format!("`{}` applies to gpio-edge triggers only", option.key),
                ));
            }
            if let Some(first) = first_interval {
                return Err(self.error(
                    entry.key_span.start,
                    &entry_path,
                    format!(
                        "a workload can have only one interval trigger; the first one is on line \
                         {}",
                        self.line_of(first)
                    ),
                ));
            }
            first_interval = Some(entry.key_span.start);
            triggers.push(Trigger::Interval(self.duration(
                &entry.value,
                &entry_path,
                "interval",
                (Trigger::MIN_INTERVAL, Trigger::MAX_INTERVAL),
            )?));
        }
        Ok(triggers)
    }

    pub(super) fn edge(&self, node: &Node, path: &str) -> Result<lichen_devices::EdgeDetection> {
        match self.string(node, path, "a string")? {
            "rising" => Ok(lichen_devices::EdgeDetection::Rising),
            "falling" => Ok(lichen_devices::EdgeDetection::Falling),
            "both" => Ok(lichen_devices::EdgeDetection::Both),
            other => Err(self.error(
                node.span.start,
                path,
                format!("unknown edge \"{other}\": expected \"rising\", \"falling\" or \"both\""),
            )),
        }
    }

    pub(super) fn config(&self, node: &Node, path: &str) -> Result<BTreeMap<String, String>> {
        let entries = self.table(node, path, " of configuration values")?;
        self.deny_duplicates(entries, path)?;
        let mut config = BTreeMap::new();
        for entry in entries {
            let value_path = format!("{path}.{}", entry.key);
            let text = match &entry.value.value {
                Value::String(text) => text.clone(),
                Value::Integer(integer) => integer.to_string(),
                Value::Float(text) | Value::Datetime(text) => text.clone(),
                Value::Boolean(flag) => flag.to_string(),
                other @ (Value::Null | Value::Array(_) | Value::Table(_)) => {
                    return Err(self.error(
                        entry.value.span.start,
                        &value_path,
                        format!(
                            "config value `{}` must be a string, a number or a boolean, found {}",
                            entry.key,
                            other.kind(self.format)
                        ),
                    ));
                }
            };
            config.insert(entry.key.clone(), text);
        }
        Ok(config)
    }
}
