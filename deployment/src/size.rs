//! Sizes as people write them in deployment files, the agent's config and the operator tool's
//! flags: one rule everywhere.
//!
//! A size is a whole number, optional spaces, then `B`, `KiB`, `MiB` or `GiB` (powers of 1024,
//! case-insensitive); no unit means bytes. Decimal units (`K`, `KB`, `M`, `MB`, `G`, `GB`) are
//! refused rather than guessed, since people often write `MB` meaning `MiB`. Leading and trailing
//! spaces are ignored. The caller checks the range its field allows.

/// Why a text is not a size; its text says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No digits before the unit (empty, a sign, a fraction's dot...).
    #[error("expected a whole number followed by B, KiB, MiB or GiB, such as \"16MiB\"")]
    NotANumber,
    /// A decimal unit, refused rather than guessed.
    #[error("unit \"{0}\" is ambiguous; use KiB, MiB or GiB (1 KiB = 1024 bytes)")]
    AmbiguousUnit(String),
    /// A unit that is not one of `B`, `KiB`, `MiB`, `GiB`.
    #[error(
        "unknown unit \"{0}\"; expected a whole number followed by B, KiB, MiB or GiB, such as \
         \"16MiB\""
    )]
    UnknownUnit(String),
    /// More bytes than a `u64` holds.
    #[error("size is too large")]
    TooLarge,
}

/// Parses a size by the rule of this module: `"16MiB"`, `"16 mib"`, `"4096"`, `"4096B"`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let unit = unit.trim_start();
    if digits.is_empty() {
        return Err(SizeError::NotANumber);
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "k" | "kb" | "m" | "mb" | "g" | "gb" => {
            return Err(SizeError::AmbiguousUnit(unit.to_owned()));
        }
        _ => return Err(SizeError::UnknownUnit(unit.to_owned())),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .ok_or(SizeError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("16 mib"), Ok(16 << 20));
        assert_eq!(parse_size(" 64KiB "), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("MiB"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("-1MiB"), Err(SizeError::NotANumber));
        assert!(parse_size("1.5MiB").is_err());
        assert_eq!(parse_size("99999999999999GiB"), Err(SizeError::TooLarge));
    }

    #[test]
    fn decimal_and_unknown_units_are_named_in_the_error() {
        let ambiguous = parse_size("16MB").unwrap_err();
        assert_eq!(ambiguous, SizeError::AmbiguousUnit("MB".to_owned()));
        assert!(
            ambiguous.to_string().contains("\"MB\" is ambiguous"),
            "{ambiguous}"
        );
        let unknown = parse_size("3 parsecs").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown unit \"parsecs\""),
            "{unknown}"
        );
    }
}
