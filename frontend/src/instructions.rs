//! Typed instructions (BuildKit's `instructions` package): what each Dockerfile line means,
//! before any variable is expanded. Words are kept as written; [`crate::convert`] expands
//! them with the shell lexer where BuildKit does.

use crate::parser::{Heredoc, Node};

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

/// Builds typed stages from the parsed AST.
pub fn from_ast(_root: &Node) -> Result<Dockerfile, InstructionError> {
    todo!()
}
