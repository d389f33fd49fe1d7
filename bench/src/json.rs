//! `lichen bench --json`: every figure of the tables as one JSON document, for tracking
//! figures over time.
//!
//! Each figure has its group (the table's title), name, value and unit, the measured text as
//! printed, and its target and reference when the table gives them. The value is the first
//! number of the measured text and the unit the words after it (`"214.3 us"` gives 214.3 and
//! `us`, `"1,438/s"` gives 1438 and `/s`), so the JSON holds exactly what the tables print.
//! Without `--json` nothing is collected.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

static ENABLED: AtomicBool = AtomicBool::new(false);
static FIGURES: Mutex<Vec<Figure>> = Mutex::new(Vec::new());

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The benchmark table it is from.
    pub group: String,
    /// What was measured.
    pub name: String,
    /// The figure's number, in `unit` (`None` when the text has no number).
    pub value: Option<f64>,
    /// The unit of `value`, as printed.
    pub unit: String,
    /// The measured text as the table prints it.
    pub measured: String,
    /// The target, if the table gives one.
    pub target: Option<String>,
    /// The reference figure, if the table gives one.
    pub reference: Option<String>,
}

/// What `lichen bench --json` prints.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Document {
    /// Every figure measured.
    pub figures: Vec<Figure>,
    /// Benchmarks that failed, with why.
    pub failed: Vec<String>,
}

/// Turns collection on (for `--json`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether figures are collected instead of printed as tables.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn figures() -> std::sync::MutexGuard<'static, Vec<Figure>> {
    FIGURES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records one table row.
pub fn record(group: &str, name: &str, measured: &str, target: &str, reference: &str) {
    let (value, unit) = value_and_unit(measured);
    let given = |text: &str| (!text.is_empty() && text != "-").then(|| text.to_string());
    figures().push(Figure {
        group: group.to_string(),
        name: name.to_string(),
        value,
        unit,
        measured: measured.to_string(),
        target: given(target),
        reference: given(reference),
    });
}

/// Takes the figures recorded so far.
pub fn take() -> Vec<Figure> {
    std::mem::take(&mut *figures())
}

/// The first number of `text` and the words after it, up to a bracket, comma or semicolon.
fn value_and_unit(text: &str) -> (Option<f64>, String) {
    let Some(start) = text.find(|c: char| c.is_ascii_digit()) else {
        return (None, String::new());
    };
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
        .unwrap_or(rest.len());
    let number: String = rest[..end].chars().filter(|c| *c != ',').collect();
    let number = number.trim_end_matches('.');
    let unit = rest[end..]
        .split(['(', ',', ';'])
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    (number.parse().ok(), unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_units_come_from_the_printed_figure() {
        assert_eq!(value_and_unit("214.3 us"), (Some(214.3), "us".into()));
        assert_eq!(value_and_unit("1,438/s"), (Some(1438.0), "/s".into()));
        assert_eq!(
            value_and_unit("1.893 % of a core (189.3 ms in 10 s)"),
            (Some(1.893), "% of a core".into())
        );
        assert_eq!(
            value_and_unit("1.6x (0.6 us per call)"),
            (Some(1.6), "x".into())
        );
        assert_eq!(value_and_unit("-"), (None, String::new()));
    }
}
