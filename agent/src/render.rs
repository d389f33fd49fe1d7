//! Output of the command-line verbs (the node's own, the local client's, the operator's):
//! aligned tables, humanised sizes, durations and times, JSON documents on stdout, exit codes.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

/// A table printed with a header row and columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells beyond the headers are dropped, missing cells are blank.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Writes the header and the rows, two spaces between columns, no trailing blanks.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let widths = self.widths();
        write_row(out, &widths, &self.headers)?;
        for row in &self.rows {
            write_row(out, &widths, row)?;
        }
        Ok(())
    }

    /// Writes the table in Markdown (`| a | b |`, a rule under the header), columns aligned.
    pub fn write_markdown(&self, out: &mut impl Write) -> io::Result<()> {
        let widths = self.widths();
        let line = |out: &mut dyn Write, cells: &[String]| {
            let cells: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, width)| {
                    let cell = cells.get(i).map(String::as_str).unwrap_or("");
                    format!("{cell:<width$}")
                })
                .collect();
            writeln!(out, "| {} |", cells.join(" | "))
        };
        line(out, &self.headers)?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        writeln!(out, "| {} |", rule.join(" | "))?;
        for row in &self.rows {
            line(out, row)?;
        }
        Ok(())
    }

    /// Each column's width: its widest cell, header included, in characters.
    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }
}

fn write_row(out: &mut impl Write, widths: &[usize], cells: &[String]) -> io::Result<()> {
    let mut line = String::new();
    for (i, width) in widths.iter().enumerate() {
        let cell = cells.get(i).map(String::as_str).unwrap_or("");
        if i > 0 {
            line.push_str("  ");
        }
        line.push_str(cell);
        if i + 1 < widths.len() {
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Bytes in binary units: `512 B`, `64 KiB`, `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 && value.fract() >= 0.05 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// A duration in its two largest units: `850ms`, `42s`, `5m12s`, `3h04m`, `2d07h`.
pub fn duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if secs == 0 {
        format!("{ms}ms")
    } else if secs < 60 {
        format!("{s}s")
    } else if secs < 3600 {
        format!("{m}m{s:02}s")
    } else if secs < 86_400 {
        format!("{h}h{m:02}m")
    } else {
        format!("{d}d{h:02}h")
    }
}

/// A Unix time in milliseconds as RFC 3339 UTC with milliseconds.
pub fn time_ms(at_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
}

/// A Unix time in milliseconds as RFC 3339 UTC to the second.
pub fn time_s(at_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
}

/// Text for one table cell: control characters escaped (so a value cannot break the table),
/// cut to `max` characters with an ellipsis, `-` when empty.
pub fn cell(text: &str, max: usize) -> String {
    if text.is_empty() {
        return "-".into();
    }
    let escaped: String = if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_string()
    };
    if escaped.chars().count() > max {
        let mut cut: String = escaped.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        escaped
    }
}

/// Exit code of a failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code when the input was refused as invalid and nothing changed (as clap uses for usage
/// errors).
pub const EXIT_INVALID: u8 = 2;

/// Writes `bytes` to stdout and flushes.
pub fn emit(bytes: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}

/// Appends `value` as pretty JSON and a newline.
pub fn push_json<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) {
    // The API types are plain data: serialising them cannot fail.
    serde_json::to_writer_pretty(&mut *out, value).expect("API types always serialise to JSON");
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_their_headers() {
        let mut table = Table::new(&["NAME", "STATE", "LAST-ERROR"]);
        table.row(vec!["door".into(), "running".into(), "-".into()]);
        table.row(vec!["thermostat".into(), "failed".into(), "trap".into()]);
        let mut out = Vec::new();
        table.write(&mut out).expect("writes to a Vec");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "NAME        STATE    LAST-ERROR\n\
             door        running  -\n\
             thermostat  failed   trap\n"
        );
    }

    #[test]
    fn markdown_tables_align_columns_and_rule_the_header() {
        let mut table = Table::new(&["figure", "measured"]);
        table.row(vec!["start p50".into(), "1.2 ms".into()]);
        table.row(vec!["RSS".into()]);
        let mut out = Vec::new();
        table.write_markdown(&mut out).expect("writes to a Vec");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "| figure    | measured |\n\
             | --------- | -------- |\n\
             | start p50 | 1.2 ms   |\n\
             | RSS       |          |\n"
        );
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_wrote_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(65536), "64 KiB");
        assert_eq!(bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(312_000), "5m12s");
        assert_eq!(duration_ms(3 * 3_600_000 + 4 * 60_000), "3h04m");
        assert_eq!(duration_ms(2 * 86_400_000 + 7 * 3_600_000), "2d07h");
        assert_eq!(time_s(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn cells_escape_newlines_and_cut_long_text() {
        assert_eq!(cell("a\nb", 10), "a\\nb");
        assert_eq!(cell("abcdef", 4), "abc…");
        assert_eq!(cell("", 4), "-");
    }
}
