//! Performing [`Mount`]s: the only place this crate calls mount(2).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::{Error, Mount, Result};

/// A [`Mount`] option that is not passed to the kernel: mount(2) is called from this
/// working directory, so relative `lowerdir`/`upperdir`/`workdir` paths resolve against it.
/// The snapshotter emits it when absolute paths would overflow the one-page limit on mount
/// data (deep layer chains). Whoever performs such a mount must honour it; [`mount_all`]
/// does, from a forked child so the caller's (multi-threaded) cwd never changes.
pub const CHDIR_OPTION: &str = "chdir=";

fn mount_err(target: &Path) -> impl FnOnce(Errno) -> Error + '_ {
    move |source| Error::Mount {
        target: target.display().to_string(),
        source,
    }
}

fn cstring(s: &[u8], what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{what} contains a NUL byte")))
}

/// Mount options split into kernel flags, filesystem data and our own `chdir=`.
struct Parsed {
    flags: MsFlags,
    data: Vec<String>,
    chdir: Option<PathBuf>,
    ro: bool,
    recursive: bool,
}

fn parse(options: &[String]) -> Parsed {
    let mut p = Parsed {
        flags: MsFlags::empty(),
        data: Vec::new(),
        chdir: None,
        ro: false,
        recursive: false,
    };
    for o in options {
        match o.as_str() {
            "ro" => p.ro = true,
            "rw" | "bind" | "defaults" => {}
            "rbind" => p.recursive = true,
            "nosuid" => p.flags |= MsFlags::MS_NOSUID,
            "nodev" => p.flags |= MsFlags::MS_NODEV,
            "noexec" => p.flags |= MsFlags::MS_NOEXEC,
            "noatime" => p.flags |= MsFlags::MS_NOATIME,
            "relatime" => p.flags |= MsFlags::MS_RELATIME,
            other => match other.strip_prefix(CHDIR_OPTION) {
                Some(dir) => p.chdir = Some(PathBuf::from(dir)),
                None => p.data.push(other.to_string()),
            },
        }
    }
    p
}

/// mount(2) run by a forked child that first changes into `dir`. Only async-signal-safe
/// calls happen between fork and `_exit`, so this is sound in a multi-threaded process.
fn mount_from_dir(
    dir: &Path,
    source: &CString,
    target: &CString,
    fstype: &CString,
    flags: MsFlags,
    data: &CString,
) -> std::result::Result<(), Errno> {
    let dir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the child only calls chdir, mount and _exit on pre-built C strings.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        // SAFETY: see above; no allocation or locking happens in the child.
        unsafe {
            let code = if libc::chdir(dir.as_ptr()) != 0
                || libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    flags.bits(),
                    data.as_ptr().cast(),
                ) != 0
            {
                *libc::__errno_location()
            } else {
                0
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for the child we just forked.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = Errno::last();
        if err != Errno::EINTR {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            code => Err(Errno::from_raw(code)),
        }
    } else {
        Err(Errno::ECHILD)
    }
}

fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let p = parse(&m.options);
    if m.kind == "bind" || m.kind == "rbind" {
        let mut flags = MsFlags::MS_BIND | p.flags;
        if p.recursive || m.kind == "rbind" {
            flags |= MsFlags::MS_REC;
        }
        nix::mount::mount(
            Some(Path::new(&m.source)),
            target,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(mount_err(target))?;
        if p.ro {
            // A bind mount ignores MS_RDONLY until remounted.
            let r = nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | p.flags,
                None::<&str>,
            );
            if let Err(e) = r {
                let _ = unmount(target);
                return Err(mount_err(target)(e));
            }
        }
        return Ok(());
    }
    let mut flags = p.flags;
    if p.ro {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = p.data.join(",");
    match &p.chdir {
        None => nix::mount::mount(
            Some(m.source.as_str()),
            target,
            Some(m.kind.as_str()),
            flags,
            Some(data.as_str()),
        )
        .map_err(mount_err(target)),
        Some(dir) => {
            let target_abs = if target.is_absolute() {
                target.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| Error::io("resolve mount target", e))?
                    .join(target)
            };
            let source = cstring(m.source.as_bytes(), "mount source")?;
            let ctarget = cstring(target_abs.as_os_str().as_bytes(), "mount target")?;
            let fstype = cstring(m.kind.as_bytes(), "mount type")?;
            let cdata = cstring(data.as_bytes(), "mount options")?;
            mount_from_dir(dir, &source, &ctarget, &fstype, flags, &cdata)
                .map_err(mount_err(target))
        }
    }
}

/// Mounts `mounts` in order on `target`. On failure, the ones already mounted are undone.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = unmount(target);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` (lazily, detaching, when busy).
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH).map_err(mount_err(target)),
        Err(e) => Err(mount_err(target)(e)),
    }
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

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The mount points strictly below `dir` listed in `mountinfo`, deepest first.
fn mounts_below(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.as_os_str().as_bytes();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .filter(|mp| {
            mp.len() > prefix.len()
                && mp.starts_with(prefix)
                && (prefix.ends_with(b"/") || mp[prefix.len()] == b'/')
        })
        .map(|mp| PathBuf::from(std::ffi::OsStr::from_bytes(&mp)))
        .collect();
    found.sort_by(|a, b| {
        b.components()
            .count()
            .cmp(&a.components().count())
            .then_with(|| b.cmp(a))
    });
    found
}

/// Unmounts every mount strictly below `dir` (deepest first): stale mounts of a killed
/// build. `dir` itself is left mounted. Returns how many unmounts succeeded.
pub fn unmount_all_under(dir: &Path) -> Result<usize> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("resolve {}", dir.display()), e))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    let mut count = 0;
    // A mount point listed n times (stacked mounts) is unmounted n times.
    for mp in mounts_below(&info, &dir) {
        match unmount(&mp) {
            Ok(()) => count += 1,
            Err(Error::Mount {
                source: Errno::EINVAL | Errno::ENOENT,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing_orders_deepest_first_and_unescapes() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/vda rw
30 22 0:5 / /b/run rw - tmpfs t rw
31 30 0:6 / /b/run/x/y rw - tmpfs t rw
32 30 0:7 / /b/run/a\\040b rw - tmpfs t rw
33 22 0:8 / /b/running rw - tmpfs t rw
";
        let got = mounts_below(info, Path::new("/b/run"));
        assert_eq!(
            got,
            vec![PathBuf::from("/b/run/x/y"), PathBuf::from("/b/run/a b")]
        );
    }

    #[test]
    fn options_split_into_flags_data_and_chdir() {
        let p = parse(&[
            "lowerdir=a:b".into(),
            "ro".into(),
            "nosuid".into(),
            "chdir=/x".into(),
        ]);
        assert!(p.ro);
        assert_eq!(p.data, vec!["lowerdir=a:b".to_string()]);
        assert_eq!(p.chdir, Some(PathBuf::from("/x")));
        assert!(p.flags.contains(MsFlags::MS_NOSUID));
    }
}
