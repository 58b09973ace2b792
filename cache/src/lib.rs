//! Build cache export and import: `--cache-to` / `--cache-from`.
//!
//! A fresh CI runner has an empty store; this crate lets it reuse the work of the last run
//! through an OCI registry (or a directory, or the image itself). The cache is an OCI
//! artifact: a manifest whose config is a [`CacheDescription`] (cache key -> the chain of
//! layer blobs, bottom first, that make up the step's result) and whose layers are every
//! blob those chains reference. Keys are the solver's own cache keys, which depend only on
//! the build definition and the content of the context files read, never on the store, so
//! a key computed on one runner means the same result on another.
//!
//! Import is lazy: only the description is fetched up front. [`ImportingCache`] wraps the
//! local cache; on a key the local store lacks but a description has, it pulls just that
//! chain's blobs (in parallel, digest-verified into the content store) and applies them
//! through the worker's layer path into `layer-<chainid>` snapshots, which carry their
//! blob in a label. The solver stops its walk at the first hit from the root, so a fully
//! cached build pulls only the final image's chain, and re-exporting the image reuses the
//! same blob bytes: the same image digest as on the runner that built it.
//!
//! `type=inline` puts a `mode=min` description into the image config itself (its blobs
//! are the image's layers). `cache-mounts=true` adds a blob of each `RUN
//! --mount=type=cache` directory the build uses; [`MountRestoringWorker`] restores one
//! on a runner that lacks it just before the first step that uses it runs.
//!
//! This is its own crate rather than a solver module because it sits above the solver: it
//! uses the solver's seams (`CacheStore`, the worker's layer apply, `SolveReport`) together
//! with the exporter's layer export and the registry client's push, which the scheduler
//! itself has no business knowing.

mod describe;
mod export;
mod import;
mod spec;

pub use describe::{
    cache_mount_dir, cache_mount_ids, describe, select, CacheDescription, CONFIG_MEDIA_TYPE,
    INLINE_CONFIG_FIELD,
};
pub use export::{push_registry, write_local, ExportReport, ARTIFACT_TYPE};
pub use import::{
    fetch_description, ImportReport, ImportedCache, ImportingCache, MountRestoringWorker,
};
pub use spec::{parse_cache_from, parse_cache_to, CacheFrom, CacheTo, ExportTarget, Mode};

/// Errors of this crate. Messages are lowercase and name the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cache option: {0}")]
    InvalidSpec(String),
    /// A cache (description or layout) that does not parse or does not add up.
    #[error("invalid build cache: {0}")]
    Invalid(String),
    #[error("{action}")]
    Registry {
        action: String,
        #[source]
        source: strata_registry::Error,
    },
    #[error("{action}")]
    Exporter {
        action: String,
        #[source]
        source: strata_exporter::Error,
    },
    #[error("{action}")]
    Content {
        action: String,
        #[source]
        source: strata_snapshotter::Error,
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
    /// A snapshot or worker operation (those report plain strings).
    #[error("{0}")]
    Store(String),
}

impl Error {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
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
    pub(crate) fn content(action: impl Into<String>, source: strata_snapshotter::Error) -> Self {
        Error::Content {
            action: action.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
