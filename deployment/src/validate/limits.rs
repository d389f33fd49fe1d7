//! Resource limits: memory, time slice, queue, CPUs and PIDs, each within its documented bound,
//! and the size and duration syntax they are written in.

use std::time::Duration;

use super::shape::find;
use super::{Checker, Result};
use crate::DurationError;
use crate::bounds::show_bytes;
use crate::size::parse_size;
use crate::spec::Limits;
use crate::tree::{Node, Value};

pub(super) const LIMIT_FIELDS: &[&str] = &["memory", "time-slice", "queue", "cpus", "pids"];

impl Checker<'_> {
    pub(super) fn limits(&self, node: &Node, path: &str) -> Result<Limits> {
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

    pub(super) fn cpus(&self, node: &Node, path: &str) -> Result<u32> {
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

    pub(super) fn memory(&self, node: &Node, path: &str) -> Result<u64> {
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

    pub(super) fn queue(&self, node: &Node, path: &str) -> Result<usize> {
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
    pub(super) fn duration(
        &self,
        node: &Node,
        path: &str,
        name: &str,
        (min, max): (Duration, Duration),
    ) -> Result<Duration> {
        let Value::String(text) = &node.value else {
            return Err(self.expected(node, path, "a duration string such as \"500ms\""));
        };
        crate::parse_duration_within(text, (min, max)).map_err(|why| {
            let sentence = match why {
                DurationError::NotADuration(_) => format!("invalid {name} \"{text}\": {why}"),
                DurationError::TooShort(_) | DurationError::TooLong(_) => {
                    format!("{name} \"{text}\" {why}")
                }
            };
            self.error(node.span.start, path, sentence)
        })
    }
}
