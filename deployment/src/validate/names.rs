//! Names: the pattern workload and logical device names follow.

use crate::spec::WorkloadSpec;

/// Longest accepted workload name.
const MAX_NAME_LEN: usize = WorkloadSpec::MAX_NAME_LEN;

/// Checks a workload name against `[a-z0-9][a-z0-9-]{0,62}`.
pub(super) fn check_name(name: &str) -> std::result::Result<(), String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(valid_char)
        && chars.all(|c| valid_char(c) || c == '-')
        && name.len() <= MAX_NAME_LEN;
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "invalid workload name {name:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 \
             and '-', starting with a letter or a digit"
        ))
    }
}

/// Checks a logical device name against the workload-name pattern.
pub(super) fn check_device_name(name: &str) -> std::result::Result<(), String> {
    check_name(name).map_err(|_| {
        format!(
            "invalid device name {name:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 \
             and '-', starting with a letter or a digit"
        )
    })
}
