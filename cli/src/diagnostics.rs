//! User-facing errors and warnings that point at the Dockerfile, as BuildKit prints them
//! (`Dockerfile:N`, the source with `>>>` on the failing lines, `ERROR: failed to solve:
//! ...`), plus a caret under the offending word and a `help:` line saying what was
//! expected, in the style of miette.

use std::fmt::Write;

use strata_frontend::convert::{ConvertError, ErrorKind, Warning};

/// BuildKit's instruction names, for "expected an instruction".
const INSTRUCTIONS: &str = "ADD, ARG, CMD, COPY, ENTRYPOINT, ENV, EXPOSE, FROM, HEALTHCHECK, \
                            LABEL, MAINTAINER, ONBUILD, RUN, SHELL, STOPSIGNAL, USER, VOLUME, \
                            WORKDIR";

/// The flags each instruction accepts in BuildKit's Dockerfile frontend (`instructions`
/// package); used only to say what was expected after an unknown flag.
fn accepted_flags(instruction: &str) -> &'static [&'static str] {
    match instruction {
        "FROM" => &["--platform"],
        "RUN" => &["--mount", "--network", "--security", "--device"],
        "COPY" => &[
            "--from",
            "--chown",
            "--chmod",
            "--link",
            "--parents",
            "--exclude",
        ],
        "ADD" => &[
            "--chown",
            "--chmod",
            "--link",
            "--keep-git-dir",
            "--checksum",
            "--exclude",
            "--unpack",
        ],
        "HEALTHCHECK" => &[
            "--interval",
            "--timeout",
            "--start-period",
            "--start-interval",
            "--retries",
        ],
        _ => &[],
    }
}

/// The word to point at in the failing lines and what was expected instead, derived from
/// the frontend's (BuildKit-worded) message and the failing line.
fn explain(message: &str, line: &str) -> (Option<String>, Option<String>) {
    let instruction = line.split_whitespace().next().unwrap_or_default();
    let instr_token = (!instruction.is_empty()).then(|| instruction.to_string());
    let upper = instruction.to_uppercase();
    let word_after = |prefix: &str| -> Option<String> {
        let rest = message.split_once(prefix)?.1;
        let w: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != ',' && *c != '\'')
            .collect();
        (!w.is_empty()).then_some(w)
    };
    if let Some(w) = word_after("unknown instruction: ") {
        return (
            Some(w),
            Some(format!("expected an instruction: {INSTRUCTIONS}")),
        );
    }
    if let Some(flag) = word_after("unknown flag: ") {
        let flags = accepted_flags(&upper);
        let help = if flags.is_empty() {
            format!("{upper} accepts no flags")
        } else {
            format!("{upper} accepts the flags {}", flags.join(", "))
        };
        return (Some(flag), Some(help));
    }
    for prefix in [
        "missing a value on flag: ",
        "duplicate flag specified: ",
        "expecting boolean value for flag ",
    ] {
        if let Some(flag) = word_after(prefix) {
            let help = match prefix {
                "missing a value on flag: " => format!("expected {flag}=<value>"),
                "duplicate flag specified: " => format!("expected {flag} at most once"),
                _ => format!("expected {flag}=true or {flag}=false"),
            };
            return (Some(flag), Some(help));
        }
    }
    if let Some(mode) = message
        .strip_prefix("invalid chmod parameter: '")
        .and_then(|r| r.split_once('\''))
        .map(|(m, _)| m)
        .or_else(|| {
            message
                .strip_prefix("--chmod=")
                .and_then(|r| r.split_once(':'))
                .map(|(m, _)| m)
        })
    {
        return (
            Some(format!("--chmod={mode}")),
            Some("expected an octal mode between 0 and 07777, such as 0755".into()),
        );
    }
    if message.contains("requires exactly one argument") {
        return (instr_token, Some(format!("expected: {upper} <value>")));
    }
    if message.contains("requires at least one argument") {
        return (
            instr_token,
            Some(format!("expected: {upper} <argument>...")),
        );
    }
    if message.contains("requires at least two arguments") {
        return (
            instr_token,
            Some(format!(
                "expected: {upper} [flags] <source>... <destination>"
            )),
        );
    }
    if message.contains("requires exactly two arguments") {
        return (instr_token, Some(format!("expected: {upper} <a> <b>")));
    }
    if message.ends_with("must have two arguments") {
        return (
            instr_token,
            Some(format!(
                "expected: {upper} <key>=<value> ... (or the legacy {upper} <key> <value>)"
            )),
        );
    }
    if message.ends_with("names can not be blank") {
        return (Some("=".into()), Some("expected a name before '='".into()));
    }
    if message.starts_with("when using JSON array syntax") {
        return (
            Some("[".into()),
            Some(r#"expected a JSON array of strings, like ["executable", "param1"]"#.into()),
        );
    }
    if message == "unterminated heredoc" {
        return (
            Some("<<".into()),
            Some(
                "expected a line holding only the heredoc's name (the word after <<) before \
                 the end of the file"
                    .into(),
            ),
        );
    }
    if let Some(rest) = message.strip_prefix("Syntax error - can't find = in ") {
        let word = rest.split(". Must be").next().unwrap_or_default();
        return (
            (!word.is_empty()).then(|| word.to_string()),
            Some(format!("expected: {upper} <name>=<value> ...")),
        );
    }
    if message.starts_with("invalid escape token") {
        return (
            Some("escape".into()),
            Some("expected # escape=\\ (the default) or # escape=` (a backtick)".into()),
        );
    }
    if let Some(name) = message
        .strip_prefix("only one ")
        .and_then(|r| r.strip_suffix(" parser directive can be used"))
    {
        return (
            Some(name.to_string()),
            Some(format!("expected at most one `# {name}=` directive")),
        );
    }
    if message.starts_with("failed to process ")
        && (message.contains("syntax error") || message.contains("unsupported modifier"))
    {
        return (
            Some("${".into()),
            Some(
                "expected a complete substitution: ${NAME}, ${NAME:-default}, ${NAME#pattern}, \
                 ${NAME/pattern/replacement}, ..."
                    .into(),
            ),
        );
    }
    if let Some(base) = message
        .strip_prefix("base name (")
        .and_then(|r| r.strip_suffix(") should not be blank"))
    {
        return (
            Some(base.to_string()),
            Some(
                "expected the global ARG it uses to have a value (a default or --build-arg)".into(),
            ),
        );
    }
    if message.contains("failed to resolve source metadata for ") {
        return if upper == "FROM" {
            (
                line.split_whitespace()
                    .skip(1)
                    .find(|w| !w.starts_with("--"))
                    .map(str::to_string),
                Some(
                    "FROM names an image in a registry, `scratch`, or an earlier stage \
                     (`FROM <image> AS <name>`)"
                        .into(),
                ),
            )
        } else {
            (
                line.split_whitespace()
                    .find(|w| w.starts_with("--from="))
                    .map(str::to_string),
                Some("--from names an earlier stage (by name or index) or an image".into()),
            )
        };
    }
    (None, None)
}

/// Where `token` first occurs in the lines `start..=end` (1-based): (line, column, width),
/// the column and width counted in characters.
fn locate(lines: &[&str], start: usize, end: usize, token: &str) -> Option<(usize, usize, usize)> {
    (start..=end).find_map(|n| {
        let line = lines.get(n - 1)?;
        let byte = line.find(token)?;
        Some((
            n,
            line[..byte].chars().count() + 1,
            token.chars().count().max(1),
        ))
    })
}

/// Renders an error at lines `start..=end` of `source`, with two lines of context
/// before and one after:
///
/// ```text
/// Dockerfile:3:1
/// --------------------
///    2 |     RUN true
///    3 | >>> FROOB x
///      |     ^^^^^
/// --------------------
/// ERROR: failed to solve: ...
/// help: expected ...
/// ```
///
/// `token` is the word to underline (the first occurrence in the failing lines).
pub fn render_at(
    file: &str,
    source: &str,
    start: usize,
    end: usize,
    message: &str,
    token: Option<&str>,
    help: Option<&str>,
) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    if start == 0 || start > lines.len() {
        let _ = write!(out, "ERROR: {message}");
        if let Some(h) = help {
            let _ = write!(out, "\nhelp: {h}");
        }
        return out;
    }
    let end = end.clamp(start, lines.len());
    let spot = token.and_then(|t| locate(&lines, start, end, t));
    let first = start.saturating_sub(2).max(1);
    let last = (end + 1).min(lines.len());
    match spot {
        Some((line, col, _)) => {
            let _ = writeln!(out, "{file}:{line}:{col}");
        }
        None => {
            let _ = writeln!(out, "{file}:{start}");
        }
    }
    let _ = writeln!(out, "--------------------");
    for n in first..=last {
        let marker = if n >= start && n <= end { ">>>" } else { "   " };
        let text = lines[n - 1];
        let _ = writeln!(out, "{n:>4} | {marker} {text}");
        if let Some((line, col, width)) = spot {
            if line == n {
                // Keep tabs so the caret lines up under tab-indented text.
                let pad: String = text
                    .chars()
                    .take(col - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                let _ = writeln!(out, "     |     {pad}{}", "^".repeat(width));
            }
        }
    }
    let _ = writeln!(out, "--------------------");
    let _ = write!(out, "ERROR: {message}");
    if let Some(h) = help {
        let _ = write!(out, "\nhelp: {h}");
    }
    out
}

/// A solver error at a Dockerfile location (no caret: the whole step failed).
pub fn render(file: &str, source: &str, start: usize, end: usize, message: &str) -> String {
    render_at(file, source, start, end, message, None, None)
}

/// The stage names of a Dockerfile (`FROM ... AS name`), for "expected one of".
fn stage_names(source: &str) -> Vec<String> {
    let Ok(parsed) = strata_frontend::parser::parse(source) else {
        return Vec::new();
    };
    parsed
        .root
        .children
        .iter()
        .filter(|n| n.value.eq_ignore_ascii_case("from"))
        .filter_map(|n| n.args().get(2).map(|a| a.value.to_lowercase()))
        .collect()
}

/// A frontend (parse or lowering) error, worded as BuildKit's `failed to solve: ...`.
pub fn render_convert_error(file: &str, source: &str, e: &ConvertError) -> String {
    let Some(loc) = e.location else {
        let mut help = None;
        if e.message.starts_with("target stage ") {
            let names = stage_names(source);
            help = Some(if names.is_empty() {
                "the Dockerfile has no named stages (`FROM <image> AS <name>`)".to_string()
            } else {
                format!("expected one of the stages: {}", names.join(", "))
            });
        }
        return render_at(
            file,
            source,
            0,
            0,
            &format!("failed to solve: {}", e.message),
            None,
            help.as_deref(),
        );
    };
    let message = match e.kind {
        ErrorKind::Instruction => format!(
            "failed to solve: dockerfile parse error on line {}: {}",
            loc.start_line, e.message
        ),
        ErrorKind::Parse | ErrorKind::Lowering => format!("failed to solve: {}", e.message),
    };
    let line = source
        .lines()
        .nth(loc.start_line.saturating_sub(1))
        .unwrap_or_default();
    let (token, mut help) = explain(&e.message, line);
    if e.message.contains("failed to resolve source metadata for ") {
        // A misspelt stage name is looked up as an image; say which stage was meant.
        let name = token
            .as_deref()
            .map(|t| t.strip_prefix("--from=").unwrap_or(t).to_lowercase());
        let stages = stage_names(source);
        let close = name.and_then(|n| {
            stages
                .iter()
                .filter(|s| **s != n)
                .map(|s| (strata_frontend::suggest::levenshtein(&n, s), s))
                .filter(|(d, _)| *d < 3)
                .min_by_key(|(d, _)| *d)
                .map(|(_, s)| s.clone())
        });
        if let (Some(stage), Some(h)) = (close, help.as_mut()) {
            h.push_str(&format!(" (did you mean the stage {stage}?)"));
        }
    }
    render_at(
        file,
        source,
        loc.start_line,
        loc.end_line,
        &message,
        token.as_deref(),
        help.as_deref(),
    )
}

/// Build check warnings as BuildKit's client prints them:
///
/// ```text
///  2 warnings found:
///  - MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 2)
///  - JSONArgsRecommended: JSON arguments recommended for CMD to prevent ... (line 3)
/// ```
pub fn render_warnings(warnings: &[Warning]) -> String {
    if warnings.is_empty() {
        return String::new();
    }
    let n = warnings.len();
    let mut out = format!(" {n} warning{} found:", if n == 1 { "" } else { "s" });
    for w in warnings {
        // BuildKit's linter.LintFormatShort.
        let _ = write!(out, "\n - {}: {}", w.rule, w.message);
        if let Some(l) = w.location.filter(|l| l.start_line > 0) {
            let _ = write!(out, " (line {})", l.start_line);
        }
    }
    out
}

/// BuildKit's warning for `--build-arg`s no ARG declared.
pub fn render_unused_build_args(args: &[String]) -> Option<String> {
    (!args.is_empty()).then(|| {
        format!(
            "[Warning] One or more build-args [{}] were not consumed",
            args.join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_frontend::instructions::Location;

    fn err(kind: ErrorKind, line: usize, msg: &str) -> ConvertError {
        ConvertError {
            message: msg.into(),
            location: Some(Location {
                start_line: line,
                end_line: line,
            }),
            kind,
        }
    }

    #[test]
    fn points_at_the_line() {
        let src = "FROM a\nRUN true\nCOPY x /\nCMD y\n";
        let out = render("Dockerfile", src, 3, 3, "boom");
        assert!(out.contains("   3 | >>> COPY x /"), "{out}");
        assert!(out.contains("   2 |     RUN true"), "{out}");
        assert!(out.starts_with("Dockerfile:3\n"), "{out}");
        assert!(out.ends_with("ERROR: boom"), "{out}");
    }

    #[test]
    fn unknown_flag_gets_column_caret_and_expected_flags() {
        let src = "FROM a\n  COPY --form=b x /\n";
        let e = err(
            ErrorKind::Instruction,
            2,
            "unknown flag: --form (did you mean from?)",
        );
        let out = render_convert_error("Dockerfile", src, &e);
        assert_eq!(
            out,
            "Dockerfile:2:8\n\
             --------------------\n\
             \x20  1 |     FROM a\n\
             \x20  2 | >>>   COPY --form=b x /\n\
             \x20    |            ^^^^^^\n\
             --------------------\n\
             ERROR: failed to solve: dockerfile parse error on line 2: unknown flag: --form (did you mean from?)\n\
             help: COPY accepts the flags --from, --chown, --chmod, --link, --parents, --exclude"
        );
    }

    #[test]
    fn caret_keeps_tabs() {
        let src = "FROM a\n\tCMD [\"a\", 1]\n";
        let e = err(
            ErrorKind::Parse,
            2,
            "when using JSON array syntax, arrays must be comprised of strings only",
        );
        let out = render_convert_error("Dockerfile", src, &e);
        assert!(out.contains("\n     |     \t    ^\n"), "{out:?}");
        assert!(out.starts_with("Dockerfile:2:6\n"), "{out}");
    }

    #[test]
    fn misspelt_stage_in_copy_from_is_suggested() {
        let src = "FROM a AS builder\nFROM b\nCOPY --from=buidler /x /\n";
        let e = err(
            ErrorKind::Lowering,
            3,
            "failed to resolve source metadata for docker.io/library/buidler:latest: not found",
        );
        let out = render_convert_error("Dockerfile", src, &e);
        assert!(out.starts_with("Dockerfile:3:6\n"), "{out}");
        assert!(out.contains("\n     |          ^^^^^^^^^^^^^^\n"), "{out}");
        assert!(
            out.ends_with(
                "help: --from names an earlier stage (by name or index) or an image \
                 (did you mean the stage builder?)"
            ),
            "{out}"
        );
    }

    #[test]
    fn target_not_found_lists_the_stages() {
        let e = ConvertError {
            message: "target stage \"buld\" could not be found (did you mean build?)".into(),
            location: None,
            kind: ErrorKind::Lowering,
        };
        let out = render_convert_error("Dockerfile", "FROM a AS build\nFROM b AS Test\n", &e);
        assert_eq!(
            out,
            "ERROR: failed to solve: target stage \"buld\" could not be found (did you mean build?)\n\
             help: expected one of the stages: build, test"
        );
    }

    #[test]
    fn warnings_in_buildkit_short_format() {
        let w = |rule: &str, msg: &str, line| Warning {
            rule: rule.into(),
            message: msg.into(),
            location: Some(Location {
                start_line: line,
                end_line: line,
            }),
        };
        assert_eq!(
            render_warnings(&[w("A", "x", 2), w("B", "y", 5)]),
            " 2 warnings found:\n - A: x (line 2)\n - B: y (line 5)"
        );
        assert_eq!(
            render_unused_build_args(&["A".into(), "B".into()]).unwrap(),
            "[Warning] One or more build-args [A B] were not consumed"
        );
        assert_eq!(render_unused_build_args(&[]), None);
    }
}
