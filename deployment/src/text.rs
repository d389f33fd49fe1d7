//! Echoing outside text safely in errors and logs.

use std::borrow::Cow;

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
}
