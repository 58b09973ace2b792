//! `.dockerignore` with moby's patternmatcher semantics (not gitignore's).
//!
//! Patterns are compiled the way `patternmatcher` does it: each one becomes an exact,
//! prefix or suffix comparison or a Go regular expression. The Go regexp text is then
//! translated to the `regex` crate's syntax rather than used as is, because the two
//! dialects read odd patterns differently (a `[` inside a class opens a nested class in
//! Rust but is a plain character in Go, and `.dockerignore` patterns such as `[*]` produce
//! exactly that).
//!
//! One deliberate difference: patternmatcher compiles a pattern's regexp lazily and reports
//! a bad one (`[z-a]`) only when a path is matched against it; here [`PatternMatcher::new`]
//! reports it at once.

use std::path::Path;

use regex::Regex;

/// A bad pattern, with its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid .dockerignore pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

/// Reads a `.dockerignore` file (ignorefile.ReadAll): BOM, comments, `!`, cleaning.
pub fn read_ignore_file(contents: &str) -> Vec<String> {
    let contents = contents.strip_prefix('\u{FEFF}').unwrap_or(contents);
    let mut lines: Vec<&str> = contents.split('\n').collect();
    // bufio.ScanLines yields no empty token after a final newline.
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let mut out = Vec::new();
    for line in lines {
        let line = line.strip_suffix('\r').unwrap_or(line);
        // A comment only when `#` is the very first character: `  # x` is a pattern.
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = go_clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push(if invert {
            format!("!{cleaned}")
        } else {
            cleaned
        });
    }
    out
}

/// Go's `path.Clean` (the Unix `filepath.Clean`).
pub fn go_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// Go's `filepath.Dir` on a `/`-separated path.
fn go_dir(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => go_clean(&path[..=i]),
        None => ".".into(),
    }
}

/// How a pattern is compared with a path (patternmatcher's `matchType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchType {
    /// The path equals the pattern.
    Exact,
    /// `dir/**`: the path starts with `dir/`.
    Prefix,
    /// `**/x` or `**x`: the path ends with the part after `**` (or equals `x`).
    Suffix,
    /// Anything else: a regexp anchored at both ends.
    Regexp,
}

/// What [`PatternMatcher::new`] made of one pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternInfo {
    /// The cleaned pattern without its `!`.
    pub pattern: String,
    pub exclusion: bool,
    pub match_type: MatchType,
    /// The Go regexp text patternmatcher builds (for [`MatchType::Regexp`] only).
    pub regexp: Option<String>,
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact,
    Prefix(String),
    Suffix(String),
    Regexp(Regex),
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    /// Number of `/`-separated parts, for the deprecated single-parent `Matches`.
    dirs: usize,
    match_type: MatchType,
    go_regexp: Option<String>,
    matcher: Matcher,
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.cleaned,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix.strip_prefix('/').is_some_and(|s| s == path)
            }
            Matcher::Regexp(re) => re.is_match(path),
        }
    }
}

/// Per-pattern results for a directory, handed to the matching of its entries
/// (patternmatcher's `MatchInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchInfo {
    parent_matched: Vec<bool>,
}

/// Compiled patterns (patternmatcher.New).
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
    /// fsutil's `onlyPrefixExcludeExceptions`: no `!` pattern has glob characters
    /// (ignoring a trailing `/*` or `/**`), so a prefix test tells whether one can
    /// match below a directory.
    only_prefix_exceptions: bool,
}

impl PatternMatcher {
    pub fn new(patterns: &[String]) -> Result<Self, PatternError> {
        let mut pm = PatternMatcher {
            patterns: Vec::new(),
            exclusions: false,
            only_prefix_exceptions: true,
        };
        for raw in patterns {
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let mut p = go_clean(trimmed);
            let mut exclusion = false;
            if let Some(rest) = p.strip_prefix('!') {
                if rest.is_empty() {
                    return Err(PatternError {
                        pattern: raw.clone(),
                        reason: "illegal exclusion pattern: \"!\"".into(),
                    });
                }
                exclusion = true;
                p = rest.to_string();
                pm.exclusions = true;
            }
            let bad = |reason: String| PatternError {
                pattern: raw.clone(),
                reason,
            };
            check_glob_syntax(&p).map_err(|()| bad("syntax error in pattern".into()))?;
            let (match_type, go_regexp) = compile(&p);
            let matcher = match match_type {
                MatchType::Exact => Matcher::Exact,
                MatchType::Prefix => Matcher::Prefix(p[..p.len() - 2].to_string()),
                MatchType::Suffix => Matcher::Suffix(p[2..].to_string()),
                MatchType::Regexp => {
                    let rust = go_regex_to_rust(&go_regexp)
                        .map_err(|e| bad(format!("syntax error in pattern: {e}")))?;
                    let re = Regex::new(&rust)
                        .map_err(|e| bad(format!("syntax error in pattern: {e}")))?;
                    Matcher::Regexp(re)
                }
            };
            if exclusion
                && pattern_without_trailing_glob(&p).contains(['*', '[', ']', '?', '^', '\\'])
            {
                pm.only_prefix_exceptions = false;
            }
            pm.patterns.push(Pattern {
                dirs: p.split('/').count(),
                cleaned: p,
                exclusion,
                match_type,
                go_regexp: (match_type == MatchType::Regexp).then_some(go_regexp),
                matcher,
            });
        }
        Ok(pm)
    }

    /// Whether `path` (relative to the context, `/`-separated) is excluded: the last
    /// pattern that matches it or one of its parent dirs wins (MatchesOrParentMatches).
    pub fn matches_or_parent_matches(&self, path: &str) -> bool {
        let parent = go_dir(path);
        let parent_dirs: Vec<&str> = parent.split('/').collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An include is only tried while nothing matched, an exception only after.
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = pattern.matches(path);
            if !hit && parent != "." {
                hit = (1..=parent_dirs.len()).any(|n| pattern.matches(&parent_dirs[..n].join("/")));
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// patternmatcher's deprecated `PatternMatcher.Matches`: like
    /// [`PatternMatcher::matches_or_parent_matches`] but only the parent prefix with as
    /// many parts as the pattern is tried.
    pub fn matches_single_parent(&self, path: &str) -> bool {
        let parent = go_dir(path);
        let parent_dirs: Vec<&str> = parent.split('/').collect();
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = pattern.matches(path);
            if !hit && parent != "." && pattern.dirs <= parent_dirs.len() {
                hit = pattern.matches(&parent_dirs[..pattern.dirs].join("/"));
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// patternmatcher's `MatchesUsingParentResults`: matching during a walk, reusing the
    /// directory's per-pattern results. Pass `MatchInfo::default()` for a path whose parent
    /// was not matched (then parent dirs are checked as in `matches_or_parent_matches`).
    pub fn matches_using_parent_results(
        &self,
        path: &str,
        parent: &MatchInfo,
    ) -> (bool, MatchInfo) {
        let parent_matched = if parent.parent_matched.len() == self.patterns.len() {
            parent.parent_matched.as_slice()
        } else {
            &[]
        };
        let mut matched = false;
        let mut info = MatchInfo {
            parent_matched: vec![false; self.patterns.len()],
        };
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut hit = parent_matched.get(i).copied().unwrap_or(false);
            if !hit {
                if pattern.exclusion != matched {
                    continue;
                }
                hit = pattern.matches(path);
                if !hit && parent_matched.is_empty() {
                    let dir = go_dir(path);
                    if dir != "." {
                        let dirs: Vec<&str> = dir.split('/').collect();
                        hit = (1..=dirs.len()).any(|n| pattern.matches(&dirs[..n].join("/")));
                    }
                }
            }
            info.parent_matched[i] = hit;
            if hit {
                matched = !pattern.exclusion;
            }
        }
        (matched, info)
    }

    /// patternmatcher's deprecated `MatchesUsingParentResult`: starts from the parent's
    /// overall result and checks `path` itself only (no parent dirs).
    pub fn matches_using_parent_result(&self, path: &str, parent_matched: bool) -> bool {
        let mut matched = parent_matched;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matches(path) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether any pattern is a `!` exception.
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// Whether a walk must still descend into the excluded directory `dir` because a `!`
    /// pattern may re-include something below it.
    pub fn may_match_below(&self, dir: &str) -> bool {
        if !self.exclusions {
            return false;
        }
        if !self.only_prefix_exceptions {
            return true;
        }
        let dir_slash = format!("{dir}/");
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            format!("{}/", pattern_without_trailing_glob(&p.cleaned)).starts_with(&dir_slash)
        })
    }

    /// The compiled patterns, in order.
    pub fn patterns(&self) -> Vec<PatternInfo> {
        self.patterns
            .iter()
            .map(|p| PatternInfo {
                pattern: p.cleaned.clone(),
                exclusion: p.exclusion,
                match_type: p.match_type,
                regexp: p.go_regexp.clone(),
            })
            .collect()
    }
}

/// patternmatcher's deprecated package-level `Matches(file, patterns)`: the path is
/// cleaned, `.` never matches, and only one parent prefix is tried.
pub fn legacy_matches(file: &str, patterns: &[String]) -> Result<bool, PatternError> {
    let pm = PatternMatcher::new(patterns)?;
    let file = go_clean(file);
    if file == "." {
        return Ok(false);
    }
    Ok(pm.matches_single_parent(&file))
}

fn pattern_without_trailing_glob(p: &str) -> &str {
    let p = p.strip_suffix("/**").unwrap_or(p);
    p.strip_suffix("/*").unwrap_or(p)
}

/// The syntax check `filepath.Match(pattern, ".")` performs (Unix rules): every chunk
/// between unbracketed stars must have well-formed classes and no trailing `\`.
fn check_glob_syntax(pattern: &str) -> Result<(), ()> {
    let b = pattern.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b'*' {
            i += 1;
        }
        // scanChunk: up to the next `*` outside brackets.
        let start = i;
        let mut in_range = false;
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => i += 1,
                b'[' => in_range = true,
                b']' => in_range = false,
                b'*' if !in_range => break,
                _ => {}
            }
            i += 1;
        }
        check_chunk(&pattern[start..i])?;
    }
    Ok(())
}

fn check_chunk(chunk: &str) -> Result<(), ()> {
    let mut rest = chunk;
    while let Some(c) = rest.chars().next() {
        match c {
            '[' => {
                rest = &rest[1..];
                rest = rest.strip_prefix('^').unwrap_or(rest);
                let mut nrange = 0;
                loop {
                    if nrange > 0 {
                        if let Some(after) = rest.strip_prefix(']') {
                            rest = after;
                            break;
                        }
                    }
                    rest = class_char(rest)?;
                    if let Some(after) = rest.strip_prefix('-') {
                        rest = class_char(after)?;
                    }
                    nrange += 1;
                }
            }
            '\\' => {
                rest = &rest[1..];
                let next = rest.chars().next().ok_or(())?;
                rest = &rest[next.len_utf8()..];
            }
            c => rest = &rest[c.len_utf8()..],
        }
    }
    Ok(())
}

/// `getEsc` of filepath.Match: one class character, which must be followed by more text.
fn class_char(chunk: &str) -> Result<&str, ()> {
    let mut rest = chunk;
    match rest.chars().next() {
        None | Some('-' | ']') => return Err(()),
        Some('\\') => rest = &rest[1..],
        Some(_) => {}
    }
    let c = rest.chars().next().ok_or(())?;
    rest = &rest[c.len_utf8()..];
    if rest.is_empty() {
        return Err(());
    }
    Ok(rest)
}

/// patternmatcher's `Pattern.compile` with `/` as separator: the match type and, for
/// regexp patterns, the Go regexp text.
fn compile(pattern: &str) -> (MatchType, String) {
    let mut re = String::from("^");
    let mut kind = MatchType::Exact;
    // Go's scanner would skip a leading byte order mark here, making `\u{FEFF}**x` a
    // suffix pattern over garbage bytes that never matches; keeping the mark is as good.
    let chars: Vec<char> = pattern.chars().collect();
    let mut pos = 0;
    let mut i = 0;
    while pos < chars.len() {
        let ch = chars[pos];
        pos += 1;
        match ch {
            '*' if chars.get(pos) == Some(&'*') => {
                pos += 1;
                // `**/` is read as `**`.
                if chars.get(pos) == Some(&'/') {
                    pos += 1;
                }
                if pos >= chars.len() {
                    if kind == MatchType::Exact {
                        kind = MatchType::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = MatchType::Regexp;
                    }
                } else {
                    // Any number of dirs, even none.
                    re.push_str("(.*/)?");
                    kind = MatchType::Regexp;
                }
                if i == 0 {
                    kind = MatchType::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = MatchType::Regexp;
            }
            '?' => {
                re.push_str("[^/]");
                kind = MatchType::Regexp;
            }
            // Go's table meant to escape `.+()|{}$` loses `|{}` (their bits overflow a
            // byte), so those stay regexp syntax, as upstream.
            '.' | '+' | '(' | ')' | '$' => {
                re.push('\\');
                re.push(ch);
            }
            '\\' => match chars.get(pos) {
                Some(&next) => {
                    pos += 1;
                    re.push('\\');
                    re.push(next);
                    kind = MatchType::Regexp;
                }
                None => re.push('\\'),
            },
            '[' | ']' => {
                re.push(ch);
                kind = MatchType::Regexp;
            }
            _ => re.push(ch),
        }
        i += 1;
    }
    if kind == MatchType::Regexp {
        re.push('$');
    }
    (kind, re)
}

/// One member of a character class, ready for the Rust syntax.
enum ClassItem {
    Range(char, char),
    Raw(String),
}

/// What the previous token of a Go regexp was, for Go's repetition rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// Start of the expression, `(` or `|`: a repetition has no argument.
    Pseudo,
    Atom,
    /// Go rejects a repetition of a repetition (`a**`); Rust would accept it.
    Repeat,
}

/// Translates Go (RE2, Perl flags) regexp text into an equivalent `regex` crate pattern.
/// Literal characters are written as `\x{..}` escapes, so the differences between the two
/// dialects (nested classes, class set operators, escapes) cannot leak through.
fn go_regex_to_rust(src: &str) -> Result<String, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::new();
    let mut prev = Prev::Pseudo;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '\\' => {
                let next = *chars
                    .get(i)
                    .ok_or("trailing backslash at end of expression")?;
                match next {
                    'A' | 'z' => {
                        i += 1;
                        out.push('\\');
                        out.push(next);
                    }
                    'b' | 'B' => {
                        i += 1;
                        out.push_str(&format!("(?-u:\\{next})"));
                    }
                    'Q' => {
                        i += 1;
                        let rest: String = chars[i..].iter().collect();
                        let lit = rest.split("\\E").next().unwrap_or("");
                        i += lit.chars().count();
                        if rest[lit.len()..].starts_with("\\E") {
                            i += 2;
                        }
                        if lit.is_empty() {
                            // Nothing was added, so a following repetition still
                            // applies to what came before.
                            continue;
                        }
                        for ch in lit.chars() {
                            push_literal(&mut out, ch);
                        }
                    }
                    'p' | 'P' => {
                        let (text, n) = unicode_class(&chars[i..])?;
                        i += n;
                        out.push_str(&text);
                    }
                    'd' | 'D' | 's' | 'S' | 'w' | 'W' => {
                        i += 1;
                        out.push_str(&format!("[{}]", perl_class(next)));
                    }
                    _ => {
                        let (ch, n) = go_escape(&chars[i..])?;
                        i += n;
                        push_literal(&mut out, ch);
                    }
                }
                prev = Prev::Atom;
            }
            '[' => {
                let (text, n) = go_class(&chars[i..])?;
                i += n;
                out.push_str(&text);
                prev = Prev::Atom;
            }
            '*' | '+' | '?' | '{' => {
                let op = if c == '{' {
                    // A `{` that does not start a valid repeat is a literal in Go.
                    match go_repeat(&chars[i..])? {
                        Some((text, n)) => {
                            i += n;
                            text
                        }
                        None => {
                            push_literal(&mut out, '{');
                            prev = Prev::Atom;
                            continue;
                        }
                    }
                } else {
                    c.to_string()
                };
                match prev {
                    Prev::Pseudo => {
                        return Err(format!("missing argument to repetition operator: `{op}`"))
                    }
                    Prev::Repeat => {
                        return Err(format!("invalid nested repetition operator: `{op}`"))
                    }
                    Prev::Atom => {}
                }
                out.push_str(&op);
                if chars.get(i) == Some(&'?') {
                    // Non-greedy form.
                    i += 1;
                    out.push('?');
                }
                prev = Prev::Repeat;
            }
            '(' | '|' => {
                out.push(c);
                prev = Prev::Pseudo;
            }
            '.' | '^' | '$' | ')' => {
                out.push(c);
                prev = Prev::Atom;
            }
            _ => {
                push_literal(&mut out, c);
                prev = Prev::Atom;
            }
        }
    }
    Ok(out)
}

/// Go's `parseRepeat` on the text after `{`: `Ok(None)` when it is no repeat (then the
/// `{` is a literal), the Rust text and chars read otherwise.
fn go_repeat(chars: &[char]) -> Result<Option<(String, usize)>, String> {
    fn int(chars: &[char], i: &mut usize) -> Option<i64> {
        let start = *i;
        if !chars.get(start).is_some_and(char::is_ascii_digit) {
            return None;
        }
        // Go disallows leading zeros.
        if chars[start] == '0' && chars.get(start + 1).is_some_and(char::is_ascii_digit) {
            return None;
        }
        let mut n: i64 = 0;
        while let Some(d) = chars.get(*i).and_then(|c| c.to_digit(10)) {
            if n >= 0 {
                n = if n >= 100_000_000 {
                    -1
                } else {
                    n * 10 + i64::from(d)
                };
            }
            *i += 1;
        }
        Some(n)
    }
    let mut i = 0;
    let Some(mut min) = int(chars, &mut i) else {
        return Ok(None);
    };
    let max;
    match chars.get(i) {
        None => return Ok(None),
        Some(',') => {
            i += 1;
            match chars.get(i) {
                None => return Ok(None),
                Some('}') => max = -1,
                Some(_) => {
                    let Some(m) = int(chars, &mut i) else {
                        return Ok(None);
                    };
                    if m < 0 {
                        min = -1;
                    }
                    max = m;
                }
            }
        }
        Some(_) => max = min,
    }
    if chars.get(i) != Some(&'}') {
        return Ok(None);
    }
    i += 1;
    let text: String = chars[..i].iter().collect();
    if !(0..=1000).contains(&min) || max > 1000 || (max >= 0 && min > max) {
        return Err(format!("invalid repeat count: `{{{text}`"));
    }
    let rust = if max < 0 {
        format!("{{{min},}}")
    } else if max == min && !text.contains(',') {
        format!("{{{min}}}")
    } else {
        format!("{{{min},{max}}}")
    };
    Ok(Some((rust, i)))
}

fn push_literal(out: &mut String, ch: char) {
    if ch.is_ascii_alphanumeric() {
        out.push(ch);
    } else {
        out.push_str(&format!("\\x{{{:X}}}", ch as u32));
    }
}

/// Go's `\d \s \w` are ASCII-only.
fn perl_class(c: char) -> &'static str {
    match c {
        'd' => "0-9",
        'D' => "^0-9",
        's' => "\\t\\n\\x0C\\r ",
        'S' => "^\\t\\n\\x0C\\r ",
        'w' => "0-9A-Za-z_",
        _ => "^0-9A-Za-z_",
    }
}

/// `\pX`, `\p{Name}`, `\P..`, `\p{^Name}` starting at `chars[0] == 'p' | 'P'`;
/// returns the Rust text and how many chars were read.
fn unicode_class(chars: &[char]) -> Result<(String, usize), String> {
    let kind = chars[0];
    match chars.get(1) {
        None => Err("invalid character class range".into()),
        Some('{') => {
            let end = chars
                .iter()
                .position(|c| *c == '}')
                .ok_or("invalid character class range")?;
            let mut name: String = chars[2..end].iter().collect();
            let mut negated = kind == 'P';
            if let Some(rest) = name.strip_prefix('^') {
                negated = !negated;
                name = rest.to_string();
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err("invalid character class range".into());
            }
            Ok((
                format!("\\{}{{{name}}}", if negated { 'P' } else { 'p' }),
                end + 1,
            ))
        }
        Some(&c) if c.is_ascii_alphabetic() => Ok((format!("\\{kind}{c}"), 2)),
        Some(_) => Err("invalid character class range".into()),
    }
}

/// Go's `parseEscape` after the backslash: returns the character and chars read.
fn go_escape(chars: &[char]) -> Result<(char, usize), String> {
    let c = *chars
        .first()
        .ok_or("trailing backslash at end of expression")?;
    let invalid = || format!("invalid escape sequence: `\\{c}`");
    if c.is_ascii() && !c.is_ascii_alphanumeric() {
        return Ok((c, 1));
    }
    let octal = |c: &char| ('0'..='7').contains(c);
    match c {
        '1'..='7' if !chars.get(1).is_some_and(octal) => Err(invalid()),
        '0'..='7' => {
            let mut value = c as u32 - '0' as u32;
            let mut n = 1;
            while n < 3 && chars.get(n).is_some_and(octal) {
                value = value * 8 + (chars[n] as u32 - '0' as u32);
                n += 1;
            }
            char::from_u32(value).map(|ch| (ch, n)).ok_or_else(invalid)
        }
        'x' => {
            if chars.get(1) == Some(&'{') {
                let end = chars.iter().position(|c| *c == '}').ok_or_else(invalid)?;
                let hex: String = chars[2..end].iter().collect();
                if hex.is_empty() {
                    return Err(invalid());
                }
                let value = u32::from_str_radix(&hex, 16).map_err(|_| invalid())?;
                char::from_u32(value)
                    .map(|ch| (ch, end + 1))
                    .ok_or_else(invalid)
            } else {
                let hex: String = chars.get(1..3).ok_or_else(invalid)?.iter().collect();
                let value = u32::from_str_radix(&hex, 16).map_err(|_| invalid())?;
                char::from_u32(value).map(|ch| (ch, 3)).ok_or_else(invalid)
            }
        }
        'a' => Ok(('\u{7}', 1)),
        'f' => Ok(('\u{c}', 1)),
        'n' => Ok(('\n', 1)),
        'r' => Ok(('\r', 1)),
        't' => Ok(('\t', 1)),
        'v' => Ok(('\u{b}', 1)),
        _ => Err(invalid()),
    }
}

/// Go's `parseClass` for the text after `[`: returns the Rust class and chars read
/// (through the closing `]`).
fn go_class(chars: &[char]) -> Result<(String, usize), String> {
    let missing = || "missing closing ]".to_string();
    let mut i = 0;
    let negated = chars.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut items = Vec::new();
    let mut first = true;
    loop {
        let c = *chars.get(i).ok_or_else(missing)?;
        if c == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        // POSIX classes like [:alpha:] are the same in both dialects.
        if c == '[' && chars.get(i + 1) == Some(&':') {
            let rest: String = chars[i + 2..].iter().collect();
            if let Some(end) = rest.find(":]") {
                let name = &rest[..end];
                let bare = name.strip_prefix('^').unwrap_or(name);
                const NAMES: [&str; 14] = [
                    "alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower",
                    "print", "punct", "space", "upper", "word", "xdigit",
                ];
                if !NAMES.contains(&bare) {
                    return Err("invalid character class range".into());
                }
                items.push(ClassItem::Raw(format!("[:{name}:]")));
                i += 2 + name.chars().count() + 2;
                continue;
            }
        }
        if c == '\\' {
            match chars.get(i + 1) {
                Some('p' | 'P') => {
                    let (text, n) = unicode_class(&chars[i + 1..])?;
                    items.push(ClassItem::Raw(text));
                    i += 1 + n;
                    continue;
                }
                Some(&k @ ('d' | 'D' | 's' | 'S' | 'w' | 'W')) => {
                    items.push(ClassItem::Raw(format!("[{}]", perl_class(k))));
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        let (lo, n) = class_char_go(&chars[i..])?;
        i += n;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            let (h, n) = class_char_go(&chars[i + 1..])?;
            if h < lo {
                return Err("invalid character class range".into());
            }
            hi = h;
            i += 1 + n;
        }
        items.push(ClassItem::Range(lo, hi));
    }
    let mut out = String::from("[");
    if negated {
        out.push('^');
    }
    for item in items {
        match item {
            ClassItem::Range(lo, hi) => {
                out.push_str(&format!("\\x{{{:X}}}", lo as u32));
                if hi != lo {
                    out.push_str(&format!("-\\x{{{:X}}}", hi as u32));
                }
            }
            ClassItem::Raw(text) => out.push_str(&text),
        }
    }
    out.push(']');
    Ok((out, i))
}

fn class_char_go(chars: &[char]) -> Result<(char, usize), String> {
    match chars.first() {
        None => Err("missing closing ]".into()),
        Some('\\') => go_escape(&chars[1..]).map(|(c, n)| (c, n + 1)),
        Some(&c) => Ok((c, 1)),
    }
}

/// Why [`walk_context`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("failed to read directory {path}")]
    ReadDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to stat {path}")]
    Stat {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file name {0:?} in the build context is not valid UTF-8")]
    NonUtf8(std::ffi::OsString),
}

struct VisitedDir {
    path: String,
    with_sep: String,
    info: MatchInfo,
    emitted: bool,
}

/// Lists the build context below `root` as fsutil's filtered walk sends it: relative
/// `/`-separated paths in lexical order, directories with a trailing `/`, symlinks not
/// followed. An excluded directory is entered only when [`PatternMatcher::may_match_below`]
/// says so, and an entry re-included inside it brings its excluded parent dirs along.
pub fn walk_context(root: &Path, matcher: &PatternMatcher) -> Result<Vec<String>, WalkError> {
    // Unlike entries below it, a missing or unreadable context root is an error.
    if let Err(source) = std::fs::read_dir(root) {
        return Err(WalkError::ReadDir {
            path: root.display().to_string(),
            source,
        });
    }
    let mut out = Vec::new();
    let mut parents: Vec<VisitedDir> = Vec::new();
    walk_dir(root, "", matcher, &mut parents, &mut out, false)?;
    Ok(out)
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    matcher: &PatternMatcher,
    parents: &mut Vec<VisitedDir>,
    out: &mut Vec<String>,
    excluded: bool,
) -> Result<(), WalkError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // fsutil skips what vanished meanwhile, and unreadable dirs that are excluded.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if excluded && e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(()),
        Err(source) => {
            return Err(WalkError::ReadDir {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    let mut list = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| WalkError::ReadDir {
            path: dir.display().to_string(),
            source,
        })?;
        list.push(entry);
    }
    list.sort_by_key(|e| e.file_name());
    for entry in list {
        let name = entry
            .file_name()
            .into_string()
            .map_err(WalkError::NonUtf8)?;
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(WalkError::Stat { path, source }),
        };
        let is_dir = file_type.is_dir();

        while parents
            .last()
            .is_some_and(|p| !path.starts_with(&p.with_sep))
        {
            parents.pop();
        }
        let parent_info = parents.last().map(|p| p.info.clone()).unwrap_or_default();
        let (excluded, info) = matcher.matches_using_parent_results(&path, &parent_info);
        if excluded && is_dir && !matcher.may_match_below(&path) {
            continue;
        }
        if !excluded {
            for parent in parents.iter_mut().filter(|p| !p.emitted) {
                out.push(format!("{}/", parent.path));
                parent.emitted = true;
            }
            out.push(if is_dir {
                format!("{path}/")
            } else {
                path.clone()
            });
        }
        if is_dir {
            parents.push(VisitedDir {
                with_sep: format!("{path}/"),
                path: path.clone(),
                info,
                emitted: !excluded,
            });
            walk_dir(&entry.path(), &path, matcher, parents, out, excluded)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(p: &[&str]) -> PatternMatcher {
        PatternMatcher::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn clean_like_go() {
        for (i, o) in [
            ("", "."),
            ("a/../..", ".."),
            ("/../a/", "/a"),
            ("a//b/./c/", "a/b/c"),
            ("!a/../b", "b"),
        ] {
            assert_eq!(go_clean(i), o, "{i}");
        }
    }

    #[test]
    fn class_with_star_reads_like_go() {
        // `[*]` becomes Go `^[[^/]*]$`: a class {[ ^ /} repeated, then a literal `]`.
        let m = pm(&["[*]"]);
        assert!(m.matches_or_parent_matches("]"));
        assert!(m.matches_or_parent_matches("[^]"));
        assert!(!m.matches_or_parent_matches("*"));
    }

    #[test]
    fn bad_range_fails_at_new() {
        assert!(PatternMatcher::new(&["[Local-Only]/".to_string()]).is_err());
    }

    #[test]
    fn go_escapes_in_patterns() {
        assert!(pm(&["a\\d"]).matches_or_parent_matches("a5"));
        assert!(!pm(&["a\\d"]).matches_or_parent_matches("ad"));
        assert!(pm(&["[[:digit:]]x"]).matches_or_parent_matches("1x"));
    }

    #[test]
    fn pipe_and_braces_stay_regexp_syntax() {
        // Upstream's escape table drops `|{}`: `x|y*` is the Go regexp `^x|y[^/]*$`.
        let m = pm(&["x|y*"]);
        assert!(m.matches_or_parent_matches("xanything"));
        assert!(m.matches_or_parent_matches("prefix-y"));
        assert!(!m.matches_or_parent_matches("zzz"));
        assert!(pm(&["a{2}?"]).matches_or_parent_matches("aab"));
        // Go rejects a repeated repetition, Rust would not.
        assert!(PatternMatcher::new(&["*{2}?".to_string()]).is_err());
        // An exact pattern keeps `|` literal.
        assert!(pm(&["a|b"]).matches_or_parent_matches("a|b"));
    }

    #[test]
    fn may_match_below_prefix_and_glob() {
        let m = pm(&["foo", "!foo/bar/**"]);
        assert!(m.may_match_below("foo"));
        assert!(m.may_match_below("foo/bar"));
        assert!(!m.may_match_below("baz"));
        assert!(pm(&["foo", "!*/x"]).may_match_below("baz"));
        assert!(!pm(&["foo"]).may_match_below("foo"));
    }

    #[test]
    fn read_ignore_file_rules() {
        let got = read_ignore_file("\u{FEFF}a\r\n  # not comment\n#c\n!  /x/../y/\n\n/\n");
        assert_eq!(got, vec!["a", "# not comment", "!y", "/"]);
    }
}
