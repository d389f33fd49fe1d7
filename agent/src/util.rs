//! Small helpers shared by the agent's modules.

use std::borrow::Cow;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// Whole milliseconds of a duration, saturating at `u64::MAX` (585 million years).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whole nanoseconds of a duration, saturating at `u64::MAX` (584 years).
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `after` from now, or a far instant (30 years on) when adding would overflow:
/// a deadline never panics, however long the wait it is given.
pub fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`deadline_after`] waits for at most: 30 years.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// Bytes as a short human figure (`12.3 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Resident set size of this process in bytes, from `/proc/self/status` (Linux only).
pub fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `text` with every character that could hide or disguise what follows escaped as Rust does
/// (`\n`, `\u{202e}`): control characters, bidirectional overrides and other invisible
/// formatting characters. Quotes and backslashes stay as they are. Errors pass what they echo
/// (names, keys, paths from a file or a request) through this, so a name cannot add lines to a
/// log or reorder a terminal's text.
pub fn escape_unprintable(text: &str) -> Cow<'_, str> {
    let hidden = |c: char| !matches!(c, '"' | '\'' | '\\') && c.escape_debug().nth(1).is_some();
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_unprintable("plain \"name\" é"), "plain \"name\" é");
        assert_eq!(
            escape_unprintable("a\nb\u{202e}c\u{1b}[31m\u{2066}"),
            "a\\nb\\u{202e}c\\u{1b}[31m\\u{2066}"
        );
    }

    #[test]
    fn deadlines_never_overflow() {
        let far = deadline_after(Duration::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(365 * 86_400));
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(nanos(Duration::from_secs(1)), 1_000_000_000);
    }
}
