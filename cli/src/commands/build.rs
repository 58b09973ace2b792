//! `strata build`: Dockerfile -> plan -> solve -> export -> outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use strata_dag::image::ImageConfig;
use strata_dag::Platform;
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};
use strata_frontend::dockerignore::{read_ignore_file, PatternMatcher};
use strata_registry::{Client, Reference};
use strata_sandbox::Sandbox;
use strata_solver::contenthash::StatCache;
use strata_solver::progress::{PlainProgress, Progress, ProgressEvent, TtyProgress};
use strata_solver::worker::RealWorker;
use strata_solver::{Bound, Solver};

use super::build_cache;
use crate::args::{BuildArgs, Cli, ProgressMode};
use crate::diagnostics;
use crate::store::Store;

/// Set by SIGINT/SIGTERM; the build stops and exits 130.
static CANCELLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// On SIGINT/SIGTERM: undo this process's mounts and exit 130 at once. Running steps die
/// with us (the sandbox init has a parent-death signal and its mounts live in its own
/// namespace); an uncommitted snapshot is never referenced by the cache, so `prune` reaps it.
fn watch_for_cancel(mounts_dir: PathBuf) {
    std::thread::spawn(move || loop {
        if CANCELLED.load(Ordering::SeqCst) {
            eprintln!("ERROR: build cancelled");
            // Kill the running steps (their cgroups) first, so nothing holds the mounts.
            strata_sandbox::kill_running_steps();
            let _ = strata_snapshotter::mount::unmount_all_under(&mounts_dir);
            std::process::exit(130);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
}

struct RegistryResolver<'a> {
    client: &'a Client,
}

impl ImageResolver for RegistryResolver<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, String> {
        let r = Reference::parse(reference).map_err(|e| e.to_string())?;
        let resolved = self
            .client
            .resolve(&r, platform)
            .map_err(|e| e.to_string())?;
        let config = ImageConfig::from_json(&resolved.config_bytes)
            .map_err(|e| format!("parse image config: {e}"))?;
        let pinned = format!(
            "{}/{}@{}",
            r.registry, r.repository, resolved.manifest_digest
        );
        Ok(ResolvedImage { pinned, config })
    }
}

pub(super) fn parse_build_args(list: &[String]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for a in list {
        match a.split_once('=') {
            Some((k, v)) => {
                map.insert(k.to_string(), v.to_string());
            }
            // `--build-arg NAME` takes the value from the environment, as docker does.
            None => {
                if let Ok(v) = std::env::var(a) {
                    map.insert(a.clone(), v);
                }
            }
        }
    }
    map
}

/// Reads `<dockerfile>.dockerignore` next to the Dockerfile, else `<context>/.dockerignore`.
fn read_dockerignore(dockerfile: &Path, context: &Path) -> Result<Vec<String>> {
    let beside = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
    for candidate in [beside, context.join(".dockerignore")] {
        if candidate.is_file() {
            let text = std::fs::read_to_string(&candidate)
                .with_context(|| format!("read {}", candidate.display()))?;
            return Ok(read_ignore_file(&text));
        }
    }
    Ok(Vec::new())
}

pub fn run(cli: &Cli, args: &BuildArgs) -> Result<i32> {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(p) = &args.platform {
        if p != "linux/amd64" {
            bail!("platform {p} is not supported yet (only linux/amd64)");
        }
    }
    let context = args
        .context
        .canonicalize()
        .with_context(|| format!("context {}", args.context.display()))?;
    if !context.is_dir() {
        bail!("context {} is not a directory", context.display());
    }
    let dockerfile_path = args
        .file
        .clone()
        .unwrap_or_else(|| context.join("Dockerfile"));
    let dockerfile_text = std::fs::read_to_string(&dockerfile_path)
        .with_context(|| format!("failed to read dockerfile {}", dockerfile_path.display()))?;
    let dockerfile_name = dockerfile_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());

    let outputs = super::outputs::parse_outputs(args)?;
    let cache_opts = build_cache::CacheOptions::parse(&args.cache_to, &args.cache_from)?;

    let build_args = parse_build_args(&args.build_args);
    let source_date_epoch = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| anyhow!("invalid SOURCE_DATE_EPOCH {s:?}"))
        })
        .transpose()?;

    let client = crate::config::registry_client(cli)?;
    let ignore_patterns = read_dockerignore(&dockerfile_path, &context)?;
    let opts = ConvertOptions {
        build_args,
        target: args.target.clone(),
        platform: Platform::default(),
        dockerignore: ignore_patterns.clone(),
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        dockerfile_name: dockerfile_name.clone(),
    };
    let quiet = args.quiet || args.progress == ProgressMode::Quiet;
    // `auto` is the live display when stderr is a terminal, as in buildx.
    let tty = match args.progress {
        ProgressMode::Tty => true,
        ProgressMode::Auto => !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ProgressMode::Plain | ProgressMode::Quiet => false,
    };
    let progress: Box<dyn Progress> = if tty && !quiet {
        Box::new(TtyProgress::new())
    } else {
        Box::new(PlainProgress::new(quiet))
    };
    progress.event(ProgressEvent::Started {
        description: format!("[internal] load build definition from {dockerfile_name}"),
    });
    let definition_started = std::time::Instant::now();
    let plan = match convert(
        &dockerfile_text,
        &opts,
        &RegistryResolver { client: &client },
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "{}",
                diagnostics::render_convert_error(&dockerfile_name, &dockerfile_text, &e)
            );
            return Ok(1);
        }
    };
    if tty && !quiet {
        // Ends the live line; plain progress has never printed a DONE for this vertex
        // (tests count DONE lines of `[...]` vertices as executed steps).
        progress.event(ProgressEvent::Done {
            description: format!("[internal] load build definition from {dockerfile_name}"),
            seconds: definition_started.elapsed().as_secs_f64(),
        });
    }
    if !plan.warnings.is_empty() {
        eprintln!("{}", diagnostics::render_warnings(&plan.warnings));
    }
    if let Some(w) = diagnostics::render_unused_build_args(&plan.unused_build_args) {
        eprintln!("{w}");
    }
    if let Some(e) = &plan.lint_error {
        eprintln!("ERROR: failed to solve: {e}");
        return Ok(1);
    }

    let mut run_env = crate::runopts::run_env(&args.secrets, &args.ssh, &args.allow)?;
    if let Err(e) = strata_solver::runmount::check_entitlements(&plan.definition, &run_env) {
        eprintln!("ERROR: failed to solve: {e}");
        return Ok(1);
    }

    let store = Store::open(&cli.root)?;
    run_env.cache_mounts_dir = Some(store.cache_mounts_dir());
    strata_solver::runmount::clean_stale_secrets();
    run_env.proxy_env = plan.proxy_env.clone();
    watch_for_cancel(store.mounts_dir.clone());
    let ignore = if ignore_patterns.is_empty() {
        None
    } else {
        Some(PatternMatcher::new(&ignore_patterns).map_err(|e| anyhow!("{e}"))?)
    };
    let init_exe = std::fs::read_link("/proc/self/exe").context("find the strata binary")?;
    let stat_cache = Arc::new(StatCache::open(&store.root.join("statcache-v1")));
    let mut worker = RealWorker::new(
        store.snapshotter.clone(),
        store.content.clone(),
        Arc::new(client),
        Arc::new(Sandbox::new(init_exe)),
        store.mounts_dir.clone(),
        context.clone(),
        ignore,
        stat_cache.clone(),
    );
    worker.run_env = run_env;
    worker.reuse_previous_copies = !args.no_cache;
    let prefetch =
        super::outputs::LayerPrefetch::start(&store, &plan.definition, &outputs, source_date_epoch)
            .map(Arc::new);
    if let Some(p) = &prefetch {
        let p = p.clone();
        worker.on_result = Some(Arc::new(move |node, snapshot| p.offer(node, snapshot)));
    }
    // An explicit --max-parallelism is a hard bound on running steps; the default bounds
    // only the CPU-busy ones by the core count, so sleeping or network-bound RUN steps of
    // independent stages overlap beyond it.
    let (parallelism, bound) = match args.max_parallelism {
        Some(n) => (n, Bound::Steps),
        None => (
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            Bound::BusySteps,
        ),
    };
    // Imported caches answer after the local one, pulling a hit's layers only when the
    // solve asks for that key.
    let imports = build_cache::import_descriptions(&worker.registry, &cache_opts.from, &progress);
    let cache = strata_cache::ImportingCache::new(
        &store.cache,
        &worker,
        &worker.registry,
        &progress,
        imports,
    );
    let restoring = strata_cache::MountRestoringWorker::new(
        &worker,
        &worker.registry,
        cache.imported(),
        store.cache_mounts_dir(),
        &progress,
    );
    let solver =
        Solver::new(&restoring, &cache, &progress, parallelism, &CANCELLED).with_bound(bound);
    let solved = solver.solve(&plan.definition);
    // The stat cache is written while the last layers are made.
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = stat_cache.save();
        });
        if let Some(p) = &prefetch {
            p.finish();
        }
    });
    let imported = cache.report();
    if imported.hits > 0 {
        progress.event(ProgressEvent::Info {
            message: format!(
                "#imported cache: {} hits, fetched {} blobs ({} bytes)",
                imported.hits, imported.blobs_fetched, imported.bytes_fetched
            ),
        });
    }
    let (result, report) = match solved {
        Ok(r) => r,
        Err(strata_solver::Error::Cancelled) => {
            eprintln!("ERROR: build cancelled");
            return Ok(130);
        }
        Err(strata_solver::Error::Step {
            step,
            message,
            location,
        }) => {
            let msg = format!("failed to solve: {step}: {message}");
            match location {
                Some(l) => eprintln!(
                    "{}",
                    diagnostics::render(
                        &dockerfile_name,
                        &dockerfile_text,
                        l.start_line,
                        l.end_line,
                        &msg
                    )
                ),
                None => eprintln!("ERROR: {msg}"),
            }
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    if CANCELLED.load(Ordering::SeqCst) {
        return Ok(130);
    }

    let epoch = source_date_epoch;
    let cache_state = build_cache::Solved {
        store: &store,
        imported: cache.imported(),
        // Only looked up when exported: each lookup opens the cache database.
        records: if cache_opts.to.is_empty() {
            Vec::new()
        } else {
            build_cache::exportable_records(&store, &worker, &report)
        },
        result: &result,
        source_date_epoch: epoch,
        cache_mount_ids: strata_cache::cache_mount_ids(&plan.definition),
    };
    super::outputs::write_outputs(
        cli,
        args,
        &outputs,
        super::outputs::BuildResult {
            store: &store,
            result: &result,
            config: build_cache::with_inline_cache(
                plan.image,
                &cache_opts,
                &cache_state,
                outputs.first().map(|o| &o.image.compression),
            )?,
            epoch,
        },
        quiet,
        &progress,
    )?;
    build_cache::export_caches(&cache_state, &worker.registry, &cache_opts.to, &progress)?;
    Ok(0)
}
