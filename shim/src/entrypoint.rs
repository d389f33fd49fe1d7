//! Finding and reading a pod's Wasm entrypoint inside its root filesystem.
//!
//! The path comes from the image (`process.args[0]`), so it is resolved inside the root with
//! `cap-std`: `..` and symbolic links may move within the root but never out of it (an
//! absolute link target is refused rather than followed on the host). The file must be a
//! regular file of at most [`MAX_ENTRYPOINT_BYTES`], read through a bounded reader, and must
//! start with the WebAssembly magic: Lichen runs Wasm pods only, and says so for any other
//! entrypoint instead of handing it to a container runtime (containerd already has runc's
//! shim for those; a node's RuntimeClass picks which).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// Largest entrypoint read, in bytes.
pub const MAX_ENTRYPOINT_BYTES: u64 = 64 << 20;
/// Most `PATH` entries searched for an entrypoint named without a slash.
pub const MAX_PATH_ENTRIES: usize = 64;
/// The first four bytes of every WebAssembly binary, module or component.
const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Why an entrypoint cannot be used. Each message names the entrypoint.
#[derive(Debug, thiserror::Error)]
pub enum EntrypointError {
    /// The root filesystem cannot be opened.
    #[error("cannot open the root filesystem {root}: {source}")]
    Root {
        /// The rootfs directory.
        root: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No such file inside the root (or it would lead out of the root).
    #[error("entrypoint {name:?} not found in the image: {reason}")]
    NotFound {
        /// The entrypoint as the image names it.
        name: String,
        /// What was tried.
        reason: String,
    },
    /// A directory, device, FIFO...
    #[error("entrypoint {name:?} is not a regular file")]
    NotRegular {
        /// The entrypoint.
        name: String,
    },
    /// Larger than [`MAX_ENTRYPOINT_BYTES`].
    #[error(
        "entrypoint {name:?} is {size} bytes, more than the {MAX_ENTRYPOINT_BYTES} bytes a Wasm pod may have"
    )]
    TooLarge {
        /// The entrypoint.
        name: String,
        /// Its size.
        size: u64,
    },
    /// Reading failed.
    #[error("cannot read entrypoint {name:?}: {source}")]
    Read {
        /// The entrypoint.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a WebAssembly binary.
    #[error(
        "entrypoint {name:?} is not a WebAssembly binary (it does not start with \\0asm): the lichen runtime runs Wasm pods only; run this image with runc's runtime class"
    )]
    NotWasm {
        /// The entrypoint.
        name: String,
    },
}

/// The entrypoint found: where, and its bytes.
#[derive(Debug)]
pub struct Entrypoint {
    /// Path inside the root where it was found (absolute, as the image would see it).
    pub path: PathBuf,
    /// The Wasm binary.
    pub bytes: Vec<u8>,
}

/// Finds `name` (`process.args[0]`) inside `root`: an absolute path from the root; a relative
/// path with a slash from `cwd`; a bare name in each `PATH` directory of `env`, then in `cwd`.
pub fn read_entrypoint(
    root: &Path,
    name: &str,
    cwd: &str,
    env: &[(String, String)],
) -> Result<Entrypoint, EntrypointError> {
    let dir = Dir::open_ambient_dir(root, ambient_authority()).map_err(|source| {
        EntrypointError::Root {
            root: root.to_path_buf(),
            source,
        }
    })?;
    let candidates = candidates(name, cwd, env);
    let mut tried = Vec::new();
    for candidate in candidates {
        let relative = inside(&candidate);
        match dir.metadata(&relative) {
            Ok(meta) if meta.is_file() => {
                return read_file(&dir, &relative, name, meta.len()).map(|bytes| Entrypoint {
                    path: candidate,
                    bytes,
                });
            }
            Ok(_) => return Err(EntrypointError::NotRegular { name: name.into() }),
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(EntrypointError::NotFound {
        name: name.into(),
        reason: tried.join("; "),
    })
}

fn candidates(name: &str, cwd: &str, env: &[(String, String)]) -> Vec<PathBuf> {
    if name.starts_with('/') {
        return vec![PathBuf::from(name)];
    }
    let in_cwd = Path::new(cwd).join(name);
    if name.contains('/') {
        return vec![in_cwd];
    }
    let mut out: Vec<PathBuf> = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, path)| {
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .take(MAX_PATH_ENTRIES)
                .map(|d| Path::new(d).join(name))
                .collect()
        })
        .unwrap_or_default();
    out.push(in_cwd);
    out
}

/// The path relative to the root: root and prefix components dropped, so cap-std resolves it
/// beneath the root (it refuses absolute paths).
fn inside(path: &Path) -> PathBuf {
    let rel: PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
        .collect();
    if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel
    }
}

fn read_file(
    dir: &Dir,
    relative: &Path,
    name: &str,
    size: u64,
) -> Result<Vec<u8>, EntrypointError> {
    if size > MAX_ENTRYPOINT_BYTES {
        return Err(EntrypointError::TooLarge {
            name: name.into(),
            size,
        });
    }
    let read_err = |source| EntrypointError::Read {
        name: name.into(),
        source,
    };
    let file = dir.open(relative).map_err(read_err)?;
    // The file may have changed since `metadata`: check again on the open handle.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(EntrypointError::NotRegular { name: name.into() });
    }
    let mut bytes = Vec::new();
    file.take(MAX_ENTRYPOINT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_ENTRYPOINT_BYTES {
        return Err(EntrypointError::TooLarge {
            name: name.into(),
            size: bytes.len() as u64,
        });
    }
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(EntrypointError::NotWasm { name: name.into() });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/hello.wasm"), WASM).unwrap();
        dir
    }

    #[test]
    fn absolute_relative_and_path_lookups_find_the_wasm() {
        let root = root();
        let found = read_entrypoint(root.path(), "/app/hello.wasm", "/", &[]).unwrap();
        assert_eq!(found.bytes, WASM);
        assert_eq!(found.path, Path::new("/app/hello.wasm"));
        let found = read_entrypoint(root.path(), "./hello.wasm", "/app", &[]).unwrap();
        assert_eq!(found.bytes, WASM);
        let env = [("PATH".to_string(), "/bin:/app".to_string())];
        let found = read_entrypoint(root.path(), "hello.wasm", "/", &env).unwrap();
        assert_eq!(found.path, Path::new("/app/hello.wasm"));
    }

    #[test]
    fn missing_entrypoint_is_named() {
        let root = root();
        let err = read_entrypoint(root.path(), "/app/nope.wasm", "/", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"/app/nope.wasm\" not found"), "{err}");
    }

    #[test]
    fn non_wasm_entrypoint_is_refused_naming_it() {
        let root = root();
        std::fs::write(root.path().join("app/sh"), b"#!/bin/sh\necho hi\n").unwrap();
        let err = read_entrypoint(root.path(), "/app/sh", "/", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"/app/sh\" is not a WebAssembly binary"),
            "{err}"
        );
    }

    #[test]
    fn symlinks_and_dotdot_cannot_leave_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.wasm"), WASM).unwrap();
        let root = root();
        std::os::unix::fs::symlink(
            outside.path().join("secret.wasm"),
            root.path().join("abs.wasm"),
        )
        .unwrap();
        let rel_target = format!(
            "../../../../../..{}",
            outside.path().join("secret.wasm").display()
        );
        std::os::unix::fs::symlink(&rel_target, root.path().join("rel.wasm")).unwrap();
        for name in ["/abs.wasm", "/rel.wasm", &rel_target] {
            let err = read_entrypoint(root.path(), name, "/", &[]).unwrap_err();
            assert!(
                matches!(err, EntrypointError::NotFound { .. }),
                "{name}: {err}"
            );
        }
        // A link that stays inside the root is followed.
        std::os::unix::fs::symlink("app/hello.wasm", root.path().join("inside.wasm")).unwrap();
        assert_eq!(
            read_entrypoint(root.path(), "/inside.wasm", "/", &[])
                .unwrap()
                .bytes,
            WASM
        );
    }

    #[test]
    fn directories_fifos_and_oversized_files_are_refused() {
        let root = root();
        let err = read_entrypoint(root.path(), "/app", "/", &[]).unwrap_err();
        assert!(matches!(err, EntrypointError::NotRegular { .. }), "{err}");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            root.path().join("fifo.wasm"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = read_entrypoint(root.path(), "/fifo.wasm", "/", &[]).unwrap_err();
        assert!(matches!(err, EntrypointError::NotRegular { .. }), "{err}");
        let big = std::fs::File::create(root.path().join("big.wasm")).unwrap();
        big.set_len(MAX_ENTRYPOINT_BYTES + 1).unwrap();
        let err = read_entrypoint(root.path(), "/big.wasm", "/", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"/big.wasm\" is") && err.contains("more than"),
            "{err}"
        );
    }
}
