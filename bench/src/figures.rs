//! How the benchmarks print figures: sorted samples with percentiles, durations, rates and
//! counts, and the table of one benchmark (figure, measured, target, reference).

use std::time::Duration;

use lichen_agent::render;

use crate::json;

/// Sorted samples with percentiles.
pub(crate) struct Samples(Vec<Duration>);

impl Samples {
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// Nearest-rank percentile.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        // A float-to-integer `as` saturates (NaN gives 0) and the rank is clamped to 1..=len
        // below, so any `p` gives an index inside the samples.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub(crate) fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.iter().sum::<Duration>().div_f64(self.0.len() as f64)
    }

    pub(crate) fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }
}

/// A duration in the unit that reads best: `7.9 us`, `0.812 ms`, `1.20 s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1e-3 {
        format!("{:.1} us", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.3} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// A measured rate (events, records or toggles per second) as a whole count with thousands
/// separators.
pub(crate) fn fmt_rate(rate: f64) -> String {
    // A float-to-integer `as` rounds toward zero and saturates (NaN gives 0): a rate is finite
    // and non-negative, and this only prints it, nothing computes with the integer.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fmt_count(rate.round() as u64)
}

/// A count with thousands separators: `200,000`.
pub(crate) fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A benchmark's table: figure, measured, target, reference.
pub(crate) struct Table {
    title: String,
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
}

impl Table {
    pub(crate) fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn row(
        &mut self,
        figure: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
        reference: impl Into<String>,
    ) {
        self.rows.push([
            figure.into(),
            measured.into(),
            target.into(),
            reference.into(),
        ]);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Prints the table in Markdown, columns aligned; with `--json`, records its rows instead.
    pub(crate) fn print(&self) {
        if json::enabled() {
            for [figure, measured, target, reference] in &self.rows {
                json::record(&self.title, figure, measured, target, reference);
            }
            return;
        }
        let mut table = render::Table::new(&["figure", "measured", "target", "reference"]);
        for row in &self.rows {
            table.row(row.to_vec());
        }
        let mut text = Vec::new();
        let _ = table.write_markdown(&mut text);
        println!("\n### {}\n", self.title);
        print!("{}", String::from_utf8_lossy(&text));
        if !self.notes.is_empty() {
            println!();
            for note in &self.notes {
                println!("- {note}");
            }
        }
        println!();
    }
}
