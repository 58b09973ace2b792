//! Overlayfs snapshotter: metadata in `metadata.redb`, data in `snapshots/<id>/{fs,work}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Info, Mount, Result, Snapshotter};

pub struct OverlaySnapshotter {
    #[allow(dead_code)]
    root: PathBuf,
}

impl OverlaySnapshotter {
    /// Opens (creating if needed) a snapshotter rooted at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        Ok(OverlaySnapshotter {
            root: root.to_path_buf(),
        })
    }
}

impl Snapshotter for OverlaySnapshotter {
    fn prepare(&self, _key: &str, _parent: &str) -> Result<Vec<Mount>> {
        todo!()
    }
    fn view(&self, _key: &str, _parent: &str) -> Result<Vec<Mount>> {
        todo!()
    }
    fn mounts(&self, _key: &str) -> Result<Vec<Mount>> {
        todo!()
    }
    fn commit(&self, _name: &str, _key: &str, _labels: BTreeMap<String, String>) -> Result<()> {
        todo!()
    }
    fn remove(&self, _key: &str) -> Result<()> {
        todo!()
    }
    fn stat(&self, _key: &str) -> Result<Info> {
        todo!()
    }
    fn update_labels(&self, _key: &str, _labels: BTreeMap<String, String>) -> Result<Info> {
        todo!()
    }
    fn walk(&self, _f: &mut dyn FnMut(&Info)) -> Result<()> {
        todo!()
    }
    fn upper_dir(&self, _key: &str) -> Result<PathBuf> {
        todo!()
    }
}
