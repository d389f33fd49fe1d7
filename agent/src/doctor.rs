//! `lichen doctor`: what this host can run, probed honestly, with reasons.

use crate::api::types::{DoctorCheck, DoctorReport};
use crate::runtime::Tier;
use crate::runtime::wasm::EngineOptions;
use crate::util::human_bytes;

mod containerd;
use containerd::containerd_check;

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
    checks.push(check("flavour", "ok", crate::flavour::describe()));
    checks.extend(board_checks(board));
    checks.push(wasm_check(engine));
    checks.push(address_space_check(engine));
    // A runtime this flavour leaves out is not probed (the probes run trial containers and
    // guests): one line says it is not in the binary.
    if crate::flavour::CONTAINERS {
        checks.push(cgroup_check());
    }
    if crate::flavour::MICROVMS {
        checks.extend(microvm_checks());
    }
    if crate::flavour::CONTAINERS {
        checks.push(oci_check());
    }
    for tier in [Tier::Container, Tier::Microvm] {
        if let Some(piece) = crate::flavour::missing_runtime(tier) {
            checks.push(check(tier.as_str(), "missing", format!("needs {piece}")));
        }
    }
    checks.push(containerd_check());
    checks.extend(isolation_checks(board));
    DoctorReport {
        version: env!("CARGO_PKG_VERSION").into(),
        board: board.into(),
        checks,
    }
}

/// The board and device checks: the board detected from the device tree (or `sim`) beside
/// the configured one, every gpiochip with its lines, the spidev and i2c-dev nodes, and
/// whether the configured profile's pins and buses are all there.
pub fn board_checks(board: &str) -> Vec<DoctorCheck> {
    let detected = lichen_devices::board::detect();
    let inventory = lichen_devices::inventory();
    device_checks(board, detected, &inventory)
}

/// [`board_checks`] on given facts (tests pass their own).
fn device_checks(
    board: &str,
    detected: lichen_devices::Result<lichen_devices::board::Detection>,
    inventory: &lichen_devices::Inventory,
) -> Vec<DoctorCheck> {
    use lichen_devices::board::{Backend, BoardProfile};

    let mut checks = Vec::new();
    let configured = BoardProfile::builtin(board);
    checks.push(match (&detected, &configured) {
        (Err(err), _) => check("board", "warn", format!("cannot detect the board: {err}")),
        (Ok(d), _) => {
            let seen = match (&d.model, d.matched) {
                (Some(model), true) => {
                    format!("device tree says {model:?}: profile {}", d.profile.name)
                }
                (Some(model), false) => format!(
                    "device tree says {model:?}, which no profile claims: profile {}",
                    d.profile.name
                ),
                (None, _) => format!(
                    "no {} (not a device-tree board): profile {}",
                    lichen_devices::board::DEVICE_TREE_MODEL,
                    d.profile.name
                ),
            };
            let status = if d.matched && d.profile.name != board {
                "warn"
            } else {
                "ok"
            };
            check(
                "board",
                status,
                format!("{seen}; configured board {board:?}"),
            )
        }
    });
    let profile = match configured {
        Ok(profile) => profile,
        Err(err) => {
            checks.push(check("board profile", "missing", err.to_string()));
            return checks;
        }
    };
    let linux = profile.backend == Backend::Linux;
    // What the host has, whatever the profile: the simulated board needs none of it.
    let absent = if linux { "missing" } else { "ok" };
    if inventory.gpiochips.is_empty() {
        checks.push(check("gpiochips", absent, "none found"));
    }
    for chip in &inventory.gpiochips {
        let lines: Vec<String> = chip
            .lines
            .iter()
            .map(|line| {
                let name = if line.name.is_empty() {
                    "unnamed"
                } else {
                    &line.name
                };
                match &line.consumer {
                    Some(c) if !c.is_empty() => format!("{} {name} (used by {c:?})", line.offset),
                    Some(_) => format!("{} {name} (used)", line.offset),
                    None => format!("{} {name}", line.offset),
                }
            })
            .collect();
        checks.push(check(
            &format!("gpiochip {}", chip.name),
            "ok",
            format!(
                "{} [{}], {} lines: {}",
                chip.path.display(),
                chip.label,
                chip.line_count,
                lines.join(", ")
            ),
        ));
    }
    let nodes = |list: &[std::path::PathBuf]| {
        if list.is_empty() {
            "none found".to_owned()
        } else {
            list.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let status = |list: &[std::path::PathBuf]| if list.is_empty() { absent } else { "ok" };
    checks.push(check(
        "spidev",
        status(&inventory.spidev),
        nodes(&inventory.spidev),
    ));
    checks.push(check(
        "i2c-dev",
        status(&inventory.i2c),
        nodes(&inventory.i2c),
    ));
    for problem in &inventory.problems {
        checks.push(check("device access", "warn", problem.clone()));
    }
    checks.push(profile_devices_check(&profile, inventory));
    checks
}

/// Whether every pin and bus of `profile` is on this host (a simulated profile always is).
fn profile_devices_check(
    profile: &lichen_devices::board::BoardProfile,
    inventory: &lichen_devices::Inventory,
) -> DoctorCheck {
    use lichen_devices::LineSpec;
    use lichen_devices::board::Backend;

    let counts = format!(
        "{} pins, {} SPI devices, {} I2C buses",
        profile.pins.len(),
        profile.spi.len(),
        profile.i2c.len()
    );
    let name = format!("board {} devices", profile.name);
    if profile.backend == Backend::Sim {
        return check(&name, "ok", format!("{counts}, all simulated in the agent"));
    }
    let mut missing = Vec::new();
    for pin in &profile.pins {
        let found = match &pin.line {
            LineSpec::Label(label) => inventory
                .gpiochips
                .iter()
                .any(|chip| chip.lines.iter().any(|l| &l.name == label)),
            LineSpec::ChipOffset { chip, offset } => inventory
                .gpiochips
                .iter()
                .any(|c| &c.label == chip && *offset < c.line_count),
        };
        if !found {
            missing.push(format!("pin {} (line {})", pin.name, pin.line));
        }
    }
    let has = |list: &[std::path::PathBuf], device: &str| {
        list.iter().any(|p| p == std::path::Path::new(device))
    };
    for bus in &profile.spi {
        if !has(&inventory.spidev, &bus.device) {
            missing.push(format!("{} ({})", bus.device, bus.name));
        }
    }
    for bus in &profile.i2c {
        if !has(&inventory.i2c, &bus.device) {
            missing.push(format!("{} ({})", bus.device, bus.name));
        }
    }
    if missing.is_empty() {
        check(&name, "ok", format!("{counts}, all found"))
    } else {
        check(
            &name,
            "missing",
            format!(
                "{counts}; not found: {} (workloads granted them will not start)",
                missing.join(", ")
            ),
        )
    }
}

fn wasm_check(engine: Option<&EngineOptions>) -> DoctorCheck {
    let options = engine.copied().unwrap_or_default();
    match crate::runtime::wasm::WasmEngine::new(options) {
        Ok(engine) => check(
            "wasm runtime",
            "ok",
            format!(
                "Wasmtime {} {} for {}; engine fingerprint {} (what the hub precompiles for); pooling allocator for {} instances, up to {} of linear memory each",
                crate::runtime::wasm::WASMTIME_VERSION,
                if crate::flavour::COMPILER {
                    "with Cranelift"
                } else {
                    "without a compiler (it maps modules precompiled on the hub)"
                },
                engine.target(),
                engine.fingerprint(),
                engine.options().max_instances,
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

/// What the pool may reserve here and how many instances fit: the agent lowers the pool to
/// what fits when it starts, with the same figures in its log.
fn address_space_check(engine: Option<&EngineOptions>) -> DoctorCheck {
    let options = engine.copied().unwrap_or_default();
    let space = crate::runtime::wasm::AddressSpace::probe();
    let (_, fit) = options.fit_to(&space);
    let status = if fit.lowered() { "warn" } else { "ok" };
    check("address space", status, fit.describe(&space))
}

fn cgroup_check() -> DoctorCheck {
    use crate::runtime::container::CgroupLayout;
    let cgroup = &crate::runtime::container::probe_cached().cgroup;
    let missing: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| !cgroup.has(c))
        .collect();
    let controllers = cgroup.controllers.join(" ");
    match cgroup.layout {
        CgroupLayout::Missing => check(
            "cgroups",
            "missing",
            "no cgroup filesystem at /sys/fs/cgroup: containers cannot be limited",
        ),
        _ if !missing.is_empty() => check(
            "cgroups",
            "warn",
            format!(
                "{} with controllers: {controllers}; missing {}: containers cannot be limited there",
                cgroup.layout,
                missing.join(", ")
            ),
        ),
        CgroupLayout::Hybrid => check(
            "cgroups",
            "ok",
            format!(
                "{} (v1 controllers: {controllers}; unified hierarchy holds: {}); memory, pids and cpu limits work through the v1 controllers",
                cgroup.layout,
                if cgroup.unified_controllers.is_empty() {
                    "none".to_string()
                } else {
                    cgroup.unified_controllers.join(" ")
                }
            ),
        ),
        _ => check(
            "cgroups",
            "ok",
            format!("{} with controllers: {controllers}", cgroup.layout),
        ),
    }
}

/// KVM as the microVM probe found it (absent, present but unusable because a trial boot of a
/// real kernel hung or failed, or usable), then QEMU and the accelerator microVMs get, and why.
fn microvm_checks() -> Vec<DoctorCheck> {
    use crate::runtime::microvm::KvmState;
    let probe = crate::runtime::microvm::probe_cached();
    let kvm = match &probe.kvm {
        KvmState::Usable { .. } => check("kvm", "ok", probe.kvm.to_string()),
        KvmState::Absent => check(
            "kvm",
            "missing",
            "/dev/kvm is absent: microVMs run under TCG emulation only",
        ),
        other => check(
            "kvm",
            "warn",
            format!("{other}; microVMs run under TCG emulation"),
        ),
    };
    let microvm = match probe.accelerator() {
        Some(_) => check("microvm", "ok", probe.summary()),
        None => check("microvm", "missing", probe.summary()),
    };
    vec![kvm, microvm]
}

fn oci_check() -> DoctorCheck {
    let probe = crate::runtime::container::probe_cached();
    let summary = probe.runtime_summary();
    match probe.usable_runtime() {
        Some(_) => check("oci runtime", "ok", summary),
        None => check(
            "oci runtime",
            "missing",
            format!("{summary}: container workloads cannot run"),
        ),
    }
}

/// One line per isolation tier: whether `deploy` accepts workloads in it on this board and
/// host, or the missing piece (the probe the agent runs once at start).
fn isolation_checks(board: &str) -> Vec<DoctorCheck> {
    let Ok(profile) = lichen_devices::board::BoardProfile::builtin(board) else {
        return Vec::new();
    };
    use crate::runtime::isolation::IsolationProbe;
    let mut probe = if crate::flavour::CONTAINERS {
        let microvm = match crate::flavour::missing_runtime(Tier::Microvm) {
            None => crate::runtime::isolation::probe_microvm(),
            Some(piece) => Err(piece),
        };
        IsolationProbe::detect(&profile, crate::runtime::container::probe_cached(), microvm)
    } else {
        let mut probe = IsolationProbe::new(&profile, Vec::new());
        probe.record(Tier::Wasm, Ok("Wasmtime, built in".to_string()));
        if crate::flavour::MICROVMS {
            probe.record(Tier::Microvm, crate::runtime::isolation::probe_microvm());
        }
        probe
    };
    for tier in Tier::ALL {
        if let Some(piece) = crate::flavour::missing_runtime(tier) {
            probe.record(tier, Err(piece));
        }
    }
    probe
        .summary()
        .into_iter()
        .map(|(tier, ok, detail)| {
            check(
                &format!("isolation {tier}"),
                if ok { "ok" } else { "missing" },
                detail,
            )
        })
        .collect()
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

#[cfg(test)]
mod device_tests {
    use std::path::PathBuf;

    use lichen_devices::Inventory;
    use lichen_devices::board::detect_from_model;
    use lichen_devices::inventory::{ChipInfo, LineInfo};

    use super::*;

    fn find<'a>(checks: &'a [DoctorCheck], name: &str) -> &'a DoctorCheck {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name:?} check in {checks:?}"))
    }

    #[test]
    fn a_host_without_device_tree_or_devices_runs_the_sim_board() {
        let checks = device_checks("sim", detect_from_model(None), &Inventory::default());
        let board = find(&checks, "board");
        assert_eq!(board.status, "ok");
        assert!(
            board
                .detail
                .contains("not a device-tree board): profile sim; configured board \"sim\""),
            "{}",
            board.detail
        );
        assert_eq!(find(&checks, "gpiochips").detail, "none found");
        assert_eq!(find(&checks, "gpiochips").status, "ok");
        assert_eq!(find(&checks, "spidev").status, "ok");
        let devices = find(&checks, "board sim devices");
        assert_eq!(devices.status, "ok");
        assert!(devices.detail.ends_with("all simulated in the agent"));
    }

    #[test]
    fn a_linux_board_lists_every_chip_and_line_and_names_what_is_missing() {
        let inventory = Inventory {
            model: None,
            gpiochips: vec![ChipInfo {
                path: PathBuf::from("/dev/gpiochip0"),
                name: "gpiochip0".into(),
                label: "gpio-sim.0-node0".into(),
                line_count: 2,
                lines: vec![
                    LineInfo {
                        offset: 0,
                        name: "GPIO17".into(),
                        consumer: Some("lichen:blinky".into()),
                    },
                    LineInfo {
                        offset: 1,
                        name: String::new(),
                        consumer: None,
                    },
                ],
            }],
            spidev: vec![PathBuf::from("/dev/spidev0.0")],
            i2c: Vec::new(),
            problems: vec!["/dev/gpiochip1: permission denied".into()],
        };
        let checks = device_checks("qemu-x86-test", detect_from_model(None), &inventory);
        let chip = find(&checks, "gpiochip gpiochip0");
        assert_eq!(
            chip.detail,
            "/dev/gpiochip0 [gpio-sim.0-node0], 2 lines: 0 GPIO17 (used by \"lichen:blinky\"), 1 unnamed"
        );
        assert_eq!(find(&checks, "spidev").detail, "/dev/spidev0.0");
        assert_eq!(find(&checks, "i2c-dev").status, "missing");
        assert_eq!(
            find(&checks, "device access").detail,
            "/dev/gpiochip1: permission denied"
        );
        let devices = find(&checks, "board qemu-x86-test devices");
        assert_eq!(devices.status, "missing");
        assert!(
            devices
                .detail
                .contains("not found: pin GPIO4 (line GPIO4), ")
                && !devices.detail.contains("pin GPIO17")
                && !devices.detail.contains("/dev/spidev0.0")
                && devices.detail.contains("/dev/i2c-0 (i2c-0)"),
            "{}",
            devices.detail
        );
    }

    #[test]
    fn a_detected_board_other_than_the_configured_one_is_a_warning() {
        let checks = device_checks(
            "sim",
            detect_from_model(Some("Raspberry Pi 4 Model B Rev 1.4")),
            &Inventory::default(),
        );
        let board = find(&checks, "board");
        assert_eq!(board.status, "warn");
        assert!(
            board
                .detail
                .starts_with("device tree says \"Raspberry Pi 4 Model B Rev 1.4\": profile rpi4b"),
            "{}",
            board.detail
        );
    }
}
