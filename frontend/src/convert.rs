//! Lowering: typed stages -> a content-addressed [`Definition`] plus the image config,
//! following BuildKit's `dockerfile2llb` (ARG/ENV scoping, which words are expanded,
//! stage reachability, COPY/WORKDIR/RUN shapes).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use strata_dag::image::{Empty, HealthConfig, History, ImageConfig};
use strata_dag::{
    CopyAction, DefinitionBuilder, ExecMount, ExecMountKind, ExecOp, FileAction, FileOp, Input,
    Network, Node, NodeMeta, Op, Owner, Platform, SourceLocation, SourceOp, UserSpec,
};

use crate::instructions::{
    ArgDecl, Command, CommandLine, CopyInstr, Dockerfile, HealthcheckInstr, Instruction, Location,
    RunInstr, Stage,
};
use crate::shell::{EnvGetter, Lex};

/// The default `PATH` BuildKit puts in every Linux image without one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The name of the build context in [`SourceOp::Local`].
pub const CONTEXT_NAME: &str = "context";

/// A base image resolved to a pinned reference and its config.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// `host/repository@sha256:...`
    pub pinned: String,
    pub config: ImageConfig,
}

/// Resolves `FROM`/`COPY --from` image names (BuildKit's metadata resolver).
pub trait ImageResolver: Sync {
    /// `reference` as the Dockerfile names it after expansion (`busybox`, `host:5000/x:tag`).
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, String>;
}

#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    pub build_args: BTreeMap<String, String>,
    /// Stage to build; the last one when `None`.
    pub target: Option<String>,
    pub platform: Platform,
    /// `.dockerignore` patterns (already read with `read_ignore_file`).
    pub dockerignore: Vec<String>,
    pub no_cache: bool,
    /// Stage names whose steps skip the cache.
    pub no_cache_filter: Vec<String>,
    /// The Dockerfile's name, for locations.
    pub dockerfile_name: String,
}

/// What the frontend hands the solver and the exporter.
#[derive(Clone, Debug)]
pub struct BuildPlan {
    pub definition: strata_dag::Definition,
    /// The target stage's image config; `rootfs` holds the base image's diff IDs only, the
    /// exporter fills in the rest. New history entries have no `created` yet.
    pub image: ImageConfig,
    pub warnings: Vec<Warning>,
    /// Build args given but never declared.
    pub unused_build_args: Vec<String>,
    /// Proxy build args (`HTTP_PROXY`, `no_proxy`, ...): the worker adds them to every
    /// RUN without their being declared, outside the definition, as BuildKit does.
    pub proxy_env: Vec<(String, String)>,
    /// `# check=error=true` (or `BUILDKIT_DOCKERFILE_CHECK`) with warnings: the build must
    /// fail after printing them, with BuildKit's `lint violation found for rules: ...`.
    pub lint_error: Option<String>,
}

/// A build check warning (BuildKit's lint rules); printed, never fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// BuildKit's rule name (`MaintainerDeprecated`, ...), see [`crate::lint`].
    pub rule: String,
    pub message: String,
    pub location: Option<Location>,
}

/// Which step of the frontend failed; BuildKit words the errors of typing the
/// instructions as `dockerfile parse error on line N: ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorKind {
    /// The text could not be parsed (parser directives, JSON, heredocs, ...).
    Parse,
    /// A parsed line is not a valid instruction (unknown instruction or flag, argument
    /// counts, ...).
    Instruction,
    /// The instructions could not be lowered (expansion, stages, images, modes, ...).
    #[default]
    Lowering,
}

/// A lowering error with the Dockerfile location it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConvertError {
    pub message: String,
    pub location: Option<Location>,
    pub kind: ErrorKind,
}

impl ConvertError {
    fn at(message: impl Into<String>, location: Location) -> Self {
        ConvertError {
            message: message.into(),
            location: Some(location),
            kind: ErrorKind::Lowering,
        }
    }
    fn bare(message: impl Into<String>) -> Self {
        ConvertError {
            message: message.into(),
            location: None,
            kind: ErrorKind::Lowering,
        }
    }
}

/// Parses and lowers a Dockerfile.
pub fn convert(
    text: &str,
    opts: &ConvertOptions,
    resolver: &dyn ImageResolver,
) -> Result<BuildPlan, ConvertError> {
    if text.is_empty() {
        return Err(ConvertError::bare("the Dockerfile cannot be empty"));
    }
    let parsed = crate::parser::parse(text).map_err(|e| ConvertError {
        message: e.message.clone(),
        location: Some(Location {
            start_line: e.line,
            end_line: e.end_line,
        }),
        kind: ErrorKind::Parse,
    })?;
    let dockerfile = crate::instructions::from_ast(&parsed.root).map_err(|e| ConvertError {
        message: e.message.clone(),
        location: Some(e.location),
        kind: ErrorKind::Instruction,
    })?;
    let mut lint_env = default_args(&opts.platform);
    for (k, v) in &opts.build_args {
        set_pair(&mut lint_env, k, v.clone());
    }
    // BuildKit reads the check options from the build arg first, then the directive.
    let check_options = match opts.build_args.get("BUILDKIT_DOCKERFILE_CHECK") {
        Some(v) => v.clone(),
        None => parsed
            .directives
            .iter()
            .find(|(k, _)| k == "check")
            .map(|(_, v)| v.split(' ').next().unwrap_or_default().to_string())
            .unwrap_or_default(),
    };
    let check = crate::lint::CheckConfig::parse(&check_options)
        .map_err(|e| ConvertError::bare(format!("failed to parse check options: {e}")))?;
    let mut warnings = crate::lint::check(&parsed, &dockerfile, &lint_env);
    let mut converter = Converter::new(&dockerfile, opts, resolver, parsed.escape)?;
    let plan = converter.run()?;
    warnings.append(&mut converter.warnings);
    warnings.retain(|w| !check.skips(&w.rule));
    let lint_error = check.error_for(&warnings);
    Ok(BuildPlan {
        warnings,
        lint_error,
        ..plan
    })
}

/// An `ARG` as declared in a stage, with its resolved value.
#[derive(Clone, Debug)]
struct BuildArg {
    key: String,
    value: Option<String>,
}

#[derive(Clone)]
struct StageState {
    root: Option<Input>,
    image: ImageConfig,
    /// The step environment (BuildKit's llb state env): image ENV, ENV and ARG values.
    env: Vec<(String, String)>,
    build_args: Vec<BuildArg>,
    /// Working directory of steps (llb `Dir`); "/" by default.
    dir: String,
    user: String,
    cmd_set: bool,
    ignore_cache: bool,
    name: String,
    cmd_index: usize,
    cmd_total: usize,
}

struct StageInfo<'a> {
    stage: &'a Stage,
    /// FROM after expansion with the global args.
    base: String,
    /// Display name: `AS` name or `stage-N`.
    display: String,
}

enum BaseKind {
    Scratch,
    Stage(usize),
    Image(String),
}

struct Converter<'a> {
    opts: &'a ConvertOptions,
    resolver: &'a dyn ImageResolver,
    lex: Lex,
    global_args: Vec<(String, String)>,
    stages: Vec<StageInfo<'a>>,
    by_name: HashMap<String, usize>,
    done: HashMap<usize, StageState>,
    in_progress: BTreeSet<usize>,
    builder: DefinitionBuilder,
    context: Option<Input>,
    images: HashMap<String, ResolvedImage>,
    used_args: BTreeSet<String>,
    warnings: Vec<Warning>,
    /// Variables the current instruction's words used but that were unset, for
    /// BuildKit's `UndefinedVar` check (interior mutability: `expand` takes `&self`).
    unmatched: std::cell::RefCell<BTreeSet<String>>,
}

fn default_args(platform: &Platform) -> Vec<(String, String)> {
    let fmt = |p: &Platform| match &p.variant {
        Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
        None => format!("{}/{}", p.os, p.architecture),
    };
    let build = Platform::default();
    vec![
        ("BUILDPLATFORM".into(), fmt(&build)),
        ("BUILDOS".into(), build.os.clone()),
        ("BUILDARCH".into(), build.architecture.clone()),
        (
            "BUILDVARIANT".into(),
            build.variant.clone().unwrap_or_default(),
        ),
        ("TARGETPLATFORM".into(), fmt(platform)),
        ("TARGETOS".into(), platform.os.clone()),
        ("TARGETARCH".into(), platform.architecture.clone()),
        (
            "TARGETVARIANT".into(),
            platform.variant.clone().unwrap_or_default(),
        ),
    ]
}

fn set_pair(list: &mut Vec<(String, String)>, key: &str, value: String) {
    if let Some(slot) = list.iter_mut().find(|(k, _)| k == key) {
        slot.1 = value;
    } else {
        list.push((key.to_string(), value));
    }
}

/// `addEnv` on a config Env list (`K=V` strings): replace in place or append.
fn add_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    if let Some(slot) = env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        *slot = entry;
    } else {
        env.push(entry);
    }
}

/// The fully qualified form docker prints for an image reference
/// (`busybox` -> `docker.io/library/busybox:latest`).
pub fn normalize_reference(name: &str) -> String {
    let (first, rest) = name.split_once('/').unwrap_or(("", name));
    let is_domain =
        !first.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut out = if is_domain {
        name.to_string()
    } else if first.is_empty() {
        format!("docker.io/library/{rest}")
    } else {
        format!("docker.io/{name}")
    };
    let last = out.rsplit('/').next().unwrap_or_default();
    if !out.contains('@') && !last.contains(':') {
        out.push_str(":latest");
    }
    out
}

/// Go's `path.Clean`.
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// BuildKit's `system.NormalizePath(cwd, p, keepSlash)` for Linux.
fn normalize_path(cwd: &str, p: &str, keep_slash: bool) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{cwd}/{p}")
    };
    let mut out = clean_path(&joined);
    if !out.starts_with('/') {
        out = format!("/{out}");
    }
    if keep_slash && (p.ends_with('/') || p.ends_with("/.")) && out != "/" {
        out.push('/');
    }
    out
}

/// BuildKit's `pathRelativeToWorkingDir`: a COPY destination under the working dir.
fn dest_path(dir: &str, p: &str) -> String {
    if p.starts_with('/') {
        return normalize_path("/", p, true);
    }
    let p = if p == "." || p.is_empty() { "./" } else { p };
    normalize_path(dir, p, true)
}

fn parse_user_spec(s: &str) -> UserSpec {
    match s.parse::<u32>() {
        Ok(id) => UserSpec::Id(id),
        Err(_) => UserSpec::Name(s.to_string()),
    }
}

/// `--chown=user[:group]` / a WORKDIR owner from `USER`.
pub fn parse_owner(s: &str) -> Option<Owner> {
    if s.is_empty() {
        return None;
    }
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    Some(Owner {
        user: parse_user_spec(user),
        group: group.filter(|g| !g.is_empty()).map(parse_user_spec),
    })
}

fn parse_chmod(s: &str, location: Location) -> Result<u32, ConvertError> {
    let non_octal = || {
        ConvertError::at(
            format!(
                "invalid chmod parameter: '{s}'. it should be octal string and between 0 and 07777"
            ),
            location,
        )
    };
    match u32::from_str_radix(s, 8) {
        Ok(v) if v <= 0o7777 => Ok(v),
        Ok(_) => Err(non_octal()),
        Err(_) if s.chars().all(|c| c.is_ascii_digit()) => Err(non_octal()),
        Err(_) => Err(ConvertError::at(
            format!("--chmod={s}: only octal modes are supported"),
            location,
        )),
    }
}

/// Parses a Go duration (`30s`, `1m30s`, `500ms`) into nanoseconds.
fn parse_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    Some(total as i64)
}

fn shell_or_default(image: &ImageConfig) -> Vec<String> {
    if image.config.shell.is_empty() {
        vec!["/bin/sh".into(), "-c".into()]
    } else {
        image.config.shell.clone()
    }
}

fn with_shell(image: &ImageConfig, cmd: &str) -> Vec<String> {
    let mut args = shell_or_default(image);
    args.push(cmd.to_string());
    args
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    format!("[{}]", quoted.join(" "))
}

/// EXPOSE values: `80`, `80/udp`, `8000-8002/tcp` -> `port/proto` keys.
fn expand_ports(spec: &str, location: Location) -> Result<Vec<String>, ConvertError> {
    let bad = || ConvertError::at(format!("invalid containerPort: {spec}"), location);
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(ConvertError::at(
            format!("invalid proto: {proto}"),
            location,
        ));
    }
    let (start, end) = match ports.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = ports.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if end < start {
        return Err(bad());
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

impl<'a> Converter<'a> {
    fn new(
        df: &'a Dockerfile,
        opts: &'a ConvertOptions,
        resolver: &'a dyn ImageResolver,
        escape: char,
    ) -> Result<Self, ConvertError> {
        if df.stages.is_empty() {
            return Err(ConvertError::bare("dockerfile contains no stages to build"));
        }
        let lex = Lex::new(escape);
        let mut global_args = default_args(&opts.platform);
        let mut used_args = BTreeSet::new();
        // buildMetaArgs: global ARGs, in order, each expanded with the ones before it.
        for (decl, location) in &df.meta_args {
            used_args.insert(decl.name.clone());
            let value = if let Some(v) = opts.build_args.get(&decl.name) {
                Some(v.clone())
            } else if let Some(default) = &decl.default {
                Some(
                    lex.process_word(default, &global_args)
                        .map_err(|e| ConvertError::at(e.to_string(), *location))?,
                )
            } else {
                None
            };
            if let Some(v) = value {
                set_pair(&mut global_args, &decl.name, v);
            }
        }
        let mut stages = Vec::new();
        let mut by_name = HashMap::new();
        for (i, stage) in df.stages.iter().enumerate() {
            let base = lex
                .process_word(&stage.base, &global_args)
                .map_err(|e| ConvertError::at(e.to_string(), stage.location))?;
            if base.is_empty() {
                return Err(ConvertError::at(
                    format!("base name ({}) should not be blank", stage.base),
                    stage.location,
                ));
            }
            let display = stage.name.clone().unwrap_or_else(|| format!("stage-{i}"));
            if let Some(name) = &stage.name {
                by_name.insert(name.to_lowercase(), i);
            }
            stages.push(StageInfo {
                stage,
                base,
                display,
            });
        }
        Ok(Converter {
            opts,
            resolver,
            lex,
            global_args,
            stages,
            by_name,
            done: HashMap::new(),
            in_progress: BTreeSet::new(),
            builder: DefinitionBuilder::new(),
            context: None,
            images: HashMap::new(),
            used_args,
            warnings: Vec::new(),
            unmatched: Default::default(),
        })
    }

    fn run(&mut self) -> Result<BuildPlan, ConvertError> {
        let target = match &self.opts.target {
            None => self.stages.len() - 1,
            Some(t) => *self.by_name.get(&t.to_lowercase()).ok_or_else(|| {
                // BuildKit's suggest.WrapError over the stage names, case-sensitive.
                let mut names: Vec<&String> = self.by_name.keys().collect();
                names.sort();
                let mut msg = format!("target stage \"{t}\" could not be found");
                let close = names
                    .iter()
                    .map(|n| (crate::suggest::levenshtein(t, n), *n))
                    .filter(|(d, _)| *d < 3)
                    .min_by_key(|(d, _)| *d);
                if let Some((_, n)) = close {
                    msg.push_str(&format!(" (did you mean {n}?)"));
                }
                ConvertError::bare(msg)
            })?,
        };
        self.dispatch_stage(target)?;
        let state = self
            .done
            .remove(&target)
            .ok_or_else(|| ConvertError::bare("target stage was not built"))?;
        let builder = std::mem::take(&mut self.builder);
        let definition = builder.finish(state.root.clone());
        let mut unused: Vec<String> = self
            .opts
            .build_args
            .keys()
            .filter(|k| !self.used_args.contains(*k) && !is_predefined_arg(k))
            .cloned()
            .collect();
        unused.sort();
        Ok(BuildPlan {
            definition,
            image: state.image,
            warnings: Vec::new(),
            unused_build_args: unused,
            lint_error: None,
            proxy_env: self
                .opts
                .build_args
                .iter()
                .filter(|(k, _)| is_proxy_arg(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    fn base_kind(&self, index: usize) -> BaseKind {
        let base = &self.stages[index].base;
        if base == "scratch" {
            return BaseKind::Scratch;
        }
        // BuildKit matches FROM against earlier stage names exactly (names are lowercase).
        if let Some(&i) = self.by_name.get(base.as_str()) {
            if i < index {
                return BaseKind::Stage(i);
            }
        }
        BaseKind::Image(base.clone())
    }

    fn resolve_image(
        &mut self,
        name: &str,
        location: Location,
    ) -> Result<ResolvedImage, ConvertError> {
        if let Some(r) = self.images.get(name) {
            return Ok(r.clone());
        }
        let resolved = self
            .resolver
            .resolve(name, &self.opts.platform)
            .map_err(|e| {
                ConvertError::at(
                    format!(
                        "failed to resolve source metadata for {}: {e}",
                        normalize_reference(name)
                    ),
                    location,
                )
            })?;
        self.images.insert(name.to_string(), resolved.clone());
        Ok(resolved)
    }

    fn image_source(&mut self, resolved: &ResolvedImage, description: String) -> Input {
        self.builder.add(
            Node {
                inputs: vec![],
                op: Op::Source(SourceOp::Image {
                    reference: resolved.pinned.clone(),
                }),
                platform: self.opts.platform.clone(),
            },
            NodeMeta {
                description,
                ..Default::default()
            },
        )
    }

    fn context_input(&mut self) -> Input {
        if let Some(c) = &self.context {
            return c.clone();
        }
        let input = self.builder.add(
            Node {
                inputs: vec![],
                op: Op::Source(SourceOp::Local {
                    name: CONTEXT_NAME.into(),
                    exclude: self.opts.dockerignore.clone(),
                    shared_key: String::new(),
                }),
                platform: self.opts.platform.clone(),
            },
            NodeMeta {
                description: "[internal] load build context".into(),
                ..Default::default()
            },
        );
        self.context = Some(input.clone());
        input
    }

    fn stage_ref(&self, from: &str, location: Location) -> Result<Option<usize>, ConvertError> {
        if let Ok(index) = from.parse::<i64>() {
            if index < 0 || index as usize >= self.stages.len() {
                return Err(ConvertError::at(
                    format!("invalid stage index {index}"),
                    location,
                ));
            }
            return Ok(Some(index as usize));
        }
        Ok(self.by_name.get(&from.to_lowercase()).copied())
    }

    fn dispatch_stage(&mut self, index: usize) -> Result<(), ConvertError> {
        if self.done.contains_key(&index) {
            return Ok(());
        }
        let info_location = self.stages[index].stage.location;
        if !self.in_progress.insert(index) {
            return Err(ConvertError::at(
                "circular dependency detected on stage",
                info_location,
            ));
        }
        let stage = self.stages[index].stage;
        let display = self.stages[index].display.clone();
        let ignore_cache = self.opts.no_cache
            || stage.name.as_ref().is_some_and(|n| {
                self.opts
                    .no_cache_filter
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(n))
            });

        let cmd_total = stage
            .commands
            .iter()
            .filter(|c| {
                matches!(
                    c.instruction,
                    Instruction::Add(_)
                        | Instruction::Copy(_)
                        | Instruction::Run(_)
                        | Instruction::Workdir(_)
                )
            })
            .count();

        let mut state = match self.base_kind(index) {
            BaseKind::Stage(i) => {
                self.dispatch_stage(i)?;
                let mut base = self
                    .done
                    .get(&i)
                    .cloned()
                    .ok_or_else(|| ConvertError::bare("stage was not built"))?;
                base.image.config.on_build.clear();
                base.cmd_index = 0;
                base.cmd_total = cmd_total;
                base.name = display.clone();
                base.ignore_cache = ignore_cache;
                base.cmd_set = false;
                base
            }
            BaseKind::Scratch => {
                let mut image = ImageConfig {
                    architecture: self.opts.platform.architecture.clone(),
                    os: self.opts.platform.os.clone(),
                    variant: self.opts.platform.variant.clone(),
                    ..Default::default()
                };
                image.rootfs.kind = "layers".into();
                self.new_state(None, image, display.clone(), ignore_cache, cmd_total)
            }
            BaseKind::Image(name) => {
                let resolved = self.resolve_image(&name, stage.location)?;
                let total = cmd_total + 1;
                let description = format!("[{display} 1/{total}] FROM {}", resolved.pinned);
                let root = self.image_source(&resolved, description);
                let mut st = self.new_state(
                    Some(root),
                    resolved.config.clone(),
                    display.clone(),
                    ignore_cache,
                    total,
                );
                st.cmd_index = 1;
                st
            }
        };
        if !matches!(self.base_kind(index), BaseKind::Stage(_)) {
            // make sure that PATH is always set
            if !state
                .image
                .config
                .env
                .iter()
                .any(|e| e.starts_with("PATH="))
            {
                state.image.config.env.push(format!("PATH={DEFAULT_PATH}"));
            }
            for e in state.image.config.env.clone() {
                let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
                set_pair(&mut state.env, k, v.to_string());
            }
            if !state.image.config.working_dir.is_empty() {
                state.dir = state.image.config.working_dir.clone();
            }
            state.user = state.image.config.user.clone();
        }

        // ONBUILD triggers of the base image run first.
        let triggers = std::mem::take(&mut state.image.config.on_build);
        for trigger in &triggers {
            let cmd = parse_trigger(trigger).map_err(|m| {
                ConvertError::at(
                    format!("failed to parse onbuild trigger {trigger:?}: {m}"),
                    stage.location,
                )
            })?;
            let cmd = Command {
                location: stage.location,
                ..cmd
            };
            self.dispatch(&mut state, &cmd)?;
        }

        for cmd in &stage.commands {
            self.dispatch(&mut state, cmd)?;
        }
        self.in_progress.remove(&index);
        self.done.insert(index, state);
        Ok(())
    }

    fn new_state(
        &self,
        root: Option<Input>,
        image: ImageConfig,
        name: String,
        ignore_cache: bool,
        cmd_total: usize,
    ) -> StageState {
        StageState {
            root,
            image,
            env: Vec::new(),
            build_args: Vec::new(),
            dir: "/".into(),
            user: String::new(),
            cmd_set: false,
            ignore_cache,
            name,
            cmd_index: 0,
            cmd_total,
        }
    }

    fn expand(
        &self,
        state: &StageState,
        word: &str,
        location: Location,
    ) -> Result<String, ConvertError> {
        let expansion = self
            .lex
            .process_word_with_matches(word, &state.env)
            .map_err(|e| ConvertError::at(e.to_string(), location))?;
        self.unmatched.borrow_mut().extend(expansion.unmatched);
        Ok(expansion.value)
    }

    /// BuildKit's `reportUnmatchedVariables`: variables an instruction's words used that
    /// are neither set nor declared ARGs of the stage (ARG itself and RUN, whose words the
    /// shell expands, are not checked).
    fn report_undefined_vars(&mut self, state: &StageState, cmd: &Command) {
        let unmatched = std::mem::take(&mut *self.unmatched.borrow_mut());
        if matches!(cmd.instruction, Instruction::Arg(_) | Instruction::Run(_)) {
            return;
        }
        let keys: Vec<&str> = state.env.iter().map(|(k, _)| k.as_str()).collect();
        for name in unmatched {
            if state.build_args.iter().any(|a| a.key == name) {
                continue;
            }
            let mut message = format!("Usage of undefined variable '${name}'");
            let close = keys
                .iter()
                .filter(|k| **k != name)
                .map(|k| (crate::suggest::levenshtein(&name, k), *k))
                .filter(|(d, _)| *d < 3)
                .min_by_key(|(d, _)| *d);
            if let Some((_, k)) = close {
                message.push_str(&format!(" (did you mean ${k}?)"));
            }
            self.warnings.push(Warning {
                rule: "UndefinedVar".into(),
                message,
                location: Some(cmd.location),
            });
        }
    }

    /// Expands ENV/LABEL pairs; every word of the line sees the environment from before
    /// the line, as in BuildKit.
    fn expand_pairs(
        &self,
        state: &StageState,
        pairs: &[crate::instructions::KeyValue],
        loc: Location,
    ) -> Result<Vec<(String, String)>, ConvertError> {
        pairs
            .iter()
            .map(|kv| {
                Ok((
                    self.expand(state, &kv.key, loc)?,
                    self.expand(state, &kv.value, loc)?,
                ))
            })
            .collect()
    }

    fn describe(&self, state: &mut StageState, text: &str) -> String {
        state.cmd_index += 1;
        let width = state.cmd_total.to_string().len();
        format!(
            "[{} {:>width$}/{}] {}",
            state.name, state.cmd_index, state.cmd_total, text
        )
    }

    fn meta(&self, state: &StageState, description: String, location: Location) -> NodeMeta {
        NodeMeta {
            description,
            ignore_cache: state.ignore_cache,
            location: Some(SourceLocation {
                file: self.opts.dockerfile_name.clone(),
                start_line: location.start_line,
                end_line: location.end_line,
            }),
        }
    }

    fn history(state: &mut StageState, created_by: String, with_layer: bool) {
        state.image.history.push(History {
            created: None,
            created_by,
            comment: "buildkit.dockerfile.v0".into(),
            empty_layer: !with_layer,
            ..Default::default()
        });
    }

    fn dispatch(&mut self, state: &mut StageState, cmd: &Command) -> Result<(), ConvertError> {
        self.unmatched.borrow_mut().clear();
        self.dispatch_instruction(state, cmd)?;
        self.report_undefined_vars(state, cmd);
        Ok(())
    }

    fn dispatch_instruction(
        &mut self,
        state: &mut StageState,
        cmd: &Command,
    ) -> Result<(), ConvertError> {
        let loc = cmd.location;
        match &cmd.instruction {
            Instruction::Env(pairs) => {
                let mut msg = String::from("ENV");
                let expanded = self.expand_pairs(state, pairs, loc)?;
                for (key, value) in expanded {
                    msg.push_str(&format!(" {key}={value}"));
                    set_pair(&mut state.env, &key, value.clone());
                    add_env(&mut state.image.config.env, &key, &value);
                }
                Self::history(state, msg, false);
            }
            Instruction::Arg(decls) => self.dispatch_arg(state, decls, loc)?,
            Instruction::Label(pairs) => {
                let mut msg = String::from("LABEL");
                let expanded = self.expand_pairs(state, pairs, loc)?;
                for (key, value) in expanded {
                    msg.push_str(&format!(" {key}={value}"));
                    state.image.config.labels.insert(key, value);
                }
                Self::history(state, msg, false);
            }
            Instruction::Maintainer(m) => {
                state.image.author = m.clone();
                Self::history(state, format!("MAINTAINER {m}"), false);
            }
            Instruction::Workdir(path) => {
                let path = self.expand(state, path, loc)?;
                let wd = normalize_path(&state.dir, &path, false);
                state.image.config.working_dir = wd.clone();
                state.dir = wd.clone();
                let mut with_layer = false;
                if wd != "/" {
                    let description = self.describe(state, &format!("WORKDIR {wd}"));
                    let owner = parse_owner(&state.image.config.user);
                    let action = FileAction::Mkdir {
                        path: wd.clone(),
                        mode: 0o755,
                        owner,
                        make_parents: true,
                    };
                    self.add_file_op(state, vec![], vec![action], description, loc);
                    with_layer = true;
                }
                Self::history(state, format!("WORKDIR {wd}"), with_layer);
            }
            Instruction::User(user) => {
                let user = self.expand(state, user, loc)?;
                state.user = user.clone();
                state.image.config.user = user.clone();
                Self::history(state, format!("USER {user}"), false);
            }
            Instruction::Expose(ports) => {
                let mut all = Vec::new();
                for p in ports {
                    let p = self.expand(state, p, loc)?;
                    for word in p.split_whitespace() {
                        all.extend(expand_ports(word, loc)?);
                    }
                }
                for p in &all {
                    state.image.config.exposed_ports.insert(p.clone(), Empty {});
                }
                Self::history(
                    state,
                    format!(
                        "EXPOSE map[{}]",
                        all.iter()
                            .map(|p| format!("{p}:{{}}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    false,
                );
            }
            Instruction::Cmd(line) => {
                self.check_json_args(state, line, cmd);
                let args = self.command_args(state, line);
                state.image.config.cmd = Some(args.clone());
                state.image.config.args_escaped = true;
                state.cmd_set = true;
                Self::history(state, format!("CMD {}", go_quote_list(&args)), false);
            }
            Instruction::Entrypoint(line) => {
                self.check_json_args(state, line, cmd);
                let args = self.command_args(state, line);
                state.image.config.entrypoint = Some(args.clone());
                if !state.cmd_set {
                    state.image.config.cmd = None;
                }
                Self::history(state, format!("ENTRYPOINT {}", go_quote_list(&args)), false);
            }
            Instruction::Volume(vols) => {
                let mut expanded = Vec::new();
                for v in vols {
                    let v = self.expand(state, v, loc)?;
                    if v.is_empty() {
                        return Err(ConvertError::at(
                            "VOLUME specified can not be an empty string",
                            loc,
                        ));
                    }
                    state.image.config.volumes.insert(v.clone(), Empty {});
                    expanded.push(v);
                }
                Self::history(state, format!("VOLUME [{}]", expanded.join(" ")), false);
            }
            Instruction::StopSignal(sig) => {
                let sig = self.expand(state, sig, loc)?;
                validate_signal(&sig).map_err(|m| ConvertError::at(m, loc))?;
                state.image.config.stop_signal = sig.clone();
                Self::history(state, format!("STOPSIGNAL {sig}"), false);
            }
            Instruction::Healthcheck(h) => {
                state.image.config.healthcheck = Some(health_config(h, loc)?);
                Self::history(state, format!("HEALTHCHECK {}", cmd.original), false);
            }
            Instruction::Shell(shell) => {
                state.image.config.shell = shell.clone();
                Self::history(state, format!("SHELL [{}]", shell.join(" ")), false);
            }
            Instruction::Onbuild(expr) => {
                state.image.config.on_build.push(expr.clone());
            }
            Instruction::Run(run) => self.dispatch_run(state, run, cmd)?,
            Instruction::Copy(c) => self.dispatch_copy(state, c, false, cmd)?,
            Instruction::Add(c) => self.dispatch_copy(state, c, true, cmd)?,
        }
        Ok(())
    }

    /// BuildKit's `JSONArgsRecommended`: shell-form CMD/ENTRYPOINT with the default shell
    /// (a SHELL instruction or a base image shell means the form was chosen on purpose).
    fn check_json_args(&mut self, state: &StageState, line: &CommandLine, cmd: &Command) {
        if matches!(line, CommandLine::Shell(_)) && state.image.config.shell.is_empty() {
            let name = cmd.original.split_whitespace().next().unwrap_or_default();
            self.warnings.push(Warning {
                rule: crate::lint::JSON_ARGS_RECOMMENDED.into(),
                message: crate::lint::json_args_recommended(name),
                location: Some(cmd.location),
            });
        }
    }

    fn command_args(&self, state: &StageState, line: &CommandLine) -> Vec<String> {
        match line {
            CommandLine::Exec(args) => args.clone(),
            CommandLine::Shell(s) => with_shell(&state.image, s),
        }
    }

    fn dispatch_arg(
        &mut self,
        state: &mut StageState,
        decls: &[ArgDecl],
        loc: Location,
    ) -> Result<(), ConvertError> {
        let mut commit = Vec::new();
        for decl in decls {
            self.used_args.insert(decl.name.clone());
            let given = self.opts.build_args.get(&decl.name).cloned();
            let mut value = None;
            if decl.default.is_none() && given.is_none() {
                value = self
                    .global_args
                    .iter()
                    .rev()
                    .find(|(k, _)| k == &decl.name)
                    .map(|(_, v)| v.clone());
            }
            if let Some(v) = given {
                value = Some(v);
            } else if let Some(default) = &decl.default {
                value = Some(self.expand(state, default, loc)?);
            }
            if let Some(v) = &value {
                set_pair(&mut state.env, &decl.name, v.clone());
                commit.push(format!("{}={v}", decl.name));
            } else {
                commit.push(decl.name.clone());
            }
            state.build_args.push(BuildArg {
                key: decl.name.clone(),
                value,
            });
        }
        Self::history(state, format!("ARG {}", commit.join(" ")), false);
        Ok(())
    }

    fn add_file_op(
        &mut self,
        state: &mut StageState,
        extra_inputs: Vec<Input>,
        actions: Vec<FileAction>,
        description: String,
        loc: Location,
    ) {
        let mut inputs = Vec::new();
        let base_input = state.root.clone().map(|r| {
            inputs.push(r);
            0u32
        });
        let offset = inputs.len() as u32;
        inputs.extend(extra_inputs);
        let actions = actions
            .into_iter()
            .map(|a| match a {
                FileAction::Copy(mut c) => {
                    c.src_input += offset;
                    FileAction::Copy(c)
                }
                other => other,
            })
            .collect();
        let node = Node {
            inputs,
            op: Op::File(FileOp {
                base_input,
                actions,
            }),
            platform: self.opts.platform.clone(),
        };
        let meta = self.meta(state, description, loc);
        state.root = Some(self.builder.add(node, meta));
    }

    fn dispatch_run(
        &mut self,
        state: &mut StageState,
        run: &RunInstr,
        cmd: &Command,
    ) -> Result<(), ConvertError> {
        let loc = cmd.location;
        let insecure = match run.security.as_deref() {
            None | Some("sandbox") => false,
            Some("insecure") => true,
            Some(s) => {
                return Err(ConvertError::at(
                    format!("unsupported security mode {s:?}"),
                    loc,
                ));
            }
        };
        let (mounts, mount_inputs) = self.lower_mounts(state, run, loc)?;
        let network = match run.network.as_deref() {
            None | Some("default") => Network::Host,
            Some("host") => Network::Host,
            Some("none") => Network::None,
            Some(other) => {
                return Err(ConvertError::at(
                    format!("unsupported network mode {other:?}"),
                    loc,
                ));
            }
        };
        let mut args = match &run.command {
            CommandLine::Exec(args) => args.clone(),
            CommandLine::Shell(s) => vec![s.clone()],
        };
        let shell_form = matches!(run.command, CommandLine::Shell(_));
        if !run.heredocs.is_empty() && shell_form {
            let line = args.first().cloned().unwrap_or_default();
            let single = run.heredocs.len() == 1 && is_single_heredoc_command(&line);
            if single {
                let doc = &run.heredocs[0];
                let data = if doc.chomp {
                    chomp_heredoc(&doc.content)
                } else {
                    doc.content.clone()
                };
                if data.starts_with("#!") {
                    return Err(ConvertError::at(
                        "RUN heredoc with a #! interpreter line is not supported yet",
                        loc,
                    ));
                }
                args = vec![data];
            } else {
                let mut b = line;
                for doc in &run.heredocs {
                    b.push('\n');
                    b.push_str(&doc.content);
                    b.push_str(&doc.name);
                }
                args = vec![b];
            }
        }
        if shell_form {
            let cmdline = args.join(" ");
            args = with_shell(&state.image, &cmdline);
        }
        let mut env: Vec<String> = state.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // As BuildKit's llb: the first ssh mount's socket is the step's agent.
        let first_ssh = mounts.iter().find_map(|m| match m.kind {
            ExecMountKind::Ssh { .. } => Some(m.target.clone()),
            _ => None,
        });
        if let Some(sock) = first_ssh {
            if !state.env.iter().any(|(k, _)| k == "SSH_AUTH_SOCK") {
                env.push(format!("SSH_AUTH_SOCK={sock}"));
            }
        }
        let description = self.describe(state, &cmd.original);
        let mut inputs = Vec::new();
        let rootfs_input = state.root.clone().map(|r| {
            inputs.push(r);
            0u32
        });
        // Mount inputs follow the root filesystem; their indices shift by its presence.
        let offset = inputs.len() as u32;
        inputs.extend(mount_inputs);
        let mounts: Vec<ExecMount> = mounts
            .into_iter()
            .map(|mut m| {
                match &mut m.kind {
                    ExecMountKind::Bind { input, .. }
                    | ExecMountKind::Cache { from: input, .. } => {
                        if let Some(i) = input {
                            *i += offset;
                        }
                    }
                    _ => {}
                }
                m
            })
            .collect();
        let node = Node {
            inputs,
            op: Op::Exec(ExecOp {
                args: args.clone(),
                env,
                cwd: state.dir.clone(),
                user: state.user.clone(),
                network,
                mounts,
                rootfs_input,
                insecure,
            }),
            platform: self.opts.platform.clone(),
        };
        let meta = self.meta(state, description, loc);
        state.root = Some(self.builder.add(node, meta));
        // History shows the args that were in scope (`|1 A=b /bin/sh -c ...`).
        let mut shown: Vec<String> = Vec::new();
        for a in &state.build_args {
            let v = state
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == &a.key)
                .map(|(_, v)| v.clone())
                .or(a.value.clone());
            let entry = format!("{}={}", a.key, v.unwrap_or_default());
            shown.retain(|s| s.split_once('=').map(|(k, _)| k) != Some(a.key.as_str()));
            shown.push(entry);
        }
        let mut created_by = String::from("RUN ");
        if !shown.is_empty() {
            created_by.push_str(&format!("|{} {} ", shown.len(), shown.join(" ")));
        }
        created_by.push_str(&args.join(" "));
        created_by.push_str(" # buildkit");
        Self::history(state, created_by, true);
        Ok(())
    }

    /// `RUN --mount`s as graph mounts, and the inputs they read (indices into the returned
    /// list; the caller shifts them past the root filesystem).
    fn lower_mounts(
        &mut self,
        state: &StageState,
        run: &RunInstr,
        loc: Location,
    ) -> Result<(Vec<ExecMount>, Vec<Input>), ConvertError> {
        let mut mounts = Vec::new();
        let mut inputs: Vec<Input> = Vec::new();
        let mut ssh_count = 0;
        for raw in &run.mounts {
            let lex = &self.lex;
            let env = &state.env;
            let m = crate::runmount::parse_mount(raw, &mut |v| {
                lex.process_word(v, env).map_err(|e| e.to_string())
            })
            .map_err(|e| ConvertError::at(e, loc))?;
            let mut add_input = |input: Input| -> u32 {
                match inputs.iter().position(|i| *i == input) {
                    Some(p) => p as u32,
                    None => {
                        inputs.push(input);
                        (inputs.len() - 1) as u32
                    }
                }
            };
            use crate::runmount::MountType;
            match m.kind {
                MountType::Secret => {
                    let mut id = if m.source.is_empty() {
                        m.id.clone()
                    } else {
                        m.source.clone()
                    };
                    if id.is_empty() {
                        if m.target.is_empty() {
                            return Err(ConvertError::at("one of source, target required", loc));
                        }
                        id = path_base(&m.target);
                    }
                    let target = if m.env.is_none() && m.target.is_empty() {
                        format!("/run/secrets/{}", path_base(&id))
                    } else {
                        m.target.clone()
                    };
                    mounts.push(ExecMount {
                        target,
                        kind: ExecMountKind::Secret {
                            id,
                            required: m.required,
                            mode: m.mode.unwrap_or(0o400),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                            env: m.env.clone(),
                        },
                    });
                    continue;
                }
                MountType::Ssh => {
                    if !m.source.is_empty() {
                        return Err(ConvertError::at("ssh does not support source", loc));
                    }
                    let target = if m.target.is_empty() {
                        format!("/run/buildkit/ssh_agent.{ssh_count}")
                    } else {
                        m.target.clone()
                    };
                    ssh_count += 1;
                    mounts.push(ExecMount {
                        target,
                        kind: ExecMountKind::Ssh {
                            id: if m.id.is_empty() {
                                "default".into()
                            } else {
                                m.id.clone()
                            },
                            required: m.required,
                            mode: m.mode.unwrap_or(0o600),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                        },
                    });
                    continue;
                }
                _ => {}
            }
            let target = if m.target.starts_with('/') {
                clean_path(&m.target)
            } else {
                clean_path(&format!("/{}/{}", state.dir, m.target))
            };
            if target == "/" {
                return Err(ConvertError::at(
                    format!("invalid mount target {target:?}"),
                    loc,
                ));
            }
            let source = clean_path(&format!("/{}", m.source));
            // The input a bind or cache mount reads: a stage, an image, or the context.
            let from = if m.from.is_empty() {
                None
            } else {
                match self.stage_ref(&m.from, loc)? {
                    Some(i) => {
                        if self.in_progress.contains(&i) {
                            return Err(ConvertError::at(
                                format!(
                                    "cannot mount from stage {:?} to {:?}, stage needs to be defined before current command",
                                    m.from, m.target
                                ),
                                loc,
                            ));
                        }
                        self.dispatch_stage(i)?;
                        // `None`: a scratch stage, an empty directory.
                        Some(self.done.get(&i).and_then(|s| s.root.clone()))
                    }
                    None => {
                        let resolved = self.resolve_image(&m.from, loc)?;
                        let description = format!("[internal] FROM {}", resolved.pinned);
                        Some(Some(self.image_source(&resolved, description)))
                    }
                }
            };
            let kind = match m.kind {
                MountType::Tmpfs => ExecMountKind::Tmpfs { size: m.size },
                MountType::Bind => {
                    let input = match from {
                        Some(src) => src.map(&mut add_input),
                        None => Some(add_input(self.context_input())),
                    };
                    ExecMountKind::Bind {
                        input,
                        source,
                        readwrite: !m.readonly,
                    }
                }
                MountType::Cache => ExecMountKind::Cache {
                    id: if m.id.is_empty() {
                        clean_path(&m.target)
                    } else {
                        m.id.clone()
                    },
                    sharing: if m.sharing.is_empty() {
                        "shared".into()
                    } else {
                        m.sharing.clone()
                    },
                    mode: m.mode.unwrap_or(0o755),
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                    readonly: m.readonly,
                    from: from.flatten().map(&mut add_input),
                    source: if source == "/" { String::new() } else { source },
                },
                MountType::Secret | MountType::Ssh => continue,
            };
            mounts.push(ExecMount { target, kind });
        }
        Ok((mounts, inputs))
    }

    fn dispatch_copy(
        &mut self,
        state: &mut StageState,
        c: &CopyInstr,
        is_add: bool,
        cmd: &Command,
    ) -> Result<(), ConvertError> {
        let loc = cmd.location;
        let keyword = if is_add { "ADD" } else { "COPY" };
        if c.parents {
            return Err(ConvertError::at(
                format!("{keyword} --parents is not supported yet"),
                loc,
            ));
        }
        if c.checksum.is_some() {
            if !is_add {
                return Err(ConvertError::at(
                    "checksum can't be specified for COPY",
                    loc,
                ));
            }
            return Err(ConvertError::at(
                "checksum requires HTTP(S) or Git sources",
                loc,
            ));
        }
        let dest_raw = self.expand(state, &c.dest, loc)?;
        let dest = dest_path(&state.dir, &dest_raw);
        let owner = match &c.chown {
            Some(ch) => parse_owner(&self.expand(state, ch, loc)?),
            None => None,
        };
        let mode = match &c.chmod {
            Some(m) => Some(parse_chmod(&self.expand(state, m, loc)?, loc)?),
            None => None,
        };
        let mut exclude = Vec::new();
        for e in &c.exclude {
            exclude.push(self.expand(state, e, loc)?);
        }

        // Where the sources come from: another stage, an image, or the build context.
        let mut extra_inputs = Vec::new();
        if let Some(from) = &c.from {
            let expanded = self
                .lex
                .process_word(from, &Vec::<(String, String)>::new())
                .unwrap_or_default();
            if &expanded != from {
                return Err(ConvertError::at(
                    "variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround",
                    loc,
                ));
            }
            match self.stage_ref(from, loc)? {
                Some(i) => {
                    self.dispatch_stage(i)?;
                    let src = self.done.get(&i).and_then(|s| s.root.clone());
                    match src {
                        Some(r) => extra_inputs.push(r),
                        None => {
                            // A scratch stage: copy from an empty filesystem.
                            let empty = self.builder.add(
                                Node {
                                    inputs: vec![],
                                    op: Op::File(FileOp {
                                        base_input: None,
                                        actions: vec![FileAction::Mkdir {
                                            path: "/".into(),
                                            mode: 0o755,
                                            owner: None,
                                            make_parents: true,
                                        }],
                                    }),
                                    platform: self.opts.platform.clone(),
                                },
                                NodeMeta {
                                    description: "[internal] scratch".into(),
                                    ..Default::default()
                                },
                            );
                            extra_inputs.push(empty);
                        }
                    }
                }
                None => {
                    let resolved = self.resolve_image(from, loc)?;
                    let src = self
                        .image_source(&resolved, format!("[internal] FROM {}", resolved.pinned));
                    extra_inputs.push(src);
                }
            }
        } else if !c.sources.is_empty() && c.heredocs.is_empty() {
            extra_inputs.push(self.context_input());
        }

        let mut actions = Vec::new();
        let heredoc_names: BTreeSet<&str> = c.heredocs.iter().map(|h| h.name.as_str()).collect();
        for src in &c.sources {
            if heredoc_names.contains(src.as_str()) {
                continue;
            }
            let src = self.expand(state, src, loc)?;
            if src.starts_with("http://") || src.starts_with("https://") {
                if !is_add {
                    return Err(ConvertError::at("source can't be a URL for COPY", loc));
                }
                return Err(ConvertError::at(
                    format!("ADD {src}: remote URLs are not supported yet"),
                    loc,
                ));
            }
            if src.starts_with("git@") || (src.contains(".git") && src.contains("://")) {
                return Err(ConvertError::at(
                    format!("{keyword} {src}: git sources are not supported yet"),
                    loc,
                ));
            }
            if extra_inputs.is_empty() {
                extra_inputs.push(self.context_input());
            }
            let unpack = is_add && c.unpack.unwrap_or(true) && c.from.is_none();
            actions.push(FileAction::Copy(CopyAction {
                src_input: 0,
                src: normalize_path("/", &src, false),
                dest: dest.clone(),
                owner: owner.clone(),
                mode,
                follow_symlinks: true,
                dir_contents_only: true,
                allow_wildcard: true,
                allow_empty_wildcard: true,
                create_dest_path: true,
                attempt_unpack: unpack,
                exclude: exclude.clone(),
            }));
        }
        // Heredoc sources: a small file made on scratch, copied like any other.
        for doc in &c.heredocs {
            let data = if doc.expand {
                self.expand(state, &doc.content, loc)?
            } else {
                doc.content.clone()
            };
            let data = if doc.chomp {
                chomp_heredoc(&data)
            } else {
                data
            };
            let name = doc.name.trim_start_matches('/').to_string();
            let file = self.builder.add(
                Node {
                    inputs: vec![],
                    op: Op::File(FileOp {
                        base_input: None,
                        actions: vec![FileAction::Mkfile {
                            path: format!("/{name}"),
                            mode: 0o644,
                            owner: None,
                            data: data.into_bytes(),
                        }],
                    }),
                    platform: self.opts.platform.clone(),
                },
                NodeMeta {
                    description: "[internal] preparing inline document".into(),
                    ..Default::default()
                },
            );
            let idx = extra_inputs.len() as u32;
            extra_inputs.push(file);
            actions.push(FileAction::Copy(CopyAction {
                src_input: idx,
                src: format!("/{name}"),
                dest: dest.clone(),
                owner: owner.clone(),
                mode,
                follow_symlinks: false,
                dir_contents_only: false,
                allow_wildcard: false,
                allow_empty_wildcard: false,
                create_dest_path: true,
                attempt_unpack: false,
                exclude: vec![],
            }));
        }
        if actions.is_empty() {
            return Err(ConvertError::at(
                format!("{keyword} requires at least two arguments"),
                loc,
            ));
        }
        let mut printed = self
            .lex
            .process_word(&cmd.original, &state.env)
            .unwrap_or_else(|_| cmd.original.clone());
        if let Some(rest) = printed.get(keyword.len()..) {
            printed = format!("{keyword}{rest}");
        }
        let description = self.describe(state, &printed);
        self.add_file_op(state, extra_inputs, actions, description, loc);

        let mut msg = String::from(keyword);
        if let Some(ch) = &c.chown {
            msg.push_str(&format!(" --chown={ch}"));
        }
        if let Some(m) = &c.chmod {
            msg.push_str(&format!(" --chmod={m}"));
        }
        for s in &c.sources {
            msg.push(' ');
            msg.push_str(s);
        }
        msg.push_str(&format!(" {} # buildkit", c.dest));
        Self::history(state, msg, true);
        Ok(())
    }
}

/// Go's `path.Base`.
fn path_base(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return if p.is_empty() { ".".into() } else { "/".into() };
    }
    t.rsplit('/').next().unwrap_or(t).to_string()
}

/// Parses an ONBUILD trigger (one instruction) by wrapping it in a throwaway stage.
fn parse_trigger(trigger: &str) -> Result<Command, String> {
    let parsed =
        crate::parser::parse(&format!("FROM scratch\n{trigger}\n")).map_err(|e| e.message)?;
    let df = crate::instructions::from_ast(&parsed.root).map_err(|e| e.message)?;
    let mut commands = df
        .stages
        .into_iter()
        .next()
        .map(|s| s.commands)
        .unwrap_or_default();
    if commands.len() != 1 {
        return Err("onbuild trigger should be a single expression".into());
    }
    Ok(commands.remove(0))
}

/// BuildKit's proxy args (`proxyEnvFromBuildArgs`).
fn is_proxy_arg(k: &str) -> bool {
    matches!(
        k,
        "HTTP_PROXY"
            | "http_proxy"
            | "HTTPS_PROXY"
            | "https_proxy"
            | "FTP_PROXY"
            | "ftp_proxy"
            | "NO_PROXY"
            | "no_proxy"
            | "ALL_PROXY"
            | "all_proxy"
    )
}

fn is_predefined_arg(k: &str) -> bool {
    is_proxy_arg(k)
        || matches!(
            k,
            "SOURCE_DATE_EPOCH" | "BUILDKIT_INLINE_CACHE" | "BUILDKIT_DOCKERFILE_CHECK"
        )
}

/// A heredoc RUN whose whole command is just `<<EOF` (optionally `<<-EOF`, quoted).
fn is_single_heredoc_command(line: &str) -> bool {
    let t = line.trim();
    let Some(rest) = t.strip_prefix("<<") else {
        return false;
    };
    let rest = rest.strip_prefix('-').unwrap_or(rest).trim();
    !rest.is_empty() && !rest.contains(char::is_whitespace)
}

/// `<<-`: strip leading tabs of every line.
fn chomp_heredoc(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

fn validate_signal(sig: &str) -> Result<(), String> {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if let Ok(n) = sig.parse::<u32>() {
        return if n == 0 {
            Err(format!("invalid signal: {sig}"))
        } else {
            Ok(())
        };
    }
    let upper = sig.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if NAMES.contains(&name) || name.starts_with("RTMIN") || name.starts_with("RTMAX") {
        Ok(())
    } else {
        Err(format!("invalid signal: {sig}"))
    }
}

fn health_config(h: &HealthcheckInstr, loc: Location) -> Result<HealthConfig, ConvertError> {
    let Some(test) = &h.test else {
        return Ok(HealthConfig {
            test: vec!["NONE".into()],
            ..Default::default()
        });
    };
    let dur = |name: &str, v: &Option<String>| -> Result<i64, ConvertError> {
        match v {
            None => Ok(0),
            Some(s) => parse_duration(s).ok_or_else(|| {
                ConvertError::at(format!("time: invalid duration \"{s}\" for --{name}"), loc)
            }),
        }
    };
    let retries = match &h.retries {
        None => 0,
        Some(r) => r
            .parse::<i64>()
            .map_err(|_| ConvertError::at(format!("invalid value for --retries: {r}"), loc))?,
    };
    Ok(HealthConfig {
        test: test.clone(),
        interval: dur("interval", &h.interval)?,
        timeout: dur("timeout", &h.timeout)?,
        start_period: dur("start-period", &h.start_period)?,
        start_interval: dur("start-interval", &h.start_interval)?,
        retries,
    })
}

impl EnvGetter for StageState {
    fn get(&self, key: &str) -> Option<String> {
        EnvGetter::get(self.env.as_slice(), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_buildkit_normalisation() {
        assert_eq!(dest_path("/", "."), "/");
        assert_eq!(dest_path("/app", "."), "/app/");
        assert_eq!(dest_path("/app", "sub/"), "/app/sub/");
        assert_eq!(dest_path("/app", "sub"), "/app/sub");
        assert_eq!(dest_path("/app", "/abs/../x/"), "/x/");
        assert_eq!(normalize_path("/", "./a/../b", false), "/b");
        assert_eq!(clean_path("a/../../b"), "../b");
    }

    #[test]
    fn ports_expand_ranges_and_protocols() {
        let loc = Location::default();
        assert_eq!(expand_ports("80", loc).unwrap(), vec!["80/tcp"]);
        assert_eq!(expand_ports("53/UDP", loc).unwrap(), vec!["53/udp"]);
        assert_eq!(
            expand_ports("8000-8002", loc).unwrap(),
            vec!["8000/tcp", "8001/tcp", "8002/tcp"]
        );
        assert!(expand_ports("abc", loc).is_err());
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn owners_parse_names_and_ids() {
        assert_eq!(
            parse_owner("1000:app"),
            Some(Owner {
                user: UserSpec::Id(1000),
                group: Some(UserSpec::Name("app".into()))
            })
        );
        assert_eq!(parse_owner(""), None);
    }
}
