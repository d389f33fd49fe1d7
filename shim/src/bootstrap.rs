//! What the `start` command leaves in a task's bundle for the task server: the containerd
//! that started the shim (its ttrpc address, for events) and the namespace.
//!
//! One resident server serves every containerd task, so it cannot take these from its own
//! environment as a per-container shim process does; `start` runs in the bundle directory with
//! `TTRPC_ADDRESS` set and writes them to [`CONTEXT_FILE`] there, beside containerd's `address`
//! file. The task server reads it on `Create`, bounded.

use std::io::Read;
use std::path::Path;

use serde_json::json;

use crate::events::EventTarget;

/// The file `start` writes in the bundle.
pub const CONTEXT_FILE: &str = "lichen-shim.json";
/// Largest context file read.
const MAX_CONTEXT_BYTES: u64 = 8 << 10;

/// Writes the context file into `bundle`.
pub fn write_context(bundle: &Path, target: &EventTarget) -> std::io::Result<()> {
    let text = json!({
        "ttrpc_address": target.ttrpc_address,
        "namespace": target.namespace,
    })
    .to_string();
    std::fs::write(bundle.join(CONTEXT_FILE), text)
}

/// Reads the context file of `bundle`; `None` if there is none (a task created by another
/// client than the shim binary) or it is not one.
pub fn read_context(bundle: &Path) -> Option<EventTarget> {
    let file = std::fs::File::open(bundle.join(CONTEXT_FILE)).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_CONTEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_CONTEXT_BYTES {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(EventTarget {
        ttrpc_address: value.get("ttrpc_address")?.as_str()?.to_string(),
        namespace: value.get("namespace")?.as_str()?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_and_junk_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_context(dir.path()), None);
        let target = EventTarget {
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            namespace: "k8s.io".into(),
        };
        write_context(dir.path(), &target).unwrap();
        assert_eq!(read_context(dir.path()), Some(target));
        std::fs::write(dir.path().join(CONTEXT_FILE), b"[1,2]").unwrap();
        assert_eq!(read_context(dir.path()), None);
    }
}
