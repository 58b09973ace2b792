//! Word expansion as BuildKit's `shell` lexer does it (`Lex.ProcessWord`/`ProcessWords`).
//!
//! The rules follow `frontend/dockerfile/shell/lex.go` rune for rune, including its quirks:
//! a leading U+FEFF is dropped (Go's `text/scanner` does that), `${V#p}`/`${V%p}` patterns
//! keep their escape characters, `${V//p/r}` expands `$0`-style templates in `r` the way
//! Go's `Regexp.ReplaceAllString` does, and an unterminated `${` reports the U+FFFD that Go
//! prints for the end-of-input rune.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use regex::Regex;

/// Where variables come from.
pub trait EnvGetter {
    fn get(&self, key: &str) -> Option<String>;
}

impl EnvGetter for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

impl EnvGetter for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// An ordered list of pairs; a later pair overrides an earlier one.
impl EnvGetter for [(String, String)] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

impl EnvGetter for Vec<(String, String)> {
    fn get(&self, key: &str) -> Option<String> {
        EnvGetter::get(self.as_slice(), key)
    }
}

/// An expansion error, worded like BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShellError(pub String);

/// The result of an expansion with the variable names it looked up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expansion {
    pub value: String,
    /// Variables that were set when looked up.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up but not set.
    pub unmatched: BTreeSet<String>,
}

/// The lexer; `escape` is the Dockerfile's escape character (`\` or `` ` ``).
#[derive(Debug, Clone)]
pub struct Lex {
    pub escape: char,
    /// Keep quotes in the output (BuildKit's RawQuotes).
    pub raw_quotes: bool,
    /// Leave `$VAR` of unset variables as written (BuildKit's SkipUnsetEnv).
    pub skip_unset_env: bool,
    /// Keep escape characters in the output (BuildKit's RawEscapes; the parser uses it
    /// with `raw_quotes` and `skip_unset_env` to find heredoc markers).
    pub raw_escapes: bool,
    /// Treat quotes as plain characters (BuildKit's SkipProcessQuotes, used when
    /// expanding heredoc bodies).
    pub skip_process_quotes: bool,
}

impl Lex {
    pub fn new(escape: char) -> Self {
        Lex {
            escape,
            raw_quotes: false,
            skip_unset_env: false,
            raw_escapes: false,
            skip_process_quotes: false,
        }
    }

    /// Expands one word: quotes removed, variables expanded, white space kept.
    pub fn process_word(&self, word: &str, env: &dyn EnvGetter) -> Result<String, ShellError> {
        self.process(word, env).map(|(value, _)| value.value)
    }

    /// Like [`Lex::process_word`], also reporting which variables were used.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn EnvGetter,
    ) -> Result<Expansion, ShellError> {
        self.process(word, env).map(|(value, _)| value)
    }

    /// Expands and splits into words on unquoted white space (including white space that
    /// came from an unquoted variable).
    pub fn process_words(
        &self,
        word: &str,
        env: &dyn EnvGetter,
    ) -> Result<Vec<String>, ShellError> {
        self.process(word, env).map(|(_, words)| words)
    }

    fn process(
        &self,
        word: &str,
        env: &dyn EnvGetter,
    ) -> Result<(Expansion, Vec<String>), ShellError> {
        let mut sw = ShellWord {
            lex: self,
            scanner: Scanner::new(word),
            env,
            raw_escapes: self.raw_escapes,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((value, words)) => Ok((
                Expansion {
                    value,
                    matched: sw.matched,
                    unmatched: sw.unmatched,
                },
                words,
            )),
            Err(msg) => Err(ShellError(format!(
                "failed to process {}: {msg}",
                go_quote(word)
            ))),
        }
    }
}

/// Go's `text/scanner` used as a rune reader: `None` is its EOF.
struct Scanner {
    chars: Vec<char>,
    pos: usize,
}

impl Scanner {
    fn new(s: &str) -> Self {
        let chars: Vec<char> = s.chars().collect();
        // text/scanner silently skips a byte order mark at the very start.
        let pos = usize::from(chars.first() == Some(&'\u{FEFF}'));
        Scanner { chars, pos }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }
}

/// Go prints the EOF rune (-1) with `%c`/`string(rune)` as U+FFFD.
fn rune_text(ch: Option<char>) -> char {
    ch.unwrap_or('\u{FFFD}')
}

/// Word splitting state (BuildKit's `wordsStruct`).
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

struct ShellWord<'a> {
    lex: &'a Lex,
    scanner: Scanner,
    env: &'a dyn EnvGetter,
    raw_escapes: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

#[derive(Clone, Copy)]
enum Special {
    Dollar,
    Heredoc,
    SingleQuote,
    DoubleQuote,
}

impl ShellWord<'_> {
    fn special(&self, ch: char) -> Option<Special> {
        match ch {
            '$' => Some(Special::Dollar),
            '<' => Some(Special::Heredoc),
            '\'' if !self.lex.skip_process_quotes => Some(Special::SingleQuote),
            '"' if !self.lex.skip_process_quotes => Some(Special::DoubleQuote),
            _ => None,
        }
    }

    /// Processes up to `stop` (consumed) or, with `None`, to the end of input.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let res = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        res
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        // Unlike BuildKit at 73ed682 (which shares one buffer between nested calls and so
        // loses the text before a `${V:-x}` in ProcessWords), every level has its own.
        let mut words = Words::default();
        while let Some(ch) = self.scanner.peek() {
            if stop == Some(ch) {
                self.scanner.next();
                return Ok((result, words.finish()));
            }
            if let Some(kind) = self.special(ch) {
                let tmp = match kind {
                    Special::Dollar => self.process_dollar()?,
                    Special::Heredoc => self.process_possible_heredoc(),
                    Special::SingleQuote => self.process_single_quote()?,
                    Special::DoubleQuote => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                if matches!(kind, Special::Dollar) {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            self.scanner.next();
            if ch == self.lex.escape {
                if self.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                // A trailing escape is dropped (it would escape the end of the line).
                let Some(escaped) = self.scanner.next() else {
                    break;
                };
                words.add_raw_char(escaped);
                result.push(escaped);
            } else {
                words.add_char(ch);
                result.push(ch);
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.scanner.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.scanner.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    )
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(ch) => result.push(ch),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        let open = self.scanner.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.scanner.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    )
                }
                Some('"') => {
                    self.scanner.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(mut ch) => {
                    self.scanner.next();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.scanner.peek() {
                            // The escape before the end is dropped; the loop then reports
                            // the missing closing quote.
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == self.lex.escape => {
                                self.scanner.next();
                                ch = next;
                            }
                            // Other escapes stay literal, as in sh.
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_possible_heredoc(&mut self) -> String {
        self.scanner.next();
        if self.scanner.peek() != Some('<') {
            return "<".into();
        }
        self.scanner.next();
        // `<< EOF` stays one word so that the parser sees the heredoc marker whole.
        let mut result = String::from("<<");
        while let Some(ch @ ('\t' | '\r' | ' ')) = self.scanner.peek() {
            result.push(ch);
            self.scanner.next();
        }
        result
    }

    fn get_env(&mut self, name: &str) -> (String, bool) {
        match self.env.get(name) {
            Some(v) => {
                self.matched.insert(name.to_string());
                (v, true)
            }
            None => {
                self.unmatched.insert(name.to_string());
                (String::new(), false)
            }
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.scanner.peek() {
            if name.is_empty() && is_go_digit(ch) {
                // Positional parameters: all the digits form the name.
                while let Some(d) = self.scanner.peek().filter(|c| is_go_digit(*c)) {
                    self.scanner.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && is_special_param(ch) {
                self.scanner.next();
                return ch.to_string();
            }
            if !is_go_letter(ch) && !is_go_digit(ch) && ch != '_' {
                break;
            }
            self.scanner.next();
            name.push(ch);
        }
        name
    }

    fn process_dollar(&mut self) -> Result<String, String> {
        self.scanner.next();

        if self.scanner.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            let (value, found) = self.get_env(&name);
            if !found && self.lex.skip_unset_env {
                return Ok(format!("${name}"));
            }
            return Ok(value);
        }

        self.scanner.next();
        match self.scanner.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.process_name();
        let first = self.scanner.next();
        let mut chs = rune_text(first).to_string();

        match first {
            Some('}') => {
                let (value, set) = self.get_env(&name);
                if !set && self.lex.skip_unset_env {
                    return Ok(format!("${{{name}}}"));
                }
                Ok(value)
            }
            Some(':' | '+' | '-' | '?' | '#' | '%') => {
                let mut ch = first;
                let null_is_unset = ch == Some(':');
                if null_is_unset {
                    ch = self.scanner.next();
                    chs.push(rune_text(ch));
                }
                let raw_escapes = matches!(ch, Some('#' | '%'));
                if null_is_unset && raw_escapes {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = match self.process_stop_on(Some('}'), raw_escapes) {
                    Ok((word, _)) => word,
                    Err(_) if self.scanner.peek().is_none() => {
                        return Err("syntax error: missing '}'".into())
                    }
                    Err(e) => return Err(e),
                };

                let (value, set) = self.get_env(&name);
                if self.lex.skip_unset_env && !set {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let empty_is_unset = !set || (null_is_unset && value.is_empty());
                match ch {
                    Some('-') => Ok(if empty_is_unset { word } else { value }),
                    Some('+') => Ok(if empty_is_unset { String::new() } else { word }),
                    Some('?') => {
                        let default = if !set {
                            "is not allowed to be unset"
                        } else if null_is_unset && value.is_empty() {
                            "is not allowed to be empty"
                        } else {
                            return Ok(value);
                        };
                        let message = if word.is_empty() {
                            default
                        } else {
                            word.as_str()
                        };
                        Err(format!("{name}: {message}"))
                    }
                    Some(c @ ('%' | '#')) => {
                        // `%`/`#` trim the shortest match, `%%`/`##` the longest.
                        let (pattern, greedy) = match word.strip_prefix(c) {
                            Some(rest) => (rest, true),
                            None => (word.as_str(), false),
                        };
                        if c == '%' {
                            trim_suffix(pattern, &value, greedy)
                        } else {
                            trim_prefix(pattern, &value, greedy)
                        }
                    }
                    _ => Err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            Some('/') => {
                let replace_all = self.scanner.peek() == Some('/');
                if replace_all {
                    self.scanner.next();
                }
                let pattern = match self.process_stop_on(Some('/'), true) {
                    Ok((p, _)) => p,
                    Err(_) if self.scanner.peek().is_none() => {
                        return Err("syntax error: missing '/' in ${}".into())
                    }
                    Err(e) => return Err(e),
                };
                let replacement = match self.process_stop_on(Some('}'), true) {
                    Ok((r, _)) => r,
                    Err(_) if self.scanner.peek().is_none() => {
                        return Err("syntax error: missing '}'".into())
                    }
                    Err(e) => return Err(e),
                };
                let (value, set) = self.get_env(&name);
                if self.lex.skip_unset_env && !set {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let re = shell_pattern_regex(&pattern, true, false)
                    .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                if replace_all {
                    Ok(go_replace_all(&re, &value, &replacement))
                } else if let Some(m) = re.find(&value) {
                    Ok(format!(
                        "{}{}{}",
                        &value[..m.start()],
                        replacement,
                        &value[m.end()..]
                    ))
                } else {
                    Ok(value)
                }
            }
            _ => Err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }
}

/// POSIX special parameters; never set in a Dockerfile but still parsed as names.
fn is_special_param(ch: char) -> bool {
    matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

fn category_regex(cell: &'static OnceLock<Option<Regex>>, pattern: &str) -> Option<&'static Regex> {
    cell.get_or_init(|| Regex::new(pattern).ok()).as_ref()
}

fn char_in(
    cell: &'static OnceLock<Option<Regex>>,
    pattern: &str,
    ch: char,
    fallback: fn(char) -> bool,
) -> bool {
    let mut buf = [0u8; 4];
    match category_regex(cell, pattern) {
        Some(re) => re.is_match(ch.encode_utf8(&mut buf)),
        None => fallback(ch),
    }
}

/// Go's `unicode.IsLetter`: general category L.
pub(crate) fn is_go_letter(ch: char) -> bool {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    if ch.is_ascii() {
        return ch.is_ascii_alphabetic();
    }
    char_in(&RE, r"^\p{L}$", ch, char::is_alphabetic)
}

/// Go's `unicode.IsDigit`: general category Nd.
pub(crate) fn is_go_digit(ch: char) -> bool {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    if ch.is_ascii() {
        return ch.is_ascii_digit();
    }
    char_in(&RE, r"^\p{Nd}$", ch, char::is_numeric)
}

/// Go's `unicode.IsPrint`: categories L, M, N, P, S and the ASCII space.
fn is_go_print(ch: char) -> bool {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    if ch.is_ascii() {
        return (' '..='~').contains(&ch);
    }
    char_in(&RE, r"^[\p{L}\p{M}\p{N}\p{P}\p{S}]$", ch, |c| {
        !c.is_control() && !c.is_whitespace()
    })
}

/// Go's `strconv.Quote`, for error messages worded like BuildKit's `%q`.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if is_go_print(c) => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// BuildKit's `convertShellPatternToRegex`: `*` and `?` globs, `\*` `\?` `\\` escapes, the
/// rest literal. Brackets are not classes here.
fn shell_pattern_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<Regex, String> {
    let mut s = Scanner::new(pattern);
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    while let Some(mut tok) = s.next() {
        match tok {
            '*' => {
                out.push_str(star);
                continue;
            }
            '?' => {
                out.push('.');
                continue;
            }
            '\\' => {
                // `\}` and `\/` were only needed to get the character past the `${}`
                // parser; the escape is not part of the pattern.
                if matches!(s.peek(), Some('}' | '/')) {
                    continue;
                }
                out.push('\\');
                let next = s.next();
                match next {
                    Some(c @ ('*' | '?' | '\\')) => tok = c,
                    other => return Err(format!("invalid escape '\\{}'", rune_text(other))),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' => out.push('\\'),
            _ => {}
        }
        out.push(tok);
    }
    Regex::new(&out).map_err(|e| format!("error parsing regexp: {e}"))
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let re = shell_pattern_regex(pattern, greedy, true)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Reverses a pattern but keeps each `\x` pair in order, so `a\*c` becomes `c\*a`.
fn reverse_pattern(pattern: &str) -> String {
    let runes: Vec<char> = pattern.chars().collect();
    let mut pieces: Vec<&[char]> = Vec::with_capacity(runes.len());
    let mut i = 0;
    while i < runes.len() {
        if runes[i] == '\\' && i + 1 < runes.len() {
            pieces.push(&runes[i..i + 2]);
            i += 2;
        } else {
            pieces.push(&runes[i..i + 1]);
            i += 1;
        }
    }
    pieces.iter().rev().flat_map(|p| p.iter()).collect()
}

/// A regex can't find the shortest rightmost match, so both sides are reversed to make it
/// a leftmost one.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed_value, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

/// Go's `Regexp.ReplaceAllString`: empty matches right after a match are skipped and the
/// replacement is a template (`$0`, `${0}` and `$$`; other names expand to nothing).
fn go_replace_all(re: &Regex, src: &str, template: &str) -> String {
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= src.len() {
        let Some(m) = re.find_at(src, search) else {
            break;
        };
        out.push_str(&src[last_end..m.start()]);
        if m.end() > last_end || m.start() == 0 {
            go_expand(&mut out, template, m.as_str());
        }
        last_end = m.end();
        let width = src[search..].chars().next().map_or(0, char::len_utf8);
        if search + width > m.end() {
            search += width;
        } else if search + 1 > m.end() {
            search += 1;
        } else {
            search = m.end();
        }
    }
    out.push_str(&src[last_end..]);
    out
}

fn go_expand(out: &mut String, template: &str, whole: &str) {
    let mut rest = template;
    while let Some(idx) = rest.find('$') {
        out.push_str(&rest[..idx]);
        rest = &rest[idx + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        match go_template_name(rest) {
            Some((name, after)) => {
                rest = after;
                if name == "0" {
                    out.push_str(whole);
                }
                // The pattern has no groups, so any other reference is empty.
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
}

/// Go's `regexp.extract`: `name` or `{name}` made of letters, digits and `_`.
fn go_template_name(s: &str) -> Option<(&str, &str)> {
    let (body, brace) = match s.strip_prefix('{') {
        Some(b) => (b, true),
        None => (s, false),
    };
    let end = body
        .char_indices()
        .find(|(_, c)| !(is_go_letter(*c) || is_go_digit(*c) || *c == '_'))
        .map_or(body.len(), |(i, _)| i);
    if end == 0 {
        return None;
    }
    let name = &body[..end];
    let mut after = &body[end..];
    if brace {
        after = after.strip_prefix('}')?;
    }
    Some((name, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn error_is_wrapped_like_buildkit() {
        let err = Lex::new('\\')
            .process_word("${X:?}", &env(&[]))
            .unwrap_err();
        assert_eq!(
            err.0,
            "failed to process \"${X:?}\": X: is not allowed to be unset"
        );
        let err = Lex::new('\\').process_word("${X", &env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            "failed to process \"${X\": unsupported modifier (\u{FFFD}) in substitution"
        );
    }

    #[test]
    fn backtick_escape() {
        let lex = Lex::new('`');
        assert_eq!(lex.process_word(r"a`$b\c", &env(&[])).unwrap(), r"a$b\c");
        assert_eq!(lex.process_word("\"a`\"b\"", &env(&[])).unwrap(), "a\"b");
    }

    #[test]
    fn raw_modes_keep_text() {
        let mut lex = Lex::new('\\');
        lex.raw_quotes = true;
        lex.skip_unset_env = true;
        lex.raw_escapes = true;
        let e = env(&[("A", "x")]);
        assert_eq!(
            lex.process_word(r#"'q' "$A" $B ${C:-d} \n"#, &e).unwrap(),
            r#"'q' "x" $B ${C:-d} \n"#
        );
        assert_eq!(
            lex.process_words("cat <<  EOF", &e).unwrap(),
            vec!["cat", "<<  EOF"]
        );
    }

    #[test]
    fn skip_process_quotes_keeps_quotes_literal() {
        let mut lex = Lex::new('\\');
        lex.skip_process_quotes = true;
        assert_eq!(
            lex.process_word("'$A' \"x\"", &env(&[("A", "1")])).unwrap(),
            "'1' \"x\""
        );
    }

    #[test]
    fn replace_all_expands_go_templates() {
        let lex = Lex::new('\\');
        let e = env(&[("F", "abab")]);
        // `$0` would be expanded as a variable first; escaped, the escape stays (raw
        // escapes) and Go's template then expands `$0` to the match.
        assert_eq!(lex.process_word("${F//b/<$0>}", &e).unwrap(), "a<>a<>");
        assert_eq!(
            lex.process_word(r"${F//b/<\$0>}", &e).unwrap(),
            r"a<\b>a<\b>"
        );
        assert_eq!(lex.process_word(r"${F/b/<\$0>}", &e).unwrap(), r"a<\$0>ab");
        assert_eq!(
            lex.process_word("${F//x*/-}", &env(&[("F", "ab")]))
                .unwrap(),
            "ab"
        );
        assert_eq!(
            lex.process_word("${F//*/-}", &env(&[("F", "ab")])).unwrap(),
            "-"
        );
        assert_eq!(lex.process_word("${F//?/-}", &e).unwrap(), "----");
    }

    #[test]
    fn nested_default_keeps_word_prefix() {
        let lex = Lex::new('\\');
        assert_eq!(
            lex.process_words("a${X:-b c}d e", &env(&[])).unwrap(),
            vec!["ab", "cd", "e"]
        );
    }

    #[test]
    fn shell_pattern_conversion_like_buildkit() {
        for (pattern, want) in [
            ("*", "^.*"),
            ("?", "^."),
            ("\\*", "^\\*"),
            (
                "(()[]{\\}^$.\\*\\?|\\\\",
                "^\\(\\(\\)\\[\\]\\{\\}\\^\\$\\.\\*\\?\\|\\\\",
            ),
        ] {
            let re = shell_pattern_regex(pattern, true, true).unwrap();
            assert_eq!(re.as_str(), want, "{pattern}");
        }
        for bad in ["\\", "\\x", "\\\\\\"] {
            assert!(shell_pattern_regex(bad, true, true).is_err(), "{bad}");
        }
        for (pattern, want) in [
            ("a\\*c", "c\\*a"),
            ("\\\\\\ab", "b\\a\\\\"),
            ("ab\\", "\\ba"),
            ("👽\\🚀🖖", "🖖\\🚀👽"),
            ("\\\\b", "b\\\\"),
        ] {
            assert_eq!(reverse_pattern(pattern), want, "{pattern}");
        }
    }

    #[test]
    fn go_quote_matches_strconv() {
        assert_eq!(
            go_quote("a\"b\\\n\u{1}\u{7f}한"),
            "\"a\\\"b\\\\\\n\\x01\\x7f한\""
        );
        assert_eq!(go_quote("\u{200b}"), "\"\\u200b\"");
    }
}
