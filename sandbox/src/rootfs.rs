//! The step's root: mounting it and the special file systems, and undoing every mount point
//! created in it so the layer never contains them (as BuildKit's mount stub cleaner does).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::statvfs::FsFlags;
use nix::sys::time::TimeSpec;
use strata_snapshotter::Mount;

use crate::error::{Context, SetupError};
use crate::syscall::Syscall;

/// Symlinks followed while resolving one path inside the root before giving up (as Linux).
const MAX_SYMLINKS: usize = 40;

enum Undo {
    Unmount(PathBuf),
    /// A mount point this sandbox created; `parent_times` restore the parent's atime/mtime.
    Remove {
        path: PathBuf,
        dir: bool,
        parent_times: Option<(TimeSpec, TimeSpec)>,
    },
}

/// The mounted root and what was done in it. Paths in `undo` are relative to the root, so the
/// same record works before `pivot_root` (base = host mount point) and after (base = `/`).
pub(crate) struct Root {
    sys: Box<dyn Syscall>,
    base: PathBuf,
    undo: Vec<Undo>,
}

impl Root {
    /// Mounts `rootfs` on `base` (an existing empty directory).
    pub(crate) fn mount(
        sys: Box<dyn Syscall>,
        rootfs: &[Mount],
        base: &Path,
    ) -> Result<Root, SetupError> {
        if rootfs.is_empty() {
            return Err(SetupError::Message(
                "mount rootfs: no root filesystem mounts given".into(),
            ));
        }
        // nodev: without a devices cgroup, a device node a step creates (it has CAP_MKNOD,
        // as in Docker) must never open, or root in a step could read the host's disks.
        let nodev: Vec<Mount> = rootfs
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.kind == "overlay" {
                    m.options.push("nodev".into());
                }
                m
            })
            .collect();
        mount_all(sys.as_ref(), &nodev, base)?;
        Ok(Root {
            sys,
            base: base.to_path_buf(),
            undo: Vec::new(),
        })
    }

    /// `path` (absolute inside the root) relative to the root, symlinks resolved without
    /// leaving the root, so a hostile image cannot point a mount at the host.
    pub(crate) fn resolve(&self, path: &str) -> Result<PathBuf, SetupError> {
        let mut pending: VecDeque<OsString> = components(Path::new(path)).collect();
        let mut resolved = PathBuf::new();
        let mut links = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                resolved.pop();
                continue;
            }
            let next = resolved.join(&c);
            let host = self.base.join(&next);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(SetupError::Message(format!(
                            "resolve {path} in rootfs: too many levels of symbolic links"
                        )));
                    }
                    let target =
                        fs::read_link(&host).ctx(|| format!("read link {}", host.display()))?;
                    if target.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    for t in components(&target).collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(t);
                    }
                }
                _ => resolved = next,
            }
        }
        Ok(resolved)
    }

    fn host(&self, rel: &Path) -> PathBuf {
        self.base.join(rel)
    }

    /// Makes sure `path` exists in the root as a directory or file to mount on, creating it
    /// and missing parents (recorded for removal). Returns the path to mount on.
    pub(crate) fn ensure(&mut self, path: &str, dir: bool) -> Result<PathBuf, SetupError> {
        let rel = self.resolve(path)?;
        let host = self.host(&rel);
        if fs::symlink_metadata(&host).is_ok() {
            return Ok(host);
        }
        let mut missing = Vec::new();
        let mut p = rel.as_path();
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() || fs::symlink_metadata(self.host(parent)).is_ok() {
                break;
            }
            missing.push(parent.to_path_buf());
            p = parent;
        }
        for d in missing.into_iter().rev() {
            self.create(d, true)?;
        }
        self.create(rel, dir)?;
        Ok(host)
    }

    fn create(&mut self, rel: PathBuf, dir: bool) -> Result<(), SetupError> {
        let host = self.host(&rel);
        let parent_times = host.parent().and_then(|p| {
            let st = nix::sys::stat::lstat(p).ok()?;
            Some((
                TimeSpec::new(st.st_atime, st.st_atime_nsec),
                TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
            ))
        });
        if dir {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&host)
                .ctx(|| format!("create mount point {}", host.display()))?;
        } else {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&host)
                .ctx(|| format!("create mount point {}", host.display()))?;
        }
        self.undo.push(Undo::Remove {
            path: rel,
            dir,
            parent_times,
        });
        Ok(())
    }

    fn mounted(&mut self, host: &Path) {
        let rel = host.strip_prefix(&self.base).unwrap_or(host).to_path_buf();
        self.undo.push(Undo::Unmount(rel));
    }

    fn mount_at(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SetupError> {
        self.sys
            .mount(source, target, fstype, flags, data)
            .ctx(|| {
                format!(
                    "mount {} on {}",
                    fstype.map_or_else(|| "bind".to_string(), str::to_string),
                    target.display()
                )
            })?;
        self.mounted(target);
        Ok(())
    }

    /// /proc, /dev (+pts, shm, mqueue), /sys, /etc/hosts and /etc/resolv.conf. Not
    /// /etc/hostname: BuildKit leaves it to the image, so a step may write or remove it.
    pub(crate) fn mount_specials(
        &mut self,
        hosts: &Path,
        resolv_conf: &Path,
    ) -> Result<(), SetupError> {
        let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

        let proc_dir = self.ensure("/proc", true)?;
        self.mount_at(
            Some(Path::new("proc")),
            &proc_dir,
            Some("proc"),
            common,
            None,
        )?;

        let dev = self.ensure("/dev", true)?;
        self.mount_at(
            Some(Path::new("tmpfs")),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )?;
        populate_dev(self.sys.as_ref(), &dev)?;
        // The few devices a step may use are the host's nodes bind-mounted into the nodev
        // tmpfs (a bind mount has its own flags), so a node made by mknod in /dev is inert.
        for name in DEVICES {
            let p = dev.join(name);
            let host = Path::new("/dev").join(name);
            self.mount_at(Some(&host), &p, None, MsFlags::MS_BIND, None)?;
        }
        let pts = dev.join("pts");
        self.mount_at(
            Some(Path::new("devpts")),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        )?;
        let shm = dev.join("shm");
        self.mount_at(
            Some(Path::new("shm")),
            &shm,
            Some("tmpfs"),
            common,
            Some("mode=1777,size=65536k"),
        )?;
        let mqueue = dev.join("mqueue");
        // Optional, as for Docker: kernels without POSIX message queues still run steps.
        let _ = self.mount_at(
            Some(Path::new("mqueue")),
            &mqueue,
            Some("mqueue"),
            common,
            None,
        );

        let sys = self.ensure("/sys", true)?;
        let sysfs = self.mount_at(
            Some(Path::new("sysfs")),
            &sys,
            Some("sysfs"),
            common | MsFlags::MS_RDONLY,
            None,
        );
        if sysfs.is_err() {
            // A fresh sysfs is refused when the network namespace is not ours; bind the
            // host's read-only instead, as runc does.
            self.mount_at(
                Some(Path::new("/sys")),
                &sys,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            remount_ro(self.sys.as_ref(), &sys)?;
        }

        self.protect_kernel_files(&proc_dir, &sys)?;

        for (target, source) in [("/etc/hosts", hosts), ("/etc/resolv.conf", resolv_conf)] {
            let t = self.ensure(target, false)?;
            self.mount_at(Some(source), &t, None, MsFlags::MS_BIND, None)?;
            remount_ro(self.sys.as_ref(), &t)?;
        }
        Ok(())
    }

    /// Docker's read-only and masked paths: without them root in the step could write
    /// host-global sysctls or /proc/sysrq-trigger, or read kernel memory.
    fn protect_kernel_files(&mut self, proc_dir: &Path, sys: &Path) -> Result<(), SetupError> {
        for name in READONLY_PROC {
            let p = proc_dir.join(name);
            if fs::symlink_metadata(&p).is_err() {
                continue;
            }
            self.mount_at(Some(&p), &p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            remount_ro(self.sys.as_ref(), &p)?;
        }
        let masked = MASKED_PROC
            .iter()
            .map(|n| proc_dir.join(n))
            .chain(MASKED_SYS.iter().map(|n| sys.join(n)));
        for p in masked {
            let Ok(meta) = fs::metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                self.mount_at(
                    Some(Path::new("tmpfs")),
                    &p,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY,
                    None,
                )?;
            } else {
                self.mount_at(
                    Some(Path::new("/dev/null")),
                    &p,
                    None,
                    MsFlags::MS_BIND,
                    None,
                )?;
            }
        }
        Ok(())
    }

    pub(crate) fn bind(
        &mut self,
        source: &Path,
        target: &str,
        readonly: bool,
    ) -> Result<(), SetupError> {
        let meta =
            fs::metadata(source).ctx(|| format!("stat mount source {}", source.display()))?;
        let t = self.ensure(target, meta.is_dir())?;
        self.mount_at(
            Some(source),
            &t,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if readonly {
            remount_ro(self.sys.as_ref(), &t)?;
        }
        Ok(())
    }

    pub(crate) fn mount_data(&mut self, mounts: &[Mount], target: &str) -> Result<(), SetupError> {
        let t = self.ensure(target, true)?;
        mount_all(self.sys.as_ref(), mounts, &t)?;
        for _ in mounts {
            self.mounted(&t);
        }
        Ok(())
    }

    pub(crate) fn tmpfs(&mut self, target: &str, size: Option<u64>) -> Result<(), SetupError> {
        let t = self.ensure(target, true)?;
        let data = size.map(|s| format!("size={s}"));
        self.mount_at(
            Some(Path::new("tmpfs")),
            &t,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data.as_deref(),
        )
    }

    /// Makes the root `/` (youki's `pivot_root(".", ".")`: no directory is needed in the root
    /// for the old one, which is stacked on top and detached at once).
    pub(crate) fn pivot(&mut self) -> Result<(), SetupError> {
        self.sys
            .pivot_root(&self.base)
            .ctx(|| format!("pivot_root to {}", self.base.display()))?;
        self.base = PathBuf::from("/");
        Ok(())
    }

    /// Unmounts everything mounted in the root and removes the mount points it created, in
    /// reverse order. Best effort: a non-empty created directory (the step wrote into it
    /// after the mount was gone) is legitimate content and stays.
    pub(crate) fn cleanup(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Unmount(rel) => {
                    let _ = self.sys.umount(&self.host(&rel), MntFlags::MNT_DETACH);
                }
                Undo::Remove {
                    path,
                    dir,
                    parent_times,
                } => {
                    let host = self.host(&path);
                    let removed = if dir {
                        fs::remove_dir(&host).is_ok()
                    } else {
                        match fs::symlink_metadata(&host) {
                            Ok(m) if m.is_file() && m.len() == 0 => fs::remove_file(&host).is_ok(),
                            _ => false,
                        }
                    };
                    if let (true, Some((atime, mtime)), Some(parent)) =
                        (removed, parent_times, host.parent())
                    {
                        let _ = utimensat(
                            None,
                            parent,
                            &atime,
                            &mtime,
                            UtimensatFlags::NoFollowSymlink,
                        );
                    }
                }
            }
        }
    }
}

/// Docker's default read-only paths under /proc.
const READONLY_PROC: &[&str] = &["bus", "fs", "irq", "sys", "sysrq-trigger"];
/// Docker's default masked paths under /proc and /sys.
const MASKED_PROC: &[&str] = &[
    "asound",
    "acpi",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];
const MASKED_SYS: &[&str] = &["firmware", "devices/virtual/powercap"];

fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

fn remount_ro(sys: &dyn Syscall, target: &Path) -> Result<(), SetupError> {
    // A bind remount sets the per-mount flags exactly, so keep nosuid etc.
    let current = sys
        .mount_flags(target)
        .ctx(|| format!("statvfs {}", target.display()))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    sys.mount(None, target, None, flags, None)
        .ctx(|| format!("remount {} read-only", target.display()))
}

/// The device nodes a step gets, bound from the host's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn populate_dev(_sys: &dyn Syscall, dev: &Path) -> Result<(), SetupError> {
    for name in DEVICES {
        let p = dev.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&p)
            .ctx(|| format!("create mount point {}", p.display()))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        let p = dev.join(name);
        std::os::unix::fs::symlink(target, &p).ctx(|| format!("create symlink {}", p.display()))?;
    }
    for name in ["pts", "shm", "mqueue"] {
        let p = dev.join(name);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&p)
            .ctx(|| format!("create {}", p.display()))?;
    }
    Ok(())
}

/// Options that are mount(2) flags rather than file system data.
fn flag_option(o: &str) -> Option<MsFlags> {
    Some(match o {
        "ro" => MsFlags::MS_RDONLY,
        "rw" | "defaults" => MsFlags::empty(),
        "nosuid" => MsFlags::MS_NOSUID,
        "nodev" => MsFlags::MS_NODEV,
        "noexec" => MsFlags::MS_NOEXEC,
        "noatime" => MsFlags::MS_NOATIME,
        "relatime" => MsFlags::MS_RELATIME,
        "strictatime" => MsFlags::MS_STRICTATIME,
        _ => return None,
    })
}

/// Mounts `mounts` in order on `target` (an absolute path). A `chdir=<dir>` option makes the
/// init chdir there first, so relative overlay `lowerdir`s stay under the page-size limit.
pub(crate) fn mount_all(
    sys: &dyn Syscall,
    mounts: &[Mount],
    target: &Path,
) -> Result<(), SetupError> {
    for m in mounts {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        let mut bind = m.kind == "bind" || m.kind == "rbind";
        let mut recursive = m.kind == "rbind";
        let mut dir = None;
        for o in &m.options {
            if let Some(f) = flag_option(o) {
                flags |= f;
            } else if o == "bind" {
                bind = true;
            } else if o == "rbind" {
                bind = true;
                recursive = true;
            } else if let Some(d) = o.strip_prefix("chdir=") {
                dir = Some(d);
            } else {
                data.push(o.as_str());
            }
        }
        if let Some(d) = dir {
            sys.chdir(Path::new(d)).ctx(|| format!("chdir to {d}"))?;
        }
        if bind {
            let rec = if recursive {
                MsFlags::MS_REC
            } else {
                MsFlags::empty()
            };
            sys.mount(
                Some(Path::new(&m.source)),
                target,
                None,
                MsFlags::MS_BIND | rec,
                None,
            )
            .ctx(|| format!("bind mount {} on {}", m.source, target.display()))?;
            if !flags.is_empty() {
                sys.mount(
                    None,
                    target,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                    None,
                )
                .ctx(|| format!("remount {}", target.display()))?;
            }
        } else {
            let data = data.join(",");
            sys.mount(
                Some(Path::new(&m.source)),
                target,
                Some(m.kind.as_str()),
                flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .ctx(|| format!("mount {} on {}", m.kind, target.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recorder::{Call, Recorder};

    fn root(base: &Path) -> Root {
        Root {
            sys: Box::new(Recorder::default()),
            base: base.to_path_buf(),
            undo: Vec::new(),
        }
    }

    #[test]
    fn resolve_keeps_symlinks_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        fs::create_dir_all(b.join("real/etc")).unwrap();
        std::os::unix::fs::symlink("/real/etc", b.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../host", b.join("real/escape")).unwrap();
        let r = root(b);
        assert_eq!(
            r.resolve("/etc/hosts").unwrap(),
            PathBuf::from("real/etc/hosts")
        );
        assert_eq!(
            r.resolve("/real/escape/x").unwrap(),
            PathBuf::from("host/x")
        );
        assert_eq!(r.resolve("/../../a/./b").unwrap(), PathBuf::from("a/b"));
        std::os::unix::fs::symlink("loop", b.join("loop")).unwrap();
        assert!(r.resolve("/loop").is_err());
    }

    #[test]
    fn ensure_records_and_cleanup_removes_only_created() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        fs::create_dir_all(b.join("etc")).unwrap();
        fs::write(b.join("etc/hosts"), "existing").unwrap();
        let before = fs::metadata(b.join("etc")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut r = root(b);
        assert_eq!(r.ensure("/etc/hosts", false).unwrap(), b.join("etc/hosts"));
        r.ensure("/etc/resolv.conf", false).unwrap();
        r.ensure("/a/b/c", true).unwrap();
        r.ensure("/keep/me", true).unwrap();
        assert!(b.join("a/b/c").is_dir() && b.join("etc/resolv.conf").is_file());
        fs::write(b.join("keep/content"), "x").unwrap();
        r.cleanup();
        assert_eq!(fs::read_to_string(b.join("etc/hosts")).unwrap(), "existing");
        assert!(!b.join("etc/resolv.conf").exists());
        assert!(!b.join("a").exists());
        assert!(!b.join("keep/me").exists());
        assert!(b.join("keep/content").exists());
        assert_eq!(
            fs::metadata(b.join("etc")).unwrap().modified().unwrap(),
            before
        );
    }

    fn mounts_of(calls: &[Call]) -> Vec<(PathBuf, Option<String>, MsFlags, Option<String>)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount {
                    target,
                    fstype,
                    flags,
                    data,
                    ..
                } => Some((target.clone(), fstype.clone(), *flags, data.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn overlay_options_split_into_flags_data_and_chdir() {
        let rec = Recorder::default();
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "lowerdir=snapshots/2/fs:snapshots/1/fs".into(),
                "ro".into(),
                "chdir=/var/lib/strata".into(),
                "index=off".into(),
            ],
        };
        mount_all(&rec, &[m], Path::new("/t")).unwrap();
        assert_eq!(
            rec.calls(),
            vec![
                Call::Chdir(PathBuf::from("/var/lib/strata")),
                Call::Mount {
                    source: Some(PathBuf::from("overlay")),
                    target: PathBuf::from("/t"),
                    fstype: Some("overlay".into()),
                    flags: MsFlags::MS_RDONLY,
                    data: Some("lowerdir=snapshots/2/fs:snapshots/1/fs,index=off".into()),
                },
            ]
        );
    }

    #[test]
    fn readonly_rbind_is_bind_then_remount() {
        let rec = Recorder::default();
        let m = Mount {
            kind: "bind".into(),
            source: "/snap/fs".into(),
            options: vec!["rbind".into(), "ro".into()],
        };
        mount_all(&rec, &[m], Path::new("/t")).unwrap();
        let mounts = mounts_of(&rec.calls());
        assert_eq!(
            mounts,
            vec![
                (
                    PathBuf::from("/t"),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None
                ),
                (
                    PathBuf::from("/t"),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None
                ),
            ]
        );
    }

    #[test]
    fn specials_are_mounted_and_undone_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        fs::create_dir_all(b.join("etc")).unwrap();
        fs::create_dir_all(b.join("proc")).unwrap();
        let rec = Recorder::default();
        let mut r = Root {
            sys: Box::new(rec.clone()),
            base: b.to_path_buf(),
            undo: Vec::new(),
        };
        r.mount_specials(Path::new("/h/hosts"), Path::new("/h/resolv"))
            .unwrap();
        let calls = rec.calls();
        let mounts = mounts_of(&calls);
        let fstypes: Vec<(String, Option<String>)> = mounts
            .iter()
            .map(|(t, f, _, _)| (t.strip_prefix(b).unwrap().display().to_string(), f.clone()))
            .collect();
        let s = |t: &str, f: Option<&str>| (t.to_string(), f.map(str::to_string));
        assert_eq!(
            fstypes,
            vec![
                s("proc", Some("proc")),
                s("dev", Some("tmpfs")),
                s("dev/null", None),
                s("dev/zero", None),
                s("dev/full", None),
                s("dev/random", None),
                s("dev/urandom", None),
                s("dev/tty", None),
                s("dev/pts", Some("devpts")),
                s("dev/shm", Some("tmpfs")),
                s("dev/mqueue", Some("mqueue")),
                s("sys", Some("sysfs")),
                s("etc/hosts", None),
                s("etc/hosts", None),
                s("etc/resolv.conf", None),
                s("etc/resolv.conf", None),
            ]
        );
        // The read-only remount keeps the mount's other flags.
        assert_eq!(
            mounts[13].2,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        );
        assert_eq!(mounts[11].2 & MsFlags::MS_RDONLY, MsFlags::MS_RDONLY);
        assert_eq!(
            mounts[1].2 & MsFlags::MS_NODEV,
            MsFlags::MS_NODEV,
            "/dev must be nodev"
        );
        assert!(
            b.join("dev/null").is_file(),
            "a mount point for the host's /dev/null"
        );
        assert!(b.join("dev").is_dir() && b.join("sys").is_dir() && b.join("etc/hosts").is_file());

        r.cleanup();
        let umounts: Vec<PathBuf> = rec
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Umount(p) => Some(p.strip_prefix(b).unwrap().to_path_buf()),
                _ => None,
            })
            .collect();
        // Read-only remounts are not separate mounts.
        let mut expected: Vec<PathBuf> = fstypes
            .iter()
            .rev()
            .map(|(t, _)| PathBuf::from(t))
            .collect();
        expected.dedup();
        assert_eq!(umounts, expected);
        // Created mount points are gone; /proc existed and stays. (/dev keeps what would
        // have been written into its tmpfs, which the recorder does not mount.)
        assert!(b.join("proc").is_dir());
        for p in ["sys", "etc/hosts", "etc/resolv.conf"] {
            assert!(!b.join(p).exists(), "{p}");
        }
    }

    #[test]
    fn pivot_switches_base_for_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let mut r = Root {
            sys: Box::new(rec.clone()),
            base: dir.path().to_path_buf(),
            undo: vec![Undo::Unmount(PathBuf::from("proc"))],
        };
        r.pivot().unwrap();
        r.cleanup();
        assert_eq!(
            rec.calls(),
            vec![
                Call::Pivot(dir.path().to_path_buf()),
                Call::Umount(PathBuf::from("/proc")),
            ]
        );
    }
}
