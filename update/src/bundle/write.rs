//! Writing a bundle (the publisher's side): the image hashed, the manifest made and checked
//! as a node would check it, signed, and the three members written in order to a temporary
//! file that is synced and renamed into place.

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{
    BundleError, FORMAT, HashWriter, IMAGE_FS, ImageInfo, MEMBERS, Manifest, Signer,
    parse_manifest, signed_message,
};

/// Writes a bundle of `image` for `target` at `version`, signed by `signer`, to `out`.
/// Returns its manifest.
pub fn write_bundle(
    out: &Path,
    version: &str,
    target: &str,
    image: &Path,
    signer: &dyn Signer,
) -> Result<Manifest, BundleError> {
    let io = |path: &Path, source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(image).map_err(|e| io(image, e))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut HashWriter(&mut hasher)).map_err(|e| io(image, e))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: version.into(),
        target: target.into(),
        image: ImageInfo {
            size,
            sha256: hex::encode(hasher.finalize()),
            fs: IMAGE_FS.into(),
        },
    };
    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
    // The same checks a node makes, so a bad version or target fails here, not on a board.
    parse_manifest(out, &manifest_bytes)?;
    let signature = signer
        .sign(&signed_message(&manifest_bytes))
        .map_err(BundleError::Sign)?;
    let sig_bytes = serde_json::to_vec_pretty(&signature).expect("a signature serialises");

    let tmp = out.with_extension("partial");
    let result = (|| -> std::io::Result<()> {
        let writer = File::create(&tmp)?;
        let mut builder = tar::Builder::new(writer);
        builder.mode(tar::HeaderMode::Deterministic);
        for (name, bytes) in [(MEMBERS[0], &manifest_bytes), (MEMBERS[1], &sig_bytes)] {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            builder.append_data(&mut header, name, bytes.as_slice())?;
        }
        let mut header = tar::Header::new_ustar();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        let mut image_file = File::open(image)?;
        builder.append_data(&mut header, MEMBERS[2], &mut image_file)?;
        let writer = builder.into_inner()?;
        writer.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(out, source));
    }
    Ok(manifest)
}
