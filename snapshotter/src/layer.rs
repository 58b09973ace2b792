//! Layers: OCI layer tar <-> a snapshot's upper directory.
//!
//! On disk a snapshot uses overlayfs' own format (a whiteout is a 0:0 char device, an
//! opaque dir has `trusted.overlay.opaque=y`); in a layer tar they are OCI's `.wh.<name>`
//! and `.wh..wh..opq`.

use std::io::{Read, Write};
use std::path::Path;

use strata_dag::Digest;

use crate::Result;

/// What applying a layer produced.
#[derive(Clone, Debug)]
pub struct Applied {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    pub uncompressed_size: u64,
}

/// Options for writing a layer tar.
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// Clamp every entry's mtime to at most this (BuildKit's rewrite-timestamp).
    pub source_date_epoch: Option<i64>,
}

/// Applies a layer (gzip, zstd or plain tar, detected by magic bytes) into `dest`, the
/// upper dir of an active snapshot, converting OCI whiteouts to overlay whiteouts. Entries
/// that would escape `dest` are refused.
pub fn apply_layer(_layer: impl Read, _dest: &Path) -> Result<Applied> {
    todo!()
}

/// Writes the changes held in `upper` as an uncompressed, deterministic layer tar (entries
/// sorted; overlay whiteouts and opaque dirs become OCI ones; hardlinks kept) and returns
/// the diff ID (sha256 of the bytes written).
pub fn write_layer(_upper: &Path, _out: impl Write, _opts: &DiffOptions) -> Result<Digest> {
    todo!()
}
