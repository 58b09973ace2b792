//! Image assembly and outputs.
//!
//! - [`export_layer`]: a snapshot's upper dir -> compressed layer blob in the content store,
//!   streaming (tar and compression run on two threads, memory stays flat).
//! - [`write_image`]: layers + config -> config and manifest blobs ([`ImageRecord`]).
//! - Outputs: [`write_oci_archive`], [`write_oci_dir`], [`write_docker_archive`],
//!   [`push_image`], [`copy_rootfs`] (`type=local`), and the local [`ImageStore`].
//!
//! Everything written is deterministic: config, manifest and index JSON have sorted keys,
//! gzip headers carry no mtime or file name, archive entries have fixed owners and times.

mod archive;
mod for_push;
mod image;
mod layer;
mod load;
mod local;
mod names;
mod pgzip;
mod push;
mod store;

pub use archive::{
    write_docker_archive, write_docker_archive_multi, write_docker_archive_multi_to,
    write_docker_archive_to, write_oci_archive, write_oci_archive_to, write_oci_dir,
};
pub use for_push::compressed_for_push;
pub use image::{
    read_config, read_image_config, read_manifest, write_image, write_image_config,
    write_manifest_for_config, ImageRecord, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD, DOCKER_MANIFEST,
};
pub use layer::{
    compression_of_media_type, export_layer, export_layers, recompress_blob, Compression, LayerBlob,
};
pub use load::{layer_reader, load_docker_archive, pull_image, LoadedImage};
pub use local::copy_rootfs;
pub use names::parse_image_name;
pub use push::{blob_sources, push_image, push_image_report, record_blob_source, PushReport};
pub use store::{ImageStore, StoredImage};

/// Errors of this crate. Messages are lowercase and name the failed action; causes chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Stored data that does not parse or does not match its digest.
    #[error("invalid image data: {0}")]
    InvalidData(String),
    #[error("{action}")]
    Content {
        action: String,
        #[source]
        source: strata_snapshotter::Error,
    },
    #[error("{action}")]
    Registry {
        action: String,
        #[source]
        source: strata_registry::Error,
    },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}")]
    Json {
        action: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn content(action: impl Into<String>, source: strata_snapshotter::Error) -> Self {
        Error::Content {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn json(action: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn registry(action: impl Into<String>, source: strata_registry::Error) -> Self {
        Error::Registry {
            action: action.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// JSON with object keys sorted at every level. oci-spec keeps labels and annotations in
/// `HashMap`s, whose order changes from process to process; going through
/// `serde_json::Value` (a `BTreeMap` here) makes equal values give equal bytes.
pub(crate) fn canonical_json<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    let v = serde_json::to_value(value).map_err(|e| Error::json(format!("encode {what}"), e))?;
    serde_json::to_vec(&v).map_err(|e| Error::json(format!("encode {what}"), e))
}

/// Converts our digest to oci-spec's.
pub(crate) fn oci_digest(d: &strata_dag::Digest) -> Result<oci_spec::image::Digest> {
    d.as_str()
        .parse()
        .map_err(|_| Error::InvalidData(format!("invalid digest {d}")))
}

/// Converts oci-spec's digest to ours, refusing anything but sha256.
pub(crate) fn dag_digest(d: &oci_spec::image::Digest) -> Result<strata_dag::Digest> {
    strata_dag::Digest::parse(d.as_ref())
        .ok_or_else(|| Error::InvalidData(format!("unsupported digest {d}")))
}
