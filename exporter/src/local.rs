//! `type=local`: copy a root filesystem to a directory, metadata and all.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::{Error, Result};

/// Copies the tree at `src` (e.g. a mounted merged rootfs) into `dest`, keeping modes,
/// owners, times, xattrs, symlinks, hardlinks (within the copy), devices and fifos.
/// Sockets are skipped. Entries already at `dest` are replaced; other ones are left alone.
pub fn copy_rootfs(src: &Path, dest: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(src).map_err(|e| Error::io(format!("stat {}", src.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let src_real =
        fs::canonicalize(src).map_err(|e| Error::io(format!("resolve {}", src.display()), e))?;
    if resolve_prefix(dest)?.starts_with(&src_real) {
        return Err(Error::InvalidArgument(format!(
            "cannot copy {} into itself ({})",
            src.display(),
            dest.display()
        )));
    }
    let mut copier = Copier {
        links: HashMap::new(),
        root: dest.to_path_buf(),
        dirs: Vec::new(),
    };
    copier.make_dir(src, dest, &meta)?;
    copier.dirs.push((dest.to_path_buf(), meta));
    let mut stack = vec![(src.to_path_buf(), dest.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        let mut entries = fs::read_dir(&s)
            .and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(|e| Error::io(format!("read directory {}", s.display()), e))?;
        entries.sort();
        for name in entries {
            let (sp, dp) = (s.join(&name), d.join(&name));
            let m = fs::symlink_metadata(&sp)
                .map_err(|e| Error::io(format!("stat {}", sp.display()), e))?;
            if m.is_dir() {
                copier.make_dir(&sp, &dp, &m)?;
                copier.dirs.push((dp.clone(), m));
                stack.push((sp, dp));
            } else {
                copier.copy_entry(&sp, &dp, &m)?;
            }
        }
    }
    // Directory times last, deepest first: creating their entries changed them.
    for (d, m) in copier.dirs.iter().rev() {
        set_times(d, m)?;
    }
    Ok(())
}

/// `p` with its longest existing prefix resolved, for paths that may not exist yet.
fn resolve_prefix(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("read current directory", e))?
            .join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = fs::canonicalize(cur) {
            return Ok(rest.iter().rev().fold(real, |acc, c| acc.join(c)));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

struct Copier {
    /// (dev, ino) of a multiply-linked source file -> its first copy.
    links: HashMap<(u64, u64), PathBuf>,
    root: PathBuf,
    dirs: Vec<(PathBuf, Metadata)>,
}

impl Copier {
    fn make_dir(&mut self, sp: &Path, dp: &Path, m: &Metadata) -> Result<()> {
        match fs::symlink_metadata(dp) {
            Ok(existing) if existing.is_dir() => {}
            // A destination given as a symlink to a directory is used, not replaced.
            Ok(_) if dp == self.root && fs::metadata(dp).is_ok_and(|m| m.is_dir()) => {}
            Ok(_) => {
                remove_any(dp)?;
                create_dir(dp)?;
            }
            Err(_) => create_dir(dp)?,
        }
        set_owner_mode_xattrs(sp, dp, m)
    }

    fn copy_entry(&mut self, sp: &Path, dp: &Path, m: &Metadata) -> Result<()> {
        if fs::symlink_metadata(dp).is_ok() {
            remove_any(dp)?;
        }
        if m.nlink() > 1 {
            if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                return fs::hard_link(first, dp).map_err(|e| {
                    Error::io(format!("link {} to {}", dp.display(), first.display()), e)
                });
            }
        }
        let ft = m.file_type();
        let io_err = |what: &str, e| Error::io(format!("{what} {}", dp.display()), e);
        if ft.is_symlink() {
            let target = fs::read_link(sp)
                .map_err(|e| Error::io(format!("read link {}", sp.display()), e))?;
            std::os::unix::fs::symlink(&target, dp).map_err(|e| io_err("create symlink", e))?;
        } else if ft.is_file() {
            fs::copy(sp, dp)
                .map_err(|e| Error::io(format!("copy {} to {}", sp.display(), dp.display()), e))?;
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else if ft.is_fifo() {
                SFlag::S_IFIFO
            } else {
                // Sockets belong to the process that made them; a copy would be meaningless.
                return Ok(());
            };
            mknod(
                dp,
                kind,
                Mode::from_bits_truncate(m.mode() & 0o7777),
                m.rdev(),
            )
            .map_err(|e| io_err("create node", io::Error::from(e)))?;
        }
        set_owner_mode_xattrs(sp, dp, m)?;
        set_times(dp, m)?;
        if m.nlink() > 1 {
            self.links.insert((m.dev(), m.ino()), dp.to_path_buf());
        }
        Ok(())
    }
}

fn create_dir(dp: &Path) -> Result<()> {
    fs::create_dir(dp).map_err(|e| Error::io(format!("create directory {}", dp.display()), e))
}

fn remove_any(p: &Path) -> Result<()> {
    let is_dir = fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let r = if is_dir {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    r.map_err(|e| Error::io(format!("remove {}", p.display()), e))
}

/// Owner first (chown clears setuid bits and file capabilities), then mode, then xattrs.
fn set_owner_mode_xattrs(sp: &Path, dp: &Path, m: &Metadata) -> Result<()> {
    lchown(dp, Some(m.uid()), Some(m.gid()))
        .map_err(|e| Error::io(format!("chown {}", dp.display()), e))?;
    if !m.file_type().is_symlink() {
        fs::set_permissions(dp, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(|e| Error::io(format!("chmod {}", dp.display()), e))?;
    }
    copy_xattrs(sp, dp)
}

fn copy_xattrs(sp: &Path, dp: &Path) -> Result<()> {
    let names = match xattr::list(sp) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) => return Err(Error::io(format!("list xattrs of {}", sp.display()), e)),
    };
    for name in names {
        // Overlay's own bookkeeping, never part of the image's content.
        if name.to_string_lossy().starts_with("trusted.overlay.") {
            continue;
        }
        let value = match xattr::get(sp, &name) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => return Err(Error::io(format!("read xattrs of {}", sp.display()), e)),
        };
        match xattr::set(dp, &name, &value) {
            Ok(()) => {}
            // The destination filesystem may not take it (tmpfs and security.*, NFS...).
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(Error::io(format!("set xattrs of {}", dp.display()), e)),
        }
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(n) if n == nix::errno::Errno::ENOTSUP as i32 || n == nix::errno::Errno::EPERM as i32
    )
}

fn set_times(dp: &Path, m: &Metadata) -> Result<()> {
    let atime = TimeSpec::new(m.atime(), m.atime_nsec());
    let mtime = TimeSpec::new(m.mtime(), m.mtime_nsec());
    utimensat(None, dp, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| Error::io(format!("set times of {}", dp.display()), io::Error::from(e)))
}
