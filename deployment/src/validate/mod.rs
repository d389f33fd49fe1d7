//! Static validation: from a located document tree to a [`DeploymentSpec`], or the first problem
//! found in file order, located at the key or value that caused it.
//!
//! One checker walks one schema; its rules are split by job: the document and workload walk
//! here, `kinds` (kind and isolation, container and microVM specs), `wasm` (module, triggers,
//! config), `grants` (GPIO, SPI, I2C), `limits` (sizes, durations, counts), `names` and `shape`
//! (types, required and unknown keys). The bounds themselves are constants in `spec` and are
//! checked again on the typed value in `bounds`.

mod grants;
mod kinds;
mod limits;
mod names;
mod shape;
#[cfg(test)]
mod tests;
mod wasm;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::DeploymentError;
use crate::locate::{LineIndex, Location, SourceMap};
use crate::spec::{
    Artifact, DeploymentSpec, IsolationChoice, Limits, MicrovmWorkload, RestartPolicy, Tier,
    WasmArtifact, WorkloadSpec,
};
use crate::tree::{Format, Node, Value};

use kinds::isolation_mismatch;
use names::check_name;
use shape::find;

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
const KIND_FIELDS: &[(&str, Tier)] = &[
    ("module", Tier::Wasm),
    ("triggers", Tier::Wasm),
    ("config", Tier::Wasm),
    ("image", Tier::Container),
    ("rootfs", Tier::Container),
    ("command", Tier::Container),
    ("args", Tier::Container),
    ("env", Tier::Container),
    ("kernel", Tier::Microvm),
    ("initramfs", Tier::Microvm),
    ("disk", Tier::Microvm),
    ("vcpus", Tier::Microvm),
    ("cmdline", Tier::Microvm),
    ("ready-marker", Tier::Microvm),
    ("boot-timeout", Tier::Microvm),
];
/// Limits that belong to one kind only (`memory` applies to all).
const KIND_LIMITS: &[(&str, Tier)] = &[
    ("time-slice", Tier::Wasm),
    ("queue", Tier::Wasm),
    ("cpus", Tier::Container),
    ("pids", Tier::Container),
];
const KINDS: &[(&str, Tier)] = &[
    ("wasm", Tier::Wasm),
    ("container", Tier::Container),
    ("microvm", Tier::Microvm),
];
const ISOLATIONS: &[(&str, IsolationChoice)] = &[
    ("wasm", IsolationChoice::Tier(Tier::Wasm)),
    ("container", IsolationChoice::Tier(Tier::Container)),
    ("microvm", IsolationChoice::Tier(Tier::Microvm)),
    ("strongest", IsolationChoice::Strongest),
];

const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

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
            .map_err(|why| self.error(name_node.span.start, &path("name"), why.to_string()))?;

        let kind = match find(entries, "kind") {
            Some(entry) => self.choice(&entry.value, &path("kind"), "kind", KINDS)?,
            None => Tier::Wasm,
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
        let artifact = match kind {
            Tier::Wasm => {
                let module_node = &self
                    .required(
                        node,
                        entries,
                        &prefix,
                        "module",
                        "every workload needs a module: a path to a .wasm file or \"sha256:<64 hex digits>\"",
                    )?
                    .value;
                Artifact::Wasm(WasmArtifact::module(
                    self.module(module_node, &path("module"))?,
                ))
            }
            Tier::Container => Artifact::Container(self.container(node, entries, &prefix)?),
            Tier::Microvm => Artifact::Microvm(self.microvm(node, entries, &prefix)?),
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
                    if kind == Tier::Microvm
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
            isolation,
            artifact,
            config,
            triggers,
            limits,
            restart,
            gpio,
            spi,
            i2c,
        };
        Ok((spec, name_node))
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
}
