//! The Dockerfile parser: BuildKit's `parser` package, rule for rule.

/// A heredoc attached to an instruction.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Heredoc {
    pub name: String,
    pub content: String,
    /// false when the name was quoted: no variable expansion in the body.
    pub expand: bool,
    /// `<<-`: leading tabs stripped.
    pub chomp: bool,
    pub file_descriptor: u32,
}

/// BuildKit's untyped `Node`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Node {
    pub value: String,
    pub next: Option<Box<Node>>,
    pub children: Vec<Node>,
    pub heredocs: Vec<Heredoc>,
    pub flags: Vec<String>,
    /// The logical line as written (for history and errors).
    pub original: String,
    pub start_line: usize,
    pub end_line: usize,
}
