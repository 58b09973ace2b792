//! Performing [`Mount`]s: the only place this crate calls mount(2).

use std::path::Path;

use crate::{Mount, Result};

/// Mounts `mounts` in order on `target`.
pub fn mount_all(_mounts: &[Mount], _target: &Path) -> Result<()> {
    todo!()
}

/// Unmounts `target` (lazily, detaching, when busy).
pub fn unmount(_target: &Path) -> Result<()> {
    todo!()
}

/// Unmounts `target` when dropped, so every mount is undone on error paths and panics.
pub struct MountGuard {
    target: std::path::PathBuf,
    active: bool,
}

impl MountGuard {
    /// Mounts `mounts` on `target` and returns a guard that unmounts it.
    pub fn mount(mounts: &[Mount], target: &Path) -> Result<Self> {
        mount_all(mounts, target)?;
        Ok(MountGuard {
            target: target.to_path_buf(),
            active: true,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now and reports failure.
    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        unmount(&self.target)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.active {
            let _ = unmount(&self.target);
        }
    }
}

/// Unmounts every mount below `dir` (deepest first): stale mounts of a killed build.
pub fn unmount_all_under(_dir: &Path) -> Result<usize> {
    todo!()
}
