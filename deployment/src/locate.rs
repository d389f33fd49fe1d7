//! Turning byte offsets into line and column, and remembering where each workload field was.

use std::collections::BTreeMap;

use super::tree::{Node, Value};

/// A 1-based line and column (the column counts characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    /// Line, from 1.
    pub(crate) line: usize,
    /// Column, from 1, in characters.
    pub(crate) column: usize,
}

/// Start offsets of the lines of a text.
#[derive(Debug, Clone)]
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes the lines of `text`.
    pub(crate) fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Self { text, line_starts }
    }

    /// The line and column of a byte offset (clamped to the text).
    pub(crate) fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        let column = self
            .text
            .get(line_start..offset)
            .map_or(offset - line_start, |prefix| prefix.chars().count())
            + 1;
        Location { line, column }
    }
}

/// Where the workloads of a parsed file and their fields are, for errors found later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SourceMap {
    workloads: Vec<WorkloadLocations>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct WorkloadLocations {
    /// The workload's table (its `[[workloads]]` header or its opening brace).
    table: Location,
    /// Keys inside the workload by relative path: `module`, `limits.memory`, `triggers[0]`...
    fields: BTreeMap<String, Location>,
}

impl SourceMap {
    /// Records the locations of one workload (called in workload order).
    pub(crate) fn push_workload(&mut self, node: &Node, lines: &LineIndex<'_>) {
        let mut fields = BTreeMap::new();
        record_fields(node, "", lines, &mut fields);
        self.workloads.push(WorkloadLocations {
            table: lines.locate(node.span.start),
            fields,
        });
    }

    /// The location of `field` (a relative path) in workload `index`: the field's key, else its
    /// nearest recorded parent, else the workload's table; `None` if there is no such workload.
    pub(crate) fn locate(&self, index: usize, field: &str) -> Option<Location> {
        let workload = self.workloads.get(index)?;
        let mut path = field;
        loop {
            if let Some(location) = workload.fields.get(path) {
                return Some(*location);
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return Some(workload.table),
            }
        }
    }
}

fn record_fields(
    node: &Node,
    prefix: &str,
    lines: &LineIndex<'_>,
    fields: &mut BTreeMap<String, Location>,
) {
    match &node.value {
        Value::Table(entries) => {
            for entry in entries {
                let path = if prefix.is_empty() {
                    entry.key.clone()
                } else {
                    format!("{prefix}.{}", entry.key)
                };
                // With a duplicated key (JSON), the first one is the one that counts.
                fields
                    .entry(path.clone())
                    .or_insert_with(|| lines.locate(entry.key_span.start));
                record_fields(&entry.value, &path, lines, fields);
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let path = format!("{prefix}[{index}]");
                fields.insert(path.clone(), lines.locate(item.span.start));
                record_fields(item, &path, lines, fields);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_lines_and_character_columns() {
        let index = LineIndex::new("ab\né = 1\n\nx");
        assert_eq!(index.locate(0), Location { line: 1, column: 1 });
        assert_eq!(index.locate(2), Location { line: 1, column: 3 });
        assert_eq!(index.locate(3), Location { line: 2, column: 1 });
        // 'é' is two bytes but one column.
        assert_eq!(index.locate(6), Location { line: 2, column: 3 });
        assert_eq!(index.locate(10), Location { line: 3, column: 1 });
        assert_eq!(index.locate(11), Location { line: 4, column: 1 });
        assert_eq!(index.locate(12), Location { line: 4, column: 2 });
        assert_eq!(index.locate(999), Location { line: 4, column: 2 });
    }
}
