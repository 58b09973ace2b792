//! One cgroup v2 per step, so the builder can tell how much CPU a step is using.
//!
//! The scheduler lets a RUN step whose processes are nearly idle (sleeping, waiting on the
//! network) stop counting against the default parallelism bound; to know that, it reads
//! the step's `cpu.stat` `usage_usec`, which every v2 cgroup has without any controller
//! being enabled. So nothing here needs the `cpu` controller, and it works on a hybrid
//! host (the v2 hierarchy mounted at /sys/fs/cgroup/unified next to v1 controllers) as on
//! a pure v2 one (/sys/fs/cgroup).
//!
//! Steps live in `<cgroup2 mount>/strata/<builder pid>-<n>`. The sandbox init learns the
//! path from its environment ([`CGROUP_ENV`]) and creates the step's pid 1 right inside it
//! with `clone3(CLONE_INTO_CGROUP)`, so everything the step runs is inside. (Moving a live
//! process by writing `cgroup.procs` costs an RCU grace period, milliseconds per step on a
//! busy host; that is only the fallback for kernels before 5.7.) The directory is removed
//! after the step (after killing whatever is left in it, when unwinding).
//!
//! Without a writable cgroup2 mount there is no meter: the step then simply never reports
//! idle and the scheduler counts it as busy, i.e. the default bound degrades to a hard
//! bound on running steps (honest, never over-subscribing).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Directory under the cgroup2 mount holding the steps' cgroups.
const PARENT: &str = "strata";
/// Environment variable giving the sandbox init the step's cgroup directory.
pub(crate) const CGROUP_ENV: &str = "STRATA_SANDBOX_CGROUP";

/// The cumulative CPU time of one step's cgroup. Cheap to clone; reading it after the
/// step ended gives `None`.
#[derive(Clone, Debug)]
pub struct CpuMeter {
    dir: Arc<PathBuf>,
}

impl CpuMeter {
    /// CPU time (user + system) the step's processes have used so far; `None` while no
    /// process is in the cgroup (before pid 1 exists, after the step, or if it could not
    /// join), so an empty cgroup's zero never passes for an idle step.
    pub fn usage(&self) -> Option<Duration> {
        let events = fs::read_to_string(self.dir.join("cgroup.events")).ok()?;
        if !events.lines().any(|l| l == "populated 1") {
            return None;
        }
        let text = fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        parse_usage_usec(&text).map(Duration::from_micros)
    }
}

/// Moves the calling process into the cgroup `dir` (the fallback when `clone3` cannot
/// create a process there directly).
pub(crate) fn join(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), "0")
}

fn parse_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// The cgroup2 mount point, from /proc/self/mountinfo (field 5 is the mount point; the
/// filesystem type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        // Mountinfo escapes spaces and the like as octal (`\040`).
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `<cgroup2 mount>/strata`, created once per process; `None` when there is no writable
/// cgroup2 hierarchy (no meter, see the module doc).
fn parent_dir() -> Option<&'static Path> {
    static PARENT_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    PARENT_DIR
        .get_or_init(|| {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
            let dir = cgroup2_mount(&mountinfo)?.join(PARENT);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => remove_stale(&dir),
                Err(_) => return None,
            }
            Some(dir)
        })
        .as_deref()
}

/// Removes the empty cgroups of builders that are gone (killed before they could remove
/// their own); a cgroup still holding processes refuses rmdir and stays.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

/// Kills the processes of every step this process is running and removes their cgroups
/// (on cancel, just before the builder exits: the steps would die with it anyway, through
/// the parent-death signal, but this way no empty cgroup is left for the next run to reap).
pub fn kill_running_steps() {
    let Some(parent) = parent_dir() else {
        return;
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let prefix = format!("{}-", std::process::id());
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            drop(StepCgroup { path: entry.path() });
        }
    }
}

/// Whether RUN steps can run in cgroups of their own here (a writable cgroup2 hierarchy):
/// without it, steps are not metered and the default parallelism is a plain bound.
pub fn cpu_metering_available() -> bool {
    StepCgroup::create().is_some()
}

/// The cgroup of one running step; dropping it kills what is left inside and removes it.
pub(crate) struct StepCgroup {
    path: PathBuf,
}

impl StepCgroup {
    /// A fresh, empty cgroup for one step, or `None` without a writable cgroup2 mount.
    pub(crate) fn create() -> Option<StepCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let parent = parent_dir()?;
        let path = parent.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&path) {
            Ok(()) => Some(StepCgroup { path }),
            // A builder that died with the same pid left it behind: reuse it only if empty.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_dir(&path).ok()?;
                fs::create_dir(&path).ok()?;
                Some(StepCgroup { path })
            }
            Err(_) => None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn meter(&self) -> CpuMeter {
        CpuMeter {
            dir: Arc::new(self.path.clone()),
        }
    }

    /// Kills every process in the cgroup: `cgroup.kill` (Linux 5.14+), else one by one.
    fn kill_all(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) with plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        // Normally the init has reaped everything by now and rmdir succeeds at once. When
        // `run` unwinds, killed processes leave the cgroup asynchronously: kill what is
        // left and retry for a moment (a cgroup with processes refuses rmdir, EBUSY).
        if fs::remove_dir(&self.path).is_ok() {
            return;
        }
        self.kill_all();
        for _ in 0..100 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_pure_hosts() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        let escaped = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/mnt/cg two")));
    }

    #[test]
    fn reads_usage_usec() {
        let stat = "usage_usec 423497\nuser_usec 400000\nsystem_usec 23497\n";
        assert_eq!(parse_usage_usec(stat), Some(423497));
        assert_eq!(parse_usage_usec("user_usec 1\n"), None);
    }
}
