//! `strata build`: Dockerfile -> plan -> solve -> export -> outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use strata_dag::image::ImageConfig;
use strata_dag::Platform;
use strata_exporter::{Compression, ImageRecord, ImageStore, LayerBlob};
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};
use strata_frontend::dockerignore::{read_ignore_file, PatternMatcher};
use strata_registry::{Client, ClientConfig, Reference};
use strata_sandbox::Sandbox;
use strata_snapshotter::layer::DiffOptions;
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::Snapshotter;
use strata_solver::contenthash::StatCache;
use strata_solver::progress::{PlainProgress, Progress, ProgressEvent};
use strata_solver::worker::{snapshot_chain, RealWorker, LABEL_BLOB};
use strata_solver::{Ref, Solver};

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
            let _ = strata_snapshotter::mount::unmount_all_under(&mounts_dir);
            std::process::exit(130);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
}

/// One requested output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    Image,
    Registry,
    Oci(PathBuf),
    Docker(PathBuf),
    Local(PathBuf),
}

fn parse_output(spec: &str) -> Result<Output> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').unwrap_or(("type", part));
        fields.insert(k.trim().to_string(), v.trim().to_string());
    }
    let kind = fields
        .get("type")
        .cloned()
        .unwrap_or_else(|| "local".into());
    let dest = || -> Result<PathBuf> {
        fields
            .get("dest")
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("output type={kind} needs dest=PATH"))
    };
    match kind.as_str() {
        "image" => Ok(Output::Image),
        "registry" => Ok(Output::Registry),
        "oci" => Ok(Output::Oci(dest()?)),
        "docker" => match fields.get("dest") {
            Some(d) => Ok(Output::Docker(PathBuf::from(d))),
            None => Ok(Output::Image),
        },
        "local" => Ok(Output::Local(dest()?)),
        "tar" => bail!("output type \"tar\" is not supported yet"),
        other => {
            bail!("unknown output type \"{other}\" (want image, registry, oci, docker or local)")
        }
    }
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

fn parse_build_args(list: &[String]) -> BTreeMap<String, String> {
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

fn now_rfc3339(epoch: Option<i64>) -> String {
    match epoch {
        Some(e) => chrono::DateTime::from_timestamp(e, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    }
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

    let mut outputs: Vec<Output> = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<Result<_>>()?;
    if args.push {
        outputs.push(Output::Registry);
    }
    if args.load || (outputs.is_empty() && !args.tags.is_empty()) {
        outputs.push(Output::Image);
    }
    if outputs.contains(&Output::Registry) && args.tags.is_empty() {
        bail!("--push needs an image name (-t NAME)");
    }

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

    let client = Client::new(ClientConfig {
        insecure: cli.insecure_registries.clone(),
    });
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
    let progress = PlainProgress::new(quiet);
    progress.event(ProgressEvent::Started {
        description: format!("[internal] load build definition from {dockerfile_name}"),
    });
    let plan = match convert(
        &dockerfile_text,
        &opts,
        &RegistryResolver { client: &client },
    ) {
        Ok(p) => p,
        Err(e) => {
            let msg = match e.location {
                Some(l) => diagnostics::render(
                    &dockerfile_name,
                    &dockerfile_text,
                    l.start_line,
                    l.end_line,
                    &e.message,
                ),
                None => format!("ERROR: {}", e.message),
            };
            eprintln!("{msg}");
            return Ok(1);
        }
    };
    for w in &plan.warnings {
        let at = w
            .location
            .map(|l| format!(" (line {})", l.start_line))
            .unwrap_or_default();
        eprintln!(" 1 warning found{at}: {}", w.message);
    }
    for a in &plan.unused_build_args {
        eprintln!("[Warning] One or more build-args [{a}] were not consumed");
    }

    let mut run_env = crate::runopts::run_env(&args.secrets, &args.ssh, &args.allow)?;
    if let Err(e) = strata_solver::runmount::check_entitlements(&plan.definition, &run_env) {
        eprintln!("ERROR: failed to solve: {e}");
        return Ok(1);
    }

    let store = Store::open(&cli.root)?;
    run_env.cache_mounts_dir = Some(store.cache_mounts_dir());
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
    let parallelism = args.max_parallelism.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let solver = Solver::new(&worker, &store.cache, &progress, parallelism, &CANCELLED);
    let solved = solver.solve(&plan.definition);
    let _ = stat_cache.save();
    let (result, _report) = match solved {
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
    let exported = export_image(&store, &worker, &result, plan.image, epoch, &progress)?;
    let digest = exported.manifest_digest.to_string();
    progress.event(ProgressEvent::Info {
        message: format!("#exporting writing image {digest} done"),
    });
    for out in &outputs {
        match out {
            Output::Image => {
                let images = ImageStore::open(&store.images_dir())?;
                let created = chrono::Utc::now().timestamp();
                if args.tags.is_empty() {
                    images.tag(
                        &format!("<none>@{}", exported.config_digest),
                        &exported,
                        created,
                    )?;
                }
                for t in &args.tags {
                    images.tag(t, &exported, created)?;
                    progress.event(ProgressEvent::Info {
                        message: format!("naming to {t} done"),
                    });
                }
            }
            Output::Registry => {
                let client = Client::new(ClientConfig {
                    insecure: cli.insecure_registries.clone(),
                });
                for t in &args.tags {
                    let reference = Reference::parse(t).map_err(|e| anyhow!("{e}"))?;
                    let pushed =
                        strata_exporter::push_image(&client, &store.content, &exported, &reference)
                            .with_context(|| format!("push {t}"))?;
                    progress.event(ProgressEvent::Info {
                        message: format!("pushing {t} {pushed} done"),
                    });
                }
            }
            Output::Oci(dest) => {
                let name = args.tags.first().map(String::as_str);
                strata_exporter::write_oci_archive(&store.content, &exported, name, dest)
                    .with_context(|| format!("write {}", dest.display()))?;
            }
            Output::Docker(dest) => {
                strata_exporter::write_docker_archive(&store.content, &exported, &args.tags, dest)
                    .with_context(|| format!("write {}", dest.display()))?;
            }
            Output::Local(dest) => export_local(&store, &result, dest)?,
        }
    }
    if let Some(path) = &args.iidfile {
        std::fs::write(path, exported.config_digest.to_string())?;
    }
    if let Some(path) = &args.metadata_file {
        let meta = serde_json::json!({
            "containerimage.digest": exported.manifest_digest.to_string(),
            "containerimage.config.digest": exported.config_digest.to_string(),
            "image.name": args.tags.join(","),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&meta)?)?;
    }
    if quiet {
        println!("{}", exported.config_digest);
    }
    Ok(0)
}

/// Turns the result's snapshot chain into layer blobs (each compressed once, remembered
/// in the snapshot's labels) and writes config and manifest.
fn export_image(
    store: &Store,
    _worker: &RealWorker,
    result: &Ref,
    mut image: ImageConfig,
    epoch: Option<i64>,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let chain = snapshot_chain(store.snapshotter.as_ref(), result).map_err(|e| anyhow!(e))?;
    let mut layers: Vec<LayerBlob> = Vec::new();
    for name in &chain {
        let info = store.snapshotter.stat(name)?;
        let blob: Option<LayerBlob> = info
            .labels
            .get(LABEL_BLOB)
            .and_then(|s| serde_json::from_str(s).ok())
            .filter(|b: &LayerBlob| store.content.exists(&b.digest));
        let blob = match blob {
            Some(b) => b,
            None => {
                let upper = store.snapshotter.upper_dir(name)?;
                let b = strata_exporter::export_layer(
                    &upper,
                    &store.content,
                    &Compression::default(),
                    &DiffOptions {
                        source_date_epoch: epoch,
                    },
                )?;
                let mut labels = BTreeMap::new();
                labels.insert(LABEL_BLOB.to_string(), serde_json::to_string(&b)?);
                store.snapshotter.update_labels(name, labels)?;
                b
            }
        };
        layers.push(blob);
    }
    let created = now_rfc3339(epoch);
    image.created = Some(created.clone());
    for h in image.history.iter_mut() {
        if h.created.is_none() {
            h.created = Some(created.clone());
        }
    }
    image.rootfs.kind = "layers".into();
    image.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
    progress.event(ProgressEvent::Info {
        message: format!("#exporting {} layers", layers.len()),
    });
    Ok(strata_exporter::write_image_config(
        &store.content,
        &layers,
        &image,
        true,
    )?)
}

/// `--output type=local,dest=DIR`: the final root filesystem, copied out of a read-only view.
fn export_local(store: &Store, result: &Ref, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let Ref::Snapshot(name) = result else {
        return Ok(());
    };
    let key = format!(
        "export-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let mounts = store.snapshotter.view(&key, name)?;
    let target = store.mounts_dir.join(&key);
    std::fs::create_dir_all(&target)?;
    let copied = (|| -> Result<()> {
        let guard = MountGuard::mount(&mounts, &target)?;
        strata_exporter::copy_rootfs(&target, dest)?;
        guard.unmount()?;
        Ok(())
    })();
    let _ = std::fs::remove_dir(&target);
    let _ = store.snapshotter.remove(&key);
    copied
}
