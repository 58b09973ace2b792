//! The scheduler against a fake worker that counts what it runs: which steps execute,
//! how many run at once, and what a cache hit or an error does to the rest of the build.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use strata_dag::{
    CopyAction, Definition, DefinitionBuilder, ExecOp, FileAction, FileOp, Input, Node, NodeMeta,
    Op, Platform, SourceOp,
};
use strata_solver::cache::MemoryCache;
use strata_solver::progress::{Progress, ProgressEvent};
use strata_solver::{Bound, CacheKey, Error, Ref, SolveReport, Solver, StepActivity, Worker};

/// Counts executions per step description and the most steps ever running at once.
#[derive(Default)]
struct FakeWorker {
    /// Content checksum of each context path a COPY reads.
    content: Mutex<HashMap<String, u8>>,
    runs: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    sleep: Duration,
    /// Steps whose description contains this fail.
    fail: Option<String>,
}

impl FakeWorker {
    fn runs(&self) -> Vec<String> {
        let mut r = self.runs.lock().unwrap().clone();
        r.sort();
        r
    }
    fn reset(&self) {
        self.runs.lock().unwrap().clear();
    }
}

impl Worker for FakeWorker {
    fn content_key(
        &self,
        node: &Node,
        local_inputs: &[Option<&Ref>],
    ) -> Result<Option<[u8; 32]>, String> {
        let Op::File(op) = &node.op else {
            return Ok(None);
        };
        let content = self.content.lock().unwrap();
        let mut sum = None;
        for a in &op.actions {
            if let FileAction::Copy(c) = a {
                if let Some(Some(Ref::Local(_))) = local_inputs.get(c.src_input as usize) {
                    let v = content.get(&c.src).copied().unwrap_or(0);
                    sum = Some([v; 32]);
                }
            }
        }
        Ok(sum)
    }

    fn immediate(&self, node: &Node) -> Option<Ref> {
        match &node.op {
            Op::Source(SourceOp::Local { .. }) => Some(Ref::Local("/context".into())),
            _ => None,
        }
    }

    fn exec(
        &self,
        _node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        _inputs: &[Ref],
        _progress: &dyn Progress,
        _activity: &StepActivity,
    ) -> Result<Ref, String> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.sleep);
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.runs.lock().unwrap().push(meta.description.clone());
        if let Some(f) = &self.fail {
            if meta.description.contains(f.as_str()) {
                return Err("exit code: 1".into());
            }
        }
        Ok(Ref::Snapshot(format!("result-{}", key.hex())))
    }

    fn exists(&self, _r: &Ref) -> bool {
        true
    }
}

/// Records progress events.
#[derive(Default)]
struct Events(Mutex<Vec<ProgressEvent>>);

impl Progress for Events {
    fn event(&self, event: ProgressEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl Events {
    fn cached(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::Cached { description } => Some(description.clone()),
                _ => None,
            })
            .collect()
    }
}

fn meta(description: &str) -> NodeMeta {
    NodeMeta {
        description: description.into(),
        ..Default::default()
    }
}

fn image(b: &mut DefinitionBuilder, reference: &str) -> Input {
    b.add(
        Node {
            inputs: vec![],
            op: Op::Source(SourceOp::Image {
                reference: reference.into(),
            }),
            platform: Platform::default(),
        },
        meta(&format!("[internal] load {reference}")),
    )
}

fn run(b: &mut DefinitionBuilder, base: &Input, cmd: &str, m: NodeMeta) -> Input {
    b.add(
        Node {
            inputs: vec![base.clone()],
            op: Op::Exec(ExecOp {
                args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                rootfs_input: Some(0),
                ..Default::default()
            }),
            platform: Platform::default(),
        },
        m,
    )
}

/// A node reading every input, standing for a final stage that copies from each.
fn merge(b: &mut DefinitionBuilder, inputs: Vec<Input>, m: NodeMeta) -> Input {
    b.add(
        Node {
            inputs,
            op: Op::Merge,
            platform: Platform::default(),
        },
        m,
    )
}

fn context(b: &mut DefinitionBuilder) -> Input {
    b.add(
        Node {
            inputs: vec![],
            op: Op::Source(SourceOp::Local {
                name: "context".into(),
                exclude: vec![],
                shared_key: String::new(),
            }),
            platform: Platform::default(),
        },
        meta("[internal] load build context"),
    )
}

fn copy(b: &mut DefinitionBuilder, base: &Input, from: &Input, src: &str, m: NodeMeta) -> Input {
    b.add(
        Node {
            inputs: vec![base.clone(), from.clone()],
            op: Op::File(FileOp {
                base_input: Some(0),
                actions: vec![FileAction::Copy(CopyAction {
                    src_input: 1,
                    src: src.into(),
                    dest: format!("/{src}"),
                    owner: None,
                    mode: None,
                    follow_symlinks: true,
                    dir_contents_only: false,
                    allow_wildcard: false,
                    allow_empty_wildcard: false,
                    create_dest_path: true,
                    attempt_unpack: false,
                    exclude: vec![],
                })],
            }),
            platform: Platform::default(),
        },
        m,
    )
}

fn solve(
    worker: &FakeWorker,
    cache: &MemoryCache,
    def: &Definition,
    parallelism: usize,
) -> Result<(Ref, SolveReport), Error> {
    let cancel = AtomicBool::new(false);
    let events = Events::default();
    Solver::new(worker, cache, &events, parallelism, &cancel).solve(def)
}

/// base -> RUN a -> COPY x -> RUN b
fn linear(no_cache_b: bool) -> Definition {
    let mut b = DefinitionBuilder::new();
    let base = image(&mut b, "base");
    let a = run(&mut b, &base, "a", meta("[s 1/3] RUN a"));
    let ctx = context(&mut b);
    let x = copy(&mut b, &a, &ctx, "x", meta("[s 2/3] COPY x"));
    let mut m = meta("[s 3/3] RUN b");
    m.ignore_cache = no_cache_b;
    let top = run(&mut b, &x, "b", m);
    b.finish(Some(top))
}

#[test]
fn a_cached_definition_executes_nothing() {
    let worker = FakeWorker::default();
    let cache = MemoryCache::default();
    let def = linear(false);
    let (first, report) = solve(&worker, &cache, &def, 4).unwrap();
    assert_eq!(report.executed.len(), 4, "{report:?}");
    worker.reset();

    let cancel = AtomicBool::new(false);
    let events = Events::default();
    let (again, report) = Solver::new(&worker, &cache, &events, 4, &cancel)
        .solve(&def)
        .unwrap();
    assert_eq!(again, first);
    assert!(worker.runs().is_empty(), "{:?}", worker.runs());
    // The walk stops at the root's hit, and shows every step it stands for as CACHED,
    // in build order, as BuildKit does.
    let all: Vec<String> = [
        "[internal] load base",
        "[s 1/3] RUN a",
        "[s 2/3] COPY x",
        "[s 3/3] RUN b",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(report.cached, all);
    assert_eq!(events.cached(), all);
}

#[test]
fn a_shared_input_runs_once() {
    let worker = FakeWorker::default();
    let cache = MemoryCache::default();
    let mut b = DefinitionBuilder::new();
    let base = image(&mut b, "base");
    let shared = run(&mut b, &base, "shared", meta("[s 1/2] RUN shared"));
    let left = run(&mut b, &shared, "left", meta("[l 2/2] RUN left"));
    let right = run(&mut b, &shared, "right", meta("[r 2/2] RUN right"));
    let ctx = context(&mut b);
    let _ = ctx;
    let join = merge(&mut b, vec![left, right], meta("merge"));
    let def = b.finish(Some(join));
    solve(&worker, &cache, &def, 4).unwrap();
    let runs = worker.runs();
    assert_eq!(
        runs.iter().filter(|r| r.contains("RUN shared")).count(),
        1,
        "{runs:?}"
    );
    assert_eq!(runs.len(), 5, "{runs:?}");
}

/// Four independent RUNs over one base, joined by a merge.
fn fan_out(n: usize) -> Definition {
    let mut b = DefinitionBuilder::new();
    let base = image(&mut b, "base");
    let branches: Vec<Input> = (0..n)
        .map(|i| {
            run(
                &mut b,
                &base,
                &format!("branch {i}"),
                meta(&format!("RUN {i}")),
            )
        })
        .collect();
    let join = merge(&mut b, branches, meta("merge"));
    b.finish(Some(join))
}

#[test]
fn independent_branches_run_concurrently_up_to_the_limit() {
    let worker = FakeWorker {
        sleep: Duration::from_millis(300),
        ..Default::default()
    };
    let cache = MemoryCache::default();
    let start = std::time::Instant::now();
    solve(&worker, &cache, &fan_out(4), 4).unwrap();
    let took = start.elapsed();
    assert_eq!(worker.max_running.load(Ordering::SeqCst), 4);
    // Serially: base + 4 branches + merge = 6 x 300 ms; in parallel about 3 x 300 ms.
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // With a limit of 2, never more than 2 at once.
    let worker = FakeWorker {
        sleep: Duration::from_millis(50),
        ..Default::default()
    };
    solve(&worker, &MemoryCache::default(), &fan_out(6), 2).unwrap();
    assert_eq!(worker.max_running.load(Ordering::SeqCst), 2);
    assert_eq!(worker.runs().len(), 8);
}

#[test]
fn a_failing_node_stops_the_build_with_its_name() {
    let worker = FakeWorker {
        fail: Some("RUN a".into()),
        ..Default::default()
    };
    let cache = MemoryCache::default();
    let err = solve(&worker, &cache, &linear(false), 4).unwrap_err();
    match err {
        Error::Step { step, message, .. } => {
            assert_eq!(step, "[s 1/3] RUN a");
            assert!(message.contains("exit code: 1"), "{message}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    // Nothing after the failed step ran.
    let runs = worker.runs();
    assert!(
        !runs
            .iter()
            .any(|r| r.contains("COPY x") || r.contains("RUN b")),
        "{runs:?}"
    );
}

#[test]
fn ignore_cache_forces_re_execution_of_only_that_step() {
    let worker = FakeWorker::default();
    let cache = MemoryCache::default();
    solve(&worker, &cache, &linear(false), 4).unwrap();
    worker.reset();
    let (_, report) = solve(&worker, &cache, &linear(true), 4).unwrap();
    assert_eq!(worker.runs(), vec!["[s 3/3] RUN b".to_string()]);
    assert_eq!(
        report.cached,
        ["[internal] load base", "[s 1/3] RUN a", "[s 2/3] COPY x"].map(String::from)
    );
}

#[test]
fn a_content_change_invalidates_only_its_dependents() {
    let worker = FakeWorker::default();
    let cache = MemoryCache::default();
    worker.content.lock().unwrap().insert("x".into(), 1);
    solve(&worker, &cache, &linear(false), 4).unwrap();
    worker.reset();
    worker.content.lock().unwrap().insert("x".into(), 2);
    let (_, report) = solve(&worker, &cache, &linear(false), 4).unwrap();
    assert_eq!(
        worker.runs(),
        vec!["[s 2/3] COPY x".to_string(), "[s 3/3] RUN b".to_string()]
    );
    assert_eq!(
        report.cached,
        ["[internal] load base", "[s 1/3] RUN a"].map(String::from)
    );
    // Back to the first content: every step is a hit again.
    worker.reset();
    worker.content.lock().unwrap().insert("x".into(), 1);
    solve(&worker, &cache, &linear(false), 4).unwrap();
    assert!(worker.runs().is_empty());
}

#[test]
fn a_node_outside_the_roots_ancestry_is_neither_keyed_nor_run() {
    // A stage the target does not need: its COPY must not even be checksummed.
    struct Counting(FakeWorker, AtomicUsize);
    impl Worker for Counting {
        fn content_key(&self, n: &Node, l: &[Option<&Ref>]) -> Result<Option<[u8; 32]>, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.content_key(n, l)
        }
        fn immediate(&self, n: &Node) -> Option<Ref> {
            self.0.immediate(n)
        }
        fn exec(
            &self,
            n: &Node,
            m: &NodeMeta,
            k: &CacheKey,
            i: &[Ref],
            p: &dyn Progress,
            a: &StepActivity,
        ) -> Result<Ref, String> {
            self.0.exec(n, m, k, i, p, a)
        }
        fn exists(&self, r: &Ref) -> bool {
            self.0.exists(r)
        }
    }
    let mut b = DefinitionBuilder::new();
    let base = image(&mut b, "base");
    let ctx = context(&mut b);
    let _unused = copy(
        &mut b,
        &base,
        &ctx,
        "unused",
        meta("[other 1/1] COPY unused"),
    );
    let top = run(&mut b, &base, "used", meta("[target 1/1] RUN used"));
    let def = b.finish(Some(top));
    let worker = Counting(FakeWorker::default(), AtomicUsize::new(0));
    let cancel = AtomicBool::new(false);
    let events = Events::default();
    Solver::new(&worker, &MemoryCache::default(), &events, 2, &cancel)
        .solve(&def)
        .unwrap();
    assert_eq!(worker.1.load(Ordering::SeqCst), 0);
    let runs: HashSet<String> = worker.0.runs().into_iter().collect();
    assert!(!runs.contains("[other 1/1] COPY unused"), "{runs:?}");
    assert_eq!(runs.len(), 2, "{runs:?}");
}

#[test]
fn a_definition_reading_an_unknown_node_is_invalid() {
    let mut def = linear(false);
    def.nodes.remove(0);
    let err = solve(&FakeWorker::default(), &MemoryCache::default(), &def, 2).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidDefinition(m) if m.contains("unknown node")),
        "{err:?}"
    );
}

#[test]
fn two_solves_on_one_store_run_a_shared_step_once() {
    // Two solvers, as two processes would be: each with its own handle on one cache file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.redb");
    let worker = FakeWorker {
        sleep: Duration::from_millis(200),
        ..Default::default()
    };
    let def = linear(false);
    let reports: Vec<SolveReport> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (worker, def, path) = (&worker, &def, &path);
                s.spawn(move || {
                    let cache = strata_solver::cache::DbCache::open(path).unwrap();
                    let cancel = AtomicBool::new(false);
                    let events = Events::default();
                    let (_, report) = Solver::new(worker, &cache, &events, 4, &cancel)
                        .solve(def)
                        .unwrap();
                    report
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let runs = worker.runs();
    let unique: HashSet<&String> = runs.iter().collect();
    assert_eq!(runs.len(), unique.len(), "a step ran twice: {runs:?}");
    assert_eq!(runs.len(), 4, "{runs:?}");
    // Whatever one solve ran, the other reused.
    let reused: usize = reports.iter().map(|r| r.cached.len()).sum();
    assert!(reused >= 1, "{reports:?}");
}

#[test]
fn a_re_made_step_re_makes_its_dependents_but_a_re_pulled_image_does_not() {
    // Stage a (ignore_cache, as --no-cache-filter a marks it) and stage b share one FROM
    // node, which carries the mark too; the final step reads both stages.
    let build = |filter_a: bool| {
        let mut b = DefinitionBuilder::new();
        let mut from_meta = meta("[a 1/2] FROM base");
        from_meta.ignore_cache = filter_a;
        let base = b.add(
            Node {
                inputs: vec![],
                op: Op::Source(SourceOp::Image {
                    reference: "base".into(),
                }),
                platform: Platform::default(),
            },
            from_meta,
        );
        let mut a_meta = meta("[a 2/2] RUN a");
        a_meta.ignore_cache = filter_a;
        let a = run(&mut b, &base, "a", a_meta);
        let stage_b = run(&mut b, &base, "b", meta("[b 2/2] RUN b"));
        let join = merge(
            &mut b,
            vec![a, stage_b],
            meta("[final 2/2] COPY --from=a --from=b"),
        );
        b.finish(Some(join))
    };
    let worker = FakeWorker::default();
    let cache = MemoryCache::default();
    solve(&worker, &cache, &build(false), 4).unwrap();
    worker.reset();
    solve(&worker, &cache, &build(true), 4).unwrap();
    assert_eq!(
        worker.runs(),
        vec![
            "[a 1/2] FROM base".to_string(),
            "[a 2/2] RUN a".to_string(),
            "[final 2/2] COPY --from=a --from=b".to_string(),
        ]
    );
}

/// The steps a [`ScriptedWorker`] is running, and the most ever at once.
#[derive(Default)]
struct Running {
    steps: Mutex<HashSet<String>>,
    changed: std::sync::Condvar,
    max: AtomicUsize,
}

impl Running {
    /// Waits until `ready` holds for the running steps, or gives up after `limit` (a safety
    /// net so that a wrong scheduler fails the assertions instead of hanging the test).
    fn wait_until(&self, limit: Duration, ready: impl Fn(&HashSet<String>) -> bool) {
        let steps = self.steps.lock().unwrap();
        let _ = self
            .changed
            .wait_timeout_while(steps, limit, |r| !ready(r))
            .unwrap();
    }

    fn set(&self, step: &str, on: bool) {
        let mut steps = self.steps.lock().unwrap();
        if on {
            steps.insert(step.to_string());
            self.max.fetch_max(steps.len(), Ordering::SeqCst);
        } else {
            steps.remove(step);
        }
        self.changed.notify_all();
    }
}

type Script = Box<dyn Fn(&Running, &str, &StepActivity) + Sync>;

/// A worker whose RUN steps say idle or busy through their `StepActivity` as a script
/// tells them, and that records which steps run at the same time.
struct ScriptedWorker {
    running: Running,
    script: Script,
}

impl ScriptedWorker {
    fn new(script: impl Fn(&Running, &str, &StepActivity) + Sync + 'static) -> Self {
        ScriptedWorker {
            running: Running::default(),
            script: Box::new(script),
        }
    }
}

impl Worker for ScriptedWorker {
    fn content_key(&self, _: &Node, _: &[Option<&Ref>]) -> Result<Option<[u8; 32]>, String> {
        Ok(None)
    }
    fn immediate(&self, _: &Node) -> Option<Ref> {
        None
    }
    fn exec(
        &self,
        _node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        _inputs: &[Ref],
        _progress: &dyn Progress,
        activity: &StepActivity,
    ) -> Result<Ref, String> {
        self.running.set(&meta.description, true);
        if meta.description.starts_with("RUN ") {
            (self.script)(&self.running, &meta.description, activity);
        }
        self.running.set(&meta.description, false);
        Ok(Ref::Snapshot(format!("result-{}", key.hex())))
    }
    fn exists(&self, _r: &Ref) -> bool {
        true
    }
}

fn solve_bounded(worker: &dyn Worker, def: &Definition, n: usize, bound: Bound) {
    let cancel = AtomicBool::new(false);
    let events = Events::default();
    Solver::new(worker, &MemoryCache::default(), &events, n, &cancel)
        .with_bound(bound)
        .solve(def)
        .unwrap();
}

const SAFETY_NET: Duration = Duration::from_secs(10);

#[test]
fn idle_steps_hold_no_slot_of_the_busy_bound() {
    // Four idle branches under a busy-steps bound of 2: all four run at once (each waits
    // for the others, so a scheduler that stops at 2 leaves them at 2 until the net).
    let worker = ScriptedWorker::new(|w: &Running, _step: &str, activity: &StepActivity| {
        activity.set_idle(true);
        // Until all four have been seen running together (the first to finish lowers the
        // count again, so the last one cannot wait for the count itself).
        w.wait_until(SAFETY_NET, |_| w.max.load(Ordering::SeqCst) == 4);
    });
    solve_bounded(&worker, &fan_out(4), 2, Bound::BusySteps);
    assert_eq!(worker.running.max.load(Ordering::SeqCst), 4);
}

#[test]
fn busy_steps_never_exceed_the_busy_bound() {
    let worker = FakeWorker {
        sleep: Duration::from_millis(150),
        ..Default::default()
    };
    solve_bounded(&worker, &fan_out(6), 2, Bound::BusySteps);
    assert_eq!(worker.max_running.load(Ordering::SeqCst), 2);
    assert_eq!(worker.runs().len(), 8);
}

#[test]
fn an_explicit_bound_holds_even_for_idle_steps() {
    // Idle steps that would all run together under the busy bound (see above), each
    // waiting a while for the others: never more than 2 at once.
    let worker = ScriptedWorker::new(|w: &Running, _step: &str, activity: &StepActivity| {
        activity.set_idle(true);
        w.wait_until(Duration::from_millis(300), |r| r.len() > 2);
    });
    solve_bounded(&worker, &fan_out(4), 2, Bound::Steps);
    assert_eq!(worker.running.max.load(Ordering::SeqCst), 2);
}

#[test]
fn a_step_busy_again_takes_its_slot_back() {
    // Bound 1. RUN 0 goes idle, so RUN 1 starts; then RUN 0 is busy again and RUN 1 goes
    // idle: one busy step holds the only slot, so RUN 2 must wait until RUN 0 ends.
    let worker = ScriptedWorker::new(
        |w: &Running, step: &str, activity: &StepActivity| match step {
            "RUN 0" => {
                activity.set_idle(true);
                w.wait_until(SAFETY_NET, |r| r.contains("RUN 1"));
                activity.set_idle(false);
                w.set("RUN 0 busy again", true);
                // Time for a wrong scheduler to start RUN 2 next to this busy step.
                w.wait_until(Duration::from_millis(500), |r| r.contains("RUN 2"));
                w.set("RUN 0 busy again", false);
            }
            "RUN 1" => {
                w.wait_until(SAFETY_NET, |r| r.contains("RUN 0 busy again"));
                activity.set_idle(true);
                w.wait_until(SAFETY_NET, |r| !r.contains("RUN 0"));
            }
            _ => {
                if w.steps.lock().unwrap().contains("RUN 0") {
                    // Left in the set, for the assertion below.
                    w.set("RUN 2 ran next to RUN 0", true);
                }
            }
        },
    );
    solve_bounded(&worker, &fan_out(3), 1, Bound::BusySteps);
    // RUN 0 (busy again, its marker) and the idle RUN 1 ran at once ...
    assert_eq!(worker.running.max.load(Ordering::SeqCst), 3);
    // ... but RUN 2 only after RUN 0.
    let left = worker.running.steps.lock().unwrap().clone();
    assert!(left.is_empty(), "{left:?}");
}
