//! What a pod container's OCI bundle says: the program (`process.args`, `env`, `cwd`), its
//! memory limit, and whether containerd's CRI plugin made it as a pod sandbox or as a
//! container of a pod (its annotations, which also carry the pod and container names).
//!
//! `config.json` is written by containerd from the image's configuration and the pod spec, so
//! it is read as outside input: bounded in size, and every count and length checked before use.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Largest `config.json` read (containerd's are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most `process.args` entries.
pub const MAX_ARGS: usize = 1024;
/// Most `process.env` entries.
pub const MAX_ENV: usize = 1024;
/// Longest single argument or environment entry, in bytes.
pub const MAX_STRING_BYTES: usize = 32 << 10;

/// containerd CRI annotation: `sandbox` or `container`.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// containerd CRI annotation: the pod sandbox id of a container.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// containerd CRI annotation: the pod's name.
pub const ANNOTATION_POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// containerd CRI annotation: the pod's Kubernetes namespace.
pub const ANNOTATION_POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// containerd CRI annotation: the container's name in the pod spec.
pub const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// Whether a task is a pod's sandbox (the "pause" container) or a program to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// The pod sandbox: holds the pod's place, runs nothing, ends when killed.
    Sandbox,
    /// A container whose entrypoint is a Wasm program.
    Program,
}

/// Names that tie a task to Kubernetes, when containerd's CRI plugin made it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod sandbox id (the sandbox's own task id for a sandbox).
    pub sandbox_id: Option<String>,
    /// The pod's name.
    pub pod_name: Option<String>,
    /// The pod's Kubernetes namespace.
    pub pod_namespace: Option<String>,
    /// The container's name in the pod spec.
    pub container_name: Option<String>,
}

/// The parts of a bundle's `config.json` the shim uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSpec {
    /// Sandbox or program.
    pub kind: TaskKind,
    /// Pod and container names.
    pub identity: PodIdentity,
    /// `process.args`; empty only for a sandbox.
    pub args: Vec<String>,
    /// `process.env` split at the first `=`.
    pub env: Vec<(String, String)>,
    /// `process.cwd` (absolute inside the rootfs; `/` when unset).
    pub cwd: String,
    /// `process.terminal`.
    pub terminal: bool,
    /// `root.path` resolved against the bundle (`<bundle>/rootfs` by default).
    pub root: PathBuf,
    /// `linux.resources.memory.limit` when positive.
    pub memory_limit: Option<u64>,
}

/// Why a bundle cannot be used. Each message names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `config.json` cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `config.json` is over [`MAX_CONFIG_BYTES`].
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not an OCI runtime spec.
    #[error("{path} is not an OCI runtime spec: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        message: String,
    },
    /// A field is missing, too long or out of range.
    #[error("config.json field {field}: {message}")]
    Field {
        /// The field, in the spec's JSON names.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Field {
        field,
        message: message.into(),
    }
}

/// Reads and checks `<bundle>/config.json`.
pub fn read_bundle(bundle: &Path) -> Result<BundleSpec, SpecError> {
    let path = bundle.join("config.json");
    let read_err = |source| SpecError::Read {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(SpecError::TooLarge { path });
    }
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| SpecError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    from_spec(bundle, &spec)
}

/// Takes what the shim needs from a parsed spec, checking every bound.
pub fn from_spec(bundle: &Path, spec: &Spec) -> Result<BundleSpec, SpecError> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let annotation = |key: &str| -> Result<Option<String>, SpecError> {
        match annotations.get(key) {
            None => Ok(None),
            Some(v) if v.len() > MAX_STRING_BYTES => Err(field(
                "annotations",
                format!("{key} is longer than {MAX_STRING_BYTES} bytes"),
            )),
            Some(v) => Ok(Some(v.clone())),
        }
    };
    let kind = match annotation(ANNOTATION_CONTAINER_TYPE)?.as_deref() {
        Some("sandbox") => TaskKind::Sandbox,
        None | Some("container") => TaskKind::Program,
        Some(other) => {
            return Err(field(
                "annotations",
                format!(
                    "{ANNOTATION_CONTAINER_TYPE} is {other:?}, expected \"sandbox\" or \"container\""
                ),
            ));
        }
    };
    let identity = PodIdentity {
        sandbox_id: annotation(ANNOTATION_SANDBOX_ID)?,
        pod_name: annotation(ANNOTATION_POD_NAME)?,
        pod_namespace: annotation(ANNOTATION_POD_NAMESPACE)?,
        container_name: annotation(ANNOTATION_CONTAINER_NAME)?,
    };

    let process = spec.process().as_ref();
    let args = process.and_then(|p| p.args().clone()).unwrap_or_default();
    if args.len() > MAX_ARGS {
        return Err(field(
            "process.args",
            format!("{} entries, at most {MAX_ARGS}", args.len()),
        ));
    }
    if let Some(long) = args.iter().find(|a| a.len() > MAX_STRING_BYTES) {
        return Err(field(
            "process.args",
            format!(
                "an argument of {} bytes, at most {MAX_STRING_BYTES}",
                long.len()
            ),
        ));
    }
    if kind == TaskKind::Program && args.first().is_none_or(|a| a.is_empty()) {
        return Err(field(
            "process.args",
            "empty: the image has no entrypoint (set its ENTRYPOINT or CMD to the .wasm file)",
        ));
    }
    let raw_env = process.and_then(|p| p.env().clone()).unwrap_or_default();
    if raw_env.len() > MAX_ENV {
        return Err(field(
            "process.env",
            format!("{} entries, at most {MAX_ENV}", raw_env.len()),
        ));
    }
    let mut env = Vec::with_capacity(raw_env.len());
    for entry in &raw_env {
        if entry.len() > MAX_STRING_BYTES {
            return Err(field(
                "process.env",
                format!(
                    "an entry of {} bytes, at most {MAX_STRING_BYTES}",
                    entry.len()
                ),
            ));
        }
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => env.push((key.to_string(), value.to_string())),
            _ => {
                return Err(field(
                    "process.env",
                    format!("entry {entry:?} is not KEY=value"),
                ));
            }
        }
    }
    let cwd = process
        .map(|p| p.cwd().to_string_lossy().into_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') || cwd.len() > MAX_STRING_BYTES {
        return Err(field(
            "process.cwd",
            format!("{cwd:?} is not an absolute path"),
        ));
    }
    let terminal = process.and_then(|p| p.terminal()).unwrap_or(false);

    let root = match spec.root().as_ref() {
        Some(root) if root.path().is_absolute() => root.path().clone(),
        Some(root) => bundle.join(root.path()),
        None => bundle.join("rootfs"),
    };
    let memory_limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|limit| u64::try_from(limit).ok())
        .filter(|&limit| limit > 0);

    Ok(BundleSpec {
        kind,
        identity,
        args,
        env,
        cwd,
        terminal,
        root,
        memory_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("test spec parses")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "args": ["/hello.wasm", "a"], "env": ["PATH=/bin", "GREETING=hi=there"], "cwd": "/", "user": {"uid": 0, "gid": 0} },
            "root": { "path": "rootfs" },
            "linux": { "resources": { "memory": { "limit": 33554432 } } }
        })
    }

    #[test]
    fn program_fields_are_read() {
        let got = from_spec(Path::new("/b"), &spec(base())).unwrap();
        assert_eq!(got.kind, TaskKind::Program);
        assert_eq!(got.args, ["/hello.wasm", "a"]);
        assert_eq!(
            got.env,
            [
                ("PATH".to_string(), "/bin".to_string()),
                ("GREETING".to_string(), "hi=there".to_string())
            ]
        );
        assert_eq!(got.root, Path::new("/b/rootfs"));
        assert_eq!(got.memory_limit, Some(32 << 20));
    }

    #[test]
    fn cri_sandbox_and_names_come_from_annotations() {
        let mut json = base();
        json["process"]["args"] = serde_json::json!(["/pause"]);
        json["annotations"] = serde_json::json!({
            ANNOTATION_CONTAINER_TYPE: "sandbox",
            ANNOTATION_SANDBOX_ID: "abc",
            ANNOTATION_POD_NAME: "blink",
            ANNOTATION_POD_NAMESPACE: "default",
        });
        let got = from_spec(Path::new("/b"), &spec(json)).unwrap();
        assert_eq!(got.kind, TaskKind::Sandbox);
        assert_eq!(got.identity.pod_name.as_deref(), Some("blink"));
        assert_eq!(got.identity.sandbox_id.as_deref(), Some("abc"));
    }

    #[test]
    fn image_without_entrypoint_is_refused_naming_process_args() {
        let mut json = base();
        json["process"]["args"] = serde_json::json!([]);
        let err = from_spec(Path::new("/b"), &spec(json))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("process.args") && err.contains("no entrypoint"),
            "{err}"
        );
    }

    #[test]
    fn bad_env_and_unknown_container_type_are_refused_naming_the_field() {
        let mut json = base();
        json["process"]["env"] = serde_json::json!(["NOEQUALS"]);
        let err = from_spec(Path::new("/b"), &spec(json))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("process.env") && err.contains("NOEQUALS"),
            "{err}"
        );

        let mut json = base();
        json["annotations"] = serde_json::json!({ ANNOTATION_CONTAINER_TYPE: "vm" });
        let err = from_spec(Path::new("/b"), &spec(json))
            .unwrap_err()
            .to_string();
        assert!(err.contains(ANNOTATION_CONTAINER_TYPE), "{err}");
    }

    #[test]
    fn too_many_args_are_refused() {
        let mut json = base();
        json["process"]["args"] = serde_json::json!(vec!["x"; MAX_ARGS + 1]);
        let err = from_spec(Path::new("/b"), &spec(json))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("process.args") && err.contains("at most"),
            "{err}"
        );
    }

    #[test]
    fn oversized_or_broken_config_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{not json").unwrap();
        let err = read_bundle(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("not an OCI runtime spec"),
            "{err}"
        );
        let big = vec![b' '; usize::try_from(MAX_CONFIG_BYTES).unwrap() + 1];
        std::fs::write(dir.path().join("config.json"), big).unwrap();
        let err = read_bundle(dir.path()).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }
}
