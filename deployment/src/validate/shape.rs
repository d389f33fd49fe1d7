//! Shapes of the document tree: the expected-type errors, required keys, duplicate and unknown
//! keys (with the closest allowed name as a hint), and the small lookups every checker uses.

use std::collections::HashMap;

use super::{Checker, Result};
use crate::DeploymentError;
use crate::tree::{Entry, Format, Node, Value};

impl Checker<'_> {
    pub(super) fn expected(&self, node: &Node, path: &str, what: &str) -> DeploymentError {
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

    pub(super) fn string<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n str> {
        match &node.value {
            Value::String(text) => Ok(text),
            _ => Err(self.expected(node, path, what)),
        }
    }

    pub(super) fn array<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n [Node]> {
        match &node.value {
            Value::Array(items) => Ok(items),
            _ => Err(self.expected(node, path, what)),
        }
    }

    /// Expects a table; `what` follows "a table" or "an object" in the message.
    pub(super) fn table<'n>(&self, node: &'n Node, path: &str, what: &str) -> Result<&'n [Entry]> {
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

    pub(super) fn required<'n>(
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
    pub(super) fn required_string(
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
    pub(super) fn deny_duplicates(&self, entries: &[Entry], prefix: &str) -> Result<()> {
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
    pub(super) fn deny_unknown(
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

pub(super) fn find<'n>(entries: &'n [Entry], key: &str) -> Option<&'n Entry> {
    entries.iter().find(|entry| entry.key == key)
}

pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The allowed name closest to `key` by edit distance, if it is close enough to be a typo.
pub(super) fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
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
