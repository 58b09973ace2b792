//! The sandbox init: `strata __sandbox-init`, freshly exec'd and single-threaded, so forking
//! is safe. Process tree:
//!
//! - outer init (host mount namespace): reads the request from fd 3, unshares the pid, uts,
//!   ipc (and net) namespaces, forks pid 1 (right into the step's cgroup, see `cgroup.rs`),
//!   waits for it and removes its state directory;
//! - pid 1 (own mount namespace): mounts the root and everything in it, pivots, forks the
//!   command, reaps zombies, kills what is left, removes the mount points it created, and
//!   reports the outcome on fd 3;
//! - the command: drops to the user and Docker's capabilities and execs.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chdir, chown, execve, fork, getppid, pipe2, setgid, setgroups, sethostname, setsid, setuid,
    ForkResult, Gid, Pid, Uid,
};

use crate::error::{Context, SetupError};
use crate::rootfs::Root;
use crate::syscall::Linux;
use crate::{caps, process, user, ExtraMount, Network, Report, RunRequest};

/// The socket to the builder: request in, [`Report`] out.
pub(crate) const REPORT_FD: RawFd = 3;
/// Pid of the builder, so the init can tell it died before PR_SET_PDEATHSIG was set.
pub(crate) const PARENT_ENV: &str = "STRATA_SANDBOX_PARENT";
pub(crate) const DEFAULT_HOSTNAME: &str = "buildkitsandbox";

fn report_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 3 is set up by `Sandbox::run` and never closed by the init.
    unsafe { BorrowedFd::borrow_raw(REPORT_FD) }
}

fn send(report: &Report) {
    let Ok(mut line) = serde_json::to_vec(report) else {
        return;
    };
    line.push(b'\n');
    let mut rest = line.as_slice();
    while !rest.is_empty() {
        match nix::unistd::write(report_fd(), rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            // Nobody left to tell.
            Err(_) => return,
        }
    }
}

pub(crate) fn main() -> ! {
    let code = match outer() {
        Ok(code) => code,
        Err(e) => {
            send(&Report::SetupFailed { message: e.chain() });
            1
        }
    };
    std::process::exit(code)
}

fn die_with_parent() -> Result<(), SetupError> {
    // Not dumpable: the step cannot read this process's memory, fds or environment
    // through /proc (as runc's init).
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(Errno::last()).ctx(|| "set not dumpable".into());
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(Errno::last()).ctx(|| "set parent death signal".into());
    }
    Ok(())
}

/// Files of one run on the host, removed by the outer init.
struct State {
    dir: PathBuf,
    root: PathBuf,
    hosts: PathBuf,
    resolv_conf: PathBuf,
    generated: Vec<PathBuf>,
}

impl State {
    fn create(req: &RunRequest, hostname: &str) -> Result<State, SetupError> {
        let template = std::env::temp_dir().join("strata-sandbox-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template)
            .ctx(|| format!("create state directory {}", template.display()))?;
        let mut state = State {
            root: dir.join("root"),
            hosts: dir.join("hosts"),
            resolv_conf: dir.join("resolv.conf"),
            dir,
            generated: Vec::new(),
        };
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&state.root)
            .ctx(|| format!("create {}", state.root.display()))?;
        match &req.hosts_file {
            Some(p) => state.hosts = p.clone(),
            None => {
                let text = format!(
                    "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                );
                state.write_generated(state.hosts.clone(), text.as_bytes())?;
            }
        }
        match &req.resolv_conf {
            Some(p) => state.resolv_conf = p.clone(),
            None => {
                let text = fs::read("/etc/resolv.conf").unwrap_or_default();
                state.write_generated(state.resolv_conf.clone(), &text)?;
            }
        }
        Ok(state)
    }

    fn write_generated(&mut self, path: PathBuf, content: &[u8]) -> Result<(), SetupError> {
        fs::write(&path, content).ctx(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .ctx(|| format!("chmod {}", path.display()))?;
        self.generated.push(path);
        Ok(())
    }

    fn remove(&self) {
        for p in &self.generated {
            let _ = fs::remove_file(p);
        }
        // Never a recursive removal: if a mount ever leaked here, that would delete the image.
        let _ = fs::remove_dir(&self.root);
        let _ = fs::remove_dir(&self.dir);
    }
}

fn read_request() -> Result<RunRequest, SetupError> {
    let flags = fcntl(REPORT_FD, FcntlArg::F_GETFD)
        .ctx(|| "use the request socket on fd 3 (is the init started by Sandbox::run?)".into())?;
    // The command must not inherit the socket, or the builder would wait for its daemons.
    fcntl(
        REPORT_FD,
        FcntlArg::F_SETFD(FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC),
    )
    .ctx(|| "set close-on-exec on fd 3".into())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match nix::unistd::read(REPORT_FD, &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).ctx(|| "read run request".into()),
        }
    }
    serde_json::from_slice(&buf)
        .map_err(|e| SetupError::Message(format!("decode run request: {e}")))
}

fn outer() -> Result<i32, SetupError> {
    die_with_parent()?;
    if let Ok(parent) = std::env::var(PARENT_ENV) {
        if parent != getppid().to_string() {
            return Err(SetupError::Message(
                "builder exited before the sandbox started".into(),
            ));
        }
    }
    let req = read_request()?;
    let hostname = if req.process.hostname.is_empty() {
        DEFAULT_HOSTNAME
    } else {
        req.process.hostname.as_str()
    };
    let state = State::create(&req, hostname)?;
    let cgroup = std::env::var_os(crate::cgroup::CGROUP_ENV).map(PathBuf::from);
    let result = spawn_pid1(&req, &state, hostname, cgroup.as_deref());
    state.remove();
    result
}

fn spawn_pid1(
    req: &RunRequest,
    state: &State,
    hostname: &str,
    cgroup: Option<&Path>,
) -> Result<i32, SetupError> {
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if req.process.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).ctx(|| "unshare namespaces".into())?;
    if req.process.network == Network::None {
        loopback_up()?;
    }
    // Its write end lives only in the outer init: pid 1 sees a hang-up if the outer init died
    // before pid 1 could arm its parent death signal.
    let (alive, alive_w) = pipe2(OFlag::O_CLOEXEC).ctx(|| "create liveness pipe".into())?;
    match fork_into_cgroup(cgroup)? {
        ForkResult::Child => {
            drop(alive_w);
            let mut root = None;
            let report = match pid1(req, state, hostname, alive, &mut root) {
                Ok(report) => report,
                Err(e) => Report::SetupFailed { message: e.chain() },
            };
            if let Some(root) = root.as_mut() {
                root.cleanup();
            }
            send(&report);
            std::process::exit(0)
        }
        ForkResult::Parent { child } => {
            drop(alive);
            let status = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => break Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break Ok(128 + sig as i32),
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => break Err(e).ctx(|| "wait for sandbox pid 1".into()),
                }
            };
            drop(alive_w);
            status
        }
    }
}

/// `clone3`'s arguments (`struct clone_args`, `CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks pid 1, inside the step's cgroup when there is one: created there by
/// `clone3(CLONE_INTO_CGROUP)` (no migration, see `cgroup.rs`), else forked and moved in.
/// A step that cannot join its cgroup still runs; its meter then reads nothing (busy).
fn fork_into_cgroup(cgroup: Option<&Path>) -> Result<ForkResult, SetupError> {
    let dir = cgroup.and_then(|p| {
        nix::fcntl::open(
            p,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
    });
    if let Some(dir) = &dir {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: as fork(2) (no stack given: the child continues on a copy of this one);
        // this process is single-threaded, so no lock is held by a thread the child lacks.
        // Unlike glibc's fork, this does not refresh glibc's cached thread id in the child,
        // which only pthread_kill/raise would use; pid 1 uses neither.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match rc {
            0 => return Ok(ForkResult::Child),
            pid if pid > 0 => {
                return Ok(ForkResult::Parent {
                    child: Pid::from_raw(pid as libc::pid_t),
                })
            }
            // ENOSYS, E2BIG (older kernels): fork and move in below.
            _ => {}
        }
    }
    // SAFETY: this process is single-threaded (a fresh exec that started no threads).
    let forked = unsafe { fork() }.ctx(|| "fork sandbox pid 1".into())?;
    if let (ForkResult::Child, Some(p)) = (&forked, cgroup) {
        let _ = crate::cgroup::join(p);
    }
    Ok(forked)
}

fn loopback_up() -> Result<(), SetupError> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Errno::last()).ctx(|| "open socket to configure lo".into());
    }
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq passed by pointer.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(Errno::last()).ctx(|| "get flags of lo".into());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(Errno::last()).ctx(|| "bring lo up".into());
        }
    }
    Ok(())
}

fn pid1(
    req: &RunRequest,
    state: &State,
    hostname: &str,
    alive: OwnedFd,
    root_slot: &mut Option<Root>,
) -> Result<Report, SetupError> {
    die_with_parent()?;
    let mut pfd = libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready != 0 {
        return Err(SetupError::Message(
            "sandbox init exited before pid 1 started".into(),
        ));
    }
    drop(alive);
    // A mount namespace of pid 1's own (not the outer init's), so pivot_root leaves the
    // outer init on the host root, able to remove the state directory.
    unshare(CloneFlags::CLONE_NEWNS).ctx(|| "unshare mount namespace".into())?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "make / private".into())?;
    umask(Mode::from_bits_truncate(0o022));

    let root = root_slot.insert(Root::mount(Box::new(Linux), &req.rootfs, &state.root)?);
    root.mount_specials(&state.hosts, &state.resolv_conf)?;
    for m in &req.mounts {
        match m {
            ExtraMount::Bind {
                source,
                target,
                readonly,
            } => root.bind(source, target, *readonly)?,
            ExtraMount::Mounts { mounts, target } => root.mount_data(mounts, target)?,
            ExtraMount::Tmpfs { target, size } => root.tmpfs(target, *size)?,
        }
    }
    sethostname(hostname).ctx(|| format!("set hostname {hostname}"))?;
    root.pivot()?;

    let passwd = fs::read_to_string("/etc/passwd").ok();
    let group = fs::read_to_string("/etc/group").ok();
    let user = user::resolve(&req.process.user, passwd.as_deref(), group.as_deref())
        .map_err(SetupError::Message)?;
    let cwd = if req.process.cwd.is_empty() {
        PathBuf::from("/")
    } else {
        Path::new("/").join(&req.process.cwd)
    };
    create_cwd(&cwd, user.uid, user.gid)?;
    let env = process::build_env(&req.process.env, &user.home);
    let arg0 = req.process.args.first().map(String::as_str).unwrap_or("");
    let path = process::lookup(Path::new("/"), arg0, &env).map_err(SetupError::Message)?;
    let exec = Exec {
        path: cstring(path.as_os_str().as_encoded_bytes())?,
        args: req
            .process
            .args
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<_, _>>()?,
        env: env
            .iter()
            .map(|e| cstring(e.as_bytes()))
            .collect::<Result<_, _>>()?,
        cwd,
        user,
        privileged: req.process.privileged,
    };
    run_command(&exec)
}

fn cstring(b: &[u8]) -> Result<CString, SetupError> {
    CString::new(b).map_err(|_| {
        SetupError::Message(format!(
            "invalid argument {:?}: contains a NUL byte",
            String::from_utf8_lossy(b)
        ))
    })
}

/// Creates the working directory's missing components owned by the user.
fn create_cwd(cwd: &Path, uid: u32, gid: u32) -> Result<(), SetupError> {
    let mut missing = Vec::new();
    let mut p = Some(cwd);
    while let Some(dir) = p {
        if fs::symlink_metadata(dir).is_ok() {
            break;
        }
        missing.push(dir);
        p = dir.parent();
    }
    for dir in missing.into_iter().rev() {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .ctx(|| format!("create working directory {}", dir.display()))?;
        chown(dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .ctx(|| format!("chown working directory {}", dir.display()))?;
    }
    Ok(())
}

struct Exec {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    cwd: PathBuf,
    user: user::ExecUser,
    privileged: bool,
}

fn run_command(exec: &Exec) -> Result<Report, SetupError> {
    // Closed by a successful exec; an error message arrives otherwise.
    let (err_read, err_write) = pipe2(OFlag::O_CLOEXEC).ctx(|| "create exec pipe".into())?;
    // SAFETY: pid 1 is single-threaded.
    let child = match unsafe { fork() }.ctx(|| "fork command".into())? {
        ForkResult::Child => {
            drop(err_read);
            let err = exec_command(exec);
            let _ = nix::unistd::write(&err_write, err.chain().as_bytes());
            // SAFETY: leaving the forked child without running pid 1's destructors.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_write);
    let mut msg = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match nix::unistd::read(err_read.as_raw_fd(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => msg.extend_from_slice(&chunk[..n]),
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    if !msg.is_empty() {
        reap_all();
        return Err(SetupError::Message(
            String::from_utf8_lossy(&msg).into_owned(),
        ));
    }
    let report = wait_for(child)?;
    // Background processes of the step die with it, as in a container.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap_all();
    Ok(report)
}

fn wait_for(child: Pid) -> Result<Report, SetupError> {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                return Ok(Report::Exited { code });
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                return Ok(Report::Signaled { signal: sig as i32 });
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e).ctx(|| "wait for command".into()),
        }
    }
}

fn reap_all() {
    loop {
        match waitpid(None, None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Runs in the forked command process; returns only on failure.
fn exec_command(exec: &Exec) -> SetupError {
    match prepare_and_exec(exec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn prepare_and_exec(exec: &Exec) -> Result<std::convert::Infallible, SetupError> {
    setsid().ctx(|| "setsid".into())?;
    // Rust ignores SIGPIPE at startup and ignored signals survive exec; `yes | head` must
    // see the default.
    // SAFETY: installing SIG_DFL has no handler to be unsafe about.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.ctx(|| "reset SIGPIPE".into())?;
    if !exec.privileged {
        caps::limit_bounding_set()?;
    }
    let u = &exec.user;
    let groups: Vec<Gid> = u.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).ctx(|| "set supplementary groups".into())?;
    setgid(Gid::from_raw(u.gid)).ctx(|| format!("set gid {}", u.gid))?;
    setuid(Uid::from_raw(u.uid)).ctx(|| format!("set uid {}", u.uid))?;
    // A privileged step keeps what root has (setuid to non-root clears it anyway).
    if !exec.privileged {
        caps::set_caps(if u.uid == 0 { caps::default_mask() } else { 0 })?;
        // The issue asks for no_new_privs: a step can never gain privileges through a
        // setuid binary or file capabilities. (BuildKit leaves it off, so `sudo` as a
        // non-root USER works there and not here; `--security=insecure` steps keep it off.)
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(SetupError::Message(format!(
                "set no_new_privs: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    chdir(&exec.cwd).ctx(|| format!("chdir to {}", exec.cwd.display()))?;
    umask(Mode::from_bits_truncate(0o022));
    let err = match execve(&exec.path, &exec.args, &exec.env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    // Worded like runc's (Go's lowercase errno strings), e.g. `exec /x: exec format error`.
    Err(SetupError::Message(format!(
        "exec {}: {}",
        exec.path.to_string_lossy(),
        err.desc().to_lowercase()
    )))
}
