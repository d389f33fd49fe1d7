//! Turns a [`ContainerSpec`] into an OCI runtime bundle: a directory with `config.json` whose
//! root is the workload's rootfs directory, mounted read-only.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroup,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxIdMappingBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, get_default_maskedpaths, get_default_mounts,
    get_default_namespaces, get_default_readonly_paths,
};

use super::cgroup::CgroupProbe;
use super::{ContainerError, ContainerSpec};

/// CPU quota period in microseconds (the kernel's default).
const CPU_PERIOD_US: u32 = 100_000;
/// Size of the writable `/tmp` every container gets (tmpfs, charged to its memory limit).
const TMP_SIZE: &str = "size=16m";

/// A bundle written on disk.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory (holds `config.json`).
    pub dir: PathBuf,
    /// The cgroup path the runtime creates for the container, for example `/lichen/lichen-door`.
    pub cgroups_path: String,
}

impl Bundle {
    /// Writes `dir/config.json` for `spec`, creating `dir`. Any older bundle there is replaced.
    pub fn write(
        dir: &Path,
        spec: &ContainerSpec,
        cgroups_path: &str,
        cgroup: &CgroupProbe,
    ) -> Result<Bundle, ContainerError> {
        let oci = build_oci_spec(spec, cgroups_path, cgroup)?;
        let io_err = |path: &Path, source| ContainerError::Bundle {
            name: spec.name.clone(),
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let config = dir.join("config.json");
        let json = serde_json::to_vec_pretty(&oci)
            .map_err(|e| io_err(&config, std::io::Error::other(e)))?;
        std::fs::write(&config, json).map_err(|e| io_err(&config, e))?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            cgroups_path: cgroups_path.to_string(),
        })
    }

    /// Removes the bundle directory (never the rootfs, which lives elsewhere).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

/// Builds the OCI runtime spec for `spec`: read-only root, new network namespace with no
/// interface configured, memory / CPU / pids limits, a device cgroup that denies everything
/// but the granted nodes, and a user namespace if asked.
pub fn build_oci_spec(
    spec: &ContainerSpec,
    cgroups_path: &str,
    cgroup: &CgroupProbe,
) -> Result<Spec, ContainerError> {
    spec.validate()?;
    let name = &spec.name;
    let oci_err = |source| ContainerError::Spec {
        name: name.clone(),
        source,
    };

    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(spec.command.clone())
        .env(env)
        .cwd("/")
        .no_new_privileges(true)
        .build()
        .map_err(oci_err)?;

    let root = RootBuilder::default()
        .path(spec.rootfs.clone())
        .readonly(true)
        .build()
        .map_err(oci_err)?;

    // Deny every device, then allow each granted node (the runtime adds its standard set).
    let mut rules: Vec<LinuxDeviceCgroup> = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(oci_err)?,
    ];
    let mut devices: Vec<LinuxDevice> = Vec::new();
    for path in &spec.devices {
        let device = granted_device(name, path)?;
        rules.push(LinuxDeviceCgroup::from(&device));
        devices.push(device);
    }

    let mut resources = LinuxResourcesBuilder::default().devices(rules);
    if let Some(bytes) = spec.limits.memory_bytes {
        let limit = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut memory = LinuxMemoryBuilder::default().limit(limit);
        if cgroup.swap_limit {
            // memory+swap equal to memory: no swap beyond the limit.
            memory = memory.swap(limit);
        }
        resources = resources.memory(memory.build().map_err(oci_err)?);
    }
    if let Some(cpus) = spec.limits.cpus {
        // Validated to be finite and within 0.01..=MAX_CPU_MILLIS / 1000 cores, so the product
        // is a whole number of microseconds far inside i64.
        #[allow(clippy::cast_possible_truncation)]
        let quota = (cpus * f64::from(CPU_PERIOD_US)).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(u64::from(CPU_PERIOD_US))
                .build()
                .map_err(oci_err)?,
        );
    }
    if let Some(pids) = spec.limits.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(pids))
                .build()
                .map_err(oci_err)?,
        );
    }

    // The default set (pid, network, ipc, uts, mount, cgroup): a new network namespace holds
    // only a loopback interface that is down, so the container reaches nothing.
    let mut namespaces = get_default_namespaces();
    let mut linux = LinuxBuilder::default();
    if let Some(map) = spec.user_namespace {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()
                .map_err(oci_err)?,
        );
        let uid = LinuxIdMappingBuilder::default()
            .host_id(map.host_uid)
            .container_id(0u32)
            .size(map.size)
            .build()
            .map_err(oci_err)?;
        let gid = LinuxIdMappingBuilder::default()
            .host_id(map.host_gid)
            .container_id(0u32)
            .size(map.size)
            .build()
            .map_err(oci_err)?;
        linux = linux.uid_mappings(vec![uid]).gid_mappings(vec![gid]);
    }
    let linux = linux
        .namespaces(namespaces)
        .resources(resources.build().map_err(oci_err)?)
        .cgroups_path(PathBuf::from(cgroups_path))
        .devices(devices)
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .build()
        .map_err(oci_err)?;

    let mut mounts: Vec<Mount> = get_default_mounts();
    if spec.user_namespace.is_some() {
        // A user namespace cannot mount the host's cgroup hierarchy.
        mounts.retain(|m| m.typ().as_deref() != Some("cgroup"));
    }
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                "nosuid".to_string(),
                "nodev".to_string(),
                "mode=1777".to_string(),
                TMP_SIZE.to_string(),
            ])
            .build()
            .map_err(oci_err)?,
    );

    let mut oci = Spec::default();
    oci.set_process(Some(process))
        .set_root(Some(root))
        .set_hostname(Some(name.clone()))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    Ok(oci)
}

/// Checks a device grant and describes the node for the runtime.
fn granted_device(name: &str, path: &Path) -> Result<LinuxDevice, ContainerError> {
    let refuse = |reason: String| ContainerError::Device {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    if !path.starts_with("/dev") || path == Path::new("/dev") {
        return Err(refuse("only nodes under /dev can be granted".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| refuse(format!("cannot stat it: {e}")))?;
    let typ = if meta.file_type().is_char_device() {
        LinuxDeviceType::C
    } else if meta.file_type().is_block_device() {
        LinuxDeviceType::B
    } else {
        return Err(refuse("it is not a character or block device".into()));
    };
    let rdev = meta.rdev();
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    LinuxDeviceBuilder::default()
        .path(path.to_path_buf())
        .typ(typ)
        .major(i64::try_from(major).unwrap_or(i64::MAX))
        .minor(i64::try_from(minor).unwrap_or(i64::MAX))
        .file_mode(meta.mode() & 0o777)
        .uid(0u32)
        .gid(0u32)
        .build()
        .map_err(|source| ContainerError::Spec {
            name: name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::{CgroupLayout, IdMapping, Limits};

    fn v2() -> CgroupProbe {
        CgroupProbe {
            layout: CgroupLayout::V2,
            controllers: vec!["cpu".into(), "memory".into(), "pids".into()],
            unified_controllers: Vec::new(),
            swap_limit: true,
        }
    }

    fn spec() -> ContainerSpec {
        let mut spec = ContainerSpec::new("door", "/srv/door/rootfs", ["/bin/busybox", "true"]);
        spec.env.push(("MODE".into(), "test".into()));
        spec.limits = Limits {
            memory_bytes: Some(16 << 20),
            cpus: Some(0.5),
            pids: Some(16),
        };
        spec
    }

    #[test]
    fn bundle_is_read_only_offline_limited_and_denies_devices() {
        let oci = build_oci_spec(&spec(), "/lichen/lichen-door", &v2()).expect("spec builds");
        let json = serde_json::to_value(&oci).expect("serialises");
        assert_eq!(json["root"]["readonly"], true);
        assert_eq!(json["root"]["path"], "/srv/door/rootfs");
        assert_eq!(json["process"]["args"][1], "true");
        assert_eq!(json["process"]["terminal"], false);
        assert!(
            json["process"]["env"]
                .as_array()
                .expect("env")
                .contains(&"MODE=test".into())
        );
        let namespaces: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert!(namespaces.contains(&"network"), "{namespaces:?}");
        assert!(!namespaces.contains(&"user"));
        let res = &json["linux"]["resources"];
        assert_eq!(res["memory"]["limit"], 16 << 20);
        assert_eq!(res["memory"]["swap"], 16 << 20);
        assert_eq!(res["cpu"]["quota"], 50_000);
        assert_eq!(res["cpu"]["period"], 100_000);
        assert_eq!(res["pids"]["limit"], 16);
        assert_eq!(
            res["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        assert!(
            json["linux"]["devices"]
                .as_array()
                .is_none_or(|d| d.is_empty())
        );
        assert_eq!(json["linux"]["cgroupsPath"], "/lichen/lichen-door");
    }

    #[test]
    fn a_granted_device_becomes_a_node_and_an_allow_rule() {
        let mut spec = spec();
        spec.devices.push("/dev/null".into());
        let oci = build_oci_spec(&spec, "/lichen/x", &v2()).expect("spec builds");
        let json = serde_json::to_value(&oci).expect("serialises");
        let node = &json["linux"]["devices"][0];
        assert_eq!(node["path"], "/dev/null");
        assert_eq!(
            (
                node["type"].as_str(),
                node["major"].as_i64(),
                node["minor"].as_i64()
            ),
            (Some("c"), Some(1), Some(3))
        );
        let allow = &json["linux"]["resources"]["devices"][1];
        assert_eq!(allow["allow"], true);
        assert_eq!(
            (allow["major"].as_i64(), allow["minor"].as_i64()),
            (Some(1), Some(3))
        );
    }

    #[test]
    fn grants_outside_dev_or_of_plain_files_are_refused_by_name() {
        let mut spec = spec();
        spec.devices.push("/etc/passwd".into());
        let err = build_oci_spec(&spec, "/lichen/x", &v2()).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "container \"door\": device grant \"/etc/passwd\": only nodes under /dev can be granted"
        );
        spec.devices = vec!["/dev/shm".into()];
        let err = build_oci_spec(&spec, "/lichen/x", &v2()).expect_err("refused");
        assert!(
            err.to_string().contains("not a character or block device"),
            "{err}"
        );
        spec.devices = vec!["/dev/lichen-no-such-node".into()];
        let err = build_oci_spec(&spec, "/lichen/x", &v2()).expect_err("refused");
        assert!(err.to_string().contains("cannot stat it"), "{err}");
    }

    #[test]
    fn user_namespace_maps_root_and_drops_the_cgroup_mount() {
        let mut spec = spec();
        spec.user_namespace = Some(IdMapping {
            host_uid: 100_000,
            host_gid: 100_000,
            size: 65_536,
        });
        let json = serde_json::to_value(build_oci_spec(&spec, "/l/x", &v2()).expect("builds"))
            .expect("serialises");
        assert_eq!(json["linux"]["uidMappings"][0]["hostID"], 100_000);
        assert!(
            json["linux"]["namespaces"]
                .as_array()
                .expect("namespaces")
                .iter()
                .any(|n| n["type"] == "user")
        );
        assert!(
            !json["mounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["type"] == "cgroup")
        );
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let mut bad = spec();
        bad.name = "Door!".into();
        assert!(build_oci_spec(&bad, "/l/x", &v2()).is_err());
        let mut bad = spec();
        bad.command.clear();
        let err = build_oci_spec(&bad, "/l/x", &v2()).expect_err("refused");
        assert_eq!(err.to_string(), "container \"door\": the command is empty");
        let mut bad = spec();
        bad.limits.cpus = Some(f64::NAN);
        assert!(build_oci_spec(&bad, "/l/x", &v2()).is_err());
        let mut bad = spec();
        bad.rootfs = "rootfs".into();
        assert!(build_oci_spec(&bad, "/l/x", &v2()).is_err());
    }
}
