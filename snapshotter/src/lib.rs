//! Snapshots, content and layers, in containerd's vocabulary.
//!
//! - [`Snapshotter`]: `key` names an active (writable) snapshot, `name` a committed one,
//!   `parent` a committed parent, `""` the empty parent. It returns [`Mount`]s as data and
//!   never mounts anything itself; [`mount::mount_all`] does that for the caller.
//! - [`content::ContentStore`]: blobs under `blobs/sha256/<hex>`, the OCI layout.
//! - [`layer`]: OCI layer tar -> snapshot directory (apply) and upper dir -> tar (diff).
//! - [`mount`]: performs [`Mount`]s (the only mount(2) caller), including the
//!   [`mount::CHDIR_OPTION`] the snapshotter emits for chains too deep for one page of
//!   absolute `lowerdir` paths.

pub mod content;
pub mod layer;
pub mod mount;
pub mod overlay;
pub mod shared_db;
pub mod sys;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use overlay::OverlaySnapshotter;

/// A mount described as data (`mount -t <kind> -o <options> <source> <target>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `overlay` or `bind`.
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Active,
    View,
    Committed,
}

/// What the metadata store knows of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub kind: Kind,
    pub name: String,
    /// Committed parent name; `None` for a snapshot on the empty parent.
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch.
    pub created: i64,
}

/// Errors of this crate. Messages are lowercase and name the failed action; causes chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("blob {0} not found")]
    BlobNotFound(String),
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("unsafe layer entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: String },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Metadata(String),
    /// A redb operation failed; `action` names what was being done.
    #[error("metadata store: {action}")]
    Db {
        action: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("mount {target}: {source}")]
    Mount {
        target: String,
        #[source]
        source: nix::Error,
    },
}

impl Error {
    /// Wraps an I/O error with the action that failed.
    pub fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            action: action.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The digest a finished sha256 hasher stands for.
pub(crate) fn sha256_digest(hasher: sha2::Sha256) -> strata_dag::Digest {
    use sha2::Digest as _;
    let s = format!("sha256:{}", hex::encode(hasher.finalize()));
    // A formatted sha256 always parses; the fallback only keeps this panic-free.
    strata_dag::Digest::parse(&s).unwrap_or_else(|| strata_dag::Digest::of(s.as_bytes()))
}

/// containerd's snapshotter model, synchronous and in-process.
pub trait Snapshotter: Send + Sync {
    /// Creates an active snapshot `key` on top of committed `parent` ("" = empty).
    fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>>;
    /// Creates a read-only view `key` of committed `parent`.
    fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>>;
    /// The mounts of an active snapshot or view.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// Turns active `key` into committed `name` with `labels`. Metadata only: no data moves.
    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()>;
    /// Removes a snapshot (active, view, or committed with no children).
    fn remove(&self, key: &str) -> Result<()>;
    fn stat(&self, key: &str) -> Result<Info>;
    /// Merges `labels` into the snapshot's labels (an empty value deletes the label).
    fn update_labels(&self, key: &str, labels: BTreeMap<String, String>) -> Result<Info>;
    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<()>;
    /// The directory holding this snapshot's own changes (overlay `upperdir`): written by
    /// layer apply into an active snapshot, read by layer diff of a committed one.
    fn upper_dir(&self, key: &str) -> Result<PathBuf>;
}
