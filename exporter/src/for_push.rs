//! Compressing a local image's layers when it leaves the machine.
//!
//! The local image store keeps the layers it builds uncompressed, as Docker's does: a
//! build then only tars and hashes a layer, and compression (the dearest part of exporting
//! a big layer) is paid by the push, once. [`compressed_for_push`] makes the image a
//! registry should get. The compressed blob of each uncompressed layer is remembered in
//! `<content>/derived/<diff id hex>.<compression>`, so pushing again, or pushing another
//! image sharing the layer, compresses nothing.

use std::io::Write;
use std::path::PathBuf;

use oci_spec::image::{ImageManifest, MediaType};
use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;

use crate::image::{read_manifest_bytes, read_verified, ImageRecord};
use crate::layer::{compression_of_media_type, recompress_blob, Compression, LayerBlob};
use crate::{dag_digest, write_manifest_for_config, Error, Result};

/// `image` with every uncompressed layer compressed with `compression`, under a new
/// manifest with the same config (so the same image ID); `image` itself when no layer is
/// uncompressed. Layers that are compressed already are kept as they are.
pub fn compressed_for_push(
    store: &ContentStore,
    image: &ImageRecord,
    compression: &Compression,
) -> Result<ImageRecord> {
    let (_, manifest) = read_manifest_bytes(store, image)?;
    let uncompressed = |media_type: &MediaType| {
        compression_of_media_type(media_type.as_ref()) == Some("uncompressed")
    };
    if !manifest
        .layers()
        .iter()
        .any(|l| uncompressed(l.media_type()))
        || *compression == Compression::Uncompressed
    {
        return Ok(image.clone());
    }
    let config_bytes = read_verified(store, &image.config_digest, "image config")?;
    let config = strata_dag::image::ImageConfig::from_json(&config_bytes)
        .map_err(|e| Error::json(format!("parse image config {}", image.config_digest), e))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::InvalidData(format!(
            "image {} has {} layers but {} diff ids",
            image.manifest_digest,
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (desc, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let diff_id = Digest::parse(diff_id)
            .ok_or_else(|| Error::InvalidData(format!("invalid diff id {diff_id:?}")))?;
        let blob = LayerBlob {
            digest: dag_digest(desc.digest())?,
            size: desc.size(),
            media_type: desc.media_type().to_string(),
            diff_id,
            uncompressed_size: 0,
        };
        layers.push(if uncompressed(desc.media_type()) {
            compressed_layer(store, &blob, compression)?
        } else {
            blob
        });
    }
    write_manifest_for_config(store, &layers, &config_bytes, is_oci(&manifest))
}

fn is_oci(manifest: &ImageManifest) -> bool {
    !matches!(manifest.media_type(), Some(MediaType::Other(t)) if t == crate::DOCKER_MANIFEST)
}

fn memo_path(store: &ContentStore, diff_id: &Digest, compression: &Compression) -> PathBuf {
    store
        .root()
        .join("derived")
        .join(format!("{}.{}", diff_id.hex(), compression.name()))
}

/// The compressed blob of an uncompressed layer: remembered, or made and remembered.
fn compressed_layer(
    store: &ContentStore,
    blob: &LayerBlob,
    compression: &Compression,
) -> Result<LayerBlob> {
    let memo = memo_path(store, &blob.diff_id, compression);
    let known = std::fs::read(&memo)
        .ok()
        .and_then(|b| serde_json::from_slice::<LayerBlob>(&b).ok())
        .filter(|b| b.diff_id == blob.diff_id && store.exists(&b.digest));
    if let Some(b) = known {
        return Ok(b);
    }
    let made = recompress_blob(store, blob, compression)?;
    // A lost or torn memo only costs compressing again (it is checked before use), so it
    // is written without fsync.
    let remember = || -> std::io::Result<()> {
        let dir = memo.parent().unwrap_or(store.root());
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec(&made).map_err(std::io::Error::other)?)?;
        tmp.persist(&memo).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = remember() {
        return Err(Error::io(format!("remember {}", memo.display()), e));
    }
    Ok(made)
}
