//! Static validation: from a located document tree to a [`DeploymentSpec`], or the first problem
//! found in file order, located at the key or value that caused it.
//!
//! This file is long on purpose: it is one checker over one schema, each field's rule beside
//! its neighbours and sharing the location plumbing; the bounds themselves are constants in
//! `spec` and are checked again on the typed value in `bounds`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use super::DeploymentError;
use super::bounds::{show_bytes, show_duration};
use super::locate::{LineIndex, Location, SourceMap};
use super::spec::{
    ContainerWorkload, DeploymentSpec, GpioEdgeTrigger, GpioGrantSpec, GpioMode, GuestRootRef,
    I2cGrantSpec, ImageRef, IsolationChoice, Limits, MicrovmWorkload, ModuleRef, RestartPolicy,
    SpiGrantSpec, Trigger, WorkloadKind, WorkloadSpec,
};
use super::tree::{Entry, Format, Node, Value};

const TOP_FIELDS: &[&str] = &["description", "workloads"];
const WORKLOAD_FIELDS: &[&str] = &[
    "name",
    "kind",
    "isolation",
    "module",
    "image",
    "rootfs",
    "command",
    "args",
    "env",
    "kernel",
    "initramfs",
    "disk",
    "vcpus",
    "cmdline",
    "ready-marker",
    "boot-timeout",
    "restart",
    "triggers",
    "config",
    "limits",
    "gpio",
    "spi",
    "i2c",
];
/// Workload fields that belong to one kind only.
const KIND_FIELDS: &[(&str, WorkloadKind)] = &[
    ("module", WorkloadKind::Wasm),
    ("triggers", WorkloadKind::Wasm),
    ("config", WorkloadKind::Wasm),
    ("image", WorkloadKind::Container),
    ("rootfs", WorkloadKind::Container),
    ("command", WorkloadKind::Container),
    ("args", WorkloadKind::Container),
    ("env", WorkloadKind::Container),
    ("kernel", WorkloadKind::Microvm),
    ("initramfs", WorkloadKind::Microvm),
    ("disk", WorkloadKind::Microvm),
    ("vcpus", WorkloadKind::Microvm),
    ("cmdline", WorkloadKind::Microvm),
    ("ready-marker", WorkloadKind::Microvm),
    ("boot-timeout", WorkloadKind::Microvm),
];
/// Limits that belong to one kind only (`memory` applies to all).
const KIND_LIMITS: &[(&str, WorkloadKind)] = &[
    ("time-slice", WorkloadKind::Wasm),
    ("queue", WorkloadKind::Wasm),
    ("cpus", WorkloadKind::Container),
    ("pids", WorkloadKind::Container),
];
const KINDS: &[(&str, WorkloadKind)] = &[
    ("wasm", WorkloadKind::Wasm),
    ("container", WorkloadKind::Container),
    ("microvm", WorkloadKind::Microvm),
];
const ISOLATIONS: &[(&str, IsolationChoice)] = &[
    ("wasm", IsolationChoice::Wasm),
    ("container", IsolationChoice::Container),
    ("microvm", IsolationChoice::Microvm),
    ("strongest", IsolationChoice::Strongest),
];
const GPIO_FIELDS: &[&str] = &["name", "pin", "mode", "initial", "bias", "edge", "debounce"];
const GPIO_INPUT_ONLY: &[&str] = &["bias", "edge", "debounce"];
const SPI_FIELDS: &[&str] = &["name", "bus", "max-hz"];
const I2C_FIELDS: &[&str] = &["name", "bus", "addresses"];
/// SPI clock of a grant that does not say.
const DEFAULT_SPI_HZ: u32 = 1_000_000;
/// Highest 7-bit I2C address.
const MAX_I2C_ADDRESS: i128 = 0x7f;
const LIMIT_FIELDS: &[&str] = &["memory", "time-slice", "queue", "cpus", "pids"];
const TRIGGER_KINDS: &[&str] = &["interval", "gpio-edge"];
/// Options a `gpio-edge` trigger takes beside its kind.
const EDGE_TRIGGER_OPTIONS: &[&str] = &["edge", "debounce"];
const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

/// Longest accepted workload name.
const MAX_NAME_LEN: usize = WorkloadSpec::MAX_NAME_LEN;

/// Checks one document; carries what errors need to be located and rendered.
pub(crate) struct Checker<'a> {
    /// File name used in errors.
    pub(crate) file: &'a str,
    /// Line index of the file's text.
    pub(crate) lines: &'a LineIndex<'a>,
    /// Format of the file, for wording.
    pub(crate) format: Format,
    /// Directory relative module paths are joined with.
    pub(crate) base_dir: &'a Path,
}

type Result<T> = std::result::Result<T, DeploymentError>;

impl Checker<'_> {
    fn error(&self, offset: usize, field: &str, message: impl Into<String>) -> DeploymentError {
        let location = self.lines.locate(offset);
        DeploymentError {
            file: self.file.to_owned(),
            line: Some(location.line),
            column: Some(location.column),
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: message.into(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.lines.locate(offset).line
    }

    /// Validates the whole document.
    pub(crate) fn deployment(&self, doc: &Node) -> Result<(DeploymentSpec, SourceMap)> {
        let entries = self.table(doc, "", "")?;
        self.deny_unknown(entries, "", TOP_FIELDS, "field")?;

        let description = find(entries, "description")
            .map(|entry| self.string(&entry.value, "description", "a string"))
            .transpose()?
            .map(str::to_owned);

        let Some(workloads) = find(entries, "workloads") else {
            let hint = match self.format {
                Format::Toml => "add [[workloads]] tables, or `workloads = []` to run nothing",
                Format::Json => "add a \"workloads\" array, or `\"workloads\": []` to run nothing",
            };
            return Err(DeploymentError {
                file: self.file.to_owned(),
                line: None,
                column: None,
                field: Some("workloads".to_owned()),
                message: format!("missing field `workloads`: {hint}"),
            });
        };
        let items = self.array(&workloads.value, "workloads", "a list of workloads")?;
        if items.len() > DeploymentSpec::MAX_WORKLOADS {
            return Err(self.error(
                workloads.value.span.start,
                "workloads",
                format!(
                    "{} workloads are too many: at most {} are accepted",
                    items.len(),
                    DeploymentSpec::MAX_WORKLOADS
                ),
            ));
        }

        let mut specs = Vec::with_capacity(items.len());
        let mut source_map = SourceMap::default();
        let mut names: HashMap<String, (usize, Location)> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            let (spec, name_node) = self.workload(item, index)?;
            let here = self.lines.locate(name_node.span.start);
            if let Some((first, first_at)) = names.get(&spec.name) {
                return Err(self.error(
                    name_node.span.start,
                    &format!("workloads[{index}].name"),
                    format!(
                        "duplicate workload name \"{}\": workloads[{first}] on line {} already \
                         uses it; names must be unique",
                        spec.name, first_at.line
                    ),
                ));
            }
            names.insert(spec.name.clone(), (index, here));
            source_map.push_workload(item, self.lines);
            specs.push(spec);
        }
        Ok((
            DeploymentSpec {
                description,
                workloads: specs,
            },
            source_map,
        ))
    }

    /// Validates one workload; also returns its `name` value node, to locate duplicates.
    fn workload<'n>(&self, node: &'n Node, index: usize) -> Result<(WorkloadSpec, &'n Node)> {
        let prefix = format!("workloads[{index}]");
        let entries = self.table(node, &prefix, " describing a workload")?;
        self.deny_unknown(entries, &prefix, WORKLOAD_FIELDS, "field")?;
        let path = |key: &str| format!("{prefix}.{key}");

        let name_node = &self
            .required(
                node,
                entries,
                &prefix,
                "name",
                "every workload needs a name",
            )?
            .value;
        let name = self.string(name_node, &path("name"), "a string")?;
        check_name(name)
            .map_err(|message| self.error(name_node.span.start, &path("name"), message))?;

        let kind = match find(entries, "kind") {
            Some(entry) => self.choice(&entry.value, &path("kind"), "kind", KINDS)?,
            None => WorkloadKind::Wasm,
        };
        let isolation = match find(entries, "isolation") {
            Some(entry) => {
                let choice =
                    self.choice(&entry.value, &path("isolation"), "isolation", ISOLATIONS)?;
                if let Some(why) = isolation_mismatch(kind, choice) {
                    return Err(self.error(entry.value.span.start, &path("isolation"), why));
                }
                Some(choice)
            }
            None => None,
        };
        self.kind_only(entries, &prefix, KIND_FIELDS, kind)?;
        let (module, container, microvm) = match kind {
            WorkloadKind::Wasm => {
                let module_node = &self
                    .required(
                        node,
                        entries,
                        &prefix,
                        "module",
                        "every workload needs a module: a path to a .wasm file or \"sha256:<64 hex digits>\"",
                    )?
                    .value;
                (Some(self.module(module_node, &path("module"))?), None, None)
            }
            WorkloadKind::Container => (None, Some(self.container(node, entries, &prefix)?), None),
            WorkloadKind::Microvm => (None, None, Some(self.microvm(node, entries, &prefix)?)),
        };

        let restart = match find(entries, "restart") {
            Some(entry) => self.restart(&entry.value, &path("restart"))?,
            None => RestartPolicy::default(),
        };
        let triggers = match find(entries, "triggers") {
            Some(entry) => self.triggers(&entry.value, &path("triggers"))?,
            None => Vec::new(),
        };
        let config = match find(entries, "config") {
            Some(entry) => self.config(&entry.value, &path("config"))?,
            None => BTreeMap::new(),
        };
        let limits = match find(entries, "limits") {
            Some(entry) => {
                let limits = self.limits(&entry.value, &path("limits"))?;
                if let Value::Table(limit_entries) = &entry.value.value {
                    self.kind_only(limit_entries, &path("limits"), KIND_LIMITS, kind)?;
                    if kind == WorkloadKind::Microvm
                        && let Some(memory) = limits.memory_bytes
                        && memory < MicrovmWorkload::MIN_MEMORY_BYTES
                    {
                        let at = find(limit_entries, "memory").map_or(0, |e| e.value.span.start);
                        return Err(self.error(
                            at,
                            &path("limits.memory"),
                            format!("a microVM needs at least 32MiB of memory, not {memory} bytes"),
                        ));
                    }
                }
                limits
            }
            None => Limits::default(),
        };

        let gpio = match find(entries, "gpio") {
            Some(entry) => self.gpio_grants(&entry.value, &path("gpio"))?,
            None => Vec::new(),
        };
        let spi = match find(entries, "spi") {
            Some(entry) => self.spi_grants(&entry.value, &path("spi"))?,
            None => Vec::new(),
        };
        let i2c = match find(entries, "i2c") {
            Some(entry) => self.i2c_grants(&entry.value, &path("i2c"))?,
            None => Vec::new(),
        };
        self.unique_device_names(entries, &prefix)?;
        self.edge_triggers_watch_inputs(entries, &prefix, &triggers, &gpio)?;

        let spec = WorkloadSpec {
            name: name.to_owned(),
            kind,
            isolation,
            module,
            container,
            microvm,
            config,
            triggers,
            limits,
            restart,
            gpio,
            spi,
            i2c,
            args: Vec::new(),
            env: BTreeMap::new(),
        };
        Ok((spec, name_node))
    }

    /// The entries of one grant table, with unknown fields refused, and its `name`.
    fn grant_entries<'n>(
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
        check_device_name(name).map_err(|message| {
            self.error(name_node.span.start, &format!("{path}.name"), message)
        })?;
        Ok((entries, name.to_owned()))
    }

    fn gpio_grants(&self, node: &Node, path: &str) -> Result<Vec<GpioGrantSpec>> {
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

    fn spi_grants(&self, node: &Node, path: &str) -> Result<Vec<SpiGrantSpec>> {
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

    fn i2c_grants(&self, node: &Node, path: &str) -> Result<Vec<I2cGrantSpec>> {
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
    fn edge_triggers_watch_inputs(
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
    fn unique_device_names(&self, entries: &[Entry], prefix: &str) -> Result<()> {
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

    fn module(&self, node: &Node, path: &str) -> Result<ModuleRef> {
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

    fn restart(&self, node: &Node, path: &str) -> Result<RestartPolicy> {
        let text = self.string(node, path, "a string")?;
        RESTART_POLICIES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, policy)| *policy)
            .ok_or_else(|| {
                self.error(
                    node.span.start,
                    path,
                    format!(
                        "unknown restart policy \"{text}\": expected \"always\", \"on-failure\" \
                         or \"never\""
                    ),
                )
            })
    }

    fn triggers(&self, node: &Node, path: &str) -> Result<Vec<Trigger>> {
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

    fn edge(&self, node: &Node, path: &str) -> Result<lichen_devices::EdgeDetection> {
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

    fn config(&self, node: &Node, path: &str) -> Result<BTreeMap<String, String>> {
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

    fn limits(&self, node: &Node, path: &str) -> Result<Limits> {
        let entries = self.table(node, path, " of limits")?;
        self.deny_unknown(entries, path, LIMIT_FIELDS, "limit")?;
        let mut limits = Limits::default();
        if let Some(entry) = find(entries, "memory") {
            limits.memory_bytes = Some(self.memory(&entry.value, &format!("{path}.memory"))?);
        }
        if let Some(entry) = find(entries, "time-slice") {
            let field = format!("{path}.time-slice");
            limits.time_slice = Some(self.duration(
                &entry.value,
                &field,
                "time-slice",
                (Limits::MIN_TIME_SLICE, Limits::MAX_TIME_SLICE),
            )?);
        }
        if let Some(entry) = find(entries, "queue") {
            limits.queue = Some(self.queue(&entry.value, &format!("{path}.queue"))?);
        }
        if let Some(entry) = find(entries, "cpus") {
            limits.cpu_millis = Some(self.cpus(&entry.value, &format!("{path}.cpus"))?);
        }
        if let Some(entry) = find(entries, "pids") {
            let field = format!("{path}.pids");
            let Value::Integer(pids) = entry.value.value else {
                return Err(self.expected(&entry.value, &field, "a whole number of processes"));
            };
            limits.pids = Some(match u32::try_from(pids) {
                Ok(pids) if (1..=Limits::MAX_PIDS).contains(&pids) => pids,
                _ => {
                    return Err(self.error(
                        entry.value.span.start,
                        &field,
                        format!(
                            "invalid pids limit {pids}: expected 1 to {}",
                            Limits::MAX_PIDS
                        ),
                    ));
                }
            });
        }
        Ok(limits)
    }

    fn cpus(&self, node: &Node, path: &str) -> Result<u32> {
        let cores = match &node.value {
            Value::Integer(integer) => *integer as f64,
            Value::Float(text) => text.parse::<f64>().unwrap_or(f64::NAN),
            _ => return Err(self.expected(node, path, "a number of cores such as 0.5")),
        };
        let millis = (cores * 1000.0).round();
        let bounds = f64::from(Limits::MIN_CPU_MILLIS)..=f64::from(Limits::MAX_CPU_MILLIS);
        if !(millis.is_finite() && bounds.contains(&millis)) {
            let why = if millis.is_finite() && millis > *bounds.end() {
                format!("it must be at most {} cores", Limits::MAX_CPU_MILLIS / 1000)
            } else {
                "it must be at least 0.01 cores".to_owned()
            };
            return Err(self.error(
                node.span.start,
                path,
                format!("invalid CPU quota {cores}: {why}"),
            ));
        }
        // Checked above to be whole and within MIN_CPU_MILLIS..=MAX_CPU_MILLIS (u32 bounds), so
        // the float-to-integer conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(millis as u32)
    }

    /// A string that must be one of `choices`.
    fn choice<T: Copy>(
        &self,
        node: &Node,
        path: &str,
        noun: &str,
        choices: &[(&str, T)],
    ) -> Result<T> {
        let text = self.string(node, path, "a string")?;
        choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let expected = choices
                    .iter()
                    .map(|(name, _)| format!("\"{name}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.error(
                    node.span.start,
                    path,
                    format!("unknown {noun} \"{text}\": expected one of {expected}"),
                )
            })
    }

    /// Refuses the first entry that `owners` gives to another kind than `kind`.
    fn kind_only(
        &self,
        entries: &[Entry],
        prefix: &str,
        owners: &[(&str, WorkloadKind)],
        kind: WorkloadKind,
    ) -> Result<()> {
        for entry in entries {
            let Some((_, owner)) = owners.iter().find(|(key, _)| *key == entry.key) else {
                continue;
            };
            if *owner == kind {
                continue;
            }
            let this = match kind {
                WorkloadKind::Wasm => "a wasm module",
                WorkloadKind::Container => "a container (kind = \"container\")",
                WorkloadKind::Microvm => "a microVM (kind = \"microvm\")",
            };
            return Err(self.error(
                entry.key_span.start,
                &join(prefix, &entry.key),
                format!(
                    "`{}` applies to {} workloads only; this workload is {this}",
                    entry.key,
                    owner.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// The kernel, root, vCPUs, command line, marker and boot timeout of a microVM workload.
    fn microvm(&self, node: &Node, entries: &[Entry], prefix: &str) -> Result<MicrovmWorkload> {
        let path = |key: &str| format!("{prefix}.{key}");
        let kernel_node = &self
            .required(
                node,
                entries,
                prefix,
                "kernel",
                "a microVM needs a kernel: a path to a bzImage/vmlinuz (arm64: Image)",
            )?
            .value;
        let kernel = self.base_dir.join(self.non_empty_path(
            kernel_node,
            &path("kernel"),
            "the guest kernel",
        )?);
        let root =
            match (find(entries, "initramfs"), find(entries, "disk")) {
                (Some(initramfs), Some(disk)) => {
                    return Err(self.error(
                        disk.key_span.start,
                        &path("disk"),
                        format!(
                            "give `initramfs` or `disk`, not both (`initramfs` is on line {})",
                            self.line_of(initramfs.key_span.start)
                        ),
                    ));
                }
                (Some(entry), None) => GuestRootRef::Initramfs(self.base_dir.join(
                    self.non_empty_path(&entry.value, &path("initramfs"), "an initramfs")?,
                )),
                (None, Some(entry)) => GuestRootRef::Disk(self.base_dir.join(
                    self.non_empty_path(&entry.value, &path("disk"), "a root disk image")?,
                )),
                (None, None) => {
                    return Err(self.error(
                        node.span.start,
                        &path("initramfs"),
                        "missing field `initramfs`: a microVM boots from `initramfs` (a cpio \
                     archive) or `disk` (a raw root filesystem image)",
                    ));
                }
            };
        let vcpus = match find(entries, "vcpus") {
            None => 1,
            Some(entry) => {
                let Value::Integer(n) = entry.value.value else {
                    return Err(self.expected(&entry.value, &path("vcpus"), "a whole number"));
                };
                match u32::try_from(n) {
                    Ok(n) if (1..=MicrovmWorkload::MAX_VCPUS).contains(&n) => n,
                    _ => {
                        return Err(self.error(
                            entry.value.span.start,
                            &path("vcpus"),
                            format!(
                                "invalid vcpus {n}: expected 1 to {}",
                                MicrovmWorkload::MAX_VCPUS
                            ),
                        ));
                    }
                }
            }
        };
        let cmdline = match find(entries, "cmdline") {
            None => String::new(),
            Some(entry) => {
                let text = self.string(&entry.value, &path("cmdline"), "a string")?;
                if text.contains(['\n', '\0']) {
                    return Err(self.error(
                        entry.value.span.start,
                        &path("cmdline"),
                        "the kernel command line must be one line",
                    ));
                }
                text.to_owned()
            }
        };
        let ready_marker = match find(entries, "ready-marker") {
            None => None,
            Some(entry) => {
                let text = self.string(&entry.value, &path("ready-marker"), "a string")?;
                if text.trim().is_empty() || text.contains('\n') {
                    return Err(self.error(
                        entry.value.span.start,
                        &path("ready-marker"),
                        "the ready marker must be non-empty text on one line",
                    ));
                }
                Some(text.to_owned())
            }
        };
        let boot_timeout = find(entries, "boot-timeout")
            .map(|entry| {
                self.duration(
                    &entry.value,
                    &path("boot-timeout"),
                    "boot-timeout",
                    (
                        MicrovmWorkload::MIN_BOOT_TIMEOUT,
                        MicrovmWorkload::MAX_BOOT_TIMEOUT,
                    ),
                )
            })
            .transpose()?;
        Ok(MicrovmWorkload {
            kernel,
            root,
            vcpus,
            cmdline,
            ready_marker,
            boot_timeout,
        })
    }

    /// The image (or rootfs), command, args and env of a container workload.
    fn container(&self, node: &Node, entries: &[Entry], prefix: &str) -> Result<ContainerWorkload> {
        let path = |key: &str| format!("{prefix}.{key}");
        let image = match (find(entries, "image"), find(entries, "rootfs")) {
            (Some(image), Some(rootfs)) => {
                return Err(self.error(
                    rootfs.key_span.start,
                    &path("rootfs"),
                    format!(
                        "give `image` or `rootfs`, not both (`image` is on line {})",
                        self.line_of(image.key_span.start)
                    ),
                ));
            }
            (Some(entry), None) => ImageRef::Oci(self.base_dir.join(self.non_empty_path(
                &entry.value,
                &path("image"),
                "an OCI image layout directory or tarball",
            )?)),
            (None, Some(entry)) => ImageRef::Rootfs(self.base_dir.join(self.non_empty_path(
                &entry.value,
                &path("rootfs"),
                "a root filesystem directory",
            )?)),
            (None, None) => {
                return Err(self.error(
                    node.span.start,
                    &path("image"),
                    "missing field `image`: a container needs `image` (an OCI image layout \
                     directory or tarball) or `rootfs` (a root filesystem directory)",
                ));
            }
        };
        let command = find(entries, "command")
            .map(|e| self.strings(&e.value, &path("command"), true))
            .transpose()?;
        let args = find(entries, "args")
            .map(|e| self.strings(&e.value, &path("args"), false))
            .transpose()?;
        if matches!(image, ImageRef::Rootfs(_)) && command.is_none() {
            return Err(self.error(
                node.span.start,
                &path("command"),
                "missing field `command`: a plain rootfs has no entrypoint, so say what to run, \
                 such as [\"/bin/sh\", \"-c\", \"echo hello\"]",
            ));
        }
        let mut env = BTreeMap::new();
        if let Some(entry) = find(entries, "env") {
            let env_path = path("env");
            let vars = self.table(&entry.value, &env_path, " of environment variables")?;
            self.deny_duplicates(vars, &env_path)?;
            for var in vars {
                let var_path = format!("{env_path}.{}", var.key);
                if var.key.is_empty() || var.key.contains(['=', '\0']) {
                    return Err(self.error(
                        var.key_span.start,
                        &var_path,
                        format!("invalid environment variable name {:?}", var.key),
                    ));
                }
                let value = self.string(&var.value, &var_path, "a string")?;
                env.insert(var.key.clone(), value.to_owned());
            }
        }
        Ok(ContainerWorkload {
            image,
            command,
            args,
            env,
        })
    }

    fn non_empty_path<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n str> {
        let text = self.string(node, path, "a string")?;
        if text.trim().is_empty() {
            return Err(self.error(
                node.span.start,
                path,
                format!("the path is empty: expected {what} (relative to the deployment file)"),
            ));
        }
        Ok(text)
    }

    /// A list of strings; `non_empty` requires at least one, with a non-empty first.
    fn strings(&self, node: &Node, path: &str, non_empty: bool) -> Result<Vec<String>> {
        let items = self.array(node, path, "a list of strings")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            out.push(
                self.string(item, &format!("{path}[{index}]"), "a string")?
                    .to_owned(),
            );
        }
        if non_empty && out.first().is_none_or(|first| first.is_empty()) {
            return Err(self.error(
                node.span.start,
                path,
                "the command is empty: expected the program and its arguments, such as \
                 [\"/bin/sh\", \"-c\", \"echo hello\"]",
            ));
        }
        Ok(out)
    }

    fn memory(&self, node: &Node, path: &str) -> Result<u64> {
        let at = node.span.start;
        let (bytes, shown) = match &node.value {
            Value::String(text) => (
                parse_size(text).map_err(|why| {
                    self.error(at, path, format!("invalid memory limit \"{text}\": {why}"))
                })?,
                format!("\"{text}\""),
            ),
            Value::Integer(integer) => (
                u64::try_from(*integer).map_err(|_| {
                    self.error(
                        at,
                        path,
                        format!("invalid memory limit {integer}: expected a positive size"),
                    )
                })?,
                format!("{integer} bytes"),
            ),
            other => {
                return Err(self.error(
                    at,
                    path,
                    format!(
                        "`memory` must be a size such as \"16MiB\", found {}",
                        other.kind(self.format)
                    ),
                ));
            }
        };
        if bytes < Limits::MIN_MEMORY_BYTES {
            return Err(self.error(
                at,
                path,
                format!(
                    "memory limit {shown} is below one WebAssembly page: it must be at least \
                     64KiB"
                ),
            ));
        }
        if bytes > Limits::MAX_MEMORY_BYTES {
            return Err(self.error(
                at,
                path,
                format!(
                    "memory limit {shown} is too large: it must be at most {}",
                    show_bytes(Limits::MAX_MEMORY_BYTES)
                ),
            ));
        }
        Ok(bytes)
    }

    fn queue(&self, node: &Node, path: &str) -> Result<usize> {
        let Value::Integer(integer) = node.value else {
            return Err(self.expected(node, path, "a whole number of events"));
        };
        match usize::try_from(integer) {
            Ok(queue) if (1..=Limits::MAX_QUEUE).contains(&queue) => Ok(queue),
            _ if integer < 1 => Err(self.error(
                node.span.start,
                path,
                format!("invalid queue length {integer}: it must be at least 1"),
            )),
            _ => Err(self.error(
                node.span.start,
                path,
                format!(
                    "invalid queue length {integer}: it must be at most {} events",
                    Limits::MAX_QUEUE
                ),
            )),
        }
    }

    /// A duration within `(min, max)`.
    fn duration(
        &self,
        node: &Node,
        path: &str,
        name: &str,
        (min, max): (Duration, Duration),
    ) -> Result<Duration> {
        let Value::String(text) = &node.value else {
            return Err(self.expected(node, path, "a duration string such as \"500ms\""));
        };
        let duration = humantime::parse_duration(text).map_err(|why| {
            self.error(
                node.span.start,
                path,
                format!(
                    "invalid {name} \"{text}\": {why}; expected a number with a unit, such as \
                     \"500ms\", \"2s\" or \"1m 30s\""
                ),
            )
        })?;
        if duration < min {
            return Err(self.error(
                node.span.start,
                path,
                format!(
                    "{name} \"{text}\" is too short: it must be at least {}",
                    show_duration(min)
                ),
            ));
        }
        if duration > max {
            return Err(self.error(
                node.span.start,
                path,
                format!(
                    "{name} \"{text}\" is too long: it must be at most {}",
                    show_duration(max)
                ),
            ));
        }
        Ok(duration)
    }

    // ---- shapes ----

    fn expected(&self, node: &Node, path: &str, what: &str) -> DeploymentError {
        let key = path.rsplit('.').next().unwrap_or(path);
        let subject = if key.is_empty() {
            "the deployment".to_owned()
        } else {
            format!("`{key}`")
        };
        self.error(
            node.span.start,
            path,
            format!(
                "{subject} must be {what}, found {}",
                node.value.kind(self.format)
            ),
        )
    }

    fn string<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n str> {
        match &node.value {
            Value::String(text) => Ok(text),
            _ => Err(self.expected(node, path, what)),
        }
    }

    fn array<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n [Node]> {
        match &node.value {
            Value::Array(items) => Ok(items),
            _ => Err(self.expected(node, path, what)),
        }
    }

    /// Expects a table; `what` follows "a table" or "an object" in the message.
    fn table<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n [Entry]> {
        match &node.value {
            Value::Table(entries) => Ok(entries),
            _ => {
                let kind = match self.format {
                    Format::Toml => "a table",
                    Format::Json => "an object",
                };
                Err(self.expected(node, path, &format!("{kind}{what}")))
            }
        }
    }

    fn required<'n>(
        &self,
        table: &Node,
        entries: &'n [Entry],
        prefix: &str,
        key: &str,
        why: &str,
    ) -> Result<&'n Entry> {
        find(entries, key).ok_or_else(|| {
            self.error(
                table.span.start,
                &format!("{prefix}.{key}"),
                format!("missing field `{key}`: {why}"),
            )
        })
    }

    /// The string value of the required field `key` of `table` (`why` says what it holds).
    fn required_string(
        &self,
        table: &Node,
        entries: &[Entry],
        prefix: &str,
        key: &str,
        why: &str,
    ) -> Result<String> {
        let node = &self.required(table, entries, prefix, key, why)?.value;
        Ok(self
            .string(node, &format!("{prefix}.{key}"), "a string")?
            .to_owned())
    }

    /// Rejects a key given twice (JSON allows it syntactically; TOML does not).
    fn deny_duplicates(&self, entries: &[Entry], prefix: &str) -> Result<()> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for entry in entries {
            if let Some(first) = seen.insert(&entry.key, entry.key_span.start) {
                return Err(self.error(
                    entry.key_span.start,
                    &join(prefix, &entry.key),
                    format!(
                        "duplicate key `{}`: it is already set on line {}",
                        entry.key,
                        self.line_of(first)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rejects duplicate keys and keys not in `allowed`, naming the closest allowed one.
    fn deny_unknown(
        &self,
        entries: &[Entry],
        prefix: &str,
        allowed: &[&str],
        noun: &str,
    ) -> Result<()> {
        self.deny_duplicates(entries, prefix)?;
        for entry in entries {
            if allowed.contains(&entry.key.as_str()) {
                continue;
            }
            let expected = allowed
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let hint = match closest(&entry.key, allowed) {
                Some(name) => format!(" (did you mean `{name}`?)"),
                None => String::new(),
            };
            return Err(self.error(
                entry.key_span.start,
                &join(prefix, &entry.key),
                format!(
                    "unknown {noun} `{}`{hint}; expected one of {expected}",
                    entry.key
                ),
            ));
        }
        Ok(())
    }
}

fn find<'n>(entries: &'n [Entry], key: &str) -> Option<&'n Entry> {
    entries.iter().find(|entry| entry.key == key)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Why a kind cannot run in the asked isolation tier, if it cannot. A Wasm module runs in the
/// agent's engine only; a container image runs in a container (a microVM that boots an OCI
/// rootfs is not built). `strongest` fits every kind.
fn isolation_mismatch(kind: WorkloadKind, choice: IsolationChoice) -> Option<String> {
    let fits = match (kind, choice) {
        (_, IsolationChoice::Strongest) => true,
        (WorkloadKind::Wasm, tier) => tier == IsolationChoice::Wasm,
        (WorkloadKind::Container, tier) => tier == IsolationChoice::Container,
        (WorkloadKind::Microvm, tier) => tier == IsolationChoice::Microvm,
    };
    (!fits).then(|| {
        let (what, only) = match kind {
            WorkloadKind::Wasm => ("a wasm module", "wasm"),
            WorkloadKind::Container => ("a container image", "container"),
            WorkloadKind::Microvm => ("a microVM kernel", "microvm"),
        };
        format!(
            "{what} cannot run in \"{}\" isolation: it runs in \"{only}\" isolation (or say \"strongest\")",
            choice.as_str()
        )
    })
}

/// Checks a workload name against `[a-z0-9][a-z0-9-]{0,62}`.
fn check_name(name: &str) -> std::result::Result<(), String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(valid_char)
        && chars.all(|c| valid_char(c) || c == '-')
        && name.len() <= MAX_NAME_LEN;
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "invalid workload name {name:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 \
             and '-', starting with a letter or a digit"
        ))
    }
}

/// Checks a logical device name against the workload-name pattern.
fn check_device_name(name: &str) -> std::result::Result<(), String> {
    check_name(name).map_err(|_| {
        format!(
            "invalid device name {name:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 \
             and '-', starting with a letter or a digit"
        )
    })
}

/// Parses a size: a whole number, optional spaces, then `B`, `KiB`, `MiB` or `GiB` (powers of
/// 1024, case-insensitive); no unit means bytes. Decimal units (`KB`, `MB`, `GB`) are refused
/// rather than guessed, since people often write `MB` meaning `MiB`.
pub(crate) fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let unit = unit.trim_start();
    const EXPECTED: &str =
        "expected a whole number followed by B, KiB, MiB or GiB, such as \"16MiB\"";
    if digits.is_empty() {
        return Err(EXPECTED.to_owned());
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "k" | "kb" | "m" | "mb" | "g" | "gb" => {
            return Err(format!(
                "unit \"{unit}\" is ambiguous; use KiB, MiB or GiB (1 KiB = 1024 bytes)"
            ));
        }
        _ => return Err(format!("unknown unit \"{unit}\"; {EXPECTED}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .ok_or_else(|| "size is too large".to_owned())
}

/// The allowed name closest to `key` by edit distance, if it is close enough to be a typo.
fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|name| (edit_distance(key, name), *name))
        .filter(|(distance, name)| *distance <= 2.max(name.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("16 mib"), Ok(16 << 20));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert!(parse_size("16MB").is_err_and(|why| why.contains("ambiguous")));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("-1MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err_and(|why| why.contains("too large")));
    }

    #[test]
    fn names_follow_the_pattern() {
        for good in ["a", "counter", "0x-1", &"a".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", "-a", "Counter", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn typos_suggest_the_closest_field() {
        assert_eq!(closest("modul", WORKLOAD_FIELDS), Some("module"));
        assert_eq!(closest("timeslice", LIMIT_FIELDS), Some("time-slice"));
        assert_eq!(closest("zzzzzz", WORKLOAD_FIELDS), None);
    }
}
