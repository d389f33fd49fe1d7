//! `wasi:logging/logging`: guest log records go to the workload's [`LogSink`].

use crate::DeviceState;
use crate::bindings::wasi::logging::logging::{Host, Level};

/// Severity of a log record, from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Detailed tracing.
    Trace,
    /// Debugging information.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected, recovered.
    Warn,
    /// Something failed.
    Error,
    /// Something failed and the function cannot go on.
    Critical,
}

impl LogLevel {
    /// The level's name in lower case, as WIT spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

/// Where a workload's log records go. The agent's implementation rate-limits, keeps a ring
/// of recent lines and persists the last ones.
pub trait LogSink: Send + Sync {
    /// Records one line logged by `workload`.
    fn log(&self, workload: &str, level: LogLevel, context: &str, message: &str);
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => Self::Trace,
            Level::Debug => Self::Debug,
            Level::Info => Self::Info,
            Level::Warn => Self::Warn,
            Level::Error => Self::Error,
            Level::Critical => Self::Critical,
        }
    }
}

/// Longest message kept; longer ones are cut (on a character boundary) and marked.
const MAX_MESSAGE_BYTES: usize = 4096;

impl Host for DeviceState {
    fn log(&mut self, level: Level, context: String, message: String) {
        let message = truncate(message, MAX_MESSAGE_BYTES);
        let context = truncate(context, 128);
        self.log
            .log(&self.workload, level.into(), &context, &message);
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}
