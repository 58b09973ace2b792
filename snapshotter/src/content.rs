//! The content store: `blobs/sha256/<hex>` (the OCI image layout), written through
//! `ingest/` temp files that are renamed into place only once their digest checks.

use std::fs::File;
use std::path::{Path, PathBuf};

use strata_dag::Digest;

use crate::Result;

pub struct ContentStore {
    #[allow(dead_code)]
    root: PathBuf,
}

/// A blob being written; nothing is visible in the store until [`Writer::commit`].
pub struct Writer {
    _private: (),
}

impl std::io::Write for Writer {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        todo!()
    }
    fn flush(&mut self) -> std::io::Result<()> {
        todo!()
    }
}

impl Writer {
    /// Fsyncs, checks `expected` (when given) against the running digest, and renames the
    /// blob into place. A blob already present is not an error: its digest is returned.
    pub fn commit(self, _expected: Option<&Digest>) -> Result<(Digest, u64)> {
        todo!()
    }
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<Self> {
        Ok(ContentStore {
            root: root.to_path_buf(),
        })
    }
    pub fn writer(&self) -> Result<Writer> {
        todo!()
    }
    /// Writes `bytes` as a blob and returns its digest.
    pub fn put(&self, _bytes: &[u8], _expected: Option<&Digest>) -> Result<(Digest, u64)> {
        todo!()
    }
    pub fn exists(&self, _digest: &Digest) -> bool {
        todo!()
    }
    pub fn path(&self, _digest: &Digest) -> PathBuf {
        todo!()
    }
    pub fn open_blob(&self, _digest: &Digest) -> Result<File> {
        todo!()
    }
    pub fn read(&self, _digest: &Digest) -> Result<Vec<u8>> {
        todo!()
    }
    pub fn size(&self, _digest: &Digest) -> Result<u64> {
        todo!()
    }
    pub fn delete(&self, _digest: &Digest) -> Result<()> {
        todo!()
    }
    pub fn walk(&self, _f: &mut dyn FnMut(&Digest, u64)) -> Result<()> {
        todo!()
    }
}
