//! Static validation: from a located document tree to a [`DeploymentSpec`], or the first problem
//! found in file order, located at the key or value that caused it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use super::DeploymentError;
use super::locate::{LineIndex, Location, SourceMap};
use super::spec::{DeploymentSpec, Limits, ModuleRef, RestartPolicy, Trigger, WorkloadSpec};
use super::tree::{Entry, Format, Node, Value};

const TOP_FIELDS: &[&str] = &["description", "workloads"];
const WORKLOAD_FIELDS: &[&str] = &["name", "module", "restart", "triggers", "config", "limits"];
const LIMIT_FIELDS: &[&str] = &["memory", "time-slice", "queue"];
const TRIGGER_KINDS: &[&str] = &["interval"];
const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

/// The smallest memory limit: one WebAssembly page.
pub(crate) const WASM_PAGE_BYTES: u64 = 64 * 1024;
/// The shortest interval and time slice.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// Longest accepted workload name.
const MAX_NAME_LEN: usize = 63;

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

        let module_node = &self
            .required(
                node,
                entries,
                &prefix,
                "module",
                "every workload needs a module: a path to a .wasm file or \"sha256:<64 hex digits>\"",
            )?
            .value;
        let module = self.module(module_node, &path("module"))?;

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
            Some(entry) => self.limits(&entry.value, &path("limits"))?,
            None => Limits::default(),
        };

        let spec = WorkloadSpec {
            name: name.to_owned(),
            module,
            config,
            triggers,
            limits,
            restart,
        };
        Ok((spec, name_node))
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
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let entries = self.table(item, &item_path, " such as { interval = \"500ms\" }")?;
            self.deny_unknown(entries, &item_path, TRIGGER_KINDS, "trigger kind")?;
            let (entry, rest) = entries.split_first().ok_or_else(|| {
                self.error(
                    item.span.start,
                    &item_path,
                    "empty trigger: expected one kind, such as { interval = \"500ms\" }",
                )
            })?;
            if let Some(extra) = rest.first() {
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
            // `deny_unknown` let only known kinds through.
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
            )?));
        }
        Ok(triggers)
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
            limits.time_slice = Some(self.duration(&entry.value, &field, "time-slice")?);
        }
        if let Some(entry) = find(entries, "queue") {
            limits.queue = Some(self.queue(&entry.value, &format!("{path}.queue"))?);
        }
        Ok(limits)
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
        if bytes < WASM_PAGE_BYTES {
            return Err(self.error(
                at,
                path,
                format!(
                    "memory limit {shown} is below one WebAssembly page: it must be at least \
                     64KiB"
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
            Ok(queue) if queue >= 1 => Ok(queue),
            _ => Err(self.error(
                node.span.start,
                path,
                format!("invalid queue length {integer}: it must be at least 1"),
            )),
        }
    }

    fn duration(&self, node: &Node, path: &str, name: &str) -> Result<Duration> {
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
        if duration < MIN_DURATION {
            return Err(self.error(
                node.span.start,
                path,
                format!("{name} \"{text}\" is too short: it must be at least 1ms"),
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
            "invalid workload name \"{name}\": use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 \
             and '-', starting with a letter or a digit"
        ))
    }
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
