//! The solver: cache keys, the persistent cache, and a parallel walk of the build graph.
//!
//! Solving is two passes. First every node's cache key is computed from the root down,
//! without executing anything: `blake3(version, op digest, input keys, content key)`, where
//! the content key is the checksum of exactly the context files an op reads. Then, from the
//! root, a node whose key is in the cache is a hit and its inputs are never needed; the
//! nodes that missed form a petgraph `DiGraph` that is scheduled by in-degree: every node
//! whose inputs are ready runs at once, up to `max_parallelism`. So a build whose final
//! step is cached pulls and runs nothing.
//!
//! What `max_parallelism` bounds is a [`Bound`]. [`Bound::Steps`] (an explicit
//! `--max-parallelism N`) bounds the steps running at once: users who pass it want a hard
//! limit. [`Bound::BusySteps`] (the CLI's default, N = the core count) bounds only the
//! CPU-busy ones: each RUN step runs in a cgroup of its own, the scheduler reads every
//! running step's CPU time every 100 ms ([`activity`]), and a step that used under a
//! quarter of one core over the last window (sleeping, waiting on the network) holds no
//! slot, so further ready steps start next to it. A step that gets busy again counts again
//! (nothing new starts until the busy steps are under the bound; running ones are never
//! paused). Steps without a meter (file ops, pulls, RUNs where no writable cgroup2 exists)
//! always count as busy. So four independent stages that mostly sleep run together on two
//! cores, while CPU-heavy steps still run two at a time.
//!
//! The walk looks up only the hits it reaches (the topmost cached step of each branch), so
//! a warm rebuild costs one cache lookup per branch; progress still shows, as BuildKit
//! does, every step such a hit stands for as CACHED, inputs first.
//!
//! `ignore_cache` (`--no-cache`, `--no-cache-filter`) makes a step run whatever the cache
//! holds, and so do the steps downstream of a re-made exec or file op (their records were
//! made from the old result); a re-pulled image is the same image and taints nothing.
//!
//! Concurrent builds: before a missed node runs, its worker takes the cache store's lock
//! for the key (a `flock`ed file per key, shared by every process on the store) and looks
//! the key up again, so when two builds need the same op it runs once and the second
//! reuses the result.
//!
//! [`Worker`] is the seam between scheduling and execution; tests use a counting fake.

pub mod activity;
pub mod cache;
pub mod contenthash;
pub mod fileop;
pub mod incremental;
pub mod progress;
pub mod runmount;
pub mod worker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use petgraph::Direction;

use strata_dag::{Definition, Digest, Node, NodeMeta, Op};

pub use activity::StepActivity;
pub use cache::{CacheStore, KeyLock};
pub use progress::{Progress, ProgressEvent};
pub use worker::error_chain;

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
    /// from `key`. `activity` is where the worker tells the scheduler whether the step is
    /// busy (see [`activity`]); a worker that never touches it has every step count busy.
    fn exec(
        &self,
        node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
        activity: &StepActivity,
    ) -> Result<Ref, String>;
    /// Whether a cached result still exists.
    fn exists(&self, r: &Ref) -> bool;
}

/// What happened to each step, for tests and progress.
#[derive(Clone, Debug, Default)]
pub struct SolveReport {
    pub executed: Vec<String>,
    pub cached: Vec<String>,
    /// Every node this solve resolved (cache hits and executed steps): its key and result.
    /// Cache export (`--cache-to`) turns these into records; nodes below a hit never
    /// appear, as they were never needed.
    pub resolved: Vec<(CacheKey, Ref)>,
    /// The cache key of every step of the plan, needed or not (sorted): `mode=max` cache
    /// export also takes the records a local hit made unnecessary to visit.
    pub planned: Vec<CacheKey>,
}

/// What `max_parallelism` bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bound {
    /// The steps running at once, whatever they do (an explicit `--max-parallelism`).
    #[default]
    Steps,
    /// The CPU-busy steps running at once (the CLI's default, with the core count): a
    /// running step whose processes are nearly idle (sleeping, waiting on the network)
    /// holds no slot, so more steps start; see [`activity`].
    BusySteps,
}

pub struct Solver<'a> {
    worker: &'a dyn Worker,
    cache: &'a dyn CacheStore,
    progress: &'a dyn Progress,
    max_parallelism: usize,
    bound: Bound,
    cancel: &'a AtomicBool,
}

/// The first pass: the graph of the definition and the cache key of every node the root
/// needs.
struct Plan<'d> {
    /// Every node of the definition; an edge goes from an input to the node reading it.
    graph: DiGraph<&'d Node, ()>,
    /// Node digests, by graph index (computing one serializes the node).
    digests: Vec<Digest>,
    index: HashMap<Digest, NodeIndex>,
    /// The nodes the root needs, inputs first.
    order: Vec<NodeIndex>,
    keys: HashMap<NodeIndex, CacheKey>,
    immediate: HashMap<NodeIndex, Ref>,
    /// Nodes that must run when needed, whatever the cache holds: those marked
    /// `ignore_cache` and those reading a result that is re-made (see [`Plan::tainted`]).
    fresh: HashSet<NodeIndex>,
    /// Nodes whose result may differ from the recorded one because it is re-made: an
    /// `ignore_cache` exec or file op, and everything downstream of one. (Image sources are
    /// pinned by digest, so pulling one again makes the same result and taints nothing;
    /// that matters because one FROM node is shared by every stage on the same image.)
    tainted: HashSet<NodeIndex>,
}

impl Plan<'_> {
    fn input_index(&self, input: &strata_dag::Input) -> Result<NodeIndex, Error> {
        self.index
            .get(&input.digest)
            .copied()
            .ok_or_else(|| Error::InvalidDefinition(format!("unknown node {}", input.digest)))
    }
}

/// How one node's job ended.
enum Outcome {
    Executed(Ref, f64),
    /// Another build made the result while this one waited for the key's lock.
    Reused(Ref),
    Failed(String),
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
            bound: Bound::Steps,
            cancel,
        }
    }

    /// Chooses what `max_parallelism` bounds (default: [`Bound::Steps`]).
    pub fn with_bound(mut self, bound: Bound) -> Self {
        self.bound = bound;
        self
    }

    /// Whether one more step may start next to the `running` ones.
    fn may_start(&self, running: &HashMap<NodeIndex, Arc<StepActivity>>) -> bool {
        let counted = match self.bound {
            Bound::Steps => running.len(),
            Bound::BusySteps => running.values().filter(|a| !a.is_idle()).count(),
        };
        counted < self.max_parallelism
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

    fn plan<'d>(&self, def: &'d Definition, root: &Digest) -> Result<Plan<'d>, Error> {
        let mut graph: DiGraph<&Node, ()> = DiGraph::with_capacity(def.nodes.len(), 0);
        let mut digests = Vec::with_capacity(def.nodes.len());
        let mut index = HashMap::with_capacity(def.nodes.len());
        for node in &def.nodes {
            let digest = node.digest();
            if index.contains_key(&digest) {
                continue;
            }
            index.insert(digest.clone(), graph.add_node(node));
            digests.push(digest);
        }
        for to in graph.node_indices().collect::<Vec<_>>() {
            let node = graph[to];
            for input in &node.inputs {
                let from = index.get(&input.digest).copied().ok_or_else(|| {
                    Error::InvalidDefinition(format!(
                        "node {} reads unknown node {}",
                        digests[to.index()],
                        input.digest
                    ))
                })?;
                graph.add_edge(from, to, ());
            }
        }
        let sorted = petgraph::algo::toposort(&graph, None).map_err(|cycle| {
            Error::InvalidDefinition(format!(
                "the build graph has a cycle through node {}",
                digests[cycle.node_id().index()]
            ))
        })?;
        let root_ix = *index
            .get(root)
            .ok_or_else(|| Error::InvalidDefinition(format!("unknown root node {root}")))?;
        // Only the root's ancestors are keyed: a stage the target does not need never has
        // its context checksummed.
        let mut needed = HashSet::new();
        let reversed = Reversed(&graph);
        let mut dfs = Dfs::new(reversed, root_ix);
        while let Some(n) = dfs.next(reversed) {
            needed.insert(n);
        }
        let mut plan = Plan {
            order: sorted.into_iter().filter(|n| needed.contains(n)).collect(),
            graph,
            digests,
            index,
            keys: HashMap::new(),
            immediate: HashMap::new(),
            fresh: HashSet::new(),
            tainted: HashSet::new(),
        };
        for &ix in &plan.order {
            let node = plan.graph[ix];
            let digest = &plan.digests[ix.index()];
            if let Some(r) = self.worker.immediate(node) {
                plan.immediate.insert(ix, r);
            }
            let mut hasher = blake3::Hasher::new();
            hasher.update(CACHE_KEY_VERSION);
            hasher.update(digest.as_str().as_bytes());
            let mut local_inputs = Vec::with_capacity(node.inputs.len());
            for input in &node.inputs {
                let input_ix = plan.input_index(input)?;
                // Inputs come first in a topological order, so their keys exist.
                let key = plan.keys.get(&input_ix).ok_or_else(|| {
                    Error::InvalidDefinition(format!("node {digest} was keyed before its inputs"))
                })?;
                hasher.update(&key.0);
                hasher.update(&input.output.to_le_bytes());
                local_inputs.push(plan.immediate.get(&input_ix));
            }
            if local_inputs.iter().any(Option::is_some) {
                let content = self
                    .worker
                    .content_key(node, &local_inputs)
                    .map_err(|m| Self::step_error(def, digest, m))?;
                if let Some(c) = content {
                    hasher.update(b"content");
                    hasher.update(&c);
                }
            }
            plan.keys
                .insert(ix, CacheKey(*hasher.finalize().as_bytes()));
            let ignore_cache = def.metadata.get(digest).is_some_and(|m| m.ignore_cache);
            let reads_tainted = node
                .inputs
                .iter()
                .filter_map(|i| plan.index.get(&i.digest))
                .any(|i| plan.tainted.contains(i));
            if reads_tainted || (ignore_cache && !matches!(node.op, Op::Source(_))) {
                plan.tainted.insert(ix);
            }
            if ignore_cache || reads_tainted {
                plan.fresh.insert(ix);
            }
        }
        Ok(plan)
    }

    /// Solves the definition and returns the root's result (`Scratch` for an empty root).
    pub fn solve(&self, def: &Definition) -> Result<(Ref, SolveReport), Error> {
        let Some(root) = &def.root else {
            return Ok((Ref::Scratch, SolveReport::default()));
        };
        let plan = self.plan(def, &root.digest)?;
        let root_ix = plan.input_index(root)?;
        let mut planned: Vec<CacheKey> = plan.keys.values().copied().collect();
        planned.sort_by_key(|k| k.0);
        let mut report = SolveReport {
            planned,
            ..SolveReport::default()
        };

        // Which results are needed, and which of those must run: walk down from the root
        // and stop at cache hits.
        let mut results: HashMap<NodeIndex, Ref> = HashMap::new();
        let mut to_run: HashSet<NodeIndex> = HashSet::new();
        let mut stack = vec![root_ix];
        let mut seen = HashSet::new();
        let mut hits = Vec::new();
        while let Some(ix) = stack.pop() {
            if !seen.insert(ix) {
                continue;
            }
            if let Some(r) = plan.immediate.get(&ix) {
                results.insert(ix, r.clone());
                continue;
            }
            let key = plan.keys[&ix];
            if !plan.fresh.contains(&ix) {
                let hit = self.cache.get(&key).map_err(Error::Cache)?;
                if let Some(r) = hit.filter(|r| self.worker.exists(r)) {
                    hits.push(ix);
                    report.resolved.push((key, r.clone()));
                    results.insert(ix, r);
                    continue;
                }
            }
            to_run.insert(ix);
            for input in &plan.graph[ix].inputs {
                stack.push(plan.input_index(input)?);
            }
        }

        self.show_cached(def, &plan, hits, &to_run, &mut report)?;
        self.run_graph(def, &plan, &mut results, &to_run, &mut report)?;
        let result = results
            .remove(&root_ix)
            .ok_or_else(|| Error::InvalidDefinition("root was not solved".into()))?;
        Ok((result, report))
    }

    /// Reports as CACHED every step the `hits` stand for (the hits and what they were made
    /// from, down to the steps that run), in build order, as BuildKit shows a cached chain.
    fn show_cached(
        &self,
        def: &Definition,
        plan: &Plan<'_>,
        hits: Vec<NodeIndex>,
        to_run: &HashSet<NodeIndex>,
        report: &mut SolveReport,
    ) -> Result<(), Error> {
        let mut covered = HashSet::new();
        let mut stack = hits;
        while let Some(ix) = stack.pop() {
            if to_run.contains(&ix) || plan.immediate.contains_key(&ix) || !covered.insert(ix) {
                continue;
            }
            for input in &plan.graph[ix].inputs {
                stack.push(plan.input_index(input)?);
            }
        }
        for ix in plan.order.iter().filter(|ix| covered.contains(ix)) {
            let Some(meta) = def.metadata.get(&plan.digests[ix.index()]) else {
                continue;
            };
            if meta.description.is_empty() {
                continue;
            }
            self.progress.event(ProgressEvent::Cached {
                description: meta.description.clone(),
            });
            report.cached.push(meta.description.clone());
        }
        Ok(())
    }

    /// Runs one missed node: under the key's lock, unless another build has made it by
    /// the time the lock is ours.
    fn run_one(
        &self,
        node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        fresh: bool,
        activity: &StepActivity,
    ) -> Outcome {
        self.progress.event(ProgressEvent::Started {
            description: meta.description.clone(),
        });
        // Fresh steps (`--no-cache`) run regardless of what other builds made: no lock.
        let _lock = if fresh {
            None
        } else {
            let lock = match self.cache.lock(key) {
                Ok(l) => l,
                Err(e) => return Outcome::Failed(format!("lock cache key {}: {e}", key.hex())),
            };
            match self.cache.get(key) {
                Ok(Some(r)) if self.worker.exists(&r) => return Outcome::Reused(r),
                Ok(_) => {}
                Err(e) => return Outcome::Failed(format!("read cache: {e}")),
            }
            lock
        };
        let start = Instant::now();
        match self
            .worker
            .exec(node, meta, key, inputs, self.progress, activity)
        {
            Ok(r) => match self.cache.put(key, &r) {
                Ok(()) => Outcome::Executed(r, start.elapsed().as_secs_f64()),
                Err(e) => Outcome::Failed(format!("record cache: {e}")),
            },
            Err(m) => Outcome::Failed(m),
        }
    }

    /// Runs the missed nodes: a graph of them, scheduled by in-degree, every ready node at
    /// once up to `max_parallelism` running ([`Bound::Steps`]) or busy
    /// ([`Bound::BusySteps`]: the running steps' meters are read every
    /// [`activity::SAMPLE_EVERY`] while waiting for steps to finish).
    fn run_graph(
        &self,
        def: &Definition,
        plan: &Plan<'_>,
        results: &mut HashMap<NodeIndex, Ref>,
        to_run: &HashSet<NodeIndex>,
        report: &mut SolveReport,
    ) -> Result<(), Error> {
        // Weights are the plan's indices; an edge is an input that must run first.
        let mut graph: DiGraph<NodeIndex, ()> = DiGraph::with_capacity(to_run.len(), 0);
        let mut local: HashMap<NodeIndex, NodeIndex> = HashMap::with_capacity(to_run.len());
        for &ix in plan.order.iter().filter(|ix| to_run.contains(ix)) {
            local.insert(ix, graph.add_node(ix));
        }
        for to in graph.node_indices().collect::<Vec<_>>() {
            for input in &plan.graph[graph[to]].inputs {
                if let Some(&from) = local.get(&plan.input_index(input)?) {
                    graph.add_edge(from, to, ());
                }
            }
        }
        if petgraph::algo::toposort(&graph, None).is_err() {
            return Err(Error::InvalidDefinition(
                "the steps to run form a cycle".into(),
            ));
        }
        let mut indegree: Vec<usize> = graph
            .node_indices()
            .map(|n| graph.edges_directed(n, Direction::Incoming).count())
            .collect();
        // Nodes were added in topological (definition) order, so ready ones start in it.
        let mut ready: VecDeque<NodeIndex> = graph
            .node_indices()
            .filter(|n| indegree[n.index()] == 0)
            .collect();

        let (tx, rx) = mpsc::channel::<(NodeIndex, Outcome)>();
        let mut failure: Option<Error> = None;
        let mut finished = 0usize;
        std::thread::scope(|scope| {
            let mut running: HashMap<NodeIndex, Arc<StepActivity>> = HashMap::new();
            let mut next_sample = Instant::now() + activity::SAMPLE_EVERY;
            // An extra sample soon after starting steps while others wait for a slot.
            let mut verdict_due: Option<Instant> = None;
            loop {
                let mut started = false;
                if !self.cancel.load(Ordering::SeqCst) && failure.is_none() {
                    while self.may_start(&running) {
                        let Some(n) = ready.pop_front() else { break };
                        let ix = graph[n];
                        let node = plan.graph[ix];
                        let inputs: Result<Vec<Ref>, Error> = node
                            .inputs
                            .iter()
                            .map(|i| {
                                let input_ix = plan.input_index(i)?;
                                results.get(&input_ix).cloned().ok_or_else(|| {
                                    Error::InvalidDefinition(format!(
                                        "input {} of a ready step has no result",
                                        i.digest
                                    ))
                                })
                            })
                            .collect();
                        let inputs = match inputs {
                            Ok(i) => i,
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        };
                        let digest = &plan.digests[ix.index()];
                        let meta = def.metadata.get(digest).cloned().unwrap_or_default();
                        let key = plan.keys[&ix];
                        let fresh = plan.fresh.contains(&ix);
                        let tx = tx.clone();
                        let activity = Arc::new(StepActivity::default());
                        running.insert(n, activity.clone());
                        started = true;
                        scope.spawn(move || {
                            let outcome =
                                self.run_one(node, &meta, &key, &inputs, fresh, &activity);
                            let _ = tx.send((n, outcome));
                        });
                    }
                }
                if running.is_empty() {
                    break;
                }
                if started && !ready.is_empty() {
                    // Steps wait for a slot: judge the new ones as soon as a window is
                    // long enough, not only at the next regular sample.
                    verdict_due = Some(Instant::now() + activity::FIRST_VERDICT);
                }
                let message = match self.bound {
                    Bound::Steps => rx.recv().ok(),
                    Bound::BusySteps => {
                        let now = Instant::now();
                        let due = verdict_due.map_or(next_sample, |v| v.min(next_sample));
                        if now >= due {
                            for a in running.values() {
                                a.sample(now);
                            }
                            if verdict_due.is_some_and(|v| now >= v) {
                                verdict_due = None;
                            }
                            if now >= next_sample {
                                next_sample = now + activity::SAMPLE_EVERY;
                            }
                            // A step that went idle frees a slot: try to start more.
                            continue;
                        }
                        // A finished step wakes this at once; the timeout only paces
                        // the sampling.
                        match rx.recv_timeout(due - now) {
                            Ok(m) => Some(m),
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => None,
                        }
                    }
                };
                let Some((n, outcome)) = message else { break };
                running.remove(&n);
                let ix = graph[n];
                let digest = &plan.digests[ix.index()];
                let description = def
                    .metadata
                    .get(digest)
                    .map(|m| m.description.clone())
                    .unwrap_or_default();
                let result = match outcome {
                    Outcome::Executed(r, seconds) => {
                        self.progress.event(ProgressEvent::Done {
                            description: description.clone(),
                            seconds,
                        });
                        report.executed.push(description);
                        report.resolved.push((plan.keys[&ix], r.clone()));
                        r
                    }
                    Outcome::Reused(r) => {
                        self.progress.event(ProgressEvent::Cached {
                            description: description.clone(),
                        });
                        report.cached.push(description);
                        report.resolved.push((plan.keys[&ix], r.clone()));
                        r
                    }
                    Outcome::Failed(message) => {
                        self.progress.event(ProgressEvent::Failed {
                            description,
                            message: message.clone(),
                        });
                        failure.get_or_insert(Self::step_error(def, digest, message));
                        continue;
                    }
                };
                finished += 1;
                results.insert(ix, result);
                for next in graph.neighbors_directed(n, Direction::Outgoing) {
                    indegree[next.index()] -= 1;
                    if indegree[next.index()] == 0 {
                        ready.push_back(next);
                    }
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        if finished != graph.node_count() {
            return Err(Error::InvalidDefinition(
                "some steps could never run (missing inputs)".into(),
            ));
        }
        Ok(())
    }
}
