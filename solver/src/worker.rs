//! The real [`Worker`]: pulls images into snapshots, runs RUN steps in the sandbox, applies
//! file ops through overlay mounts, and checksums the build context for cache keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_dag::{Digest, ExecMountKind, ExecOp, FileAction, FileOp, Node, NodeMeta, Op, SourceOp};
use strata_frontend::dockerignore::PatternMatcher;
use strata_registry::{Client, Reference};
use strata_sandbox::{ProcessSpec, RunRequest, Sandbox, Stream};
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::{OverlaySnapshotter, Snapshotter};

use crate::contenthash::checksum;
use crate::contenthash::StatCache;
use crate::fileop::{
    apply_file_op_with, is_context_copy, FileOpOptions, FileOpOutcome, SourceRoot,
};
use crate::incremental::{CopyManifest, PreviousCopy, MANIFEST_FILE};
use crate::progress::{Progress, ProgressEvent};
use crate::runmount::{MountContext, PreparedMounts, RunEnv, INSECURE_ENTITLEMENT};
use crate::{CacheKey, Ref, StepActivity, Worker};

/// Labels a committed layer snapshot carries about its blob (set when pulled or exported).
pub const LABEL_BLOB: &str = "strata.io/blob";
/// The cache key a result snapshot was made for (informational).
pub const LABEL_CACHE_KEY: &str = "strata.io/cache-key";
/// On the result of a context COPY: the digest of its node (which does not depend on the
/// context's content), so the next run of the step finds this result and its copy manifest
/// to link unchanged files from (see [`crate::incremental`]).
pub const LABEL_COPY_STEP: &str = "strata.io/copy-step";

/// Everything a build needs from the store and the client.
pub struct RealWorker {
    pub snapshotter: Arc<OverlaySnapshotter>,
    pub content: Arc<ContentStore>,
    pub registry: Arc<Client>,
    pub sandbox: Arc<Sandbox>,
    /// Directory for temporary mount points.
    pub mounts_dir: PathBuf,
    /// The build context directory and its `.dockerignore` matcher.
    pub context_dir: PathBuf,
    pub ignore: Option<PatternMatcher>,
    pub stat_cache: Arc<StatCache>,
    /// Secrets, ssh sockets, entitlements and the cache mount dir for RUN steps.
    pub run_env: RunEnv,
    /// Link unchanged files of a context COPY from the previous result of the same step
    /// (off for `--no-cache`: such a build reuses nothing a previous build made).
    pub reuse_previous_copies: bool,
    /// Told of every exec or file op result as soon as it is committed (the CLI starts
    /// exporting the final image's layers while later steps run).
    pub on_result: Option<ResultHook>,
    /// Serializes pulls of one chain so two nodes never apply the same layer at once.
    pull_lock: Mutex<()>,
}

/// See [`RealWorker::on_result`]: the step's node and its result snapshot.
pub type ResultHook = Arc<dyn Fn(&Node, &str) + Send + Sync>;

impl RealWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        snapshotter: Arc<OverlaySnapshotter>,
        content: Arc<ContentStore>,
        registry: Arc<Client>,
        sandbox: Arc<Sandbox>,
        mounts_dir: PathBuf,
        context_dir: PathBuf,
        ignore: Option<PatternMatcher>,
        stat_cache: Arc<StatCache>,
    ) -> Self {
        RealWorker {
            snapshotter,
            content,
            registry,
            sandbox,
            mounts_dir,
            context_dir,
            ignore,
            stat_cache,
            run_env: RunEnv::default(),
            reuse_previous_copies: true,
            on_result: None,
            pull_lock: Mutex::new(()),
        }
    }

    fn mount_context(&self) -> MountContext<'_> {
        MountContext {
            snapshotter: &self.snapshotter,
            mounts_dir: &self.mounts_dir,
            run_env: &self.run_env,
            temp_key: &Self::temp_key,
            ignore: self.ignore.as_ref(),
        }
    }

    fn temp_key(prefix: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "{prefix}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            nanos()
        )
    }

    fn mount_point(&self, key: &str) -> Result<PathBuf, String> {
        let dir = self.mounts_dir.join(key);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create mount point {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Prepares an active snapshot on `parent`, runs `f` on it, and commits it as a result
    /// of `key`; on failure the active snapshot is removed.
    fn with_active<T>(
        &self,
        parent: &str,
        key: &CacheKey,
        labels: BTreeMap<String, String>,
        f: impl FnOnce(&str, Vec<strata_snapshotter::Mount>) -> Result<T, String>,
    ) -> Result<Ref, String> {
        let active = Self::temp_key("active");
        let mounts = self
            .snapshotter
            .prepare(&active, parent)
            .map_err(|e| format!("prepare snapshot: {e}"))?;
        let outcome = f(&active, mounts);
        match outcome {
            Ok(_) => {
                let name = format!("result-{}-{}", key.hex(), nanos());
                let mut labels = labels;
                labels.insert(LABEL_CACHE_KEY.into(), key.hex());
                if let Err(e) = self.snapshotter.commit(&name, &active, labels) {
                    let _ = self.snapshotter.remove(&active);
                    return Err(format!("commit snapshot: {e}"));
                }
                Ok(Ref::Snapshot(name))
            }
            Err(e) => {
                let _ = self.snapshotter.remove(&active);
                Err(e)
            }
        }
    }

    fn pull(
        &self,
        reference: &str,
        progress: &dyn Progress,
        description: &str,
    ) -> Result<Ref, String> {
        let reference = Reference::parse(reference).map_err(|e| e.to_string())?;
        let resolved = self
            .registry
            .resolve(&reference, &strata_dag::Platform::default())
            .map_err(|e| format!("resolve {reference}: {e}"))?;
        let config = strata_dag::image::ImageConfig::from_json(&resolved.config_bytes)
            .map_err(|e| format!("parse image config of {reference}: {e}"))?;
        let layers = resolved.manifest.layers();
        if layers.len() != config.rootfs.diff_ids.len() {
            return Err(format!(
                "image {reference} has {} layers but {} diff ids",
                layers.len(),
                config.rootfs.diff_ids.len()
            ));
        }
        // Fetch the blobs we lack in parallel, then apply them in order.
        let missing: Vec<_> = layers
            .iter()
            .filter_map(|l| Digest::parse(l.digest().as_ref()))
            .filter(|d| !self.content.exists(d))
            .collect();
        let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for chunk in missing.chunks(missing.len().div_ceil(4).max(1)) {
                let errors = &errors;
                let reference = &reference;
                s.spawn(move || {
                    for d in chunk {
                        if let Err(e) = self.fetch_blob(reference, d) {
                            if let Ok(mut errs) = errors.lock() {
                                errs.push(e);
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = errors.into_inner().ok().and_then(|v| v.into_iter().next()) {
            return Err(e);
        }
        // Remembered so that a push to another repository of this registry can mount
        // these layers instead of uploading them; only a hint, so errors are ignored.
        for d in layers
            .iter()
            .filter_map(|l| Digest::parse(l.digest().as_ref()))
        {
            let _ = strata_exporter::record_blob_source(
                &self.content,
                &d,
                &reference.registry,
                &reference.repository,
            );
        }
        let mut blobs = Vec::with_capacity(layers.len());
        for (layer, diff_id) in layers.iter().zip(&config.rootfs.diff_ids) {
            let digest = Digest::parse(layer.digest().as_ref())
                .ok_or_else(|| format!("layer digest {} is not sha256", layer.digest()))?;
            let diff_id = Digest::parse(diff_id)
                .ok_or_else(|| format!("diff id {diff_id} of {reference} is not sha256"))?;
            blobs.push(strata_exporter::LayerBlob {
                digest,
                size: layer.size(),
                media_type: layer.media_type().to_string(),
                diff_id,
                uncompressed_size: 0,
            });
        }
        self.apply_layers(&blobs, progress, description)
    }

    /// Applies layer blobs (already in the content store) bottom first into committed
    /// snapshots named by chain ID (`layer-<chainid hex>`), so equal layer stacks are
    /// shared whether they came from an image pull or an imported build cache. Each
    /// snapshot records its blob in [`LABEL_BLOB`], so re-exporting it reuses the same
    /// bytes. Returns the top snapshot (`Scratch` for no layers).
    pub fn apply_layers(
        &self,
        layers: &[strata_exporter::LayerBlob],
        progress: &dyn Progress,
        description: &str,
    ) -> Result<Ref, String> {
        let _guard = self.pull_lock.lock().map_err(|e| e.to_string())?;
        let mut parent = String::new();
        let mut chain: Option<String> = None;
        for layer in layers {
            let diff_id = layer.diff_id.to_string();
            // ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n)), as in the OCI spec.
            let chain_id = match &chain {
                None => diff_id.clone(),
                Some(prev) => Digest::of(format!("{prev} {diff_id}").as_bytes()).to_string(),
            };
            chain = Some(chain_id.clone());
            let name = format!("layer-{}", chain_id.trim_start_matches("sha256:"));
            if self.snapshotter.stat(&name).is_err() {
                let digest = layer.digest.clone();
                progress.event(ProgressEvent::Output {
                    description: description.to_string(),
                    line: format!("extracting {digest}"),
                });
                // The whole descriptor, so a layer imported from a build cache describes
                // itself exactly as on the runner that built it.
                let blob = serde_json::to_string(layer)
                    .map_err(|e| format!("encode blob label of {digest}: {e}"))?;
                let mut labels = BTreeMap::new();
                labels.insert(LABEL_BLOB.to_string(), blob);
                let active = Self::temp_key("pull");
                self.snapshotter
                    .prepare(&active, &parent)
                    .map_err(|e| format!("prepare snapshot: {e}"))?;
                let applied = (|| {
                    let upper = self
                        .snapshotter
                        .upper_dir(&active)
                        .map_err(|e| e.to_string())?;
                    let file = self.content.open_blob(&digest).map_err(|e| e.to_string())?;
                    let applied = strata_snapshotter::layer::apply_layer(
                        std::io::BufReader::new(file),
                        &upper,
                    )
                    .map_err(|e| format!("apply layer {digest}: {e}"))?;
                    if applied.diff_id.as_str() != diff_id {
                        return Err(format!(
                            "layer {digest}: diff id {} does not match the expected {diff_id}",
                            applied.diff_id
                        ));
                    }
                    Ok(())
                })();
                if let Err(e) = applied {
                    let _ = self.snapshotter.remove(&active);
                    return Err(e);
                }
                if let Err(e) = self.snapshotter.commit(&name, &active, labels) {
                    let _ = self.snapshotter.remove(&active);
                    // Another build committed the same layer first: use theirs.
                    if self.snapshotter.stat(&name).is_err() {
                        return Err(format!("commit layer snapshot: {e}"));
                    }
                }
            }
            parent = name;
        }
        if parent.is_empty() {
            Ok(Ref::Scratch)
        } else {
            Ok(Ref::Snapshot(parent))
        }
    }

    fn fetch_blob(&self, reference: &Reference, digest: &Digest) -> Result<(), String> {
        let mut writer = self.content.writer().map_err(|e| e.to_string())?;
        self.registry
            .fetch_blob(reference, digest, &mut writer)
            .map_err(|e| format!("fetch {digest}: {e}"))?;
        writer
            .commit(Some(digest))
            .map_err(|e| format!("store {digest}: {e}"))?;
        Ok(())
    }

    fn exec_run(
        &self,
        exec: &ExecOp,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
        activity: &StepActivity,
    ) -> Result<Ref, String> {
        if exec.insecure && !self.run_env.allow_insecure {
            return Err(format!("entitlement {INSECURE_ENTITLEMENT} is not allowed"));
        }
        let parent = match exec.rootfs_input {
            Some(i) => input_snapshot(inputs, i)?,
            None => String::new(),
        };
        let description = meta.description.clone();
        // Dropped (unmounted, unlocked, removed) after the step, whatever its outcome.
        let prepared = self.mount_context().prepare(exec, inputs)?;
        let mut env = exec.env.clone();
        env.extend(prepared.env.iter().cloned());
        for (k, v) in &self.run_env.proxy_env {
            if !env
                .iter()
                .any(|e| e.split_once('=').map(|(n, _)| n) == Some(k))
            {
                env.push(format!("{k}={v}"));
            }
        }
        self.with_active(&parent, key, BTreeMap::new(), |_active, mounts| {
            let req = RunRequest {
                rootfs: mounts,
                process: ProcessSpec {
                    args: exec.args.clone(),
                    env,
                    cwd: exec.cwd.clone(),
                    user: exec.user.clone(),
                    hostname: "buildkitsandbox".into(),
                    network: exec.network,
                    privileged: exec.insecure,
                },
                mounts: prepared.mounts.clone(),
                hosts_file: None,
                resolv_conf: None,
            };
            let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            let mut tail: Vec<String> = Vec::new();
            let mut emit = |stream: Stream, bytes: &[u8]| {
                let buf = &mut pending[stream as usize];
                buf.extend_from_slice(bytes);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    tail.push(text.clone());
                    if tail.len() > 10 {
                        tail.remove(0);
                    }
                    progress.event(ProgressEvent::Output {
                        description: description.clone(),
                        line: text,
                    });
                }
            };
            // The scheduler reads the step's CPU time while it runs; committing the
            // result afterwards counts as busy again.
            let result = self.sandbox.run_metered(&req, &mut emit, &mut |meter| {
                activity.set_meter(move || meter.usage())
            });
            activity.clear_meter();
            for buf in pending.iter() {
                if !buf.is_empty() {
                    let text = String::from_utf8_lossy(buf).into_owned();
                    progress.event(ProgressEvent::Output {
                        description: description.clone(),
                        line: text,
                    });
                }
            }
            result.map_err(|e| match e {
                strata_sandbox::Error::Exit { code } => {
                    format!(
                        "process \"{}\" did not complete successfully: exit code: {code}",
                        exec.args.join(" ")
                    )
                }
                other => other.to_string(),
            })
        })
    }

    fn exec_file(
        &self,
        node: &Node,
        op: &FileOp,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
    ) -> Result<Ref, String> {
        let parent = match op.base_input {
            Some(i) => input_snapshot(inputs, i)?,
            None => String::new(),
        };
        // Read-only views of the snapshot inputs that actions copy from, undone when
        // `views` is dropped, whatever happens. The context is read in place: the file op
        // applies `.dockerignore` itself.
        let mut used: Vec<u32> = op
            .actions
            .iter()
            .filter_map(|a| match a {
                FileAction::Copy(c) => Some(c.src_input),
                _ => None,
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        let mount_context = self.mount_context();
        let mut views = PreparedMounts::new(self.snapshotter.clone());
        let mut roots: Vec<Option<PathBuf>> = vec![None; inputs.len()];
        let mut is_context = vec![false; inputs.len()];
        for &i in &used {
            roots[i as usize] = Some(match inputs.get(i as usize) {
                Some(Ref::Local(p)) => {
                    is_context[i as usize] = true;
                    p.clone()
                }
                Some(_) => mount_context.input_root(inputs, i, false, &mut views)?,
                None => return Err(format!("file op reads missing input {i}")),
            });
        }
        // A context COPY records what it copied, labelled with its step, and links what is
        // unchanged since the step's previous result.
        let record = is_context_copy(op, |i| is_context.get(i as usize) == Some(&true));
        let mut labels = BTreeMap::new();
        let mut previous = None;
        if record {
            let step = node.digest().hex().to_string();
            if self.reuse_previous_copies {
                previous = self.previous_copy(&step);
            }
            labels.insert(LABEL_COPY_STEP.to_string(), step);
        }
        let opts = FileOpOptions {
            stat_cache: record.then_some(&*self.stat_cache),
            previous: previous.as_ref(),
        };
        self.with_active(&parent, key, labels, |active, mounts| {
            let target = self.mount_point(active)?;
            let guard =
                MountGuard::mount(&mounts, &target).map_err(|e| format!("mount snapshot: {e}"))?;
            let sources: Vec<Option<SourceRoot>> = roots
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.as_deref().map(|path| SourceRoot {
                        path,
                        ignore: if is_context[i] {
                            self.ignore.as_ref()
                        } else {
                            None
                        },
                        is_context: is_context[i],
                    })
                })
                .collect();
            let applied =
                apply_file_op_with(&target, op, &sources, &opts).map_err(|e| error_chain(&e));
            let unmounted = guard.unmount().map_err(|e| format!("unmount: {e}"));
            let _ = std::fs::remove_dir(&target);
            let outcome = applied?;
            unmounted?;
            self.finish_copy(
                active,
                outcome,
                previous.as_ref(),
                progress,
                &meta.description,
            )
        })
    }

    /// The most recent committed result of the context COPY `step` that has a manifest.
    fn previous_copy(&self, step: &str) -> Option<PreviousCopy> {
        let mut found: Vec<(i64, u128, String)> = Vec::new();
        self.snapshotter
            .walk(&mut |info| {
                if info.kind == strata_snapshotter::Kind::Committed
                    && info.labels.get(LABEL_COPY_STEP).map(String::as_str) == Some(step)
                {
                    // Result names end in their commit time in nanoseconds.
                    let nanos = info.name.rsplit('-').next().and_then(|n| n.parse().ok());
                    found.push((info.created, nanos.unwrap_or(0), info.name.clone()));
                }
            })
            .ok()?;
        found.sort();
        found.iter().rev().find_map(|(_, _, name)| {
            let upper = self.snapshotter.upper_dir(name).ok()?;
            let manifest = CopyManifest::load(&upper.parent()?.join(MANIFEST_FILE))?;
            PreviousCopy::open(&upper, manifest).ok()
        })
    }

    /// After a file op's snapshot is unmounted: turns its placeholders into links of the
    /// previous result and stores its copy manifest beside the upper dir (inside the
    /// snapshot's directory, so it goes with the snapshot and exists only once the
    /// snapshot is committed).
    fn finish_copy(
        &self,
        active: &str,
        outcome: FileOpOutcome,
        previous: Option<&PreviousCopy>,
        progress: &dyn Progress,
        description: &str,
    ) -> Result<(), String> {
        if outcome.manifest.is_none() && outcome.links.is_empty() {
            return Ok(());
        }
        let upper = self
            .snapshotter
            .upper_dir(active)
            .map_err(|e| format!("find snapshot directory: {e}"))?;
        if let Some(prev) = previous.filter(|_| !outcome.links.is_empty()) {
            let report = outcome
                .links
                .finish(&upper, prev)
                .map_err(|e| error_chain(&e))?;
            let mut line = format!(
                "linked {} unchanged files from the previous result",
                report.linked
            );
            if report.copied > 0 {
                line.push_str(&format!(" (copied {}: link failed)", report.copied));
            }
            progress.event(ProgressEvent::Output {
                description: description.to_string(),
                line,
            });
        }
        if let (Some(manifest), Some(dir)) = (outcome.manifest, upper.parent()) {
            // Without a manifest the next run copies everything: slower, never wrong, so a
            // failed write does not fail the step.
            let _ = manifest.save(&dir.join(MANIFEST_FILE));
        }
        Ok(())
    }
}

/// An error with its causes on one line, `outer: inner: innermost`, for errors reported
/// as strings rather than through anyhow.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn input_snapshot(inputs: &[Ref], i: u32) -> Result<String, String> {
    match inputs.get(i as usize) {
        Some(r) => r
            .snapshot_name()
            .map(str::to_string)
            .ok_or_else(|| "a local directory cannot be a root filesystem".into()),
        None => Err(format!("missing input {i}")),
    }
}

impl Worker for RealWorker {
    fn content_key(
        &self,
        node: &Node,
        local_inputs: &[Option<&Ref>],
    ) -> Result<Option<[u8; 32]>, String> {
        let mut hasher = blake3::Hasher::new();
        let mut any = false;
        if let Op::Exec(exec) = &node.op {
            // A bind of the context reads exactly the files under its source.
            for m in &exec.mounts {
                let ExecMountKind::Bind {
                    input: Some(i),
                    source,
                    ..
                } = &m.kind
                else {
                    continue;
                };
                if let Some(Some(Ref::Local(path))) = local_inputs.get(*i as usize) {
                    let root = SourceRoot {
                        path,
                        ignore: self.ignore.as_ref(),
                        is_context: true,
                    };
                    let action = crate::runmount::mount_copy_action(*i, source);
                    let sum =
                        checksum(&root, &action, &self.stat_cache).map_err(|e| e.to_string())?;
                    hasher.update(m.target.as_bytes());
                    hasher.update(&sum);
                    any = true;
                }
            }
            return Ok(any.then(|| *hasher.finalize().as_bytes()));
        }
        let Op::File(op) = &node.op else {
            return Ok(None);
        };
        for action in &op.actions {
            if let FileAction::Copy(c) = action {
                if let Some(Some(Ref::Local(path))) = local_inputs.get(c.src_input as usize) {
                    let root = SourceRoot {
                        path,
                        ignore: self.ignore.as_ref(),
                        is_context: true,
                    };
                    let sum = checksum(&root, c, &self.stat_cache).map_err(|e| error_chain(&e))?;
                    hasher.update(&sum);
                    any = true;
                }
            }
        }
        Ok(any.then(|| *hasher.finalize().as_bytes()))
    }

    fn immediate(&self, node: &Node) -> Option<Ref> {
        match &node.op {
            Op::Source(SourceOp::Local { .. }) => Some(Ref::Local(self.context_dir.clone())),
            _ => None,
        }
    }

    fn exec(
        &self,
        node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
        activity: &StepActivity,
    ) -> Result<Ref, String> {
        match &node.op {
            Op::Source(SourceOp::Image { reference }) => {
                self.pull(reference, progress, &meta.description)
            }
            Op::Source(SourceOp::Local { .. }) => Ok(Ref::Local(self.context_dir.clone())),
            Op::Exec(exec) => self.exec_run(exec, meta, key, inputs, progress, activity),
            Op::File(op) => self.exec_file(node, op, meta, key, inputs, progress),
            Op::Merge => Err("merge ops are not supported yet".into()),
        }
        .inspect(|r| {
            if let (Ref::Snapshot(name), Some(hook)) = (r, &self.on_result) {
                hook(node, name);
            }
        })
    }

    fn exists(&self, r: &Ref) -> bool {
        match r {
            Ref::Snapshot(name) => self.snapshotter.stat(name).is_ok(),
            Ref::Scratch => true,
            Ref::Local(p) => p.is_dir(),
        }
    }
}

/// The layer chain of a result, bottom first (committed snapshot names).
pub fn snapshot_chain(snapshotter: &dyn Snapshotter, top: &Ref) -> Result<Vec<String>, String> {
    let mut chain = Vec::new();
    let mut next = match top {
        Ref::Snapshot(n) => Some(n.clone()),
        _ => None,
    };
    while let Some(name) = next {
        let info = snapshotter.stat(&name).map_err(|e| e.to_string())?;
        next = info.parent.clone().filter(|p| !p.is_empty());
        chain.push(name);
    }
    chain.reverse();
    Ok(chain)
}
