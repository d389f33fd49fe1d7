//! The containerd check of `lichen doctor`: whether containerd (stock or K3S's) is configured
//! with Lichen's runtime type and whether its shim binary is on `PATH`.

use super::check;
use crate::api::types::DoctorCheck;

/// containerd configurations that may name Lichen's runtime: the stock one, K3S's generated
/// one and K3S's templates (containerd 1.x and 2.x).
const CONTAINERD_CONFIGS: &[&str] = &[
    "/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
    "/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl",
];
/// The runtime type containerd configurations name Lichen's shim by.
const LICHEN_RUNTIME: &str = "io.containerd.lichen.v1";
/// The shim binary containerd runs for that runtime type.
const LICHEN_SHIM: &str = "containerd-shim-lichen-v1";
/// Largest containerd configuration read.
const MAX_CONTAINERD_CONFIG: u64 = 1 << 20;

/// Whether containerd is configured to run pods with Lichen's shim.
pub(super) fn containerd_check() -> DoctorCheck {
    use std::io::Read;
    let configs: Vec<(String, Option<String>)> = CONTAINERD_CONFIGS
        .iter()
        .map(|path| {
            let text = std::fs::File::open(path).ok().and_then(|f| {
                let mut text = String::new();
                f.take(MAX_CONTAINERD_CONFIG)
                    .read_to_string(&mut text)
                    .ok()?;
                Some(text)
            });
            (path.to_string(), text)
        })
        .collect();
    let shim = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(LICHEN_SHIM))
            .find(|candidate| candidate.is_file())
    });
    containerd_status(&configs, shim.as_deref())
}

/// The containerd check from what was found: each configuration's text (if it exists) and
/// the shim binary's path (if on `PATH`).
fn containerd_status(
    configs: &[(String, Option<String>)],
    shim: Option<&std::path::Path>,
) -> DoctorCheck {
    let present: Vec<&(String, Option<String>)> =
        configs.iter().filter(|(_, text)| text.is_some()).collect();
    let naming: Vec<&str> = present
        .iter()
        .filter(|(_, text)| text.as_deref().is_some_and(|t| t.contains(LICHEN_RUNTIME)))
        .map(|(path, _)| path.as_str())
        .collect();
    let shim_text = match shim {
        Some(path) => format!("{LICHEN_SHIM} at {}", path.display()),
        None => format!("{LICHEN_SHIM} not on PATH"),
    };
    if present.is_empty() {
        return check(
            "containerd",
            "missing",
            format!("no containerd configuration found (not a Kubernetes node?); {shim_text}"),
        );
    }
    if naming.is_empty() {
        let paths: Vec<&str> = present.iter().map(|(p, _)| p.as_str()).collect();
        return check(
            "containerd",
            "missing",
            format!(
                "{} names no runtime of type {LICHEN_RUNTIME}: Wasm pods cannot use runtime class lichen; {shim_text}",
                paths.join(", ")
            ),
        );
    }
    let status = if shim.is_some() { "ok" } else { "missing" };
    check(
        "containerd",
        status,
        format!(
            "{} names runtime {LICHEN_RUNTIME}; {shim_text}",
            naming.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_check_says_which_config_names_the_runtime_and_where_the_shim_is() {
        let none = containerd_status(&[("/etc/containerd/config.toml".into(), None)], None);
        assert_eq!(none.status, "missing");
        assert!(
            none.detail.contains("no containerd configuration"),
            "{}",
            none.detail
        );

        let plain = [(
            "/etc/containerd/config.toml".to_string(),
            Some("version = 2\n".to_string()),
        )];
        let unconfigured = containerd_status(&plain, None);
        assert_eq!(unconfigured.status, "missing");
        assert!(
            unconfigured
                .detail
                .contains("names no runtime of type io.containerd.lichen.v1"),
            "{}",
            unconfigured.detail
        );

        let configured = [(
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl".to_string(),
            Some("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.lichen]\n  runtime_type = \"io.containerd.lichen.v1\"\n".to_string()),
        )];
        let without_shim = containerd_status(&configured, None);
        assert_eq!(without_shim.status, "missing");
        assert!(
            without_shim.detail.contains("not on PATH"),
            "{}",
            without_shim.detail
        );
        let ok = containerd_status(
            &configured,
            Some(std::path::Path::new(
                "/usr/local/bin/containerd-shim-lichen-v1",
            )),
        );
        assert_eq!(ok.status, "ok", "{}", ok.detail);
        assert!(
            ok.detail.contains("config.toml.tmpl names runtime"),
            "{}",
            ok.detail
        );
    }
}
