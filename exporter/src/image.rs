//! Layers + config -> config and manifest blobs.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageManifest, MediaType};
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
    config: ImageConfiguration,
    oci_media_types: bool,
) -> Result<ImageRecord> {
    let value = serde_json::to_value(&config).map_err(|e| Error::json("encode image config", e))?;
    assemble(store, layers, value, oci_media_types)
}

/// [`write_image`] for strata's own config type, which keeps Docker's fields
/// (`Healthcheck`, `OnBuild`, `Shell`) that oci-spec's `Config` would drop.
pub fn write_image_config(
    store: &ContentStore,
    layers: &[LayerBlob],
    config: &strata_dag::image::ImageConfig,
    oci_media_types: bool,
) -> Result<ImageRecord> {
    let value = serde_json::to_value(config).map_err(|e| Error::json("encode image config", e))?;
    assemble(store, layers, value, oci_media_types)
}

/// Works on the config as JSON so that fields neither type knows survive.
fn assemble(
    store: &ContentStore,
    layers: &[LayerBlob],
    mut config: serde_json::Value,
    oci_media_types: bool,
) -> Result<ImageRecord> {
    for l in layers {
        if !store.exists(&l.digest) {
            return Err(Error::NotFound(format!("layer blob {}", l.digest)));
        }
    }
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("image config is not a JSON object".into()))?;
    obj.insert(
        "rootfs".into(),
        serde_json::json!({
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        }),
    );
    normalize_history(obj, layers.len());

    let config_bytes = canonical_json("image config", &config)?;
    write_manifest_for_config(store, layers, &config_bytes, oci_media_types)
}

/// Stores `config_bytes` as they are (a loaded or pulled image keeps its image ID) and
/// writes a manifest for it and `layers`, whose blobs must be in the store.
pub fn write_manifest_for_config(
    store: &ContentStore,
    layers: &[LayerBlob],
    config_bytes: &[u8],
    oci_media_types: bool,
) -> Result<ImageRecord> {
    for l in layers {
        if !store.exists(&l.digest) {
            return Err(Error::NotFound(format!("layer blob {}", l.digest)));
        }
    }
    let config_digest = Digest::of(config_bytes);
    let (_, config_size) = store
        .put(config_bytes, Some(&config_digest))
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
/// history) are prepended blank, surplus ones are marked empty from the bottom. An absent
/// or empty history is left so: every tool accepts that.
fn normalize_history(config: &mut serde_json::Map<String, serde_json::Value>, layers: usize) {
    let Some(history) = config.get_mut("history").and_then(|h| h.as_array_mut()) else {
        return;
    };
    if history.is_empty() {
        return;
    }
    let is_empty =
        |h: &serde_json::Value| h.get("empty_layer") == Some(&serde_json::Value::Bool(true));
    let non_empty = history.iter().filter(|h| !is_empty(h)).count();
    if non_empty < layers {
        let blank = std::iter::repeat_with(|| serde_json::json!({})).take(layers - non_empty);
        let rest = std::mem::take(history);
        *history = blank.chain(rest).collect();
    } else {
        let mut surplus = non_empty - layers;
        for h in history.iter_mut() {
            if surplus == 0 {
                break;
            }
            if !is_empty(h) {
                if let Some(o) = h.as_object_mut() {
                    o.insert("empty_layer".into(), serde_json::Value::Bool(true));
                    surplus -= 1;
                }
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

/// The image's config as strata's own type (keeps Docker's extra fields).
pub fn read_image_config(
    store: &ContentStore,
    image: &ImageRecord,
) -> Result<strata_dag::image::ImageConfig> {
    let bytes = read_verified(store, &image.config_digest, "image config")?;
    strata_dag::image::ImageConfig::from_json(&bytes)
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

    fn history(empty: &[bool]) -> serde_json::Map<String, serde_json::Value> {
        let h: Vec<_> = empty
            .iter()
            .map(|e| {
                if *e {
                    serde_json::json!({"created_by": "x", "empty_layer": true})
                } else {
                    serde_json::json!({"created_by": "x"})
                }
            })
            .collect();
        let serde_json::Value::Object(m) = serde_json::json!({ "history": h }) else {
            unreachable!()
        };
        m
    }

    fn entries(c: &serde_json::Map<String, serde_json::Value>) -> Vec<serde_json::Value> {
        c["history"].as_array().unwrap().clone()
    }

    fn non_empty(c: &serde_json::Map<String, serde_json::Value>) -> usize {
        entries(c)
            .iter()
            .filter(|h| h.get("empty_layer") != Some(&serde_json::Value::Bool(true)))
            .count()
    }

    #[test]
    fn history_is_matched_to_layers() {
        let mut c = history(&[false, true]);
        normalize_history(&mut c, 3);
        assert_eq!(entries(&c).len(), 4);
        assert_eq!(non_empty(&c), 3);
        assert_eq!(
            entries(&c)[0],
            serde_json::json!({}),
            "blank entries go first"
        );
        assert_eq!(entries(&c)[2]["created_by"], "x");

        let mut c = history(&[false, false, false, true]);
        normalize_history(&mut c, 1);
        assert_eq!(entries(&c).len(), 4);
        assert_eq!(non_empty(&c), 1);
        assert_eq!(entries(&c)[2].get("empty_layer"), None, "the top one stays");

        let mut c = history(&[]);
        normalize_history(&mut c, 2);
        assert!(entries(&c).is_empty());
        let mut none = serde_json::Map::new();
        normalize_history(&mut none, 2);
        assert!(none.is_empty());
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
