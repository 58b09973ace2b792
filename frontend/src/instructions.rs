//! Typed instructions (BuildKit's `instructions` package): what each Dockerfile line means,
//! before any variable is expanded. Words are kept as written; [`crate::convert`] expands
//! them with the shell lexer where BuildKit does.

use crate::parser::{
    chomp_heredoc_content, go_quote, go_to_lower, go_to_upper, parse_heredoc_word, Heredoc, Node,
    ParseResult,
};

/// A 1-based inclusive line range in the Dockerfile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Location {
    pub start_line: usize,
    pub end_line: usize,
}

/// Shell form (one string run by the SHELL) or exec form (JSON array, no shell).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandLine {
    Shell(String),
    Exec(Vec<String>),
}

/// A `KEY=value` pair of ENV, LABEL (value unexpanded, quotes still in place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// One `ARG name[=default]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

/// COPY and ADD share this shape; ADD-only flags are `None`/false for COPY.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CopyInstr {
    /// Sources as written (unexpanded). For heredoc sources, the heredoc name.
    pub sources: Vec<String>,
    /// The sources that are not heredocs (BuildKit's `SourcePaths`), in order.
    pub paths: Vec<String>,
    pub dest: String,
    /// Heredocs used as inline sources (`COPY <<EOF /dst`).
    pub heredocs: Vec<Heredoc>,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    // ADD only
    pub keep_git_dir: Option<bool>,
    pub checksum: Option<String>,
    pub unpack: Option<bool>,
}

/// `RUN --mount=...` as written (comma-separated `key=value` fields, unexpanded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInstr {
    pub command: CommandLine,
    pub heredocs: Vec<Heredoc>,
    pub mounts: Vec<String>,
    pub network: Option<String>,
    pub security: Option<String>,
    /// `--device=...` as written (BuildKit accepts it on RUN).
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HealthcheckInstr {
    /// `None` = `HEALTHCHECK NONE`; otherwise the test as in the image config
    /// (`["CMD", ...]` or `["CMD-SHELL", "..."]`).
    pub test: Option<Vec<String>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub start_period: Option<String>,
    pub start_interval: Option<String>,
    pub retries: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instruction {
    Run(RunInstr),
    Copy(CopyInstr),
    Add(CopyInstr),
    Env(Vec<KeyValue>),
    Arg(Vec<ArgDecl>),
    Label(Vec<KeyValue>),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Volume(Vec<String>),
    StopSignal(String),
    Healthcheck(HealthcheckInstr),
    Shell(Vec<String>),
    Maintainer(String),
    /// The trigger's original text (`RUN echo hi`), stored in the image config verbatim.
    Onbuild(String),
}

impl Instruction {
    /// The keyword as BuildKit prints it in history and progress (`RUN`, `COPY`, ...).
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Run(_) => "RUN",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::Label(_) => "LABEL",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Shell(_) => "SHELL",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::Onbuild(_) => "ONBUILD",
        }
    }
}

/// An instruction with where it came from and its original text (for history, progress
/// and error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub instruction: Instruction,
    pub location: Location,
    /// The logical line as written, flags included (`COPY --from=build /a /b`).
    pub original: String,
}

/// One `FROM` and the commands under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// `AS name`, lowercased as BuildKit does.
    pub name: Option<String>,
    /// The FROM argument as written (unexpanded): an image, a stage name or `scratch`.
    pub base: String,
    pub platform: Option<String>,
    pub location: Location,
    pub original: String,
    pub commands: Vec<Command>,
}

/// A whole Dockerfile in typed form.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Dockerfile {
    /// `ARG`s before the first FROM.
    pub meta_args: Vec<(ArgDecl, Location)>,
    pub stages: Vec<Stage>,
    /// Parser warnings (empty continuation lines, ...), with their line.
    pub warnings: Vec<(usize, String)>,
}

/// An error with its place in the Dockerfile, as BuildKit words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InstructionError {
    pub message: String,
    pub location: Location,
}

impl InstructionError {
    fn at(node: &Node, message: impl Into<String>) -> Self {
        InstructionError {
            message: message.into(),
            location: location_of(node),
        }
    }
}

fn location_of(node: &Node) -> Location {
    Location {
        start_line: node.start_line,
        end_line: node.end_line,
    }
}

/// What one top-level node turns into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A `FROM` (with no commands yet).
    Stage(Stage),
    Command(Command),
}

/// Builds typed stages from the parsed AST.
pub fn from_ast(root: &Node) -> Result<Dockerfile, InstructionError> {
    let mut df = Dockerfile::default();
    for node in &root.children {
        match parse_instruction(node)? {
            Parsed::Stage(stage) => df.stages.push(stage),
            Parsed::Command(cmd) => match df.stages.last_mut() {
                Some(stage) => stage.commands.push(cmd),
                None => match cmd.instruction {
                    Instruction::Arg(args) => {
                        df.meta_args
                            .extend(args.into_iter().map(|a| (a, cmd.location)));
                    }
                    _ => {
                        return Err(InstructionError::at(
                            node,
                            "no build stage in current context",
                        ))
                    }
                },
            },
        }
    }
    Ok(df)
}

/// [`from_ast`] plus the parser's warnings.
pub fn from_parse_result(res: &ParseResult) -> Result<Dockerfile, InstructionError> {
    let mut df = from_ast(&res.root)?;
    df.warnings = res
        .warnings
        .iter()
        .map(|w| (w.line, w.message.clone()))
        .collect();
    Ok(df)
}

/// Parses one node that must be a command (not `FROM`), as BuildKit's `ParseCommand`
/// does for ONBUILD triggers inherited from a base image.
pub fn parse_command(node: &Node) -> Result<Command, InstructionError> {
    match parse_instruction(node)? {
        Parsed::Command(c) => Ok(c),
        Parsed::Stage(_) => Err(InstructionError::at(
            node,
            format!("{} is not a command type", go_to_upper(&node.value)),
        )),
    }
}

/// BuildKit's `ParseInstruction`: one top-level node to a stage start or a command.
pub fn parse_instruction(node: &Node) -> Result<Parsed, InstructionError> {
    let req = Request {
        node,
        args: node_args(node),
    };
    let command = |instruction| {
        Parsed::Command(Command {
            instruction,
            location: location_of(node),
            original: node.original.trim().to_string(),
        })
    };
    let r = match go_to_lower(&node.value).as_str() {
        "env" => parse_kv_instr(&req, "ENV").map(|kv| command(Instruction::Env(kv))),
        "label" => parse_kv_instr(&req, "LABEL").map(|kv| command(Instruction::Label(kv))),
        "maintainer" => {
            one_argument(&req, "MAINTAINER").map(|m| command(Instruction::Maintainer(m)))
        }
        "add" => parse_copy(&req, true).map(|c| command(Instruction::Add(c))),
        "copy" => parse_copy(&req, false).map(|c| command(Instruction::Copy(c))),
        "from" => parse_from(&req).map(Parsed::Stage),
        "onbuild" => parse_onbuild(&req).map(|o| command(Instruction::Onbuild(o))),
        "workdir" => one_argument(&req, "WORKDIR").map(|w| command(Instruction::Workdir(w))),
        "run" => parse_run(&req).map(|r| command(Instruction::Run(r))),
        "cmd" => parse_cmdline(&req).map(|c| command(Instruction::Cmd(c))),
        "entrypoint" => parse_cmdline(&req).map(|c| command(Instruction::Entrypoint(c))),
        "healthcheck" => parse_healthcheck(&req).map(|h| command(Instruction::Healthcheck(h))),
        "expose" => parse_expose(&req).map(|e| command(Instruction::Expose(e))),
        "user" => one_argument(&req, "USER").map(|u| command(Instruction::User(u))),
        "volume" => parse_volume(&req).map(|v| command(Instruction::Volume(v))),
        "stopsignal" => parse_stopsignal(&req).map(|s| command(Instruction::StopSignal(s))),
        "arg" => parse_arg(&req).map(|a| command(Instruction::Arg(a))),
        "shell" => parse_shell(&req).map(|s| command(Instruction::Shell(s))),
        _ => Err(crate::suggest::wrap_error(
            format!("unknown instruction: {}", node.value),
            &node.value,
            &INSTRUCTION_NAMES,
            false,
        )),
    };
    r.map_err(|m| InstructionError::at(node, m))
}

const INSTRUCTION_NAMES: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

struct Request<'a> {
    node: &'a Node,
    args: Vec<String>,
}

/// BuildKit's `nodeArgs`: the argument chain, with a sub-command (ONBUILD) flattened.
fn node_args(node: &Node) -> Vec<String> {
    let mut out = Vec::new();
    for a in node.args() {
        match a.children.as_slice() {
            [] => out.push(a.value.clone()),
            [child] => {
                out.push(child.value.clone());
                out.extend(node_args(child));
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Flags (BuildKit's BFlags)

#[derive(Clone, Copy, PartialEq)]
enum FlagKind {
    Bool,
    Str,
    Strings,
}

#[derive(Default)]
struct FlagValues {
    used: Vec<&'static str>,
    bools: Vec<(&'static str, bool)>,
    strings: Vec<(&'static str, String)>,
    lists: Vec<(&'static str, Vec<String>)>,
}

impl FlagValues {
    fn used(&self, name: &str) -> bool {
        self.used.contains(&name)
    }

    /// `Some` only when given on the line.
    fn bool(&self, name: &str) -> Option<bool> {
        self.bools.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// `Some` only when given with a non-empty value (BuildKit treats "" as unset).
    fn string(&self, name: &str) -> Option<String> {
        self.strings
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    fn raw_string(&self, name: &str) -> Option<&str> {
        self.strings
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.lists
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// BuildKit's `BFlags.Parse` against the flags an instruction accepts.
fn parse_flags(args: &[String], defs: &[(&'static str, FlagKind)]) -> Result<FlagValues, String> {
    let mut out = FlagValues::default();
    for a in args {
        if a == "--" {
            break;
        }
        if !a.starts_with("--") {
            return Err(format!("arg should start with -- : {a}"));
        }
        let (flag_name, value, has_value) = match a.split_once('=') {
            Some((n, v)) => (n, v, true),
            None => (a.as_str(), "", false),
        };
        let arg = &flag_name[2..];
        let Some(&(name, kind)) = defs.iter().find(|(n, _)| *n == arg) else {
            let names: Vec<&str> = defs.iter().map(|(n, _)| *n).collect();
            return Err(crate::suggest::wrap_error(
                format!("unknown flag: {flag_name}"),
                arg,
                &names,
                true,
            ));
        };
        if out.used(name) && kind != FlagKind::Strings {
            return Err(format!("duplicate flag specified: {flag_name}"));
        }
        out.used.push(name);
        match kind {
            FlagKind::Bool => {
                if has_value && value.is_empty() {
                    return Err(format!("missing a value on flag: {flag_name}"));
                }
                let b = match go_to_lower(value).as_str() {
                    "true" | "" => true,
                    "false" => false,
                    _ => {
                        return Err(format!(
                            "expecting boolean value for flag {flag_name}, not: {value}"
                        ))
                    }
                };
                out.bools.push((name, b));
            }
            FlagKind::Str => {
                if !has_value {
                    return Err(format!("missing a value on flag: {flag_name}"));
                }
                out.strings.push((name, value.to_string()));
            }
            FlagKind::Strings => {
                if !has_value {
                    return Err(format!("missing a value on flag: {flag_name}"));
                }
                match out.lists.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, l)) => l.push(value.to_string()),
                    None => out.lists.push((name, vec![value.to_string()])),
                }
            }
        }
    }
    Ok(out)
}

fn no_flags(req: &Request) -> Result<(), String> {
    parse_flags(&req.node.flags, &[]).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Instructions

fn parse_kv_instr(req: &Request, name: &str) -> Result<Vec<KeyValue>, String> {
    no_flags(req)?;
    if req.args.is_empty() {
        return Err(format!("{name} requires at least one argument"));
    }
    if !req.args.chunks_exact(3).remainder().is_empty() {
        return Err(format!("Bad input to {name}, too many arguments"));
    }
    let mut out = Vec::new();
    for triple in req.args.chunks(3) {
        if triple[0].is_empty() {
            return Err(format!("{name} names can not be blank"));
        }
        out.push(KeyValue {
            key: triple[0].clone(),
            value: triple[1].clone(),
        });
    }
    Ok(out)
}

fn one_argument(req: &Request, name: &str) -> Result<String, String> {
    if req.args.len() != 1 {
        return Err(format!("{name} requires exactly one argument"));
    }
    no_flags(req)?;
    Ok(req.args[0].clone())
}

fn parse_copy(req: &Request, is_add: bool) -> Result<CopyInstr, String> {
    let name = if is_add { "ADD" } else { "COPY" };
    if req.args.len() < 2 {
        return Err(format!(
            "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
        ));
    }
    let defs: &[(&'static str, FlagKind)] = if is_add {
        &[
            ("chown", FlagKind::Str),
            ("chmod", FlagKind::Str),
            ("link", FlagKind::Bool),
            ("keep-git-dir", FlagKind::Bool),
            ("checksum", FlagKind::Str),
            ("unpack", FlagKind::Bool),
            ("exclude", FlagKind::Strings),
        ]
    } else {
        &[
            ("chown", FlagKind::Str),
            ("from", FlagKind::Str),
            ("chmod", FlagKind::Str),
            ("link", FlagKind::Bool),
            ("exclude", FlagKind::Strings),
            ("parents", FlagKind::Bool),
        ]
    };
    let flags = parse_flags(&req.node.flags, defs)?;

    let (srcs, dest) = req.args.split_at(req.args.len() - 1);
    let dest = dest[0].clone();
    if parse_heredoc_word(&dest).is_some() {
        return Err(format!("{name} cannot accept a heredoc as a destination"));
    }
    let mut paths = Vec::new();
    let mut heredocs = Vec::new();
    for src in srcs {
        match parse_heredoc_word(src) {
            Some(mut h) => {
                // The last heredoc of that name wins, as with BuildKit's lookup map.
                let content = req
                    .node
                    .heredocs
                    .iter()
                    .rev()
                    .find(|n| n.name == h.name)
                    .map(|n| n.content.clone())
                    .unwrap_or_default();
                h.content = if h.chomp {
                    chomp_heredoc_content(&content)
                } else {
                    content
                };
                heredocs.push(h);
            }
            None => paths.push(src.clone()),
        }
    }
    Ok(CopyInstr {
        sources: srcs
            .iter()
            .map(|s| parse_heredoc_word(s).map_or_else(|| s.clone(), |h| h.name))
            .collect(),
        paths,
        dest,
        heredocs,
        from: if is_add { None } else { flags.string("from") },
        chown: flags.string("chown"),
        chmod: flags.string("chmod"),
        link: flags.bool("link").unwrap_or(false),
        parents: !is_add && flags.bool("parents").unwrap_or(false),
        exclude: flags.list("exclude"),
        keep_git_dir: if is_add {
            flags.bool("keep-git-dir")
        } else {
            None
        },
        checksum: if is_add {
            flags.string("checksum")
        } else {
            None
        },
        unpack: if is_add { flags.bool("unpack") } else { None },
    })
}

/// Go `strings.EqualFold` for the short ASCII keywords compared here (`as`): simple
/// folding, where `ſ` folds to `s` and the Kelvin sign to `k`.
fn equal_fold(a: &str, b: &str) -> bool {
    let fold = |c: char| match c {
        '\u{17f}' => 's',
        c => go_to_lower(&c.to_string()).chars().next().unwrap_or(c),
    };
    a.chars().map(fold).eq(b.chars().map(fold))
}

fn valid_stage_name(name: &str) -> bool {
    let mut cs = name.chars();
    matches!(cs.next(), Some('a'..='z'))
        && cs.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
}

fn parse_from(req: &Request) -> Result<Stage, String> {
    let args = &req.args;
    let name = if args.len() == 3 && equal_fold(&args[1], "as") {
        let lowered = go_to_lower(&args[2]);
        if !valid_stage_name(&lowered) {
            return Err(format!(
                "invalid name for build stage: {}, name can't start with a number or contain symbols",
                go_quote(&args[2])
            ));
        }
        Some(lowered)
    } else if args.len() != 1 {
        return Err("FROM requires either one or three arguments".to_string());
    } else {
        None
    };
    let flags = parse_flags(&req.node.flags, &[("platform", FlagKind::Str)])?;
    Ok(Stage {
        name,
        base: args[0].clone(),
        platform: flags.string("platform"),
        location: location_of(req.node),
        original: req.node.original.trim().to_string(),
        commands: Vec::new(),
    })
}

fn parse_onbuild(req: &Request) -> Result<String, String> {
    let Some(first) = req.args.first() else {
        return Err("ONBUILD requires at least one argument".to_string());
    };
    no_flags(req)?;
    let trigger = go_to_upper(first.trim());
    match trigger.as_str() {
        "ONBUILD" => return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string()),
        "MAINTAINER" | "FROM" => {
            return Err(format!("{trigger} isn't allowed as an ONBUILD trigger"))
        }
        _ => {}
    }
    let mut expression = strip_onbuild_keyword(&req.node.original).to_string();
    for h in &req.node.heredocs {
        expression.push('\n');
        expression.push_str(&h.content);
        expression.push_str(&h.name);
    }
    Ok(expression)
}

/// Removes `(?i)^\s*ONBUILD\s*` (Go's ASCII `\s`).
fn strip_onbuild_keyword(original: &str) -> &str {
    let is_s = |c: char| matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ');
    let t = original.trim_start_matches(is_s);
    match t.get(..7) {
        Some(k) if k.eq_ignore_ascii_case("onbuild") => t[7..].trim_start_matches(is_s),
        _ => original,
    }
}

/// Exec form when the parser saw a JSON array, else the shell form joined with spaces.
fn command_line(req: &Request) -> CommandLine {
    if req.node.json {
        CommandLine::Exec(req.args.clone())
    } else {
        CommandLine::Shell(req.args.join(" "))
    }
}

fn parse_run(req: &Request) -> Result<RunInstr, String> {
    let flags = parse_flags(
        &req.node.flags,
        &[
            ("device", FlagKind::Strings),
            ("mount", FlagKind::Strings),
            ("network", FlagKind::Str),
            ("security", FlagKind::Str),
        ],
    )?;
    let network = flags.raw_string("network").map(str::to_string);
    if let Some(n) = &network {
        if !matches!(n.as_str(), "default" | "none" | "host") {
            return Err(format!("invalid network mode {}", go_quote(n)));
        }
    }
    let security = flags.raw_string("security").map(str::to_string);
    if let Some(s) = &security {
        if !matches!(s.as_str(), "insecure" | "sandbox") {
            return Err(format!("security {} is not valid", go_quote(s)));
        }
    }
    Ok(RunInstr {
        command: command_line(req),
        heredocs: req.node.heredocs.clone(),
        mounts: flags.list("mount"),
        network,
        security,
        devices: flags.list("device"),
    })
}

fn parse_cmdline(req: &Request) -> Result<CommandLine, String> {
    no_flags(req)?;
    Ok(command_line(req))
}

fn parse_healthcheck(req: &Request) -> Result<HealthcheckInstr, String> {
    let Some(first) = req.args.first() else {
        return Err("HEALTHCHECK requires at least one argument".to_string());
    };
    let typ = go_to_upper(first);
    let args = &req.args[1..];
    if typ == "NONE" {
        if !args.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".to_string());
        }
        return Ok(HealthcheckInstr::default());
    }
    let flags = parse_flags(
        &req.node.flags,
        &[
            ("interval", FlagKind::Str),
            ("timeout", FlagKind::Str),
            ("start-period", FlagKind::Str),
            ("start-interval", FlagKind::Str),
            ("retries", FlagKind::Str),
        ],
    )?;
    if typ != "CMD" {
        return Err(format!(
            "Unknown type {} in HEALTHCHECK (try CMD)",
            go_quote(&typ)
        ));
    }
    if args.is_empty() {
        return Err("Missing command after HEALTHCHECK CMD".to_string());
    }
    let test = if req.node.json {
        std::iter::once("CMD".to_string())
            .chain(args.iter().cloned())
            .collect()
    } else {
        vec!["CMD-SHELL".to_string(), args.join(" ")]
    };
    for name in ["interval", "timeout", "start-period", "start-interval"] {
        if let Some(v) = flags.string(name) {
            let d = parse_go_duration(&v).map_err(|e| e.to_string())?;
            if d != 0 && d < 1_000_000 {
                return Err(format!(
                    "Interval {} cannot be less than 1ms",
                    go_quote(name)
                ));
            }
        }
    }
    let retries = flags.string("retries");
    if let Some(r) = &retries {
        let n = parse_go_int32(r)?;
        if n < 0 {
            return Err(format!("--retries cannot be negative ({n})"));
        }
    }
    Ok(HealthcheckInstr {
        test: Some(test),
        interval: flags.string("interval"),
        timeout: flags.string("timeout"),
        start_period: flags.string("start-period"),
        start_interval: flags.string("start-interval"),
        retries,
    })
}

/// Go `strconv.ParseInt(s, 10, 32)` with its error wording.
fn parse_go_int32(s: &str) -> Result<i32, String> {
    use std::num::IntErrorKind;
    s.parse::<i32>().map_err(|e| {
        let what = match e.kind() {
            IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => "value out of range",
            _ => "invalid syntax",
        };
        format!("strconv.ParseInt: parsing {}: {what}", go_quote(s))
    })
}

/// A duration Go's `time.ParseDuration` rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(String);

/// Go `time.ParseDuration`, in nanoseconds (HEALTHCHECK's `--interval=1m30s` and friends).
pub fn parse_go_duration(orig: &str) -> Result<i64, DurationError> {
    let invalid = || DurationError(format!("time: invalid duration {}", go_quote(orig)));
    let mut s = orig;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    const LIMIT: u128 = 1 << 63;
    let mut total: u128 = 0;
    while !s.is_empty() {
        let b = s.as_bytes();
        if !(b[0] == b'.' || b[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut v: u128 = 0;
        for &c in &b[..int_len] {
            v = v * 10 + u128::from(c - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
        }
        s = &s[int_len..];
        let mut frac: u128 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(|c| c.is_ascii_digit()).count();
            let mut overflow = false;
            for c in rest[..frac_len].bytes() {
                if overflow {
                    continue;
                }
                let next = frac * 10 + u128::from(c - b'0');
                if next > LIMIT {
                    overflow = true;
                    continue;
                }
                frac = next;
                scale *= 10.0;
            }
            post = frac_len > 0;
            s = &rest[frac_len..];
        }
        if int_len == 0 && !post {
            return Err(invalid());
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        if unit.is_empty() {
            return Err(DurationError(format!(
                "time: missing unit in duration {}",
                go_quote(orig)
            )));
        }
        let mult: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit),
                    go_quote(orig)
                )))
            }
        };
        if v > LIMIT / mult {
            return Err(invalid());
        }
        v *= mult;
        if frac > 0 {
            // Go computes the fractional part in float64 and truncates.
            v += (frac as f64 * (mult as f64 / scale)) as u128;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        total += v;
        if total > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        return Ok(i64::try_from(total).map_or(i64::MIN, |t| -t));
    }
    if total > LIMIT - 1 {
        return Err(invalid());
    }
    i64::try_from(total).map_err(|_| invalid())
}

fn parse_expose(req: &Request) -> Result<Vec<String>, String> {
    if req.args.is_empty() {
        return Err("EXPOSE requires at least one argument".to_string());
    }
    no_flags(req)?;
    let mut ports = req.args.clone();
    ports.sort();
    Ok(ports)
}

fn parse_volume(req: &Request) -> Result<Vec<String>, String> {
    if req.args.is_empty() {
        return Err("VOLUME requires at least one argument".to_string());
    }
    no_flags(req)?;
    let mut out = Vec::new();
    for v in &req.args {
        let v = v.trim();
        if v.is_empty() {
            return Err("VOLUME specified can not be an empty string".to_string());
        }
        out.push(v.to_string());
    }
    Ok(out)
}

/// STOPSIGNAL: BuildKit never checks its flags, so they are ignored here too.
fn parse_stopsignal(req: &Request) -> Result<String, String> {
    if req.args.len() != 1 {
        return Err("STOPSIGNAL requires exactly one argument".to_string());
    }
    Ok(req.args[0].clone())
}

/// ARG: BuildKit never checks its flags either.
fn parse_arg(req: &Request) -> Result<Vec<ArgDecl>, String> {
    if req.args.is_empty() {
        return Err("ARG requires at least one argument".to_string());
    }
    let mut out = Vec::new();
    for arg in &req.args {
        match arg.split_once('=') {
            Some(("", _)) => return Err("ARG names can not be blank".to_string()),
            Some((k, v)) => out.push(ArgDecl {
                name: k.to_string(),
                default: Some(v.to_string()),
            }),
            None => out.push(ArgDecl {
                name: arg.clone(),
                default: None,
            }),
        }
    }
    Ok(out)
}

fn parse_shell(req: &Request) -> Result<Vec<String>, String> {
    no_flags(req)?;
    if req.args.is_empty() {
        return Err("SHELL requires at least one argument".to_string());
    }
    if !req.node.json {
        return Err("SHELL requires the arguments to be in JSON form".to_string());
    }
    Ok(req.args.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;

    fn df(text: &str) -> Result<Dockerfile, InstructionError> {
        let res = parse(text).map_err(|e| InstructionError {
            message: format!("parse: {e}"),
            location: Location::default(),
        })?;
        from_ast(&res.root)
    }

    fn err(text: &str) -> InstructionError {
        match df(text) {
            Ok(d) => panic!("expected an error for {text:?}, got {d:?}"),
            Err(e) => e,
        }
    }

    fn only_command(text: &str) -> Command {
        let d = df(text).unwrap();
        assert_eq!(d.stages.len(), 1);
        d.stages[0].commands.last().cloned().unwrap()
    }

    #[test]
    fn unknown_and_misused_flags() {
        let e = err("FROM a\nCOPY --form=b x /y\n");
        assert_eq!(e.message, "unknown flag: --form (did you mean from?)");
        assert_eq!(
            e.location,
            Location {
                start_line: 2,
                end_line: 2
            }
        );
        assert_eq!(
            err("FROM a\nCOPY --foo x /y\n").message,
            "unknown flag: --foo (did you mean from?)"
        );
        assert_eq!(
            err("FROM a\nRUN --bogus=1 true\n").message,
            "unknown flag: --bogus"
        );
        assert_eq!(err("FROM a\nCMD --x=1 true\n").message, "unknown flag: --x");
        assert_eq!(
            err("FROM a\nCOPY --from x /y\n").message,
            "missing a value on flag: --from"
        );
        assert_eq!(
            err("FROM a\nCOPY --link=maybe x /y\n").message,
            "expecting boolean value for flag --link, not: maybe"
        );
        assert_eq!(
            err("FROM a\nCOPY --from=a --from=b x /y\n").message,
            "duplicate flag specified: --from"
        );
        assert_eq!(
            err("FROM a\nRUN --network=bridge true\n").message,
            "invalid network mode \"bridge\""
        );
        assert_eq!(
            err("FROM a\nRUN --security=x true\n").message,
            "security \"x\" is not valid"
        );
        assert_eq!(
            err("FROM a\nADD --parents x /y\n").message,
            "unknown flag: --parents"
        );
    }

    #[test]
    fn copy_and_add_flags() {
        let c = only_command(
            "FROM a\nCOPY --from=build --chown=1:1 --chmod=755 --link --parents --exclude=*.md --exclude=x a b /dst/\n",
        );
        let Instruction::Copy(c) = c.instruction else {
            panic!("not COPY")
        };
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("1:1"));
        assert_eq!(c.chmod.as_deref(), Some("755"));
        assert!(c.link && c.parents);
        assert_eq!(c.exclude, vec!["*.md", "x"]);
        assert_eq!(c.sources, vec!["a", "b"]);
        assert_eq!(c.dest, "/dst/");
        let a = only_command(
            "FROM a\nADD --keep-git-dir=false --checksum=sha256:ab --unpack=true https://x/y.tgz /d\n",
        );
        let Instruction::Add(a) = a.instruction else {
            panic!("not ADD")
        };
        assert_eq!(a.keep_git_dir, Some(false));
        assert_eq!(a.unpack, Some(true));
        assert_eq!(a.checksum.as_deref(), Some("sha256:ab"));
        assert_eq!(
            err("FROM a\nCOPY onlyone\n").message,
            "COPY requires at least two arguments, but only one was provided. Destination could not be determined"
        );
    }

    #[test]
    fn copy_heredoc_sources() {
        let c = only_command("FROM a\nCOPY <<-EOF plain /dst\n\thello\nEOF\n");
        assert_eq!(c.original, "COPY <<-EOF plain /dst");
        let Instruction::Copy(c) = c.instruction else {
            panic!("not COPY")
        };
        assert_eq!(c.sources, vec!["EOF", "plain"]);
        assert_eq!(c.paths, vec!["plain"]);
        assert_eq!(c.heredocs.len(), 1);
        assert_eq!(c.heredocs[0].content, "hello\n");
        assert_eq!(
            err("FROM a\nCOPY x <<EOF\nEOF\n").message,
            "COPY cannot accept a heredoc as a destination"
        );
    }

    #[test]
    fn exec_and_shell_forms() {
        let c = only_command("FROM a\nRUN [\"echo\", \"hi\"]\n");
        let Instruction::Run(r) = c.instruction else {
            panic!("not RUN")
        };
        assert_eq!(
            r.command,
            CommandLine::Exec(vec!["echo".into(), "hi".into()])
        );
        let c = only_command("FROM a\nRUN --mount=type=cache,target=/c --network=none echo hi\n");
        assert_eq!(
            c.original,
            "RUN --mount=type=cache,target=/c --network=none echo hi"
        );
        let Instruction::Run(r) = c.instruction else {
            panic!("not RUN")
        };
        assert_eq!(r.command, CommandLine::Shell("echo hi".into()));
        assert_eq!(r.mounts, vec!["type=cache,target=/c"]);
        assert_eq!(r.network.as_deref(), Some("none"));
        let c = only_command("FROM a\nCMD [\"a\", 1\n");
        assert_eq!(
            c.instruction,
            Instruction::Cmd(CommandLine::Shell("[\"a\", 1".into()))
        );
        let c = only_command("FROM a\nENTRYPOINT []\n");
        assert_eq!(
            c.instruction,
            Instruction::Entrypoint(CommandLine::Exec(vec![]))
        );
        let c = only_command("FROM a\nSHELL [\"/bin/bash\", \"-c\"]\n");
        assert_eq!(
            c.instruction,
            Instruction::Shell(vec!["/bin/bash".into(), "-c".into()])
        );
        assert_eq!(
            err("FROM a\nSHELL /bin/bash -c\n").message,
            "SHELL requires the arguments to be in JSON form"
        );
        assert_eq!(
            err("FROM a\nSHELL []\n").message,
            "SHELL requires at least one argument"
        );
    }

    #[test]
    fn onbuild_triggers() {
        let c = only_command("FROM a\nONBUILD RUN echo hi\n");
        assert_eq!(c.instruction, Instruction::Onbuild("RUN echo hi".into()));
        let c = only_command("FROM a\n  onbuild   COPY <<EOF /x\nbody\nEOF\n");
        assert_eq!(
            c.instruction,
            Instruction::Onbuild("COPY <<EOF /x\nbody\nEOF".into())
        );
        assert_eq!(
            err("FROM a\nONBUILD ONBUILD RUN x\n").message,
            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
        );
        assert_eq!(
            err("FROM a\nONBUILD from b\n").message,
            "FROM isn't allowed as an ONBUILD trigger"
        );
        assert_eq!(
            err("FROM a\nONBUILD MAINTAINER me\n").message,
            "MAINTAINER isn't allowed as an ONBUILD trigger"
        );
        assert_eq!(
            err("FROM a\nONBUILD\n").message,
            "ONBUILD requires at least one argument"
        );
    }

    #[test]
    fn healthcheck() {
        let c = only_command(
            "FROM a\nHEALTHCHECK --interval=1m30s --retries=3 CMD curl -f http://x/ || exit 1\n",
        );
        let Instruction::Healthcheck(h) = c.instruction else {
            panic!("not HEALTHCHECK")
        };
        assert_eq!(
            h.test,
            Some(vec![
                "CMD-SHELL".into(),
                "curl -f http://x/ || exit 1".into()
            ])
        );
        assert_eq!(h.interval.as_deref(), Some("1m30s"));
        assert_eq!(h.retries.as_deref(), Some("3"));
        let c = only_command("FROM a\nHEALTHCHECK cmd [\"/bin/check\", \"-v\"]\n");
        let Instruction::Healthcheck(h) = c.instruction else {
            panic!("not HEALTHCHECK")
        };
        assert_eq!(
            h.test,
            Some(vec!["CMD".into(), "/bin/check".into(), "-v".into()])
        );
        let c = only_command("FROM a\nHEALTHCHECK NONE\n");
        assert_eq!(
            c.instruction,
            Instruction::Healthcheck(HealthcheckInstr::default())
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK NONE x\n").message,
            "HEALTHCHECK NONE takes no arguments"
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK CMD\n").message,
            "Missing command after HEALTHCHECK CMD"
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK FOO x\n").message,
            "Unknown type \"FOO\" in HEALTHCHECK (try CMD)"
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK --interval=10 CMD x\n").message,
            "time: missing unit in duration \"10\""
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK --timeout=1us CMD x\n").message,
            "Interval \"timeout\" cannot be less than 1ms"
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK --retries=-1 CMD x\n").message,
            "--retries cannot be negative (-1)"
        );
        assert_eq!(
            err("FROM a\nHEALTHCHECK --retries=x CMD x\n").message,
            "strconv.ParseInt: parsing \"x\": invalid syntax"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("-2ms"), Ok(-2_000_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration(".s").is_err());
        assert_eq!(
            parse_go_duration("3x").unwrap_err().to_string(),
            "time: unknown unit \"x\" in duration \"3x\""
        );
        assert!(parse_go_duration("9999999999999999999h").is_err());
    }

    #[test]
    fn stages_and_names() {
        let d = df("ARG V=1\nFROM --platform=linux/arm64 img:${V} AS Build\nRUN x\nFROM build\n")
            .unwrap();
        assert_eq!(d.meta_args.len(), 1);
        assert_eq!(d.meta_args[0].0.default.as_deref(), Some("1"));
        assert_eq!(d.stages.len(), 2);
        assert_eq!(d.stages[0].name.as_deref(), Some("build"));
        assert_eq!(d.stages[0].base, "img:${V}");
        assert_eq!(d.stages[0].platform.as_deref(), Some("linux/arm64"));
        assert_eq!(d.stages[0].commands.len(), 1);
        assert_eq!(d.stages[1].name, None);
        let e = err("FROM a AS 1st\n");
        assert_eq!(
            e.message,
            "invalid name for build stage: \"1st\", name can't start with a number or contain symbols"
        );
        assert_eq!(err("FROM a AS b!\n").location.start_line, 1);
        assert_eq!(
            err("FROM a b\n").message,
            "FROM requires either one or three arguments"
        );
        assert_eq!(
            df("FROM a as x.y-z_1\n").unwrap().stages[0].name.as_deref(),
            Some("x.y-z_1")
        );
    }

    #[test]
    fn before_from_and_unknown() {
        let e = err("ARG a\nRUN x\nFROM b\n");
        assert_eq!(e.message, "no build stage in current context");
        assert_eq!(
            e.location,
            Location {
                start_line: 2,
                end_line: 2
            }
        );
        let e = err("FROM a\n\nXYZZY bar\n");
        assert_eq!(e.message, "unknown instruction: XYZZY");
        assert_eq!(
            e.location,
            Location {
                start_line: 3,
                end_line: 3
            }
        );
        assert_eq!(
            err("FROM a\nFOO x\n").message,
            "unknown instruction: FOO (did you mean FROM?)"
        );
        assert_eq!(
            err("FROM a\nRUNN x\n").message,
            "unknown instruction: RUNN (did you mean RUN?)"
        );
        assert_eq!(
            err("FROM a\ncopyy x y\n").message,
            "unknown instruction: copyy (did you mean copy?)"
        );
    }

    #[test]
    fn env_label_arg_and_simple_instructions() {
        let d = df(
            "FROM a\nENV k v w\nENV a=1 b=\"2 3\"\nLABEL x=y\nARG n\nARG m=\"q\" o=\nEXPOSE 80 443/udp 22\nVOLUME [\"/a\", \"/b\"]\nUSER me\nWORKDIR /w\nSTOPSIGNAL SIGTERM\nMAINTAINER someone\n",
        )
        .unwrap();
        let got: Vec<Instruction> = d.stages[0]
            .commands
            .iter()
            .map(|c| c.instruction.clone())
            .collect();
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        let arg = |n: &str, v: Option<&str>| ArgDecl {
            name: n.into(),
            default: v.map(Into::into),
        };
        assert_eq!(
            got,
            vec![
                Instruction::Env(vec![kv("k", "v w")]),
                Instruction::Env(vec![kv("a", "1"), kv("b", "\"2 3\"")]),
                Instruction::Label(vec![kv("x", "y")]),
                Instruction::Arg(vec![arg("n", None)]),
                Instruction::Arg(vec![arg("m", Some("\"q\"")), arg("o", Some(""))]),
                Instruction::Expose(vec!["22".into(), "443/udp".into(), "80".into()]),
                Instruction::Volume(vec!["/a".into(), "/b".into()]),
                Instruction::User("me".into()),
                Instruction::Workdir("/w".into()),
                Instruction::StopSignal("SIGTERM".into()),
                Instruction::Maintainer("someone".into()),
            ]
        );
        assert_eq!(
            err("FROM a\nENV =x\n").message,
            "ENV names can not be blank"
        );
        assert_eq!(
            err("FROM a\nWORKDIR\n").message,
            "WORKDIR requires exactly one argument"
        );
        assert_eq!(
            err("FROM a\nEXPOSE\n").message,
            "EXPOSE requires at least one argument"
        );
        assert_eq!(
            err("FROM a\nVOLUME [\"\"]\n").message,
            "VOLUME specified can not be an empty string"
        );
    }

    #[test]
    fn argument_count_errors() {
        for cmd in ["MAINTAINER", "WORKDIR", "USER", "STOPSIGNAL"] {
            let res = parse(cmd).unwrap();
            let e = parse_command(&res.root.children[0]).unwrap_err();
            assert_eq!(e.message, format!("{cmd} requires exactly one argument"));
        }
        for cmd in ["ENV", "LABEL", "ONBUILD", "HEALTHCHECK", "EXPOSE", "VOLUME"] {
            let res = parse(cmd).unwrap();
            let e = parse_command(&res.root.children[0]).unwrap_err();
            assert_eq!(e.message, format!("{cmd} requires at least one argument"));
        }
        // The flag is reported only once the argument count is right.
        let res = parse("MAINTAINER --boo joe@example.com").unwrap();
        assert_eq!(
            parse_command(&res.root.children[0]).unwrap_err().message,
            "unknown flag: --boo"
        );
        // STOPSIGNAL and ARG never look at their flags in BuildKit.
        let c = only_command("FROM a\nSTOPSIGNAL --x 9\n");
        assert_eq!(c.instruction, Instruction::StopSignal("9".into()));
    }

    #[test]
    fn parse_command_rejects_from() {
        let res = parse("FROM a\n").unwrap();
        assert!(parse_command(&res.root.children[0]).is_err());
        let res = parse("RUN echo\n").unwrap();
        assert!(parse_command(&res.root.children[0]).is_ok());
    }
}
