//! OCI image layout tarballs built offline, for containerd to import (`ctr images import`):
//! one layer with the given files, an image config with an entrypoint and a command, a
//! manifest and an index naming the image. The containerd tests and `lichen bench pods` build
//! their images with it (nothing can be pulled here); it is behind the `image-layout` feature,
//! so the shim's own build does not carry it.

use std::path::Path;

use sha2::{Digest, Sha256};

/// One file of an image layer.
pub struct ImageFile {
    /// Path inside the image, without the leading `/`.
    pub path: String,
    /// Contents.
    pub bytes: Vec<u8>,
    /// Mode bits.
    pub mode: u32,
}

impl ImageFile {
    /// A file of mode 0755.
    pub fn new(path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.trim_start_matches('/').to_string(),
            bytes: bytes.into(),
            mode: 0o755,
        }
    }
}

/// An image to build: one layer, an entrypoint, a command, an environment.
pub struct ImageSpec {
    /// Reference, e.g. `lichen.test/hello:1`.
    pub name: String,
    /// The layer's files.
    pub files: Vec<ImageFile>,
    /// `Entrypoint` of the image config.
    pub entrypoint: Vec<String>,
    /// `Cmd` of the image config.
    pub cmd: Vec<String>,
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// `sha256:<hex>` of `bytes`: how OCI names a blob.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn append(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, bytes)?;
    Ok(())
}

/// Builds `spec` as an OCI image layout tarball, offline (nothing is pulled).
pub fn build_image_tar(spec: &ImageSpec) -> std::io::Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for file in &spec.files {
        let mut parent = Path::new(&file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    for dir in &dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        layer.append_data(&mut header, format!("{}/", dir.display()), std::io::empty())?;
    }
    for file in &spec.files {
        append(&mut layer, &file.path, &file.bytes, file.mode)?;
    }
    let layer = layer.into_inner()?;
    let layer_digest = digest(&layer);
    let config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len() }],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    })
    .to_string()
    .into_bytes();

    let mut out = tar::Builder::new(Vec::new());
    append(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut out, "index.json", &index, 0o644)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        append(&mut out, &name, blob, 0o644)?;
    }
    out.into_inner()
}
