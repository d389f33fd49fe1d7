//! The OCI image layout tarballs the pod benchmark imports: one layer holding one program,
//! built by `lichen_shim::layout` (the builder the containerd tests use too).

use anyhow::Result;
use lichen_shim::layout::{ImageFile, ImageSpec, build_image_tar};

/// An OCI image layout tarball of one layer holding `bytes` at `path` (mode 0755).
pub(super) fn image_tar(
    name: &str,
    path: &str,
    bytes: &[u8],
    entrypoint: &[&str],
) -> Result<Vec<u8>> {
    Ok(build_image_tar(&ImageSpec {
        name: name.to_string(),
        files: vec![ImageFile::new(path, bytes)],
        entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        cmd: Vec::new(),
    })?)
}
