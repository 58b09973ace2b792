//! `RUN --mount`s made ready for the sandbox: snapshot and context binds, persistent cache
//! directories, tmpfs, secrets and the ssh agent socket. Everything prepared for a step is
//! undone when its [`PreparedMounts`] is dropped (on success, error and unwinding alike).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use strata_dag::{
    CopyAction, Definition, ExecMount, ExecMountKind, ExecOp, FileAction, FileOp, Op,
};
use strata_frontend::dockerignore::PatternMatcher;
use strata_sandbox::ExtraMount;
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::{Mount, OverlaySnapshotter, Snapshotter};

use crate::fileop::{apply_file_op, SourceRoot};
use crate::Ref;

/// The entitlement `RUN --security=insecure` needs.
pub const INSECURE_ENTITLEMENT: &str = "security.insecure";

/// What the client gives RUN steps besides the graph: never part of any cache key.
#[derive(Clone, Debug, Default)]
pub struct RunEnv {
    /// `--secret id=...`: id -> content.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// `--ssh id=socket`: id -> agent socket on the host.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--allow security.insecure`.
    pub allow_insecure: bool,
    /// Where cache mounts live (`<store>/cache-mounts`); derived from the mounts dir when
    /// `None`.
    pub cache_mounts_dir: Option<PathBuf>,
    /// Proxy variables given as build args (`HTTP_PROXY=...`), added to every RUN's
    /// environment unless the step sets them; outside the op, so they change neither the
    /// cache key nor the history (BuildKit's `llb.WithProxy`).
    pub proxy_env: Vec<(String, String)>,
}

/// Refuses a definition that needs an entitlement the build was not given, before anything
/// runs (as BuildKit checks at load time).
pub fn check_entitlements(def: &Definition, env: &RunEnv) -> Result<(), String> {
    for node in &def.nodes {
        if let Op::Exec(e) = &node.op {
            if e.insecure && !env.allow_insecure {
                return Err(format!("entitlement {INSECURE_ENTITLEMENT} is not allowed"));
            }
        }
    }
    Ok(())
}

/// The mounts of one step, ready for the sandbox, and what to undo afterwards.
pub(crate) struct PreparedMounts {
    pub mounts: Vec<ExtraMount>,
    /// `KEY=value` entries of env secrets.
    pub env: Vec<String>,
    snapshotter: Arc<OverlaySnapshotter>,
    guards: Vec<MountGuard>,
    snapshots: Vec<String>,
    /// Empty mount point directories to remove.
    dirs: Vec<PathBuf>,
    /// Secret directories to remove with their content.
    trees: Vec<PathBuf>,
    _locks: Vec<Flock<fs::File>>,
}

impl PreparedMounts {
    /// Nothing prepared yet; what is added later is undone when this is dropped.
    pub(crate) fn new(snapshotter: Arc<OverlaySnapshotter>) -> Self {
        PreparedMounts {
            mounts: Vec::new(),
            env: Vec::new(),
            snapshotter,
            guards: Vec::new(),
            snapshots: Vec::new(),
            dirs: Vec::new(),
            trees: Vec::new(),
            _locks: Vec::new(),
        }
    }
}

impl Drop for PreparedMounts {
    fn drop(&mut self) {
        // Unmount before removing what was mounted; snapshots after their mounts.
        self.guards.clear();
        for s in self.snapshots.drain(..) {
            let _ = self.snapshotter.remove(&s);
        }
        for d in self.dirs.drain(..).rev() {
            let _ = fs::remove_dir(&d);
        }
        for t in self.trees.drain(..) {
            let _ = fs::remove_dir_all(&t);
        }
    }
}

/// Paths and stores a step's mounts are made from.
pub(crate) struct MountContext<'a> {
    pub snapshotter: &'a Arc<OverlaySnapshotter>,
    pub mounts_dir: &'a Path,
    pub run_env: &'a RunEnv,
    pub temp_key: &'a dyn Fn(&str) -> String,
    /// The context's `.dockerignore` rules: ignored files must not be visible to a step.
    pub ignore: Option<&'a PatternMatcher>,
}

impl MountContext<'_> {
    fn cache_root(&self) -> PathBuf {
        match &self.run_env.cache_mounts_dir {
            Some(d) => d.clone(),
            // mounts_dir is <store>/mounts/<pid>.
            None => self
                .mounts_dir
                .parent()
                .and_then(Path::parent)
                .unwrap_or(self.mounts_dir)
                .join("cache-mounts"),
        }
    }

    /// Prepares every mount of `exec` over `inputs`.
    pub(crate) fn prepare(&self, exec: &ExecOp, inputs: &[Ref]) -> Result<PreparedMounts, String> {
        let mut p = PreparedMounts::new(self.snapshotter.clone());
        for m in &exec.mounts {
            self.prepare_one(m, inputs, &mut p)?;
        }
        Ok(p)
    }

    fn prepare_one(
        &self,
        m: &ExecMount,
        inputs: &[Ref],
        p: &mut PreparedMounts,
    ) -> Result<(), String> {
        let target = m.target.clone();
        match &m.kind {
            ExecMountKind::Tmpfs { size } => {
                p.mounts.push(ExtraMount::Tmpfs {
                    target,
                    size: *size,
                });
            }
            ExecMountKind::Bind {
                input,
                source,
                readwrite,
            } => {
                let root = match input {
                    None => self.empty_dir(p)?,
                    Some(i) => self.input_root(inputs, *i, *readwrite, p)?,
                };
                let src = resolve_in_root(&root, source)?;
                if fs::symlink_metadata(&src).is_err() {
                    return Err(format!("mount {target}: source {source:?}: not found"));
                }
                p.mounts.push(ExtraMount::Bind {
                    source: src,
                    target,
                    readonly: !*readwrite,
                });
            }
            ExecMountKind::Cache {
                id,
                sharing,
                mode,
                uid,
                gid,
                readonly,
                from,
                source,
            } => {
                let seed = match from {
                    Some(i) => Some((self.input_root(inputs, *i, false, p)?, source.clone())),
                    None => None,
                };
                let dir = self.cache_dir(id, sharing, *mode, *uid, *gid, seed, p)?;
                p.mounts.push(ExtraMount::Bind {
                    source: dir,
                    target,
                    readonly: *readonly,
                });
            }
            ExecMountKind::Secret {
                id,
                required,
                mode,
                uid,
                gid,
                env,
            } => {
                let Some(data) = self.run_env.secrets.get(id) else {
                    if *required {
                        return Err(format!("secret {id}: not found"));
                    }
                    return Ok(());
                };
                if let Some(name) = env {
                    let value = String::from_utf8(data.clone())
                        .map_err(|_| format!("secret {id} as env {name}: not valid utf-8"))?;
                    p.env.push(format!("{name}={value}"));
                }
                if !target.is_empty() {
                    let file = self.secret_file(id, data, *mode, *uid, *gid, p)?;
                    p.mounts.push(ExtraMount::Bind {
                        source: file,
                        target,
                        readonly: true,
                    });
                }
            }
            ExecMountKind::Ssh { id, required, .. } => {
                let Some(sock) = self.run_env.ssh.get(id) else {
                    if *required {
                        return Err(format!("no SSH key {id:?} forwarded from the client"));
                    }
                    return Ok(());
                };
                p.mounts.push(ExtraMount::Bind {
                    source: sock.clone(),
                    target,
                    readonly: false,
                });
            }
        }
        Ok(())
    }

    fn new_dir(&self, prefix: &str, p: &mut PreparedMounts) -> Result<PathBuf, String> {
        let dir = self.mounts_dir.join((self.temp_key)(prefix));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("create mount point {}: {e}", dir.display()))?;
        p.dirs.push(dir.clone());
        Ok(dir)
    }

    fn empty_dir(&self, p: &mut PreparedMounts) -> Result<PathBuf, String> {
        let dir = self.new_dir("empty", p)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// The host directory holding input `i`: a read-only view of a snapshot, or (when
    /// `writable`) a throwaway active snapshot whose writes are discarded; the context
    /// itself, or an overlay on it when writable.
    pub(crate) fn input_root(
        &self,
        inputs: &[Ref],
        i: u32,
        writable: bool,
        p: &mut PreparedMounts,
    ) -> Result<PathBuf, String> {
        let mounts: Vec<Mount> = match inputs.get(i as usize) {
            None => return Err(format!("mount reads missing input {i}")),
            Some(Ref::Local(dir)) if !writable && self.ignore.is_none() => return Ok(dir.clone()),
            Some(Ref::Local(dir)) => {
                // An overlay on the context: its upper dir takes the writes (discarded with
                // it) and hides `.dockerignore`d entries behind whiteouts, so nothing is
                // copied.
                let scratch = self.new_dir("rw", p)?;
                let (upper, work) = (scratch.join("upper"), scratch.join("work"));
                for d in [&upper, &work] {
                    fs::create_dir(d).map_err(|e| format!("create {}: {e}", d.display()))?;
                }
                p.trees.push(scratch);
                let mut made = vec![PathBuf::new()];
                if let Some(m) = self.ignore {
                    whiteout_ignored(dir, &upper, "", m, &mut made)
                        .map_err(|e| format!("filter build context for mount: {e}"))?;
                }
                // Last, deepest first: creating entries in them changed their times.
                for rel in made.iter().rev() {
                    copy_dir_meta(&dir.join(rel), &upper.join(rel))
                        .map_err(|e| format!("prepare context mount: {e}"))?;
                }
                vec![Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options: vec![
                        format!("lowerdir={}", dir.display()),
                        format!("upperdir={}", upper.display()),
                        format!("workdir={}", work.display()),
                    ],
                }]
            }
            Some(Ref::Scratch) if !writable => return self.empty_dir(p),
            Some(r) => {
                let parent = r.snapshot_name().unwrap_or_default().to_string();
                let key = (self.temp_key)(if writable { "bind-rw" } else { "bind" });
                let mounts = if writable {
                    self.snapshotter.prepare(&key, &parent)
                } else {
                    self.snapshotter.view(&key, &parent)
                }
                .map_err(|e| format!("prepare mount snapshot: {e}"))?;
                p.snapshots.push(key);
                mounts
            }
        };
        let target = self.new_dir("mnt", p)?;
        let guard =
            MountGuard::mount(&mounts, &target).map_err(|e| format!("mount input {i}: {e}"))?;
        p.guards.push(guard);
        Ok(target)
    }

    #[allow(clippy::too_many_arguments)]
    fn cache_dir(
        &self,
        id: &str,
        sharing: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        seed: Option<(PathBuf, String)>,
        p: &mut PreparedMounts,
    ) -> Result<PathBuf, String> {
        let base = self
            .cache_root()
            .join(hex::encode(Sha256::digest(id.as_bytes())));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| format!("create cache mount {id}: {e}"))?;
        let lock = |name: &str, arg: FlockArg| -> Result<Option<Flock<fs::File>>, String> {
            let path = base.join(format!("{name}.lock"));
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("open cache lock {}: {e}", path.display()))?;
            match Flock::lock(file, arg) {
                Ok(l) => Ok(Some(l)),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
                Err((_, e)) => Err(format!("lock cache mount {id}: {e}")),
            }
        };
        let name = match sharing {
            "locked" => {
                // Held until the step is done: other users of the id wait here.
                if let Some(l) = lock("data", FlockArg::LockExclusive)? {
                    p._locks.push(l);
                }
                "data".to_string()
            }
            "private" => {
                // The first directory nobody else holds; a new one when all are busy.
                let mut n = 0usize;
                loop {
                    let name = if n == 0 {
                        "data".to_string()
                    } else {
                        format!("data-{n}")
                    };
                    if let Some(l) = lock(&name, FlockArg::LockExclusiveNonblock)? {
                        p._locks.push(l);
                        break name;
                    }
                    n += 1;
                }
            }
            _ => "data".to_string(),
        };
        let dir = base.join(&name);
        if fs::symlink_metadata(&dir).is_err() {
            // Made complete under a temporary name, then renamed: a concurrent user sees
            // either nothing or the whole seeded directory.
            let tmp = base.join((self.temp_key)("new"));
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| format!("create cache mount {id}: {e}"))?;
            let made = (|| {
                if let Some((root, source)) = &seed {
                    copy_tree(root, source, &tmp)
                        .map_err(|e| format!("seed cache mount {id}: {e}"))?;
                }
                nix::unistd::chown(
                    &tmp,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(|e| format!("chown cache mount {id}: {e}"))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| format!("chmod cache mount {id}: {e}"))?;
                fs::rename(&tmp, &dir).or_else(|e| {
                    // Another build made it first: use theirs.
                    if dir.is_dir() {
                        Ok(())
                    } else {
                        Err(format!("create cache mount {id}: {e}"))
                    }
                })
            })();
            if fs::symlink_metadata(&tmp).is_ok() {
                let _ = fs::remove_dir_all(&tmp);
            }
            made?;
        }
        Ok(dir)
    }

    fn secret_file(
        &self,
        id: &str,
        data: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        p: &mut PreparedMounts,
    ) -> Result<PathBuf, String> {
        let dir = secrets_base().join((self.temp_key)(SECRET_PREFIX));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("create secret dir {}: {e}", dir.display()))?;
        p.trees.push(dir.clone());
        let file = dir.join("secret");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, data))
            .map_err(|e| format!("write secret {id}: {e}"))?;
        nix::unistd::chown(
            &file,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| format!("chown secret {id}: {e}"))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| format!("chmod secret {id}: {e}"))?;
        Ok(file)
    }
}

/// Hides the entries of `ctx` (below `rel`) that `.dockerignore` excludes by whiteouts in
/// `upper`; excluded directories that may hold re-included entries are entered instead.
fn whiteout_ignored(
    ctx: &Path,
    upper: &Path,
    rel: &str,
    m: &PatternMatcher,
    made: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let dir = ctx.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let child = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = entry.file_type()?.is_dir();
        let ignored = m.matches_or_parent_matches(&child);
        if ignored && !(is_dir && m.may_match_below(&child)) {
            ensure_upper_parent(upper, rel, made)?;
            // An overlay whiteout: a 0/0 character device.
            nix::sys::stat::mknod(
                &upper.join(&child),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(std::io::Error::from)?;
        } else if is_dir {
            whiteout_ignored(ctx, upper, &child, m, made)?;
        }
    }
    Ok(())
}

/// Creates `rel` and its parents in `upper`, recording them in `made` (parents first) so
/// that they get the context directories' owner, mode and times once filled.
fn ensure_upper_parent(upper: &Path, rel: &str, made: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if rel.is_empty() {
        return Ok(());
    }
    let mut sofar = PathBuf::new();
    for part in rel.split('/') {
        sofar.push(part);
        let target = upper.join(&sofar);
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        fs::create_dir(&target)?;
        made.push(sofar.clone());
    }
    Ok(())
}

/// Gives `dst` the owner, mode and times of `src`.
fn copy_dir_meta(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(src)?;
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let atime = nix::sys::time::TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(
        None,
        dst,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// Name prefix of the per-step secret directories (`<prefix>-<pid>-...`).
const SECRET_PREFIX: &str = "strata-secret";

/// Where secret files are written: outside the store, preferably in memory.
fn secrets_base() -> PathBuf {
    ["/dev/shm", "/run"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Removes the secret directories of strata processes that are gone (a SIGKILL'd build
/// cannot remove its own). Returns how many were removed.
pub fn clean_stale_secrets() -> usize {
    let Ok(entries) = fs::read_dir(secrets_base()) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SECRET_PREFIX))
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The copy a bind mount of `src` of input `src_input` amounts to: its content (when a
/// directory) to `/`. The worker checksums this same action for a mount of the context, so
/// the cache key covers exactly what the mount exposes.
pub(crate) fn mount_copy_action(src_input: u32, src: &str) -> CopyAction {
    CopyAction {
        src_input,
        src: src.to_string(),
        dest: "/".into(),
        owner: None,
        mode: None,
        follow_symlinks: true,
        dir_contents_only: true,
        allow_wildcard: false,
        allow_empty_wildcard: false,
        create_dest_path: true,
        attempt_unpack: false,
        exclude: vec![],
    }
}

/// Copies `source` of `root` (its content, when a directory) into the directory `dest`.
fn copy_tree(root: &Path, source: &str, dest: &Path) -> Result<(), String> {
    let src = if source.is_empty() { "/" } else { source };
    let op = FileOp {
        base_input: None,
        actions: vec![FileAction::Copy(mount_copy_action(0, src))],
    };
    let sources = [Some(SourceRoot {
        path: root,
        ignore: None,
        is_context: false,
    })];
    apply_file_op(dest, &op, &sources).map_err(|e| e.to_string())
}

/// `path` inside `root`, symlinks resolved without leaving `root`, so a hostile source tree
/// cannot point a bind mount at the host.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    const MAX_LINKS: usize = 40;
    let mut pending: Vec<OsString> = components(Path::new(path));
    pending.reverse();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&c);
        let host = root.join(&next);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(format!("resolve {path}: too many levels of symbolic links"));
                }
                let target = fs::read_link(&host).map_err(|e| format!("read link {path}: {e}"))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved = next,
        }
    }
    Ok(root.join(resolved))
}

fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        snapshotter: Arc<OverlaySnapshotter>,
        mounts_dir: PathBuf,
        run_env: RunEnv,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let snapshotter =
                Arc::new(OverlaySnapshotter::open(&dir.path().join("snapshots")).unwrap());
            let run_env = RunEnv {
                cache_mounts_dir: Some(dir.path().join("cache-mounts")),
                ..Default::default()
            };
            Fixture {
                mounts_dir: dir.path().join("mounts"),
                _dir: dir,
                snapshotter,
                run_env,
            }
        }

        fn ctx(&self) -> MountContext<'_> {
            MountContext {
                snapshotter: &self.snapshotter,
                mounts_dir: &self.mounts_dir,
                run_env: &self.run_env,
                temp_key: &key,
                ignore: None,
            }
        }

        fn cache(&self, sharing: &str) -> (PreparedMounts, PathBuf) {
            let exec = ExecOp {
                mounts: vec![ExecMount {
                    target: "/c".into(),
                    kind: ExecMountKind::Cache {
                        id: "the-id".into(),
                        sharing: sharing.into(),
                        mode: 0o750,
                        uid: 1000,
                        gid: 1001,
                        readonly: false,
                        from: None,
                        source: String::new(),
                    },
                }],
                ..Default::default()
            };
            let p = self.ctx().prepare(&exec, &[]).unwrap();
            let dir = match &p.mounts[0] {
                ExtraMount::Bind { source, .. } => source.clone(),
                other => panic!("{other:?}"),
            };
            (p, dir)
        }
    }

    #[test]
    fn cache_dirs_get_their_owner_and_mode_and_persist() {
        use std::os::unix::fs::MetadataExt;
        let f = Fixture::new();
        let (p, dir) = f.cache("shared");
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1000, 1001, 0o750)
        );
        fs::write(dir.join("kept"), "x").unwrap();
        drop(p);
        let (_p2, again) = f.cache("shared");
        assert_eq!(again, dir);
        assert!(again.join("kept").exists());
        // Shared users share.
        let (_p3, third) = f.cache("shared");
        assert_eq!(third, dir);
    }

    #[test]
    fn private_cache_users_get_separate_dirs_while_busy() {
        let f = Fixture::new();
        let (first, a) = f.cache("private");
        let (_second, b) = f.cache("private");
        assert_ne!(a, b);
        drop(first);
        let (_third, c) = f.cache("private");
        assert_eq!(c, a, "a released private dir is reused");
    }

    #[test]
    fn locked_cache_waits_for_the_holder() {
        let f = Fixture::new();
        let (held, _) = f.cache("locked");
        let released = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let (_p, _) = f.cache("locked");
                released.load(std::sync::atomic::Ordering::SeqCst)
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            released.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(held);
            assert!(waiter.join().unwrap(), "got the lock while it was held");
        });
    }

    #[test]
    fn missing_secrets_fail_only_when_required() {
        let f = Fixture::new();
        let secret = |required: bool| ExecOp {
            mounts: vec![ExecMount {
                target: "/run/secrets/s".into(),
                kind: ExecMountKind::Secret {
                    id: "s".into(),
                    required,
                    mode: 0o400,
                    uid: 0,
                    gid: 0,
                    env: None,
                },
            }],
            ..Default::default()
        };
        let err = f.ctx().prepare(&secret(true), &[]).err().unwrap();
        assert_eq!(err, "secret s: not found");
        let p = f.ctx().prepare(&secret(false), &[]).unwrap();
        assert!(p.mounts.is_empty());
    }

    #[test]
    fn secret_files_are_removed_with_the_step() {
        let mut f = Fixture::new();
        f.run_env.secrets.insert("s".into(), b"value".to_vec());
        let exec = ExecOp {
            mounts: vec![ExecMount {
                target: "/run/secrets/s".into(),
                kind: ExecMountKind::Secret {
                    id: "s".into(),
                    required: true,
                    mode: 0o440,
                    uid: 0,
                    gid: 0,
                    env: Some("S".into()),
                },
            }],
            ..Default::default()
        };
        let p = f.ctx().prepare(&exec, &[]).unwrap();
        assert_eq!(p.env, vec!["S=value".to_string()]);
        let file = match &p.mounts[0] {
            ExtraMount::Bind {
                source, readonly, ..
            } => {
                assert!(readonly);
                source.clone()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(fs::read(&file).unwrap(), b"value");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
            0o440
        );
        drop(p);
        assert!(!file.exists());
        assert!(!file.parent().unwrap().exists());
    }

    #[test]
    fn ignored_context_entries_become_whiteouts() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let ctx = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(ctx.path().join("files/sub")).unwrap();
        fs::create_dir_all(ctx.path().join("node_modules/x")).unwrap();
        for f in ["files/f1", "files/f10", "files/f2", "files/sub/f1", "keep"] {
            fs::write(ctx.path().join(f), f).unwrap();
        }
        let m = PatternMatcher::new(&[
            "node_modules".to_string(),
            "files/f1*".to_string(),
            "!files/f10".to_string(),
        ])
        .unwrap();
        let mut made = vec![PathBuf::new()];
        whiteout_ignored(ctx.path(), upper.path(), "", &m, &mut made).unwrap();
        let is_whiteout = |rel: &str| {
            fs::symlink_metadata(upper.path().join(rel))
                .map(|md| md.file_type().is_char_device() && md.rdev() == 0)
                .unwrap_or(false)
        };
        assert!(is_whiteout("node_modules"));
        assert!(is_whiteout("files/f1"));
        for kept in ["files/f10", "files/f2", "files/sub", "keep"] {
            assert!(!upper.path().join(kept).exists(), "{kept}");
        }
        assert_eq!(made, vec![PathBuf::new(), PathBuf::from("files")]);
    }

    #[test]
    fn resolve_stays_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("a/abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("a/b/up")).unwrap();
        assert_eq!(resolve_in_root(root, "/a/abs").unwrap(), root.join("etc"));
        assert_eq!(resolve_in_root(root, "a/b/up/x").unwrap(), root.join("x"));
        assert_eq!(resolve_in_root(root, "/../../a").unwrap(), root.join("a"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(root, "/loop")
            .unwrap_err()
            .contains("too many levels"));
    }
}
