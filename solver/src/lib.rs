//! The solver: cache keys, the persistent cache, and a parallel walk of the build graph.
//!
//! Solving is two passes. First every node's cache key is computed from the root down,
//! without executing anything: `blake3(version, op digest, input keys, content key)`, where
//! the content key is the checksum of exactly the context files an op reads. Then, from the
//! root, a node whose key is in the cache is a hit and its inputs are never needed; the
//! nodes that missed run in parallel as soon as their inputs are ready. So a build whose
//! final step is cached pulls and runs nothing.
//!
//! [`Worker`] is the seam between scheduling and execution; tests use a counting fake.

pub mod cache;
pub mod contenthash;
pub mod fileop;
pub mod progress;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use strata_dag::{Definition, Digest, Node, NodeMeta};

pub use cache::CacheStore;
pub use progress::{Progress, ProgressEvent};

/// Version salt of every cache key: bump it when the meaning of keys changes.
const CACHE_KEY_VERSION: &[u8] = b"strata-cache-v1";

/// The result of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    /// A committed snapshot.
    Snapshot(String),
    /// An empty filesystem.
    Scratch,
    /// A host directory given by the client (the build context).
    Local(std::path::PathBuf),
}

impl Ref {
    /// The committed snapshot name, `""` for scratch (the empty parent).
    pub fn snapshot_name(&self) -> Option<&str> {
        match self {
            Ref::Snapshot(n) => Some(n),
            Ref::Scratch => Some(""),
            Ref::Local(_) => None,
        }
    }
}

/// A cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step}: {message}")]
    Step {
        step: String,
        message: String,
        location: Option<strata_dag::SourceLocation>,
    },
    #[error("invalid build definition: {0}")]
    InvalidDefinition(String),
    #[error("build cancelled")]
    Cancelled,
    #[error("cache store: {0}")]
    Cache(String),
}

/// Executes ops; the seam between scheduling and execution.
pub trait Worker: Sync {
    /// Checksum of the content `node` reads from inputs that are not themselves cached
    /// results (the local build context), or `None` when it reads none.
    fn content_key(
        &self,
        node: &Node,
        local_inputs: &[Option<&Ref>],
    ) -> Result<Option<[u8; 32]>, String>;
    /// The result of a source that needs no execution (the local context), if `node` is one.
    fn immediate(&self, node: &Node) -> Option<Ref>;
    /// Runs `node` over its inputs' results and commits its result under a name derived
    /// from `key`.
    fn exec(
        &self,
        node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
    ) -> Result<Ref, String>;
    /// Whether a cached result still exists.
    fn exists(&self, r: &Ref) -> bool;
}

/// What happened to each step, for tests and progress.
#[derive(Clone, Debug, Default)]
pub struct SolveReport {
    pub executed: Vec<String>,
    pub cached: Vec<String>,
}

pub struct Solver<'a> {
    worker: &'a dyn Worker,
    cache: &'a dyn CacheStore,
    progress: &'a dyn Progress,
    max_parallelism: usize,
    cancel: &'a AtomicBool,
}

struct Plan<'d> {
    nodes: HashMap<Digest, &'d Node>,
    keys: HashMap<Digest, CacheKey>,
    immediate: HashMap<Digest, Ref>,
}

impl<'a> Solver<'a> {
    pub fn new(
        worker: &'a dyn Worker,
        cache: &'a dyn CacheStore,
        progress: &'a dyn Progress,
        max_parallelism: usize,
        cancel: &'a AtomicBool,
    ) -> Self {
        Solver {
            worker,
            cache,
            progress,
            max_parallelism: max_parallelism.max(1),
            cancel,
        }
    }

    fn step_error(def: &Definition, digest: &Digest, message: String) -> Error {
        let meta = def.metadata.get(digest);
        Error::Step {
            step: meta
                .map(|m| m.description.clone())
                .unwrap_or_else(|| digest.to_string()),
            message,
            location: meta.and_then(|m| m.location.clone()),
        }
    }

    fn plan<'d>(&self, def: &'d Definition) -> Result<Plan<'d>, Error> {
        let mut plan = Plan {
            nodes: HashMap::new(),
            keys: HashMap::new(),
            immediate: HashMap::new(),
        };
        // Definitions are topologically ordered: inputs come before their users.
        for node in &def.nodes {
            let digest = node.digest();
            if let Some(r) = self.worker.immediate(node) {
                plan.immediate.insert(digest.clone(), r);
            }
            let mut hasher = blake3::Hasher::new();
            hasher.update(CACHE_KEY_VERSION);
            hasher.update(digest.as_str().as_bytes());
            let mut local_inputs = Vec::new();
            for input in &node.inputs {
                let key = plan.keys.get(&input.digest).ok_or_else(|| {
                    Error::InvalidDefinition(format!(
                        "node {digest} reads {} before it is defined",
                        input.digest
                    ))
                })?;
                hasher.update(&key.0);
                hasher.update(&input.output.to_le_bytes());
                local_inputs.push(plan.immediate.get(&input.digest));
            }
            if local_inputs.iter().any(Option::is_some) {
                let content = self
                    .worker
                    .content_key(node, &local_inputs)
                    .map_err(|m| Self::step_error(def, &digest, m))?;
                if let Some(c) = content {
                    hasher.update(b"content");
                    hasher.update(&c);
                }
            }
            plan.keys
                .insert(digest.clone(), CacheKey(*hasher.finalize().as_bytes()));
            plan.nodes.insert(digest, node);
        }
        Ok(plan)
    }

    /// Solves the definition and returns the root's result (`Scratch` for an empty root).
    pub fn solve(&self, def: &Definition) -> Result<(Ref, SolveReport), Error> {
        let Some(root) = &def.root else {
            return Ok((Ref::Scratch, SolveReport::default()));
        };
        let plan = self.plan(def)?;
        let mut report = SolveReport::default();

        // Which results are needed, and which of those must run.
        let mut results: HashMap<Digest, Ref> = HashMap::new();
        let mut to_run: HashSet<Digest> = HashSet::new();
        let mut stack = vec![root.digest.clone()];
        let mut seen = HashSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let node = plan
                .nodes
                .get(&d)
                .ok_or_else(|| Error::InvalidDefinition(format!("unknown node {d}")))?;
            if let Some(r) = plan.immediate.get(&d) {
                results.insert(d.clone(), r.clone());
                continue;
            }
            let meta = def.metadata.get(&d).cloned().unwrap_or_default();
            let key = plan.keys[&d];
            if !meta.ignore_cache {
                let hit = self.cache.get(&key).map_err(Error::Cache)?;
                if let Some(r) = hit.filter(|r| self.worker.exists(r)) {
                    self.progress.event(ProgressEvent::Cached {
                        description: meta.description.clone(),
                    });
                    report.cached.push(meta.description.clone());
                    results.insert(d.clone(), r);
                    continue;
                }
            }
            to_run.insert(d.clone());
            for input in &node.inputs {
                stack.push(input.digest.clone());
            }
        }

        self.run_parallel(def, &plan, &mut results, to_run, &mut report)?;
        let result = results
            .remove(&root.digest)
            .ok_or_else(|| Error::InvalidDefinition("root was not solved".into()))?;
        Ok((result, report))
    }

    fn run_parallel(
        &self,
        def: &Definition,
        plan: &Plan<'_>,
        results: &mut HashMap<Digest, Ref>,
        mut pending: HashSet<Digest>,
        report: &mut SolveReport,
    ) -> Result<(), Error> {
        let (tx, rx) = mpsc::channel::<(Digest, Result<Ref, String>, f64)>();
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            let mut running = 0usize;
            loop {
                let cancelled = self.cancel.load(Ordering::SeqCst);
                let failed = failure.lock().map(|f| f.is_some()).unwrap_or(true);
                if !cancelled && !failed {
                    // Start every ready node, in definition order, up to the limit.
                    let ready: Vec<Digest> = def
                        .nodes
                        .iter()
                        .map(Node::digest)
                        .filter(|d| pending.contains(d))
                        .filter(|d| {
                            plan.nodes[d]
                                .inputs
                                .iter()
                                .all(|i| results.contains_key(&i.digest))
                        })
                        .collect();
                    for d in ready {
                        if running >= self.max_parallelism {
                            break;
                        }
                        pending.remove(&d);
                        running += 1;
                        let node = plan.nodes[&d];
                        let inputs: Vec<Ref> = node
                            .inputs
                            .iter()
                            .map(|i| results[&i.digest].clone())
                            .collect();
                        let meta = def.metadata.get(&d).cloned().unwrap_or_default();
                        let key = plan.keys[&d];
                        let tx = tx.clone();
                        let worker = self.worker;
                        let progress = self.progress;
                        scope.spawn(move || {
                            progress.event(ProgressEvent::Started {
                                description: meta.description.clone(),
                            });
                            let start = Instant::now();
                            let r = worker.exec(node, &meta, &key, &inputs, progress);
                            let _ = tx.send((d, r, start.elapsed().as_secs_f64()));
                        });
                    }
                }
                if running == 0 {
                    break;
                }
                let Ok((d, r, secs)) = rx.recv() else { break };
                running -= 1;
                let description = def
                    .metadata
                    .get(&d)
                    .map(|m| m.description.clone())
                    .unwrap_or_default();
                match r {
                    Ok(result) => {
                        if let Err(e) = self.cache.put(&plan.keys[&d], &result) {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(Error::Cache(e));
                            }
                        }
                        self.progress.event(ProgressEvent::Done {
                            description: description.clone(),
                            seconds: secs,
                        });
                        report.executed.push(description);
                        results.insert(d, result);
                    }
                    Err(message) => {
                        self.progress.event(ProgressEvent::Failed {
                            description,
                            message: message.clone(),
                        });
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(Self::step_error(def, &d, message));
                        }
                    }
                }
            }
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        if !pending.is_empty() {
            return Err(Error::InvalidDefinition(
                "some steps could never run (missing inputs)".into(),
            ));
        }
        Ok(())
    }
}
