//! Layers + config -> config and manifest blobs.

use oci_spec::image::{Descriptor, History, ImageConfiguration, ImageManifest, MediaType, RootFs};
use serde::{Deserialize, Serialize};
use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;

use crate::layer::LayerBlob;
use crate::{canonical_json, oci_digest, Error, Result};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Not in Docker's spec; the name BuildKit and containerd use for zstd under schema2.
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// An image written to the content store: what its manifest descriptor needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    /// The manifest's media type (OCI or Docker schema2).
    pub media_type: String,
    pub config_digest: Digest,
    /// Sum of the compressed layer sizes and the config size (what `docker images` shows
    /// for a pulled image).
    #[serde(default)]
    pub size: u64,
}

/// Writes the config (its `rootfs.diff_ids` replaced by the layers' diff IDs, in order)
/// and the manifest into `store`. OCI media types, or Docker schema2 ones when
/// `oci_media_types` is false. The layer blobs must be in the store already.
pub fn write_image(
    store: &ContentStore,
    layers: &[LayerBlob],
    mut config: ImageConfiguration,
    oci_media_types: bool,
) -> Result<ImageRecord> {
    for l in layers {
        if !store.exists(&l.digest) {
            return Err(Error::NotFound(format!("layer blob {}", l.digest)));
        }
    }
    let mut rootfs = RootFs::default();
    rootfs.set_typ("layers".to_string());
    rootfs.set_diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect());
    config.set_rootfs(rootfs);
    normalize_history(&mut config, layers.len());

    let config_bytes = canonical_json("image config", &config)?;
    let config_digest = Digest::of(&config_bytes);
    let (_, config_size) = store
        .put(&config_bytes, Some(&config_digest))
        .map_err(|e| Error::content("store image config", e))?;

    let (manifest_type, config_type) = if oci_media_types {
        (MediaType::ImageManifest, MediaType::ImageConfig)
    } else {
        (
            MediaType::Other(DOCKER_MANIFEST.into()),
            MediaType::Other(DOCKER_CONFIG.into()),
        )
    };
    let layer_descs = layers
        .iter()
        .map(|l| {
            Ok(Descriptor::new(
                MediaType::from(layer_media_type(&l.media_type, oci_media_types)?),
                l.size,
                oci_digest(&l.digest)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(manifest_type.clone())
        .config(Descriptor::new(
            config_type,
            config_size,
            oci_digest(&config_digest)?,
        ))
        .layers(layer_descs)
        .build()
        .map_err(|e| Error::InvalidData(format!("build image manifest: {e}")))?;
    let manifest_bytes = canonical_json("image manifest", &manifest)?;
    let manifest_digest = Digest::of(&manifest_bytes);
    let (_, manifest_size) = store
        .put(&manifest_bytes, Some(&manifest_digest))
        .map_err(|e| Error::content("store image manifest", e))?;

    Ok(ImageRecord {
        manifest_digest,
        manifest_size,
        media_type: manifest_type.to_string(),
        config_digest,
        size: layers.iter().map(|l| l.size).sum::<u64>() + config_size,
    })
}

/// Makes the history's non-empty entries match the layer count, as BuildKit does, since
/// docker refuses images where they differ: missing entries (a base image without
/// history) are prepended blank, surplus ones are marked empty from the bottom. An empty
/// history is left empty: every tool accepts that.
fn normalize_history(config: &mut ImageConfiguration, layers: usize) {
    let history = config.history_mut();
    if history.is_empty() {
        return;
    }
    let non_empty = history
        .iter()
        .filter(|h| h.empty_layer() != Some(true))
        .count();
    if non_empty < layers {
        let blank = std::iter::repeat_with(History::default).take(layers - non_empty);
        let rest = std::mem::take(history);
        *history = blank.chain(rest).collect();
    } else {
        let mut surplus = non_empty - layers;
        for h in history.iter_mut() {
            if surplus == 0 {
                break;
            }
            if h.empty_layer() != Some(true) {
                h.set_empty_layer(Some(true));
                surplus -= 1;
            }
        }
    }
}

/// The media type a layer gets in a manifest of the chosen flavour. Accepts either
/// flavour as input so layers pulled as Docker schema2 can be re-exported as OCI.
fn layer_media_type(stored: &str, oci: bool) -> Result<&'static str> {
    let kind = match stored {
        "application/vnd.oci.image.layer.v1.tar+gzip" | DOCKER_LAYER_GZIP => 0,
        "application/vnd.oci.image.layer.v1.tar+zstd" | DOCKER_LAYER_ZSTD => 1,
        "application/vnd.oci.image.layer.v1.tar" | DOCKER_LAYER => 2,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unsupported layer media type {other:?}"
            )))
        }
    };
    Ok(match (kind, oci) {
        (0, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (1, true) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (_, true) => "application/vnd.oci.image.layer.v1.tar",
        (0, false) => DOCKER_LAYER_GZIP,
        (1, false) => DOCKER_LAYER_ZSTD,
        (_, false) => DOCKER_LAYER,
    })
}

/// Reads a blob and checks it against its digest.
pub(crate) fn read_verified(store: &ContentStore, digest: &Digest, what: &str) -> Result<Vec<u8>> {
    let bytes = store
        .read(digest)
        .map_err(|e| Error::content(format!("read {what} {digest}"), e))?;
    let actual = Digest::of(&bytes);
    if &actual != digest {
        return Err(Error::InvalidData(format!(
            "{what} {digest}: content hashes to {actual}"
        )));
    }
    Ok(bytes)
}

pub(crate) fn read_manifest_bytes(
    store: &ContentStore,
    image: &ImageRecord,
) -> Result<(Vec<u8>, ImageManifest)> {
    let bytes = read_verified(store, &image.manifest_digest, "image manifest")?;
    let manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::json(format!("parse image manifest {}", image.manifest_digest), e))?;
    Ok((bytes, manifest))
}

/// The image's manifest, read from `store` and verified against its digest.
pub fn read_manifest(store: &ContentStore, image: &ImageRecord) -> Result<ImageManifest> {
    read_manifest_bytes(store, image).map(|(_, m)| m)
}

/// The image's config, read from `store` and verified against its digest.
pub fn read_config(store: &ContentStore, image: &ImageRecord) -> Result<ImageConfiguration> {
    let bytes = read_verified(store, &image.config_digest, "image config")?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::json(format!("parse image config {}", image.config_digest), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types_map_between_flavours() {
        assert_eq!(
            layer_media_type(DOCKER_LAYER_GZIP, true).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd", false).unwrap(),
            DOCKER_LAYER_ZSTD
        );
        assert_eq!(
            layer_media_type("application/vnd.oci.image.layer.v1.tar", false).unwrap(),
            DOCKER_LAYER
        );
        assert!(layer_media_type("text/plain", true).is_err());
    }

    fn history(empty: &[bool]) -> ImageConfiguration {
        let mut c = ImageConfiguration::default();
        c.set_history(
            empty
                .iter()
                .map(|e| {
                    let mut h = History::default();
                    h.set_created_by(Some("x".into()));
                    h.set_empty_layer(e.then_some(true));
                    h
                })
                .collect(),
        );
        c
    }

    fn non_empty(c: &ImageConfiguration) -> usize {
        c.history()
            .iter()
            .filter(|h| h.empty_layer() != Some(true))
            .count()
    }

    #[test]
    fn history_is_matched_to_layers() {
        let mut c = history(&[false, true]);
        normalize_history(&mut c, 3);
        assert_eq!(c.history().len(), 4);
        assert_eq!(non_empty(&c), 3);
        assert_eq!(c.history()[0].created_by(), &None, "blank entries go first");
        assert_eq!(c.history()[2].created_by().as_deref(), Some("x"));

        let mut c = history(&[false, false, false, true]);
        normalize_history(&mut c, 1);
        assert_eq!(c.history().len(), 4);
        assert_eq!(non_empty(&c), 1);
        assert_eq!(c.history()[2].empty_layer(), None, "the top one stays");

        let mut c = history(&[]);
        normalize_history(&mut c, 2);
        assert!(c.history().is_empty());
    }

    #[test]
    fn config_json_is_canonical() {
        let mut labels = std::collections::HashMap::new();
        for i in 0..20 {
            labels.insert(format!("label{i:02}"), "v".to_string());
        }
        let cfg = oci_spec::image::ConfigBuilder::default()
            .labels(labels)
            .build()
            .unwrap();
        let mut img = ImageConfiguration::default();
        img.set_config(Some(cfg));
        let a = canonical_json("c", &img).unwrap();
        let s = String::from_utf8(a).unwrap();
        let positions: Vec<usize> = (0..20)
            .map(|i| s.find(&format!("label{i:02}")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{s}");
    }
}
