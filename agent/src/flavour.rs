//! What this build of Lichen carries: the cargo features that decide which runtimes and links
//! are in the binary. Two flavours are named: the full node (every runtime, Cranelift, the
//! KubeEdge mapper) and the small node for boards of the Pi Zero 2 W class (the Wasm runtime,
//! devices and hub link only; `cargo build -p lichen --no-default-features --features
//! small-node`). `lichen doctor` says which one runs and what it lacks, and a workload of a
//! kind the binary lacks is refused naming the kind and the missing feature.

use crate::runtime::Tier;

/// Whether Cranelift is in: the node compiles modules that come without a compiled form.
pub const COMPILER: bool = cfg!(feature = "compiler");
/// Whether the container runtime (OCI bundles through runc/crun) is in.
pub const CONTAINERS: bool = cfg!(feature = "containers");
/// Whether the microVM runtime (QEMU) is in.
pub const MICROVMS: bool = cfg!(feature = "microvms");
/// Whether the KubeEdge device mapper (DMI gRPC) is in.
pub const KUBEEDGE: bool = cfg!(feature = "kubeedge");
/// Whether Kubernetes pods are in (containerd's Task API served for Wasm pods).
pub const PODS: bool = cfg!(feature = "pods");

/// The flavour's name as a literal, for the `lichen` binary's version text
/// (`lichen_agent::flavour_name!()`, which `lichen bench size` finds in a foreign build).
#[cfg(all(
    feature = "compiler",
    feature = "containers",
    feature = "microvms",
    feature = "kubeedge",
    feature = "pods"
))]
#[macro_export]
macro_rules! flavour_name {
    () => {
        "full node"
    };
}
#[cfg(not(any(
    feature = "compiler",
    feature = "containers",
    feature = "microvms",
    feature = "kubeedge",
    feature = "pods"
)))]
/// The flavour's name as a literal: `small node`.
#[macro_export]
macro_rules! flavour_name {
    () => {
        "small node"
    };
}
#[cfg(all(
    any(
        feature = "compiler",
        feature = "containers",
        feature = "microvms",
        feature = "kubeedge",
        feature = "pods"
    ),
    not(all(
        feature = "compiler",
        feature = "containers",
        feature = "microvms",
        feature = "kubeedge",
        feature = "pods"
    ))
))]
/// The flavour's name as a literal: `custom build`.
#[macro_export]
macro_rules! flavour_name {
    () => {
        "custom build"
    };
}

/// The optional parts, with the cargo feature of each and whether this build has it.
const PARTS: [(&str, &str, bool); 5] = [
    ("compiler", "compiler (Cranelift)", COMPILER),
    ("containers", "containers", CONTAINERS),
    ("microvms", "microVMs", MICROVMS),
    ("kubeedge", "KubeEdge mapper", KUBEEDGE),
    ("pods", "Kubernetes pods", PODS),
];

/// The flavour's name: `full node` (every part), `small node` (none) or `custom build`.
pub fn name() -> &'static str {
    flavour_name!()
}

/// The optional parts this build lacks, as `what (cargo feature `name`)`.
pub fn lacks() -> Vec<String> {
    PARTS
        .iter()
        .filter(|(_, _, on)| !*on)
        .map(|(feature, what, _)| format!("{what} (cargo feature `{feature}`)"))
        .collect()
}

/// The flavour in one line for `doctor` and the daemon's start log.
pub fn describe() -> String {
    let lacks = lacks();
    if lacks.is_empty() {
        return format!(
            "{}: Wasm runtime with compiler, containers, microVMs, Kubernetes pods, KubeEdge mapper, devices, hub link",
            name()
        );
    }
    let mut text = format!(
        "{}: Wasm runtime, devices, hub link; built without {}",
        name(),
        lacks.join(", ")
    );
    if !COMPILER {
        text.push_str(
            "; runs only modules precompiled for this node's engine on the hub (`lichen hub deploy --precompile TARGET`)",
        );
    }
    text
}

/// Why a tier's runtime is not in this binary, or `None` when it is: the missing piece, as
/// the isolation probe words it (`"container" isolation needs ...`).
pub fn missing_runtime(tier: Tier) -> Option<String> {
    let (on, feature) = match tier {
        Tier::Wasm => (true, ""),
        Tier::Container => (CONTAINERS, "containers"),
        Tier::Microvm => (MICROVMS, "microvms"),
    };
    (!on).then(|| {
        format!(
            "a lichen built with the {tier} runtime: this binary ({}) has none (cargo feature `{feature}` off)",
            name()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flavour_names_each_part_it_lacks_and_each_missing_runtime_names_its_kind() {
        let described = describe();
        assert!(described.starts_with(name()), "{described}");
        let expected = if PARTS.iter().all(|(_, _, on)| *on) {
            "full node"
        } else if PARTS.iter().all(|(_, _, on)| !*on) {
            "small node"
        } else {
            "custom build"
        };
        assert_eq!(name(), expected);
        assert_eq!(flavour_name!(), expected);
        for (feature, _, on) in PARTS {
            assert_eq!(
                described.contains(&format!("`{feature}`")),
                !on,
                "{feature}: {described}"
            );
        }
        assert_eq!(missing_runtime(Tier::Wasm), None);
        for (tier, on) in [(Tier::Container, CONTAINERS), (Tier::Microvm, MICROVMS)] {
            match missing_runtime(tier) {
                None => assert!(on, "{tier}"),
                Some(text) => {
                    assert!(!on, "{tier}");
                    assert!(text.contains(&format!("the {tier} runtime")), "{text}");
                }
            }
        }
    }
}
