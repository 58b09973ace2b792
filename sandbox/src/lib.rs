//! Runs one RUN step in fresh Linux namespaces over an overlay root.
//!
//! The caller (`strata`) spawns itself again as `strata __sandbox-init` ([`INIT_ARG`]); that
//! fresh, single-threaded process unshares the namespaces, forks the step's pid 1, mounts
//! the root filesystem, /proc, /dev, /etc/hosts, /etc/resolv.conf and the `RUN --mount`s,
//! `pivot_root`s into it and execs the command. Nothing is forked from the multi-threaded
//! builder itself.
//!
//! The request goes to the init as JSON over a socket on its fd 3, which then carries one
//! JSON report back (exit code, signal, or a setup error's text). Every mount lives in a
//! mount namespace of the sandbox's own, and the init dies with the builder (parent death
//! signal), so no mount outlives a step even when the builder is killed. Mount points the
//! sandbox had to create in the root are removed after the step, with the parent
//! directory's times restored, so they never reach the layer (a parent directory overlayfs
//! copied up stays in the upper dir, unchanged from below).
//!
//! [`Sandbox::run_metered`] also puts the step in a cgroup v2 of its own and hands the
//! caller a [`CpuMeter`] of it, so the scheduler can tell a sleeping step from a busy one
//! (see `cgroup.rs`).

mod caps;
mod cgroup;
mod error;
mod init;
mod process;
mod rootfs;
mod syscall;
mod user;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use strata_snapshotter::Mount;

pub use cgroup::{cpu_metering_available, kill_running_steps, CpuMeter};
pub use process::DEFAULT_PATH;

/// `argv[1]` that makes `strata` act as the sandbox init ([`init_main`]).
pub const INIT_ARG: &str = "__sandbox-init";

pub use strata_dag::Network;

/// What the step runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside the root; created (owned by the user) if missing.
    pub cwd: String,
    /// `USER` as written: `name`, `uid`, `name:group`, `uid:gid`; empty = root. Resolved
    /// against the root's /etc/passwd and /etc/group, with supplementary groups.
    pub user: String,
    pub hostname: String,
    pub network: Network,
    /// `RUN --security=insecure`: keep every capability instead of Docker's default set.
    #[serde(default)]
    pub privileged: bool,
}

/// An extra mount inside the root (`RUN --mount`), already prepared by the caller.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ExtraMount {
    /// Bind `source` (a host path) at `target`.
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
    },
    /// Mounts described as data (e.g. an overlay for a rw bind whose writes are discarded).
    Mounts {
        mounts: Vec<Mount>,
        target: String,
    },
    Tmpfs {
        target: String,
        size: Option<u64>,
    },
}

/// One run of a step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// Mounts that make the root filesystem (the active snapshot's mounts).
    pub rootfs: Vec<Mount>,
    pub process: ProcessSpec,
    pub mounts: Vec<ExtraMount>,
    /// Host files bind-mounted (read-only) over /etc/hosts and /etc/resolv.conf; generated
    /// when `None` (`127.0.0.1 localhost <hostname>`, a copy of the host's resolv.conf).
    pub hosts_file: Option<PathBuf>,
    pub resolv_conf: Option<PathBuf>,
}

/// Which stream a chunk of step output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Errors of [`Sandbox::run`]. A command killed by a signal is `Exit { code: 128 + signal }`
/// (as runc and BuildKit report it); `Signal` means the sandbox init itself was killed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("start sandbox: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("process did not complete successfully: exit code: {code}")]
    Exit { code: i32 },
    #[error("process killed by signal {signal}")]
    Signal { signal: i32 },
}

/// What the init reports on its socket, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    Exited { code: i32 },
    Signaled { signal: i32 },
    SetupFailed { message: String },
}

/// Runs RUN steps by re-executing `init_exe` as the sandbox init.
pub struct Sandbox {
    init_exe: PathBuf,
}

impl Sandbox {
    /// `init_exe` is a binary whose `main` calls [`init_main`] when `argv[1]` is [`INIT_ARG`]
    /// (normally `/proc/self/exe` of `strata`).
    pub fn new(init_exe: PathBuf) -> Self {
        Sandbox { init_exe }
    }

    /// Runs the step and streams its output to `output`. Ok only when it exited 0; every
    /// mount it made is gone when this returns, whatever happened.
    ///
    /// Mounts live in a mount namespace owned by the sandbox's processes, which die with the
    /// builder (parent death signal), so even a killed builder leaves no mount behind.
    pub fn run(
        &self,
        req: &RunRequest,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<(), Error> {
        self.run_metered(req, output, &mut |_| {})
    }

    /// [`Sandbox::run`], in a cgroup of the step's own: `started` gets the meter of the
    /// step's CPU time once the init is inside, before the command runs. Without a
    /// writable cgroup2 hierarchy the step runs uncgrouped and `started` is never called.
    pub fn run_metered(
        &self,
        req: &RunRequest,
        output: &mut dyn FnMut(Stream, &[u8]),
        started: &mut dyn FnMut(CpuMeter),
    ) -> Result<(), Error> {
        // Declared before the init's handle, so it is dropped (emptied, removed) after
        // the init has been killed and reaped.
        let cgroup = cgroup::StepCgroup::create();
        let request =
            serde_json::to_vec(req).map_err(|e| Error::Spawn(std::io::Error::other(e)))?;
        let (mut sock, child_sock) = UnixStream::pair().map_err(Error::Spawn)?;
        let child_fd = child_sock.as_raw_fd();
        let mut cmd = Command::new(&self.init_exe);
        // The builder's environment (maybe credentials) has no business in the sandbox.
        cmd.arg(INIT_ARG)
            .env_clear()
            .env(init::PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == init::REPORT_FD {
                    // dup2 onto itself keeps close-on-exec; clear it instead.
                    if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, init::REPORT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(tmp) = std::env::var_os("TMPDIR") {
            cmd.env("TMPDIR", tmp);
        }
        if let Some(cg) = &cgroup {
            cmd.env(cgroup::CGROUP_ENV, cg.path());
        }
        let child = cmd.spawn().map_err(Error::Spawn)?;
        drop(child_sock);
        let mut child = KillOnDrop(Some(child));
        // The init creates the step's pid 1 inside the cgroup; until then (and if that
        // failed) the meter reads nothing, which the scheduler takes as busy.
        if let Some(cg) = &cgroup {
            started(cg.meter());
        }
        // A failed write means the init is gone; its exit status tells why.
        let _ = sock
            .write_all(&request)
            .and_then(|()| sock.shutdown(std::net::Shutdown::Write));

        let (stdout, stderr) = match child.0.as_mut() {
            Some(c) => (c.stdout.take(), c.stderr.take()),
            None => (None, None),
        };
        let reports = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>)>();
            if let Some(out) = stdout {
                let tx = tx.clone();
                scope.spawn(move || pump(out, Stream::Stdout, tx));
            }
            if let Some(err) = stderr {
                let tx = tx.clone();
                scope.spawn(move || pump(err, Stream::Stderr, tx));
            }
            drop(tx);
            let reports = scope.spawn(move || {
                let mut text = String::new();
                let _ = sock.read_to_string(&mut text);
                text
            });
            for (stream, chunk) in rx {
                output(stream, &chunk);
            }
            reports.join().unwrap_or_default()
        });
        let status = child.wait().map_err(Error::Spawn)?;
        let report = reports
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Report>(l).ok());
        match report {
            Some(Report::Exited { code: 0 }) => Ok(()),
            Some(Report::Exited { code }) => Err(Error::Exit { code }),
            Some(Report::Signaled { signal }) => Err(Error::Exit { code: 128 + signal }),
            Some(Report::SetupFailed { message }) => Err(Error::Setup(message)),
            None => match status.signal() {
                Some(signal) => Err(Error::Signal { signal }),
                None => Err(Error::Setup(format!(
                    "sandbox init exited with status {} without a report",
                    status.code().unwrap_or(-1)
                ))),
            },
        }
    }
}

/// Kills and reaps the init if `run` unwinds before waiting for it.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.0.take() {
            Some(mut c) => c.wait(),
            None => Err(std::io::Error::other("sandbox init already reaped")),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pump(mut from: impl Read, stream: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Entry point of `strata __sandbox-init`: never returns.
pub fn init_main() -> ! {
    init::main()
}
