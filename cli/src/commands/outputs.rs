//! `strata build` outputs: `--output` specs with buildx's attributes, image assembly (one
//! layer blob per snapshot, compression and SOURCE_DATE_EPOCH), and the writes: local
//! store, registry, OCI and docker tars, the final filesystem as a directory or a tar,
//! `--iidfile` and `--metadata-file`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use strata_dag::image::{History, ImageConfig};
use strata_exporter::{Compression, ImageRecord, ImageStore, LayerBlob};
use strata_registry::Reference;
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::layer::DiffOptions;
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::{OverlaySnapshotter, Snapshotter};
use strata_solver::progress::{Progress, ProgressEvent};
use strata_solver::worker::{snapshot_chain, LABEL_BLOB, LABEL_CACHE_KEY};
use strata_solver::Ref;

use crate::args::{BuildArgs, Cli};
use crate::store::Store;

/// What an output does with the build result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An image: into the local store and/or pushed (`type=image|registry`, `type=docker`
    /// without dest, `--load`, `--push`).
    Image,
    /// OCI layout tar (or directory with `tar=false`).
    Oci,
    /// `docker load` tar.
    Docker,
    /// The final root filesystem into a directory.
    Local,
    /// The final root filesystem as a tar.
    Tar,
}

/// Where an archive output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    Stdout,
    Path(PathBuf),
}

/// How the image's layers and manifest are made; outputs that differ here get images of
/// their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    pub compression: Compression,
    /// Re-compress base-image layers stored with another compression.
    pub force_compression: bool,
    pub oci_media_types: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            compression: Compression::default(),
            force_compression: false,
            oci_media_types: true,
        }
    }
}

/// One parsed `--output`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSpec {
    pub kind: Kind,
    pub dest: Option<Dest>,
    /// `name=` (comma-separated in buildx, so given as several); else the `-t` tags.
    pub names: Vec<String>,
    /// Tag into the local image store (`type=image`, `type=docker` without dest).
    pub store: bool,
    pub push: bool,
    /// `tar=false` for `type=oci`: an OCI layout directory.
    pub tar: bool,
    pub image: ImageOptions,
    /// `compression=` or `compression-level=` was given.
    pub compression_given: bool,
}

impl OutputSpec {
    fn new(kind: Kind) -> Self {
        OutputSpec {
            kind,
            dest: None,
            names: Vec::new(),
            store: kind == Kind::Image,
            push: false,
            tar: true,
            image: ImageOptions::default(),
            compression_given: false,
        }
    }

    /// Whether this output needs an image (config, manifest, layer blobs).
    fn needs_image(&self) -> bool {
        matches!(self.kind, Kind::Image | Kind::Oci | Kind::Docker)
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => bail!("output attribute {key}={v:?}: want true or false"),
    }
}

/// Splits `a=1,name=x,y` as buildx does: a part without `=` continues the previous
/// value (so `name=a,b` names two images), and a first part without `=` is the type.
fn split_attributes(spec: &str) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in spec.split(',') {
        match part.split_once('=') {
            Some((k, v)) => out.push((k.trim().to_string(), v.trim().to_string())),
            None if out.is_empty() => out.push(("type".into(), part.trim().to_string())),
            None => {
                if let Some(last) = out.last_mut() {
                    last.1.push(',');
                    last.1.push_str(part.trim());
                }
            }
        }
    }
    Ok(out)
}

/// Parses one `--output` value with buildx's attributes.
pub fn parse_output(spec: &str) -> Result<OutputSpec> {
    let attrs = split_attributes(spec)?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in attrs {
        if fields.insert(k.clone(), v).is_some() {
            bail!("output {spec:?}: attribute {k} given twice");
        }
    }
    let kind_name = fields.remove("type").unwrap_or_else(|| "local".into());
    let mut out = match kind_name.as_str() {
        "image" => OutputSpec::new(Kind::Image),
        "registry" => {
            let mut o = OutputSpec::new(Kind::Image);
            o.store = false;
            o.push = true;
            o
        }
        "oci" => OutputSpec::new(Kind::Oci),
        "docker" => {
            let mut o = OutputSpec::new(Kind::Docker);
            o.image.oci_media_types = false;
            o
        }
        "local" => OutputSpec::new(Kind::Local),
        "tar" => OutputSpec::new(Kind::Tar),
        other => {
            bail!("unknown output type {other:?} (want image, registry, oci, docker, local or tar)")
        }
    };
    let image_kind = out.needs_image();
    let mut level: Option<i32> = None;
    let mut compression: Option<String> = None;
    for (key, value) in fields {
        let applies = match key.as_str() {
            "dest" => !matches!(kind_name.as_str(), "image" | "registry"),
            "name" | "compression" | "compression-level" | "force-compression"
            | "oci-mediatypes" => image_kind,
            "push" => kind_name == "image",
            "tar" => kind_name == "oci",
            _ => bail!(
                "output type={kind_name}: unknown attribute {key:?} (supported: dest, name, \
                 push, compression, compression-level, force-compression, oci-mediatypes, tar)"
            ),
        };
        if !applies {
            bail!("output type={kind_name}: attribute {key:?} does not apply to this type");
        }
        match key.as_str() {
            "dest" => {
                if value.is_empty() {
                    bail!("output type={kind_name}: dest is empty");
                }
                out.dest = Some(if value == "-" {
                    Dest::Stdout
                } else {
                    Dest::Path(PathBuf::from(value))
                });
            }
            "name" => {
                out.names = value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "push" => out.push = parse_bool(&key, &value)?,
            "tar" => out.tar = parse_bool(&key, &value)?,
            "compression" => compression = Some(value),
            "compression-level" => {
                level = Some(value.parse().map_err(|_| {
                    anyhow!("output attribute compression-level={value:?}: not a number")
                })?)
            }
            "force-compression" => out.image.force_compression = parse_bool(&key, &value)?,
            "oci-mediatypes" => out.image.oci_media_types = parse_bool(&key, &value)?,
            _ => {}
        }
    }
    if compression.is_some() || level.is_some() {
        out.compression_given = true;
        out.image.compression =
            Compression::from_name(compression.as_deref().unwrap_or("gzip"), level)
                .map_err(|e| anyhow!("output type={kind_name}: {e}"))?;
    }
    match (out.kind, &out.dest) {
        (Kind::Docker, None) => {
            // buildx: type=docker without dest loads the image into the engine's store.
            out.kind = Kind::Image;
            out.store = true;
        }
        (Kind::Oci | Kind::Local | Kind::Tar, None) => {
            bail!("output type={kind_name} needs dest=PATH")
        }
        (Kind::Local, Some(Dest::Stdout)) => {
            bail!("output type=local needs a directory as dest (use type=tar,dest=- for stdout)")
        }
        (Kind::Oci, Some(Dest::Stdout)) if !out.tar => {
            bail!("output type=oci,tar=false needs a directory as dest")
        }
        _ => {}
    }
    Ok(out)
}

/// All outputs of a build: `--output` values plus `--push` and `--load`, and an image in
/// the local store when only `-t` is given.
pub fn parse_outputs(args: &BuildArgs) -> Result<Vec<OutputSpec>> {
    let mut outputs: Vec<OutputSpec> = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<Result<_>>()?;
    if args.push {
        // `--push` is `type=image,push=true` merged into an image output if there is one.
        match outputs.iter_mut().find(|o| o.kind == Kind::Image) {
            Some(o) => o.push = true,
            None => {
                let mut o = OutputSpec::new(Kind::Image);
                o.store = false;
                o.push = true;
                outputs.push(o);
            }
        }
    }
    if args.load || (outputs.is_empty() && !args.tags.is_empty()) {
        match outputs.iter_mut().find(|o| o.kind == Kind::Image) {
            Some(o) => o.store = true,
            None => outputs.push(OutputSpec::new(Kind::Image)),
        }
    }
    for o in outputs.iter_mut() {
        // Like Docker's image store, the local one keeps built layers uncompressed: the
        // build only tars and hashes them, and `strata push` compresses (once; see
        // `strata_exporter::compressed_for_push`).
        if o.kind == Kind::Image && o.store && !o.push && !o.compression_given {
            o.image.compression = Compression::Uncompressed;
        }
    }
    let stdout_outputs = outputs
        .iter()
        .filter(|o| o.dest == Some(Dest::Stdout))
        .count();
    if stdout_outputs > 1 {
        bail!("only one output can go to stdout (dest=-)");
    }
    for o in &outputs {
        if o.push && o.names.is_empty() && args.tags.is_empty() {
            bail!("pushing needs an image name (-t NAME or name=NAME)");
        }
    }
    Ok(outputs)
}

/// The label remembering a built snapshot's layer blob for one compression and epoch: a
/// blob made without SOURCE_DATE_EPOCH (unclamped mtimes) is never reused for a build
/// with one, nor one made for another epoch.
pub(crate) fn blob_label(compression: &Compression, epoch: Option<i64>) -> String {
    match epoch {
        None => format!("{LABEL_BLOB}.{}", compression.name()),
        Some(e) => format!("{LABEL_BLOB}.{}.epoch-{e}", compression.name()),
    }
}

/// What making layer blobs needs of the store; owned (shared), so a background thread can
/// make them while the build runs (see [`LayerPrefetch`]).
#[derive(Clone)]
pub(crate) struct Layers {
    snapshotter: Arc<OverlaySnapshotter>,
    content: Arc<ContentStore>,
}

impl Layers {
    pub(crate) fn of(store: &Store) -> Self {
        Layers {
            snapshotter: store.snapshotter.clone(),
            content: store.content.clone(),
        }
    }
}

fn stored_blob(labels: &BTreeMap<String, String>, key: &str, store: &Layers) -> Option<LayerBlob> {
    labels
        .get(key)
        .and_then(|s| serde_json::from_str::<LayerBlob>(s).ok())
        .filter(|b| store.content.exists(&b.digest))
}

/// The blob for one snapshot of the chain, made and remembered when missing.
///
/// Base-image layers (committed by a pull, with the pulled blob in `strata.io/blob` and
/// no cache key) keep their blob unless `force-compression` asks for another
/// compression; they are never re-diffed, so SOURCE_DATE_EPOCH leaves them untouched as
/// BuildKit's rewrite-timestamp does. Built layers are diffed with the requested
/// compression (its level only matters when the blob is first made).
fn layer_blob(
    store: &Layers,
    name: &str,
    opts: &ImageOptions,
    epoch: Option<i64>,
) -> Result<LayerBlob> {
    let info = store.snapshotter.stat(name)?;
    let pulled = info
        .labels
        .get(LABEL_BLOB)
        .filter(|_| !info.labels.contains_key(LABEL_CACHE_KEY))
        .and_then(|s| serde_json::from_str::<LayerBlob>(s).ok());
    if let Some(base) = pulled {
        let same = strata_exporter::compression_of_media_type(&base.media_type)
            == Some(opts.compression.name());
        let have_base = store.content.exists(&base.digest);
        if have_base && (same || !opts.force_compression) {
            return Ok(base);
        }
        let key = blob_label(&opts.compression, None);
        if let Some(b) = stored_blob(&info.labels, &key, store) {
            return Ok(b);
        }
        let b = if have_base {
            strata_exporter::recompress_blob(&store.content, &base, &opts.compression)?
        } else {
            let upper = store.snapshotter.upper_dir(name)?;
            strata_exporter::export_layer(
                &upper,
                &store.content,
                &opts.compression,
                &DiffOptions::default(),
            )?
        };
        remember(store, name, &key, &b)?;
        return Ok(b);
    }
    let key = blob_label(&opts.compression, epoch);
    if let Some(b) = stored_blob(&info.labels, &key, store) {
        return Ok(b);
    }
    let upper = store.snapshotter.upper_dir(name)?;
    let b = strata_exporter::export_layer(
        &upper,
        &store.content,
        &opts.compression,
        &DiffOptions {
            source_date_epoch: epoch,
        },
    )?;
    remember(store, name, &key, &b)?;
    if epoch.is_none() && opts.compression == Compression::default() {
        // Cache export reuses the blob in `strata.io/blob` (as it did before there were
        // per-compression labels) instead of diffing the layer again.
        if !info.labels.contains_key(LABEL_BLOB) {
            remember(store, name, LABEL_BLOB, &b)?;
        }
    }
    Ok(b)
}

fn remember(store: &Layers, name: &str, key: &str, blob: &LayerBlob) -> Result<()> {
    let mut labels = BTreeMap::new();
    labels.insert(key.to_string(), serde_json::to_string(blob)?);
    store.snapshotter.update_labels(name, labels)?;
    Ok(())
}

fn created_time(epoch: Option<i64>) -> String {
    match epoch {
        Some(e) => chrono::DateTime::from_timestamp(e, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    }
}

/// Turns the result's snapshot chain into layer blobs (several layers compressed at once)
/// and writes config and manifest.
fn assemble_image(
    store: &Store,
    result: &Ref,
    mut image: ImageConfig,
    opts: &ImageOptions,
    epoch: Option<i64>,
    created: &str,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let chain = snapshot_chain(store.snapshotter.as_ref(), result).map_err(|e| anyhow!(e))?;
    let layers = Layers::of(store);
    let slots: Vec<Mutex<Option<Result<LayerBlob>>>> =
        chain.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(chain.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (Some(name), Some(slot)) = (chain.get(i), slots.get(i)) else {
                    return;
                };
                let r = layer_blob(&layers, name, opts, epoch)
                    .with_context(|| format!("export layer {name}"));
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    let mut layers = Vec::with_capacity(chain.len());
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(r) => layers.push(r?),
            None => bail!("a layer was not exported"),
        }
    }
    if epoch.is_none() {
        layer_times(store, &chain, &mut image.history)?;
    }
    for h in image.history.iter_mut() {
        if h.created.is_none() {
            h.created = Some(created.to_string());
        }
    }
    image.created = match epoch {
        None => image.history.iter().rev().find_map(|h| h.created.clone()),
        Some(_) => None,
    }
    .or_else(|| Some(created.to_string()));
    image.rootfs.kind = "layers".into();
    image.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
    progress.event(ProgressEvent::Info {
        message: format!(
            "#exporting {} layers ({})",
            layers.len(),
            opts.compression.name()
        ),
    });
    Ok(strata_exporter::write_image_config(
        &store.content,
        &layers,
        &image,
        opts.oci_media_types,
    )?)
}

/// Dates history as BuildKit does without SOURCE_DATE_EPOCH: a layer's entry takes the
/// time its snapshot was made, and an entry without a layer (ENV, CMD) the time of the
/// first new layer after it, else of the layer before it. The image's own `created` is
/// then the last entry's. So a cached rebuild writes the very same config and manifest
/// (the same image ID) instead of a new one stamped with the build's time.
fn layer_times(store: &Store, chain: &[String], history: &mut [History]) -> Result<()> {
    for (layer, h) in history.iter_mut().filter(|h| !h.empty_layer).enumerate() {
        if h.created.is_none() {
            if let Some(name) = chain.get(layer) {
                let made = store.snapshotter.stat(name)?.created;
                h.created = chrono::DateTime::from_timestamp(made, 0)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            }
        }
    }
    // The first new layer's time (or the last known one when none follows a gap) ...
    let mut fill: Option<String> = None;
    let mut gap = false;
    for h in history.iter() {
        match &h.created {
            Some(t) => {
                fill = Some(t.clone());
                if gap {
                    break;
                }
            }
            None => gap = true,
        }
    }
    // ... for the entries before any dated one; later ones take the time before them.
    let mut gap = false;
    for h in history.iter_mut() {
        match &h.created {
            Some(t) if gap => fill = Some(t.clone()),
            Some(_) => {}
            None => {
                gap = true;
                h.created = fill.clone();
            }
        }
    }
    Ok(())
}

/// Makes the layer blobs of the final image in the background while the build goes on:
/// each step on the final stage's chain (the root and its rootfs/base inputs, down to the
/// image) hands its result over as soon as it is committed, and one thread makes its blob
/// for the first image output, remembering it in the snapshot's labels as the export
/// would. The export then finds them made. Layers of other stages are never made.
pub(crate) struct LayerPrefetch {
    chain: std::collections::HashSet<strata_dag::Digest>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<String>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LayerPrefetch {
    /// `None` when no output needs an image.
    pub(crate) fn start(
        store: &Store,
        def: &strata_dag::Definition,
        outputs: &[OutputSpec],
        epoch: Option<i64>,
    ) -> Option<LayerPrefetch> {
        let opts = outputs.iter().find(|o| o.needs_image())?.image.clone();
        let chain = final_chain(def);
        let layers = Layers::of(store);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let thread = std::thread::Builder::new()
            .name("strata-layer-prefetch".into())
            .spawn(move || {
                for name in rx {
                    // A failure here is met again, and reported, by the export itself.
                    let _ = layer_blob(&layers, &name, &opts, epoch);
                }
            })
            .ok()?;
        Some(LayerPrefetch {
            chain,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// For [`strata_solver::worker::RealWorker::on_result`].
    pub(crate) fn offer(&self, node: &strata_dag::Node, snapshot: &str) {
        if !self.chain.contains(&node.digest()) {
            return;
        }
        if let Some(tx) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(snapshot.to_string());
        }
    }

    /// Waits until every offered layer is made.
    pub(crate) fn finish(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The nodes whose results are layers of the final image: the root and, down from it, the
/// input each step is made on (an exec's rootfs, a file op's base) until the image.
fn final_chain(def: &strata_dag::Definition) -> std::collections::HashSet<strata_dag::Digest> {
    let by_digest: std::collections::HashMap<strata_dag::Digest, &strata_dag::Node> =
        def.nodes.iter().map(|n| (n.digest(), n)).collect();
    let mut chain = std::collections::HashSet::new();
    let mut next = def.root.as_ref().map(|r| r.digest.clone());
    while let Some(digest) = next.take() {
        let Some(node) = by_digest.get(&digest) else {
            break;
        };
        let base = match &node.op {
            strata_dag::Op::Exec(e) => e.rootfs_input,
            strata_dag::Op::File(f) => f.base_input,
            _ => None,
        };
        next = base
            .and_then(|i| node.inputs.get(i as usize))
            .map(|i| i.digest.clone());
        if !chain.insert(digest) {
            break;
        }
    }
    chain
}

/// Images made so far, one per distinct [`ImageOptions`].
struct Images<'a> {
    store: &'a Store,
    result: &'a Ref,
    config: &'a ImageConfig,
    epoch: Option<i64>,
    /// One timestamp for every image of the build, so their configs agree.
    created: String,
    progress: &'a dyn Progress,
    made: Vec<(ImageOptions, ImageRecord)>,
}

impl Images<'_> {
    fn get(&mut self, opts: &ImageOptions) -> Result<ImageRecord> {
        if let Some((_, r)) = self.made.iter().find(|(o, _)| o == opts) {
            return Ok(r.clone());
        }
        let r = assemble_image(
            self.store,
            self.result,
            self.config.clone(),
            opts,
            self.epoch,
            &self.created,
            self.progress,
        )?;
        self.progress.event(ProgressEvent::Info {
            message: format!("#exporting writing image {} done", r.manifest_digest),
        });
        self.made.push((opts.clone(), r.clone()));
        Ok(r)
    }
}

/// Everything a build hands to its outputs.
pub struct BuildResult<'a> {
    pub store: &'a Store,
    pub result: &'a Ref,
    pub config: ImageConfig,
    pub epoch: Option<i64>,
}

/// Writes every output, then `--iidfile` and `--metadata-file`; prints the image ID
/// with `--quiet` (unless an output owns stdout).
pub fn write_outputs(
    cli: &Cli,
    args: &BuildArgs,
    outputs: &[OutputSpec],
    build: BuildResult<'_>,
    quiet: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let mut images = Images {
        store: build.store,
        result: build.result,
        config: &build.config,
        epoch: build.epoch,
        created: created_time(build.epoch),
        progress,
        made: Vec::new(),
    };
    let mut first: Option<(ImageRecord, Vec<String>)> = None;
    for out in outputs {
        let names = if out.names.is_empty() {
            args.tags.clone()
        } else {
            out.names.clone()
        };
        let record = if out.needs_image() {
            let r = images.get(&out.image)?;
            first.get_or_insert_with(|| (r.clone(), names.clone()));
            Some(r)
        } else {
            None
        };
        match (out.kind, record) {
            (Kind::Image, Some(r)) => write_image(cli, build.store, out, &names, &r, progress)?,
            (Kind::Oci, Some(r)) => {
                let name = names.first().map(String::as_str);
                match &out.dest {
                    Some(Dest::Stdout) => strata_exporter::write_oci_archive_to(
                        &build.store.content,
                        &r,
                        name,
                        std::io::stdout().lock(),
                    )
                    .context("write oci archive to stdout")?,
                    Some(Dest::Path(p)) if !out.tar => {
                        strata_exporter::write_oci_dir(&build.store.content, &r, name, p)
                            .with_context(|| format!("write oci layout {}", p.display()))?
                    }
                    Some(Dest::Path(p)) => {
                        strata_exporter::write_oci_archive(&build.store.content, &r, name, p)
                            .with_context(|| format!("write {}", p.display()))?
                    }
                    None => bail!("output type=oci needs dest=PATH"),
                }
            }
            (Kind::Docker, Some(r)) => match &out.dest {
                Some(Dest::Stdout) => strata_exporter::write_docker_archive_to(
                    &build.store.content,
                    &r,
                    &names,
                    std::io::stdout().lock(),
                )
                .context("write docker archive to stdout")?,
                Some(Dest::Path(p)) => {
                    strata_exporter::write_docker_archive(&build.store.content, &r, &names, p)
                        .with_context(|| format!("write {}", p.display()))?
                }
                None => bail!("output type=docker needs dest=PATH"),
            },
            (Kind::Local, _) => match &out.dest {
                Some(Dest::Path(p)) => export_local(build.store, build.result, p)?,
                _ => bail!("output type=local needs dest=DIR"),
            },
            (Kind::Tar, _) => {
                export_tar(build.store, build.result, out.dest.as_ref(), build.epoch)?
            }
            (_, None) => bail!("output {:?} has no image", out.kind),
        }
    }
    // --iidfile, --metadata-file and --quiet describe an image; one is made when no output
    // made one (buildx reports the image its exporter made).
    let wants_image = args.iidfile.is_some() || args.metadata_file.is_some() || quiet;
    if first.is_none() && wants_image {
        let r = images.get(&ImageOptions::default())?;
        first = Some((r, args.tags.clone()));
    }
    if let (Some(path), Some((r, _))) = (&args.iidfile, &first) {
        std::fs::write(path, r.config_digest.to_string())
            .with_context(|| format!("write iidfile {}", path.display()))?;
    }
    if let (Some(path), Some((r, names))) = (&args.metadata_file, &first) {
        let meta = metadata_json(r, names);
        std::fs::write(path, serde_json::to_vec_pretty(&meta)?)
            .with_context(|| format!("write metadata file {}", path.display()))?;
    }
    let stdout_taken = outputs.iter().any(|o| o.dest == Some(Dest::Stdout));
    if let (true, false, Some((r, _))) = (quiet, stdout_taken, &first) {
        println!("{}", r.config_digest);
    }
    Ok(())
}

/// buildx's metadata keys for an image exporter's result.
fn metadata_json(r: &ImageRecord, names: &[String]) -> serde_json::Value {
    let mut meta = serde_json::json!({
        "containerimage.digest": r.manifest_digest.to_string(),
        "containerimage.config.digest": r.config_digest.to_string(),
        "containerimage.descriptor": {
            "mediaType": r.media_type,
            "digest": r.manifest_digest.to_string(),
            "size": r.manifest_size,
        },
    });
    if !names.is_empty() {
        meta["image.name"] = serde_json::Value::String(names.join(","));
    }
    meta
}

/// `type=image`: tag into the local store and/or push.
fn write_image(
    cli: &Cli,
    store: &Store,
    out: &OutputSpec,
    names: &[String],
    r: &ImageRecord,
    progress: &dyn Progress,
) -> Result<()> {
    if out.store {
        let images = ImageStore::open(&store.images_dir())?;
        let now = chrono::Utc::now().timestamp();
        if names.is_empty() {
            // Like a dangling image in docker: stored, named by nothing but its ID.
            progress.event(ProgressEvent::Info {
                message: format!("writing image {} (no name given)", r.config_digest),
            });
        }
        for n in names {
            images.tag(n, r, now)?;
            progress.event(ProgressEvent::Info {
                message: format!("naming to {n} done"),
            });
        }
    }
    if out.push {
        let client = crate::config::registry_client(cli)?;
        for n in names {
            let reference = Reference::parse(n).map_err(|e| anyhow!("{e}"))?;
            let report = strata_exporter::push_image_report(&client, &store.content, r, &reference)
                .with_context(|| format!("push {n}"))?;
            progress.event(ProgressEvent::Info {
                message: format!(
                    "pushing {n} {}: {} blobs uploaded, {} mounted, {} already present",
                    report.manifest_digest,
                    report.uploaded.len(),
                    report.mounted.len(),
                    report.existing.len()
                ),
            });
        }
    }
    Ok(())
}

/// Mounts a read-only view of the result and runs `f` on its root (an empty directory
/// for a scratch result).
fn with_rootfs<T>(store: &Store, result: &Ref, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let key = format!(
        "export-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let target = store.mounts_dir.join(&key);
    std::fs::create_dir_all(&target)
        .with_context(|| format!("create mount point {}", target.display()))?;
    let Ref::Snapshot(name) = result else {
        let r = f(&target);
        let _ = std::fs::remove_dir(&target);
        return r;
    };
    let mounts = store.snapshotter.view(&key, name)?;
    let done = (|| -> Result<T> {
        let guard = MountGuard::mount(&mounts, &target)?;
        let r = f(&target);
        guard.unmount()?;
        r
    })();
    let _ = std::fs::remove_dir(&target);
    let _ = store.snapshotter.remove(&key);
    done
}

/// `type=local,dest=DIR`: the final root filesystem, copied out of a read-only view.
fn export_local(store: &Store, result: &Ref, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("create {}", dest.display()))?;
    with_rootfs(store, result, |root| {
        strata_exporter::copy_rootfs(root, dest)
            .with_context(|| format!("copy the root filesystem to {}", dest.display()))
    })
}

/// `type=tar`: the final root filesystem as one tar (to a file or stdout); mtimes are
/// clamped to SOURCE_DATE_EPOCH when set.
fn export_tar(store: &Store, result: &Ref, dest: Option<&Dest>, epoch: Option<i64>) -> Result<()> {
    let opts = DiffOptions {
        source_date_epoch: epoch,
    };
    with_rootfs(store, result, |root| match dest {
        Some(Dest::Stdout) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            strata_snapshotter::layer::write_layer(root, &mut out, &opts)
                .context("write root filesystem tar to stdout")?;
            out.flush().context("write root filesystem tar to stdout")?;
            Ok(())
        }
        Some(Dest::Path(p)) => {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            // A new file beside the destination, renamed into place when complete.
            let tmp = super::tempfile::tempfile_in(&dir, "strata-tar")?;
            {
                let mut w = std::io::BufWriter::new(&tmp.1);
                strata_snapshotter::layer::write_layer(root, &mut w, &opts)
                    .with_context(|| format!("write root filesystem tar {}", p.display()))?;
                w.flush()
                    .with_context(|| format!("write root filesystem tar {}", p.display()))?;
            }
            std::fs::rename(&tmp.0, p).with_context(|| format!("rename into {}", p.display()))?;
            Ok(())
        }
        None => bail!("output type=tar needs dest=PATH or dest=-"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeResolver;

    impl strata_frontend::convert::ImageResolver for FakeResolver {
        fn resolve(
            &self,
            reference: &str,
            _platform: &strata_dag::Platform,
        ) -> Result<strata_frontend::convert::ResolvedImage, String> {
            Ok(strata_frontend::convert::ResolvedImage {
                pinned: format!(
                    "{reference}@{}",
                    strata_dag::Digest::of(reference.as_bytes())
                ),
                config: ImageConfig::default(),
            })
        }
    }

    #[test]
    fn only_the_final_stages_steps_have_layers_made_early() {
        let text = "FROM img AS builder\nRUN make\nCOPY src /src\n\
                    FROM img\nRUN setup\nCOPY --from=builder /src /app\nENV A=1\n";
        let opts = strata_frontend::convert::ConvertOptions {
            dockerfile_name: "Dockerfile".into(),
            ..Default::default()
        };
        let def = strata_frontend::convert::convert(text, &opts, &FakeResolver)
            .unwrap()
            .definition;
        let chain = final_chain(&def);
        let described = |d: &strata_dag::Digest| {
            def.metadata
                .get(d)
                .map(|m| m.description.clone())
                .unwrap_or_default()
        };
        let mut names: Vec<String> = chain.iter().map(described).collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().any(|n| n.contains("RUN setup")), "{names:?}");
        assert!(
            names.iter().any(|n| n.contains("COPY --from=builder")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("FROM img")), "{names:?}");
        assert!(!names
            .iter()
            .any(|n| n.contains("make") || n.contains("COPY src")));
    }

    #[test]
    fn buildx_attributes_parse() {
        let o = parse_output(
            "type=image,name=a:1,b:2,push=true,compression=zstd,compression-level=5,\
             force-compression=true,oci-mediatypes=false",
        )
        .unwrap();
        assert_eq!(o.kind, Kind::Image);
        assert_eq!(o.names, ["a:1", "b:2"]);
        assert!(o.push && o.store);
        assert_eq!(o.image.compression, Compression::Zstd { level: 5 });
        assert!(o.image.force_compression);
        assert!(!o.image.oci_media_types);

        let r = parse_output("type=registry").unwrap();
        assert!(r.push && !r.store);
        let d = parse_output("type=docker").unwrap();
        assert_eq!((d.kind, d.store), (Kind::Image, true));
        let d = parse_output("type=docker,dest=x.tar").unwrap();
        assert_eq!(d.kind, Kind::Docker);
        assert!(
            !d.image.oci_media_types,
            "docker defaults to docker media types"
        );
        let t = parse_output("type=tar,dest=-").unwrap();
        assert_eq!((t.kind, t.dest), (Kind::Tar, Some(Dest::Stdout)));
        let l = parse_output("dest=out").unwrap();
        assert_eq!(l.kind, Kind::Local, "type defaults to local");
        let oci = parse_output("type=oci,dest=dir,tar=false").unwrap();
        assert!(!oci.tar);
        let gz = parse_output("type=oci,dest=x,compression-level=9").unwrap();
        assert_eq!(gz.image.compression, Compression::Gzip { level: 9 });
    }

    #[test]
    fn bad_attributes_are_clear_errors() {
        for (spec, needle) in [
            ("type=image,bogus=1", "unknown attribute \"bogus\""),
            ("type=local,compression=zstd,dest=x", "does not apply"),
            ("type=oci", "needs dest"),
            ("type=tar", "needs dest"),
            ("type=image,compression=lz4", "unknown compression"),
            ("type=image,compression=gzip,compression-level=12", "0..=9"),
            ("type=image,push=maybe", "want true or false"),
            ("type=nope", "unknown output type"),
            ("type=local,dest=-", "directory"),
            ("type=image,name=a,name=b", "given twice"),
        ] {
            let err = parse_output(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn blob_labels_differ_by_compression_and_epoch() {
        let gz = Compression::default();
        let zs = Compression::Zstd { level: 3 };
        let labels = [
            blob_label(&gz, None),
            blob_label(&zs, None),
            blob_label(&gz, Some(1)),
            blob_label(&gz, Some(2)),
        ];
        for (i, a) in labels.iter().enumerate() {
            assert!(a.starts_with(LABEL_BLOB));
            for b in &labels[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
