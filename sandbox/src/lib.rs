//! Runs one RUN step in fresh Linux namespaces over an overlay root.
//!
//! The caller (`strata`) spawns itself again as `strata __sandbox-init` ([`INIT_ARG`]); that
//! fresh, single-threaded process unshares the namespaces, forks the step's pid 1, mounts
//! the root filesystem, /proc, /dev, /etc/hosts, /etc/resolv.conf and the `RUN --mount`s,
//! `pivot_root`s into it and execs the command. Nothing is forked from the multi-threaded
//! builder itself.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use strata_snapshotter::Mount;

/// argv[1] that makes `strata` act as the sandbox init ([`init_main`]).
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
    /// Host files bind-mounted over /etc/hosts and /etc/resolv.conf; generated when `None`.
    pub hosts_file: Option<PathBuf>,
    pub resolv_conf: Option<PathBuf>,
}

/// Which stream a chunk of step output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

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

/// Runs RUN steps by re-executing `init_exe` as the sandbox init.
pub struct Sandbox {
    #[allow(dead_code)]
    init_exe: PathBuf,
}

impl Sandbox {
    /// `init_exe` is a binary whose `main` calls [`init_main`] when argv[1] is [`INIT_ARG`]
    /// (normally `/proc/self/exe` of `strata`).
    pub fn new(init_exe: PathBuf) -> Self {
        Sandbox { init_exe }
    }

    /// Runs the step and streams its output to `output`. Ok only when it exited 0; every
    /// mount it made is gone when this returns, whatever happened.
    pub fn run(
        &self,
        _req: &RunRequest,
        _output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<(), Error> {
        todo!()
    }
}

/// Entry point of `strata __sandbox-init`: never returns.
pub fn init_main() -> ! {
    todo!()
}
