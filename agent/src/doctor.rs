//! `lichen doctor`: what this host can run, probed honestly, with reasons.

use std::path::Path;

use crate::api::types::{DoctorCheck, DoctorReport};
use crate::runtime::wasm::EngineOptions;
use crate::util::human_bytes;

fn check(name: &str, status: &str, detail: impl Into<String>) -> DoctorCheck {
    DoctorCheck {
        name: name.into(),
        status: status.into(),
        detail: detail.into(),
    }
}

/// Probes the host. `engine` is the sizing of the running engine, if any.
pub fn report(board: &str, engine: Option<&EngineOptions>) -> DoctorReport {
    let mut checks = Vec::new();
    checks.push(check(
        "platform",
        "ok",
        format!(
            "{} {}, kernel {}",
            std::env::consts::ARCH,
            std::env::consts::OS,
            read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into())
        ),
    ));
    match read_trimmed("/proc/device-tree/model") {
        Some(model) => checks.push(check("board model", "ok", format!("device tree says {model:?}"))),
        None => checks.push(check(
            "board model",
            "warn",
            format!("no /proc/device-tree/model (not a device-tree board); using board profile {board:?}"),
        )),
    }
    checks.push(wasm_check(engine));
    checks.push(address_space_check(engine));
    checks.push(cgroup_check());
    checks.push(kvm_check());
    checks.push(oci_check());
    DoctorReport {
        version: env!("CARGO_PKG_VERSION").into(),
        board: board.into(),
        checks,
    }
}

/// The `hub` check of an agent config: offline, signed-only, or loudly insecure.
pub fn hub_check(hub: Option<&crate::config::HubSection>) -> DoctorCheck {
    let (status, detail) = crate::hub::doctor_check(hub);
    check("hub", status, detail)
}

fn wasm_check(engine: Option<&EngineOptions>) -> DoctorCheck {
    let options = engine.copied().unwrap_or_default();
    match crate::runtime::wasm::WasmEngine::new(options) {
        Ok(_) => check(
            "wasm runtime",
            "ok",
            format!(
                "Wasmtime with Cranelift for {}; pooling allocator for {} instances, up to {} of linear memory each",
                std::env::consts::ARCH,
                options.max_instances,
                human_bytes(options.max_memory_bytes)
            ),
        ),
        Err(err) => check(
            "wasm runtime",
            "missing",
            format!("cannot build the engine: {err:#}"),
        ),
    }
}

fn address_space_check(engine: Option<&EngineOptions>) -> DoctorCheck {
    let options = engine.copied().unwrap_or_default();
    let reserved = options.reserved_memory_bytes();
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max address space"))?;
            line.split_whitespace()
                .nth(3)
                .and_then(|v| v.parse::<u64>().ok())
        });
    match limit {
        Some(limit) if reserved > limit => check(
            "address space",
            "warn",
            format!(
                "the pool reserves {} of virtual memory but `ulimit -v` allows {}: lower wasm.max-instances or wasm.max-memory",
                human_bytes(reserved),
                human_bytes(limit)
            ),
        ),
        Some(limit) => check(
            "address space",
            "ok",
            format!(
                "the pool reserves {} of the {} allowed",
                human_bytes(reserved),
                human_bytes(limit)
            ),
        ),
        None => check(
            "address space",
            "ok",
            format!(
                "the pool reserves {} of virtual memory (a 39-bit Raspberry Pi kernel gives 512 GiB)",
                human_bytes(reserved)
            ),
        ),
    }
}

fn cgroup_check() -> DoctorCheck {
    match read_trimmed("/sys/fs/cgroup/cgroup.controllers") {
        Some(controllers) => check(
            "cgroups",
            "ok",
            format!(
                "cgroup v2 with controllers: {controllers} (used by the container runtime, not built yet)"
            ),
        ),
        None if Path::new("/sys/fs/cgroup/memory").exists() => check(
            "cgroups",
            "warn",
            "cgroup v1 or hybrid hierarchy (used by the container runtime, not built yet)",
        ),
        None => check(
            "cgroups",
            "missing",
            "no cgroup filesystem at /sys/fs/cgroup",
        ),
    }
}

fn kvm_check() -> DoctorCheck {
    if Path::new("/dev/kvm").exists() {
        check(
            "kvm",
            "warn",
            "/dev/kvm is present; whether it really boots guests is probed by the microVM runtime, which is not built yet",
        )
    } else {
        check(
            "kvm",
            "missing",
            "no /dev/kvm: microVM workloads would run under TCG emulation only",
        )
    }
}

fn oci_check() -> DoctorCheck {
    let found: Vec<&str> = ["crun", "runc"]
        .into_iter()
        .filter(|name| find_in_path(name))
        .collect();
    if found.is_empty() {
        check(
            "oci runtime",
            "missing",
            "neither crun nor runc is in PATH: container workloads cannot run",
        )
    } else {
        check(
            "oci runtime",
            "warn",
            format!(
                "found {} in PATH; the container runtime that uses it is not built yet",
                found.join(", ")
            ),
        )
    }
}

fn find_in_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| {
            s.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string()
        })
        .filter(|s| !s.is_empty())
}
