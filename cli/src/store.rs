//! The store under `--root`: where each part lives, and crash recovery at open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::OverlaySnapshotter;
use strata_solver::cache::DbCache;

/// An open store. Layout: `content/` (OCI blobs), `snapshots/` (overlay snapshotter),
/// `cache-v1.redb` (cache records), `images/` (local image store), `statcache-v1`,
/// `mounts/<pid>/` (this process's temporary mount points).
pub struct Store {
    pub root: PathBuf,
    pub snapshotter: Arc<OverlaySnapshotter>,
    pub content: Arc<ContentStore>,
    pub cache: DbCache,
    pub mounts_dir: PathBuf,
}

impl Store {
    pub fn open(root: &Path) -> Result<Store> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("create store {}", root.display()))?;
        let mounts_root = root.join("mounts");
        std::fs::create_dir_all(&mounts_root)?;
        clean_stale_mounts(&mounts_root);
        let mounts_dir = mounts_root.join(std::process::id().to_string());
        std::fs::create_dir_all(&mounts_dir)?;
        let snapshotter =
            OverlaySnapshotter::open(&root.join("snapshots")).context("open snapshotter")?;
        let content = ContentStore::open(&root.join("content")).context("open content store")?;
        let cache = DbCache::open(&root.join("cache-v1.redb"))
            .map_err(anyhow::Error::msg)
            .context("open cache")?;
        Ok(Store {
            root: root.to_path_buf(),
            snapshotter: Arc::new(snapshotter),
            content: Arc::new(content),
            cache,
            mounts_dir,
        })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Persistent `RUN --mount=type=cache` directories, one per cache id.
    pub fn cache_mounts_dir(&self) -> PathBuf {
        self.root.join("cache-mounts")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = strata_snapshotter::mount::unmount_all_under(&self.mounts_dir);
        remove_empty_dirs(&self.mounts_dir);
    }
}

/// Removes `dir` and its subdirectories only while they are empty, so that a mount that
/// could not be undone never has its content deleted.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Unmounts and removes the mount dirs of strata processes that are gone (a SIGKILL'd
/// build); live processes' dirs are left alone.
fn clean_stale_mounts(mounts_root: &Path) {
    let Ok(entries) = std::fs::read_dir(mounts_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let _ = strata_snapshotter::mount::unmount_all_under(&dir);
        remove_empty_dirs(&dir);
    }
}
