//! Host tools the end-to-end tests drive (an OCI runtime, QEMU, containerd): a test whose tool
//! is missing fails naming it, unless the opt-out variable [`ALLOW_MISSING`] lists the tool,
//! in which case the test says so and passes without running. CI never sets it.
//!
//! ```text
//! LICHEN_TEST_ALLOW_MISSING=runc,qemu cargo test --workspace
//! ```
//!
//! Names: `runc` (no OCI runtime at all: neither runc nor crun), `qemu`
//! (`qemu-system-x86_64`), `containerd` (containerd and ctr), `foreign-guests` (the JavaScript
//! and Python example components `scripts/build-foreign-guests` builds).

use std::process::Command;

/// The opt-out variable: a comma-separated list of tools whose absence may skip a test.
pub const ALLOW_MISSING: &str = "LICHEN_TEST_ALLOW_MISSING";

/// Whether [`ALLOW_MISSING`] lists `tool`.
pub fn allowed_missing(tool: &str) -> bool {
    listed(std::env::var(ALLOW_MISSING).ok().as_deref(), tool)
}

/// Whether the comma-separated `list` names `tool` (case and spaces aside).
fn listed(list: Option<&str>, tool: &str) -> bool {
    list.is_some_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|t| t.eq_ignore_ascii_case(tool))
    })
}

/// A test's `tool` is missing (`why` says what is missing): returns `false` (skip, saying so)
/// when [`ALLOW_MISSING`] lists it, else fails the test naming the tool and the variable.
pub fn missing(tool: &str, why: &str) -> bool {
    verdict(std::env::var(ALLOW_MISSING).ok().as_deref(), tool, why)
}

fn verdict(list: Option<&str>, tool: &str, why: &str) -> bool {
    if listed(list, tool) {
        eprintln!("SKIPPED (allowed by {ALLOW_MISSING}): {why}");
        return false;
    }
    panic!(
        "{why}: run scripts/install-deps, or set {ALLOW_MISSING}={tool} to let this test skip on a machine without it"
    );
}

/// Whether `program --version` runs and succeeds.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `true` when `qemu-system-x86_64` runs; else [`missing`] for `qemu`.
pub fn qemu_present() -> bool {
    runs("qemu-system-x86_64")
        || missing(
            "qemu",
            "qemu-system-x86_64 is not installed (the test boots a real kernel under it)",
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_fails_unless_the_opt_out_lists_it() {
        assert!(listed(Some("runc, QEMU"), "runc") && listed(Some("runc, QEMU"), "qemu"));
        assert!(!listed(Some("runc,qemu"), "containerd"));
        assert!(!listed(None, "runc"), "unset, nothing may be missing");
        assert!(!verdict(Some("runc"), "runc", "runc is not installed"));
        let refused = std::panic::catch_unwind(|| verdict(None, "runc", "runc is not installed"));
        let message = *refused
            .expect_err("a tool the opt-out does not list fails the test")
            .downcast::<String>()
            .expect("a formatted panic");
        assert!(
            message.contains("runc is not installed")
                && message.contains("LICHEN_TEST_ALLOW_MISSING=runc"),
            "{message}"
        );
    }
}
