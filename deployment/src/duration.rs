//! Durations as people write them in deployment files and pod environments (`"500ms"`, `"2s"`,
//! `"1m 30s"`, `"1year"`): one parser and one bounds check, so every field that takes a
//! duration accepts the same text and words its refusals alike.

use std::time::Duration;

use crate::bounds::show_duration;

/// Why a text is not a duration within its field's bounds. The text completes a sentence that
/// begins with the field and the value: `interval "0s" is too short: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all; holds the parser's reason.
    #[error("{0}; expected a number with a unit, such as \"500ms\", \"2s\" or \"1m 30s\"")]
    NotADuration(String),
    /// Shorter than the field allows.
    #[error("is too short: it must be at least {}", show_duration(*.0))]
    TooShort(Duration),
    /// Longer than the field allows.
    #[error("is too long: it must be at most {}", show_duration(*.0))]
    TooLong(Duration),
}

/// Parses `text` (a `humantime` duration) and checks it lies within `min..=max`.
pub fn parse_duration_within(
    text: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, DurationError> {
    let duration = humantime::parse_duration(text)
        .map_err(|why| DurationError::NotADuration(why.to_string()))?;
    if duration < min {
        return Err(DurationError::TooShort(min));
    }
    if duration > max {
        return Err(DurationError::TooLong(max));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(60));

    #[test]
    fn accepts_within_and_at_the_bounds() {
        assert_eq!(
            parse_duration_within("1m 30s", (Duration::ZERO, Duration::from_secs(90))),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(parse_duration_within("1ms", BOUNDS), Ok(BOUNDS.0));
        assert_eq!(parse_duration_within("60s", BOUNDS), Ok(BOUNDS.1));
    }

    #[test]
    fn refuses_past_the_bounds_naming_the_bound() {
        let short = parse_duration_within("0s", BOUNDS).unwrap_err();
        assert_eq!(short, DurationError::TooShort(BOUNDS.0));
        assert_eq!(short.to_string(), "is too short: it must be at least 1ms");
        let long = parse_duration_within("2m", BOUNDS).unwrap_err();
        assert_eq!(long.to_string(), "is too long: it must be at most 1m");
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        let err = parse_duration_within("soon", BOUNDS).unwrap_err();
        assert!(matches!(err, DurationError::NotADuration(_)), "{err:?}");
        assert!(err.to_string().contains("such as \"500ms\""), "{err}");
    }
}
