//! Names: the pattern workload and logical device names follow.

use crate::spec::WorkloadSpec;

/// Longest accepted workload name.
const MAX_NAME_LEN: usize = WorkloadSpec::MAX_NAME_LEN;

/// A name that does not follow `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum NameError {
    /// A workload's `name`.
    #[error(
        "invalid workload name {0:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 and '-', \
         starting with a letter or a digit"
    )]
    Workload(String),
    /// A grant's logical device `name`.
    #[error(
        "invalid device name {0:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9 and '-', \
         starting with a letter or a digit"
    )]
    Device(String),
}

fn well_formed(name: &str) -> bool {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = name.chars();
    chars.next().is_some_and(valid_char)
        && chars.all(|c| valid_char(c) || c == '-')
        && name.len() <= MAX_NAME_LEN
}

/// Checks a workload name against `[a-z0-9][a-z0-9-]{0,62}`.
pub(super) fn check_name(name: &str) -> Result<(), NameError> {
    if well_formed(name) {
        Ok(())
    } else {
        Err(NameError::Workload(name.to_owned()))
    }
}

/// Checks a logical device name against the workload-name pattern.
pub(super) fn check_device_name(name: &str) -> Result<(), NameError> {
    if well_formed(name) {
        Ok(())
    } else {
        Err(NameError::Device(name.to_owned()))
    }
}
