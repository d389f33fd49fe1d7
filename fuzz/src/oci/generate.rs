//! The generator of OCI image layouts for the `oci_image` target: indexes, manifests,
//! configurations and layers whose descriptors, digests, media types, platforms and tar entries
//! sit at every edge (links out of the root, whiteouts, FIFOs, device nodes, set-uid files).

use std::io::Write as _;
use std::path::Path;

use arbitrary::Unstructured;
use lichen_agent::runtime::container::{ImageLimits, SetuidPolicy};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{Blob, Image, small_limits};
use crate::input::{self, int, one_in, pick};

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

const LAYER_MEDIA: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/octet-stream",
];

pub(super) fn generate(u: &mut Unstructured<'_>, raw_part: u8, raw: Vec<u8>) -> Image {
    let hostile = one_in(u, 2);
    let limits = if one_in(u, 3) {
        ImageLimits {
            max_unpacked_bytes: pick(u, &[0, 1, 100, 4096, 1 << 20]),
            max_file_bytes: pick(u, &[0, 1, 10, 1000, 1 << 20]),
            max_entries: pick(u, &[0, 1, 3, 10, 1000]),
            max_path_bytes: pick(u, &[1, 8, 30, 4096]),
            max_depth: pick(u, &[0, 1, 2, 128]),
            setuid: pick(
                u,
                &[
                    SetuidPolicy::Refuse,
                    SetuidPolicy::Strip,
                    SetuidPolicy::Keep,
                ],
            ),
        }
    } else {
        small_limits()
    };
    let mut image = Image {
        limits,
        hostile,
        packing: pick(u, &[0, 0, 1, 2]),
        layout_marker: if hostile && one_in(u, 12) {
            pick(
                u,
                &[&b"{}"[..], b"{\"imageLayoutVersion\":\"2.0.0\"}", b"junk"],
            )
            .to_vec()
        } else {
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
        },
        ..Image::default()
    };

    // Layers.
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut known = Vec::new();
    for i in 0..int(u, 0..=3) {
        let (tar, summary) = if raw_part == 4 && i == 0 {
            (raw.clone(), "raw".to_owned())
        } else {
            layer(u, &mut known)
        };
        let gzip = one_in(u, 3);
        let bytes = if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).expect("gzip");
            gz.finish().expect("gzip")
        } else {
            tar.clone()
        };
        diff_ids.push(format!("sha256:{}", sha(&tar)));
        let media = if gzip {
            LAYER_MEDIA[1]
        } else {
            pick(u, LAYER_MEDIA)
        };
        layer_descs.push(descriptor(u, &mut image, media, bytes));
        image.layers.push(summary);
    }

    // Configuration.
    let config = if raw_part == 3 {
        raw.clone()
    } else {
        let strings = |u: &mut Unstructured<'_>| -> Vec<String> {
            (0..int(u, 0..=3)).map(|_| input::path(u)).collect()
        };
        let mut config = json!({
            "architecture": pick(u, &["amd64", "arm64", "riscv64", ""]),
            "os": pick(u, &["linux", "windows"]),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if !one_in(u, 4) {
            config["config"] = json!({
                "Entrypoint": strings(u),
                "Cmd": strings(u),
                "Env": (0..int(u, 0..=3)).map(|_| format!("{}={}", input::name(u), input::name(u))).collect::<Vec<_>>(),
            });
        }
        serde_json::to_vec(&config).expect("JSON")
    };
    let config_desc = descriptor(
        u,
        &mut image,
        "application/vnd.oci.image.config.v1+json",
        config,
    );

    // Manifest.
    let manifest = if raw_part == 2 {
        raw.clone()
    } else {
        let mut manifest = json!({
            "schemaVersion": if hostile && one_in(u, 12) { 1 } else { 2 },
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layer_descs,
        });
        if hostile && one_in(u, 12) {
            manifest["layers"] = json!(null);
        }
        serde_json::to_vec(&manifest).expect("JSON")
    };
    let manifest_desc = descriptor(
        u,
        &mut image,
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );

    // Index, perhaps through a nested index.
    let mut entries = vec![platformed(u, hostile, manifest_desc)];
    if hostile && one_in(u, 4) {
        let other = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha(b"missing")),
            "size": 7,
        });
        entries.push(platformed(u, hostile, other));
    }
    let mut index = json!({"schemaVersion": 2, "manifests": entries});
    for _ in 0..int(u, 0..=3) {
        if !one_in(u, 3) {
            break;
        }
        let nested = serde_json::to_vec(&index).expect("JSON");
        let desc = descriptor(
            u,
            &mut image,
            "application/vnd.oci.image.index.v1+json",
            nested,
        );
        index = json!({"schemaVersion": 2, "manifests": [desc]});
    }
    image.index = if raw_part == 1 {
        raw
    } else {
        serde_json::to_vec(&index).expect("JSON")
    };

    // Links in the layout that lead out of it.
    if hostile && one_in(u, 6) {
        image.extra_links.push((
            pick(u, &["blobs/sha256/x", "blobs", "oci-layout"]).to_owned(),
            pick(u, &["/outside", "/outside/victim", "../outside"]).to_owned(),
        ));
    }
    image
}

/// Stores `bytes` as a blob (usually) and returns its descriptor (usually honest).
fn descriptor(u: &mut Unstructured<'_>, image: &mut Image, media: &str, bytes: Vec<u8>) -> Value {
    let hex = sha(&bytes);
    let size = bytes.len() as u64;
    let mut digest = format!("sha256:{hex}");
    let mut size_field = json!(size);
    let tamper = if image.hostile && one_in(u, 4) {
        int(u, 0..=4)
    } else {
        99
    };
    match tamper {
        0 => digest = format!("sha256:{}", sha(b"not this one")),
        1 => digest = format!("sha512:{hex}{hex}"),
        2 => {
            digest = pick(
                u,
                &[
                    "sha256:../../../../outside/victim/../../../../../../outside/x",
                    "sha256:",
                    "sha256:ZZ",
                    "md5:00",
                    "",
                ],
            )
            .to_owned()
        }
        3 => digest = format!("sha256:{}", hex.to_ascii_uppercase()),
        4 => size_field = json!(pick(u, input::EDGE_NUMBERS)),
        _ => {}
    }
    let blob = match if image.hostile { int(u, 0..=47) } else { 99 } {
        0 => Blob::Link(pick(u, &["/outside/victim", "../../../outside/victim", "/"]).to_owned()),
        1 => Blob::Fifo,
        2 => Blob::Bytes(Vec::new()),
        _ => Blob::Bytes(bytes),
    };
    if !(image.hostile && one_in(u, 16)) {
        image.blobs.insert(hex, blob);
    }
    let mut desc = json!({"mediaType": media, "digest": digest, "size": size_field});
    if one_in(u, 15) {
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": input::name(u)});
    }
    desc
}

fn platformed(u: &mut Unstructured<'_>, hostile: bool, mut desc: Value) -> Value {
    if one_in(u, 3) {
        let here = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            "riscv64" => "riscv64",
            _ => "amd64",
        };
        desc["platform"] = if hostile {
            json!({
                "architecture": pick(u, &["amd64", "arm64", "riscv64", "s390x"]),
                "os": pick(u, &["linux", "windows"]),
            })
        } else {
            json!({"architecture": here, "os": "linux"})
        };
    }
    desc
}

const COMPONENTS: &[&str] = &[
    "etc", "a", "b", "victim", "outside", "dir", "x", "bin", "usr", "lib", "store", "layout",
];
const SYMLINK_TARGETS: &[&str] = &[
    "/outside",
    "/outside/victim",
    "/outside/dir",
    "../outside",
    "../../outside",
    "../../../outside",
    "../../../../outside",
    "../../../../../outside",
    "../../../../../../outside/dir",
    "/",
    "/etc",
    "..",
    ".",
    "a",
    "a/b",
    "victim",
    "/store",
    "/layout",
    "dir/../..",
];
const HARDLINK_TARGETS: &[&str] = &[
    "a",
    "etc/victim",
    "etc",
    "/outside/victim",
    "../outside/victim",
    "../../../../outside/victim",
    "victim",
    "a/b",
];

/// A path for an entry: often through one a lower layer (or this one) made, a link above all,
/// so entries and whiteouts land on what the layers below left.
fn entry_path(u: &mut Unstructured<'_>, known: &[String]) -> String {
    if !known.is_empty() && one_in(u, 2) {
        let base = pick(u, known);
        if one_in(u, 4) {
            return base;
        }
        return format!("{base}/{}", pick(u, COMPONENTS));
    }
    let depth = int(u, 1..=3);
    let mut parts: Vec<&str> = (0..depth).map(|_| pick(u, COMPONENTS)).collect();
    if one_in(u, 20) {
        parts.insert(0, pick(u, &["..", ".", "/"]));
    }
    parts.join("/")
}

/// One layer's tar bytes and a short description of its entries; `known` collects the paths
/// of links and directories for later entries and layers.
fn layer(u: &mut Unstructured<'_>, known: &mut Vec<String>) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut summary = Vec::new();
    for _ in 0..int(u, 0..=8) {
        let mut header = tar::Header::new_gnu();
        let mut path = entry_path(u, known);
        let mut data: Vec<u8> = Vec::new();
        let mode = pick(u, &[0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o000, 0o777]);
        let kind = int(u, 0..=9);
        match kind {
            0..=2 => {
                header.set_entry_type(tar::EntryType::Regular);
                data = match int(u, 0..=3) {
                    0 => vec![b'z'; int::<usize>(u, 0..=200_000)],
                    _ => format!("content of {path}").into_bytes(),
                };
            }
            3 => header.set_entry_type(tar::EntryType::Directory),
            4 => header.set_entry_type(tar::EntryType::Symlink),
            5 => header.set_entry_type(tar::EntryType::Link),
            6 => {
                header.set_entry_type(tar::EntryType::Regular);
                let parent = Path::new(&path)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let hidden = pick(u, COMPONENTS);
                path = if parent.is_empty() {
                    format!(".wh.{hidden}")
                } else {
                    format!("{parent}/.wh.{hidden}")
                };
            }
            7 => {
                header.set_entry_type(tar::EntryType::Regular);
                path = format!("{path}/.wh..wh..opq");
            }
            8 => header.set_entry_type(tar::EntryType::Fifo),
            _ => {
                header.set_entry_type(if one_in(u, 2) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                let _ = header.set_device_major(1);
                let _ = header.set_device_minor(3);
            }
        }
        header.set_mode(mode);
        header.set_uid(pick(u, &[0, 1000, 65534, u64::from(u32::MAX)]));
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        if header.set_path(&path).is_err() {
            let bytes = path.as_bytes();
            let n = bytes.len().min(99);
            header.as_old_mut().name[..n].copy_from_slice(&bytes[..n]);
        }
        let link = match kind {
            4 => Some(pick(u, SYMLINK_TARGETS)),
            5 => Some(pick(u, HARDLINK_TARGETS)),
            _ => None,
        };
        if let Some(target) = link
            && header.set_link_name(target).is_err()
        {
            let bytes = target.as_bytes();
            let n = bytes.len().min(99);
            header.as_old_mut().linkname[..n].copy_from_slice(&bytes[..n]);
        }
        header.set_cksum();
        tar.append(&header, &data[..]).expect("a tar in memory");
        if matches!(kind, 3 | 4) && known.len() < 16 {
            known.push(path.clone());
        }
        summary.push(match link {
            Some(target) => format!("{path} -> {target}"),
            None => format!("{path} ({kind})"),
        });
    }
    (
        tar.into_inner().expect("a tar in memory"),
        summary.join(", "),
    )
}
