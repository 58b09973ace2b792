//! The Dockerfile parser: BuildKit's `parser` package, rule for rule.
//!
//! The quirks kept here on purpose (byte-wise flag scanning, the 64 KiB line limit, heredoc
//! word lexing with a shared word buffer, ...) are what BuildKit does; a Dockerfile must
//! mean the same thing to strata as to `docker build`.

use unicode_general_category::{get_general_category, GeneralCategory};

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
    /// BuildKit's `Attributes["json"]`: the arguments were a JSON array (exec form).
    pub json: bool,
}

/// A parser warning (BuildKit only emits "empty continuation line").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// 1-based line where the instruction carrying the problem ends.
    pub line: usize,
    /// BuildKit's `Short` text.
    pub message: String,
    /// BuildKit's `Detail[0]`.
    pub detail: String,
    pub url: String,
}

/// The outcome of [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseResult {
    pub root: Node,
    /// The escape token in force (`\` or `` ` ``).
    pub escape: char,
    pub warnings: Vec<Warning>,
    /// Parser directives found at the top, name lowercased (`syntax`, `escape`, `check`).
    pub directives: Vec<(String, String)>,
}

/// A parse failure, worded as BuildKit words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub message: String,
    /// 1-based first line of the failing construct.
    pub line: usize,
    /// 1-based last line of the failing construct (equal to `line` for one-line errors).
    pub end_line: usize,
}

impl ParseError {
    fn new(message: impl Into<String>, line: usize, end_line: usize) -> Self {
        ParseError {
            message: message.into(),
            line,
            end_line: end_line.max(line),
        }
    }
}

/// bufio.Scanner's default maximum token size; longer lines make BuildKit fail.
const MAX_SCAN_TOKEN_SIZE: usize = 64 * 1024;

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

impl Node {
    /// BuildKit's `Node.Dump()`: the AST as s-expressions.
    pub fn dump(&self) -> String {
        let mut s = go_to_lower(&self.value);
        if !self.flags.is_empty() {
            s.push_str(" [");
            let quoted: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(&quoted.join(" "));
            s.push(']');
        }
        for c in &self.children {
            s.push('(');
            s.push_str(&c.dump());
            s.push_str(")\n");
        }
        let mut n = self.next.as_deref();
        while let Some(a) = n {
            s.push(' ');
            if a.children.is_empty() {
                s.push_str(&go_quote(&a.value));
            } else {
                s.push_str(&a.dump());
            }
            n = a.next.as_deref();
        }
        s.trim().to_string()
    }

    /// The argument chain (`Next`, `Next.Next`, ...) as a list of nodes.
    pub fn args(&self) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut n = self.next.as_deref();
        while let Some(a) = n {
            out.push(a);
            n = a.next.as_deref();
        }
        out
    }

    fn can_contain_heredoc(&self) -> bool {
        let mut node = self;
        if go_to_lower(&node.value) == "onbuild" {
            if let Some(child) = node.next.as_deref().and_then(|n| n.children.first()) {
                node = child;
            }
        }
        matches!(go_to_lower(&node.value).as_str(), "add" | "copy" | "run") && !node.json
    }
}

// ---------------------------------------------------------------------------------------
// Go string helpers

/// Go `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if is_go_print(c) => out.push(c),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Go `unicode.IsPrint`: categories L, M, N, P, S and the ASCII space.
fn is_go_print(c: char) -> bool {
    use GeneralCategory::*;
    if c == ' ' {
        return true;
    }
    matches!(
        get_general_category(c),
        UppercaseLetter
            | LowercaseLetter
            | TitlecaseLetter
            | ModifierLetter
            | OtherLetter
            | NonspacingMark
            | SpacingMark
            | EnclosingMark
            | DecimalNumber
            | LetterNumber
            | OtherNumber
            | ConnectorPunctuation
            | DashPunctuation
            | OpenPunctuation
            | ClosePunctuation
            | InitialPunctuation
            | FinalPunctuation
            | OtherPunctuation
            | MathSymbol
            | CurrencySymbol
            | ModifierSymbol
            | OtherSymbol
    )
}

fn is_go_letter(c: char) -> bool {
    use GeneralCategory::*;
    matches!(
        get_general_category(c),
        UppercaseLetter | LowercaseLetter | TitlecaseLetter | ModifierLetter | OtherLetter
    )
}

fn is_go_digit(c: char) -> bool {
    get_general_category(c) == GeneralCategory::DecimalNumber
}

/// Go `strings.ToLower` (simple case mapping, one rune to one rune).
pub fn go_to_lower(s: &str) -> String {
    s.chars()
        .map(|c| {
            let mut l = c.to_lowercase();
            match (l.next(), l.next()) {
                (Some(one), None) => one,
                // Only U+0130 lowercases to two runes; its simple mapping is 'i'.
                _ if c == '\u{130}' => 'i',
                _ => c,
            }
        })
        .collect()
}

/// Go `strings.ToUpper` (simple case mapping, one rune to one rune).
pub fn go_to_upper(s: &str) -> String {
    s.chars()
        .map(|c| {
            let mut u = c.to_uppercase();
            match (u.next(), u.next()) {
                (Some(one), None) => one,
                _ => c,
            }
        })
        .collect()
}

/// The separator class of BuildKit's `reWhitespace` (`[\t\v\f\r ]+`).
fn is_re_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// Go `regexp.Split(s, n)` with `reWhitespace`; `limit` 0 means no limit.
fn split_re_ws(s: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        if limit != 0 && out.len() + 1 == limit {
            break;
        }
        let Some(start) = rest.find(is_re_ws) else {
            break;
        };
        let after = &rest[start..];
        let len = after.len() - after.trim_start_matches(is_re_ws).len();
        out.push(rest[..start].to_string());
        rest = &rest[start + len..];
    }
    out.push(rest.to_string());
    out
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

// ---------------------------------------------------------------------------------------
// Physical lines

/// Lines as bufio.Scanner with BuildKit's `scanLines` yields them: line endings kept,
/// and a line over the scanner's limit stops the scan with an error.
struct Lines<'a> {
    rest: &'a str,
    too_long: bool,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.too_long || self.rest.is_empty() {
            return None;
        }
        let len = match self.rest.find('\n') {
            Some(i) if i < MAX_SCAN_TOKEN_SIZE => i + 1,
            None if self.rest.len() < MAX_SCAN_TOKEN_SIZE => self.rest.len(),
            _ => {
                self.too_long = true;
                return None;
            }
        };
        let (line, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(line)
    }
}

// ---------------------------------------------------------------------------------------
// Directives

#[derive(Default)]
struct DirectiveParser {
    done: bool,
    seen: Vec<String>,
}

impl DirectiveParser {
    /// BuildKit's `DirectiveParser.ParseLine` with the `#` comment prefix.
    fn parse_line(&mut self, line: &str) -> Result<Option<(String, String)>, String> {
        if self.done {
            return Ok(None);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(None);
        };
        let rest = rest.trim_start();
        let Some((name, value)) = match_directive(rest) else {
            self.done = true;
            return Ok(None);
        };
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&name) {
            return Err(format!("only one {name} parser directive can be used"));
        }
        self.seen.push(name.clone());
        Ok(Some((name, value.to_string())))
    }
}

/// Go RE2 `\s` (no `\v`).
fn is_re2_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ')
}

/// `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`
fn match_directive(s: &str) -> Option<(&str, &str)> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if c.is_ascii_alphabetic() => {}
        _ => return None,
    }
    let name_end = s
        .char_indices()
        .find(|(_, c)| !c.is_ascii_alphanumeric())
        .map_or(s.len(), |(i, _)| i);
    let name = &s[..name_end];
    let rest = s[name_end..].trim_start_matches(is_re2_space);
    let rest = rest.strip_prefix('=')?;
    let value = rest.trim_start_matches(is_re2_space);
    let value = value.trim_end_matches(is_re2_space);
    // `.` does not match a newline; lines never carry one here, but stay exact.
    if value.is_empty() || value.contains('\n') {
        return None;
    }
    Some((name, value))
}

struct Directives {
    parser: DirectiveParser,
    escape: char,
    found: Vec<(String, String)>,
}

impl Directives {
    fn possible_parser_directive(&mut self, line: &str) -> Result<(), String> {
        if let Some((name, value)) = self.parser.parse_line(line)? {
            if name == "escape" {
                let mut cs = value.chars();
                match (cs.next(), cs.next()) {
                    (Some(c @ ('`' | '\\')), None) => self.escape = c,
                    _ => {
                        return Err(format!(
                            "invalid escape token '{value}' does not match ` or \\"
                        ))
                    }
                }
            }
            self.found.push((name, value));
        }
        Ok(())
    }

    /// BuildKit's `processLine`: trims the newline (and leading blanks on a first line),
    /// feeds the directive parser and blanks comment lines.
    fn process_line<'a>(&mut self, token: &'a str, strip_left: bool) -> Result<&'a str, String> {
        let mut token = trim_newline(token);
        if strip_left {
            token = token.trim_start();
        }
        self.possible_parser_directive(token)?;
        Ok(if is_comment(token) { "" } else { token })
    }

    /// Removes a trailing line-continuation escape; returns (line, is_end_of_line).
    fn trim_continuation<'a>(&self, line: &'a str) -> (&'a str, bool) {
        let t = line.trim_end_matches([' ', '\t']);
        let Some(before) = t.strip_suffix(self.escape) else {
            return (line, true);
        };
        if before.is_empty() || !before.ends_with(self.escape) {
            (before, false)
        } else {
            (line, true)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parse

/// Parses a Dockerfile as BuildKit's `parser.Parse` does.
pub fn parse(text: &str) -> Result<ParseResult, ParseError> {
    let mut d = Directives {
        parser: DirectiveParser::default(),
        escape: '\\',
        found: Vec::new(),
    };
    let mut lines = Lines {
        rest: text,
        too_long: false,
    };
    let mut current_line = 0usize;
    let mut root = Node::default();
    let mut warnings = Vec::new();

    while let Some(raw) = lines.next() {
        let raw = if current_line == 0 {
            raw.strip_prefix('\u{feff}').unwrap_or(raw)
        } else {
            raw
        };
        let line = d
            .process_line(raw, true)
            .map_err(|m| ParseError::new(m, current_line + 1, current_line + 1))?;
        current_line += 1;
        let start_line = current_line;

        let (first, mut end_of_line) = d.trim_continuation(line);
        if end_of_line && first.is_empty() {
            continue;
        }
        let mut buf = first.to_string();
        let mut has_empty_continuation = false;
        while !end_of_line {
            let Some(raw) = lines.next() else { break };
            let l = d
                .process_line(raw, false)
                .map_err(|m| ParseError::new(m, current_line + 1, current_line + 1))?;
            current_line += 1;
            if is_comment(raw) {
                continue;
            }
            if trim_newline(l).trim_start().is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (t, e) = d.trim_continuation(l);
            end_of_line = e;
            buf.push_str(t);
        }

        if has_empty_continuation {
            warnings.push(Warning {
                line: current_line,
                message: format!("Empty continuation line found in: {buf}"),
                detail: "Empty continuation lines will become errors in a future release"
                    .to_string(),
                url: "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/"
                    .to_string(),
            });
        }

        let mut child = new_node_from_line(&buf, d.escape)
            .map_err(|m| ParseError::new(m, start_line, current_line))?;

        if child.can_contain_heredoc() && buf.contains("<<") {
            let heredocs = heredocs_from_line(&buf)
                .map_err(|m| ParseError::new(m, start_line, current_line))?;
            for mut heredoc in heredocs {
                let mut terminated = false;
                let mut content = std::mem::take(&mut heredoc.content);
                for body in lines.by_ref() {
                    current_line += 1;
                    let mut candidate = trim_newline(body);
                    if heredoc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    content.push_str(body);
                }
                if !terminated {
                    return Err(ParseError::new(
                        "unterminated heredoc",
                        start_line,
                        current_line,
                    ));
                }
                heredoc.content = content;
                child.heredocs.push(heredoc);
            }
        }

        child.start_line = start_line;
        child.end_line = current_line;
        set_nested_lines(&mut child, start_line, current_line);
        if root.children.is_empty() {
            root.start_line = start_line;
        }
        root.end_line = current_line;
        root.children.push(child);
    }

    if root.children.is_empty() {
        return Err(ParseError::new(
            "file with no instructions",
            current_line,
            current_line,
        ));
    }
    if lines.too_long {
        return Err(ParseError::new(
            format!(
                "dockerfile line greater than max allowed size of {}",
                MAX_SCAN_TOKEN_SIZE - 1
            ),
            current_line,
            current_line,
        ));
    }

    Ok(ParseResult {
        root,
        escape: d.escape,
        warnings,
        directives: d.found,
    })
}

/// BuildKit leaves nested nodes (the ONBUILD trigger) at line 0; giving them the
/// instruction's range makes errors about triggers point somewhere useful.
fn set_nested_lines(node: &mut Node, start: usize, end: usize) {
    let mut n = node.next.as_deref_mut();
    while let Some(a) = n {
        for c in &mut a.children {
            c.start_line = start;
            c.end_line = end;
            set_nested_lines(c, start, end);
        }
        n = a.next.as_deref_mut();
    }
}

/// Splits a logical line into keyword, flags and arguments and dispatches on the keyword.
fn new_node_from_line(line: &str, escape: char) -> Result<Node, String> {
    let parts = split_re_ws(line.trim(), 2);
    let cmd = parts.first().cloned().unwrap_or_default();
    let (args, flags) = match parts.get(1) {
        Some(rest) => {
            let (args, flags) = extract_builder_flags(rest, escape);
            (args.trim().to_string(), flags)
        }
        None => (String::new(), Vec::new()),
    };

    let (next, json) = match go_to_lower(&cmd).as_str() {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(&args)?,
        "arg" => (parse_name_or_name_val(&args, escape), false),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(&args)?,
        "env" => (parse_name_val(&args, "ENV", escape)?, false),
        "label" => (parse_name_val(&args, "LABEL", escape)?, false),
        "expose" | "from" => (parse_strings_whitespace_delimited(&args), false),
        "healthcheck" => parse_health_config(&args)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => (parse_string(&args), false),
        "onbuild" => (parse_sub_command(&args, escape)?, false),
        _ => (Some(Box::default()), false),
    };

    Ok(Node {
        value: cmd,
        original: line.to_string(),
        flags,
        next,
        json,
        ..Node::default()
    })
}

/// BuildKit's `extractBuilderFlags`. It walks bytes, not runes, so a non-ASCII byte in a
/// flag becomes the Latin-1 rune of that byte; kept for identical flag values.
fn extract_builder_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let b = line.as_bytes();
    let rest_from = |pos: usize| String::from_utf8_lossy(&b[pos..]).into_owned();
    let is_space = |c: char| c.is_whitespace();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut ch = '\0';
    let mut pos = 0usize;
    while pos <= b.len() {
        if pos != b.len() {
            ch = char::from(b[pos]);
        }
        if phase == Phase::Spaces {
            if pos == b.len() {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            if ch != '-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                return (rest_from(pos), words);
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && pos == b.len() {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (rest_from(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            if ch == escape {
                if pos + 1 == b.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                ch = char::from(b[pos]);
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        if phase == Phase::Quote {
            if ch == quote {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            if ch == escape {
                if pos + 1 == b.len() {
                    phase = Phase::Word;
                    pos += 1;
                    continue;
                }
                pos += 1;
                ch = char::from(b[pos]);
            }
            word.push(ch);
        }
        pos += 1;
    }
    (String::new(), words)
}

fn chain(values: Vec<String>) -> Option<Box<Node>> {
    let mut next: Option<Box<Node>> = None;
    for value in values.into_iter().rev() {
        next = Some(Box::new(Node {
            value,
            next,
            ..Node::default()
        }));
    }
    next
}

fn parse_sub_command(rest: &str, escape: char) -> Result<Option<Box<Node>>, String> {
    if rest.is_empty() {
        return Ok(None);
    }
    let child = new_node_from_line(rest, escape)?;
    Ok(Some(Box::new(Node {
        children: vec![child],
        ..Node::default()
    })))
}

/// BuildKit's `parseWords`: quote-aware split that keeps quotes and escapes in place.
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut word = String::new();
    let mut pos = 0usize;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && at_end {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

fn key_value_node(key: String, value: String, sep: &str) -> Vec<String> {
    vec![key, value, sep.to_string()]
}

/// ENV and LABEL: `key value` (legacy) or `k=v ...`, as key/value/separator triples.
fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Option<Box<Node>>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(None);
    };
    if !first.contains('=') {
        let mut parts = split_re_ws(rest, 2).into_iter();
        let (Some(k), Some(v)) = (parts.next(), parts.next()) else {
            return Err(format!("{key} must have two arguments"));
        };
        return Ok(chain(key_value_node(k, v, "")));
    }
    let mut values = Vec::new();
    for word in &words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                go_quote(word)
            ));
        };
        values.extend(key_value_node(k.to_string(), v.to_string(), "="));
    }
    Ok(chain(values))
}

fn parse_name_or_name_val(rest: &str, escape: char) -> Option<Box<Node>> {
    chain(parse_words(rest, escape))
}

fn parse_strings_whitespace_delimited(rest: &str) -> Option<Box<Node>> {
    if rest.is_empty() {
        return None;
    }
    chain(split_re_ws(rest, 0))
}

fn parse_string(rest: &str) -> Option<Box<Node>> {
    if rest.is_empty() {
        return None;
    }
    chain(vec![rest.to_string()])
}

enum JsonError {
    NotArray,
    Syntax,
    NotStringArray,
}

fn parse_json(rest: &str) -> Result<Option<Box<Node>>, JsonError> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Err(JsonError::NotArray);
    }
    let elems = go_json_array(rest).ok_or(JsonError::Syntax)?;
    let mut values = Vec::with_capacity(elems.len());
    for e in elems {
        values.push(e.ok_or(JsonError::NotStringArray)?);
    }
    Ok(chain(values))
}

type ArgsAndJson = (Option<Box<Node>>, bool);

fn parse_maybe_json(rest: &str) -> Result<ArgsAndJson, String> {
    if rest.is_empty() {
        return Ok((None, false));
    }
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonError::NotStringArray) => Err(NOT_STRING_ARRAY.to_string()),
        Err(_) => Ok((chain(vec![rest.to_string()]), false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<ArgsAndJson, String> {
    match parse_json(rest) {
        Ok(n) => Ok((n, true)),
        Err(JsonError::NotStringArray) => Err(NOT_STRING_ARRAY.to_string()),
        Err(_) => Ok((parse_strings_whitespace_delimited(rest), false)),
    }
}

/// HEALTHCHECK: a type word, then the rest as for CMD. Go scans bytes here too.
fn parse_health_config(rest: &str) -> Result<ArgsAndJson, String> {
    let b = rest.as_bytes();
    let is_space = |x: u8| char::from(x).is_whitespace();
    let sep = b.iter().position(|&x| is_space(x)).unwrap_or(b.len());
    let next = b[sep..]
        .iter()
        .position(|&x| !is_space(x))
        .map_or(b.len(), |p| sep + p);
    if sep == 0 {
        return Ok((None, false));
    }
    let typ = String::from_utf8_lossy(&b[..sep]).into_owned();
    let cmd_text = String::from_utf8_lossy(&b[next..]).into_owned();
    let (cmd, json) = parse_maybe_json(&cmd_text)?;
    Ok((
        Some(Box::new(Node {
            value: typ,
            next: cmd,
            ..Node::default()
        })),
        json,
    ))
}

// ---------------------------------------------------------------------------------------
// JSON arrays, with Go encoding/json's acceptance rules

/// Validates `s` as one JSON value that is an array and returns its elements: `Some` for
/// strings, `None` for anything else. `None` overall for invalid JSON.
fn go_json_array(s: &str) -> Option<Vec<Option<String>>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Expect {
        ValueOrClose,
        Value,
        CommaOrClose,
        KeyOrClose,
        Key,
        Colon,
    }
    const MAX_DEPTH: usize = 10000;
    let b = s.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut stack: Vec<u8> = vec![b'['];
    i += 1;
    let mut expect = Expect::ValueOrClose;
    let mut elems = Vec::new();
    loop {
        i = skip_ws(i);
        let &c = b.get(i)?;
        let mut closed = false;
        match expect {
            Expect::ValueOrClose | Expect::Value => {
                if c == b']' && expect == Expect::ValueOrClose {
                    stack.pop();
                    i += 1;
                    closed = true;
                } else {
                    let top_level = stack.len() == 1;
                    match c {
                        b'"' => {
                            let (value, ni) = json_string(b, i)?;
                            if top_level {
                                elems.push(Some(value));
                            }
                            i = ni;
                            expect = Expect::CommaOrClose;
                        }
                        b'[' | b'{' => {
                            if top_level {
                                elems.push(None);
                            }
                            stack.push(c);
                            if stack.len() > MAX_DEPTH {
                                return None;
                            }
                            i += 1;
                            expect = if c == b'[' {
                                Expect::ValueOrClose
                            } else {
                                Expect::KeyOrClose
                            };
                        }
                        b't' | b'f' | b'n' => {
                            let lit: &[u8] = match c {
                                b't' => b"true",
                                b'f' => b"false",
                                _ => b"null",
                            };
                            if !b[i..].starts_with(lit) {
                                return None;
                            }
                            if top_level {
                                elems.push(None);
                            }
                            i += lit.len();
                            expect = Expect::CommaOrClose;
                        }
                        b'-' | b'0'..=b'9' => {
                            i = json_number(b, i)?;
                            if top_level {
                                elems.push(None);
                            }
                            expect = Expect::CommaOrClose;
                        }
                        _ => return None,
                    }
                }
            }
            Expect::KeyOrClose | Expect::Key => {
                if c == b'}' && expect == Expect::KeyOrClose {
                    stack.pop();
                    i += 1;
                    closed = true;
                } else if c == b'"' {
                    i = json_string(b, i)?.1;
                    expect = Expect::Colon;
                } else {
                    return None;
                }
            }
            Expect::Colon => {
                if c != b':' {
                    return None;
                }
                i += 1;
                expect = Expect::Value;
            }
            Expect::CommaOrClose => {
                let top = *stack.last()?;
                if c == b',' {
                    i += 1;
                    expect = if top == b'[' {
                        Expect::Value
                    } else {
                        Expect::Key
                    };
                } else if (c == b']' && top == b'[') || (c == b'}' && top == b'{') {
                    stack.pop();
                    i += 1;
                    closed = true;
                } else {
                    return None;
                }
            }
        }
        if closed {
            if stack.is_empty() {
                return (skip_ws(i) == b.len()).then_some(elems);
            }
            expect = Expect::CommaOrClose;
        }
    }
}

fn json_number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut j: usize| {
        let start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        (j, j - start)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i).0,
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let (j, n) = digits(i + 1);
        if n == 0 {
            return None;
        }
        i = j;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let (j, n) = digits(i);
        if n == 0 {
            return None;
        }
        i = j;
    }
    Some(i)
}

fn hex4(b: &[u8], i: usize) -> Option<u32> {
    let h = b.get(i..i + 4)?;
    let s = std::str::from_utf8(h).ok()?;
    if !s.bytes().all(|x| x.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Scans and decodes the JSON string starting at `b[i] == '"'`; returns it and the index
/// after the closing quote. Lone surrogates decode to U+FFFD as in Go.
fn json_string(b: &[u8], i: usize) -> Option<(String, usize)> {
    let mut out: Vec<u8> = Vec::new();
    let mut j = i + 1;
    loop {
        let &c = b.get(j)?;
        match c {
            b'"' => {
                let s = String::from_utf8(out).ok()?;
                return Some((s, j + 1));
            }
            b'\\' => {
                let &e = b.get(j + 1)?;
                j += 2;
                let simple = match e {
                    b'"' => Some('"'),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    b'u' => None,
                    _ => return None,
                };
                let ch = match simple {
                    Some(ch) => ch,
                    None => {
                        let r = hex4(b, j)?;
                        j += 4;
                        if (0xD800..0xE000).contains(&r) {
                            let low = if b.get(j) == Some(&b'\\') && b.get(j + 1) == Some(&b'u') {
                                hex4(b, j + 2)
                            } else {
                                None
                            };
                            match low {
                                Some(lo) if r < 0xDC00 && (0xDC00..0xE000).contains(&lo) => {
                                    j += 6;
                                    let cp = 0x10000 + ((r - 0xD800) << 10) + (lo - 0xDC00);
                                    char::from_u32(cp).unwrap_or('\u{fffd}')
                                }
                                _ => '\u{fffd}',
                            }
                        } else {
                            char::from_u32(r).unwrap_or('\u{fffd}')
                        }
                    }
                };
                let mut tmp = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
            }
            c if c < 0x20 => return None,
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Heredocs

/// Reads a heredoc word (`<<EOF`, `3<<-'END'`) as BuildKit's `ParseHeredoc` does:
/// `Ok(None)` when `src` is not a heredoc word.
fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, String> {
    let Some((fd, chomp, rest)) = match_heredoc(src) else {
        return Ok(None);
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let words = shell_words(rest, false, false)?;
    if words.len() != 1 {
        return Ok(None);
    }
    let words_raw = shell_words(rest, true, false)?;
    if words_raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let count = |w: &str| w.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = count(&words[0]) == count(&words_raw[0]);
    Ok(Some(Heredoc {
        name: words[0].clone(),
        content: String::new(),
        expand,
        chomp,
        file_descriptor: fd,
    }))
}

/// BuildKit's `MustParseHeredoc`: errors count as "not a heredoc".
pub fn parse_heredoc_word(src: &str) -> Option<Heredoc> {
    parse_heredoc(src).ok().flatten()
}

/// `^(\d*)<<(-?)\s*([^<]*)$` with Go's ASCII `\d` and `\s`.
fn match_heredoc(src: &str) -> Option<(u32, bool, &str)> {
    let digits_end = src.find(|c: char| !c.is_ascii_digit()).unwrap_or(src.len());
    let digits = &src[..digits_end];
    let rest = src[digits_end..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches(is_re2_space);
    if rest.contains('<') {
        return None;
    }
    // Go's ParseUint error is ignored: overflow yields the maximum value.
    let fd = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().unwrap_or(u32::MAX)
    };
    Some((fd, chomp, rest))
}

/// Go `(?m)^\t+` removed: leading tabs of every line of a `<<-` heredoc.
pub fn chomp_heredoc_content(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.split_inclusive('\n') {
        out.push_str(line.trim_start_matches('\t'));
    }
    out
}

fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    // A line the lexer cannot read has no heredocs (BuildKit ignores that error).
    let words = shell_words(line, true, true).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(h) = parse_heredoc(&word)? {
            docs.push(h);
        }
    }
    Ok(docs)
}

/// `ProcessWords` of BuildKit's shell lexer with `\` escape, no variables defined and
/// `SkipUnsetEnv` (so `$x` stays `$x`): just enough to find heredoc words exactly as
/// BuildKit finds them.
fn shell_words(word: &str, raw_quotes: bool, raw_escapes: bool) -> Result<Vec<String>, String> {
    let mut lex = HeredocLex {
        chars: word.chars().collect(),
        pos: 0,
        raw_quotes,
        raw_escapes,
        words_buffer: String::new(),
    };
    lex.process_stop_on(None, raw_escapes)
        .map(|(_, words)| words)
        .map_err(|e| format!("failed to process {}: {e}", go_quote(word)))
}

struct HeredocLex {
    chars: Vec<char>,
    pos: usize,
    raw_quotes: bool,
    raw_escapes: bool,
    /// Shared by nested `process_stop_on` calls, which reset it: BuildKit does the same,
    /// so text before a `${...}` in the same word is dropped from the word list.
    words_buffer: String,
}

#[derive(Default)]
struct WordList {
    words: Vec<String>,
    in_word: bool,
}

impl WordList {
    fn add_char(&mut self, buf: &mut String, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !buf.is_empty() {
                self.words.push(std::mem::take(buf));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(buf, ch);
        }
    }

    fn add_raw_char(&mut self, buf: &mut String, ch: char) {
        buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, buf: &mut String, s: &str) {
        for ch in s.chars() {
            self.add_char(buf, ch);
        }
    }

    fn add_raw_string(&mut self, buf: &mut String, s: &str) {
        buf.push_str(s);
        self.in_word = true;
    }

    fn get_words(&mut self, buf: &mut String) -> Vec<String> {
        if !buf.is_empty() {
            self.words.push(std::mem::take(buf));
            self.in_word = false;
        }
        std::mem::take(&mut self.words)
    }
}

const MISSING_BRACE: &str = "syntax error: missing '}'";

impl HeredocLex {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        self.words_buffer.clear();
        let mut words = WordList::default();
        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.next();
                let w = words.get_words(&mut self.words_buffer);
                return Ok((result, w));
            }
            match ch {
                '$' => {
                    let tmp = self.process_dollar()?;
                    result.push_str(&tmp);
                    words.add_string(&mut self.words_buffer, &tmp);
                }
                '<' | '\'' | '"' => {
                    let tmp = match ch {
                        '<' => self.process_possible_heredoc(),
                        '\'' => self.process_single_quote()?,
                        _ => self.process_double_quote()?,
                    };
                    result.push_str(&tmp);
                    words.add_raw_string(&mut self.words_buffer, &tmp);
                }
                _ => {
                    self.next();
                    if ch == '\\' {
                        if self.raw_escapes {
                            words.add_raw_char(&mut self.words_buffer, ch);
                            result.push(ch);
                        }
                        let Some(escaped) = self.next() else { break };
                        words.add_raw_char(&mut self.words_buffer, escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(&mut self.words_buffer, ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        let w = words.get_words(&mut self.words_buffer);
        Ok((result, w))
    }

    fn process_single_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .to_string(),
                    )
                }
                Some('\'') => {
                    if self.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .to_string(),
                    )
                }
                Some('"') => {
                    self.next();
                    if self.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                }
                Some(_) => {
                    let Some(mut ch) = self.next() else { continue };
                    if ch == '\\' {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some('"' | '$' | '\\') => {
                                if let Some(c) = self.next() {
                                    ch = c;
                                }
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    /// `$name` / `${...}` with every variable unset and kept as written.
    fn process_dollar(&mut self) -> Result<String, String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            return Ok(format!("${name}"));
        }
        self.next();
        match self.peek() {
            None => return Err(MISSING_BRACE.to_string()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".to_string()),
            Some(_) => {}
        }
        let name = self.process_name();
        let ch = self.next();
        let mut chs = String::from(ch.unwrap_or('\u{fffd}'));
        match ch {
            Some('}') => Ok(format!("${{{name}}}")),
            Some(':' | '+' | '-' | '?' | '#' | '%') => {
                let mut c = ch;
                let null_is_unset = c == Some(':');
                if null_is_unset {
                    c = self.next();
                    chs.push(c.unwrap_or('\u{fffd}'));
                }
                let raw = matches!(c, Some('#' | '%'));
                if null_is_unset && raw {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = self.nested('}', raw, MISSING_BRACE)?;
                Ok(format!("${{{name}{chs}{word}}}"))
            }
            Some('/') => {
                if self.peek() == Some('/') {
                    self.next();
                }
                let pattern = self.nested('/', true, "syntax error: missing '/' in ${}")?;
                let replacement = self.nested('}', true, MISSING_BRACE)?;
                Ok(format!("${{{name}/{pattern}/{replacement}}}"))
            }
            _ => Err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }

    fn nested(&mut self, stop: char, raw: bool, eof_msg: &str) -> Result<String, String> {
        match self.process_stop_on(Some(stop), raw) {
            Ok((word, _)) => Ok(word),
            Err(_) if self.peek().is_none() => Err(eof_msg.to_string()),
            Err(e) => Err(e),
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_go_digit(ch) {
                while let Some(d) = self.peek().filter(|&d| is_go_digit(d)) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !is_go_letter(ch) && !is_go_digit(ch) && ch != '_' {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }

    fn process_possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.next();
        let mut result = String::from("<<");
        while let Some(c) = self.peek().filter(|c| matches!(c, '\t' | '\r' | ' ')) {
            result.push(c);
            self.next();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_go() {
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("\t\u{1}\u{7f}"), r#""\t\x01\x7f""#);
        assert_eq!(go_quote("é\u{a0}\u{ad}"), "\"é\\u00a0\\u00ad\"");
        assert_eq!(go_quote("\u{e0000}"), "\"\\U000e0000\"");
    }

    #[test]
    fn flags_are_extracted() {
        let (rest, flags) = extract_builder_flags("--a=1 --b='x y' -- foo", '\\');
        assert_eq!(flags, vec!["--a=1", "--b=x y"]);
        assert_eq!(rest, " foo");
        let (rest, flags) = extract_builder_flags("--a=é foo", '\\');
        assert_eq!(flags, vec!["--a=\u{c3}\u{a9}"]);
        assert_eq!(rest, "foo");
    }

    #[test]
    fn json_follows_go_rules() {
        assert_eq!(
            go_json_array(r#"["a", "\u00e9\ud83d\ude00", "\ud800x"]"#),
            Some(vec![
                Some("a".into()),
                Some("é😀".into()),
                Some("\u{fffd}x".into())
            ])
        );
        assert_eq!(
            go_json_array("[1, [2], {\"a\": null}]"),
            Some(vec![None, None, None])
        );
        assert_eq!(go_json_array("[01]"), None);
        assert_eq!(go_json_array("[\"a\",]"), None);
        assert_eq!(go_json_array("[] x"), None);
        assert_eq!(go_json_array(&"[".repeat(20000)), None);
    }

    #[test]
    fn heredoc_word_parsing() {
        let h = parse_heredoc("3<<-'EOF'").unwrap().unwrap();
        assert_eq!(
            (h.name.as_str(), h.expand, h.chomp, h.file_descriptor),
            ("EOF", false, true, 3)
        );
        assert_eq!(parse_heredoc("<<").unwrap(), None);
        assert_eq!(parse_heredoc("echo").unwrap(), None);
        assert_eq!(chomp_heredoc_content("\t\ta\n\tb\nc\t\n"), "a\nb\nc\t\n");
    }

    #[test]
    fn text_before_substitution_is_dropped_like_buildkit() {
        assert_eq!(
            shell_words("foo${a:-b} x", true, true).unwrap(),
            vec!["${a:-b}".to_string(), "x".to_string()]
        );
    }

    #[test]
    fn errors_are_located() {
        let e = parse("FROM a\nRUN <<EOF\nbody\n").unwrap_err();
        assert_eq!(
            (e.message.as_str(), e.line, e.end_line),
            ("unterminated heredoc", 2, 3)
        );
        let e = parse("# escape=x\nFROM a\n").unwrap_err();
        assert!(e.message.starts_with("invalid escape token 'x'"), "{e}");
        let e = parse("# escape=`\n# ESCAPE=\\\nFROM a\n").unwrap_err();
        assert_eq!(e.message, "only one escape parser directive can be used");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn directives_and_onbuild_heredoc() {
        let r = parse("# syntax=docker/dockerfile:1\n#escape=`\nFROM a\nONBUILD RUN <<E\nx\nE\n")
            .unwrap();
        assert_eq!(r.escape, '`');
        assert_eq!(
            r.directives,
            vec![
                ("syntax".to_string(), "docker/dockerfile:1".to_string()),
                ("escape".to_string(), "`".to_string())
            ]
        );
        let onbuild = &r.root.children[1];
        assert_eq!(onbuild.heredocs.len(), 1);
        assert_eq!(onbuild.heredocs[0].content, "x\n");
        assert_eq!(onbuild.dump(), "onbuild (run \"<<E\")");
        assert_eq!((onbuild.start_line, onbuild.end_line), (4, 6));
    }

    #[test]
    fn overlong_line_is_an_error() {
        let text = format!("FROM a\nRUN {}\n", "x".repeat(70000));
        let e = parse(&text).unwrap_err();
        assert_eq!(
            e.message,
            "dockerfile line greater than max allowed size of 65535"
        );
    }
}
