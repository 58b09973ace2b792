//! BuildKit's parser test data (see shared/conformance/README.md), run against our parser.
//!
//! Every case found on disk is run; failures are collected and reported together so one
//! broken rule does not hide the others. Nothing here names a case: the layout decides.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::conformance_dir;
use strata_frontend::instructions::from_ast;
use strata_frontend::parser::{parse, Node};

/// Sorted entries of `dir` (directories or files per `want_dirs`).
fn entries(dir: &Path, want_dirs: bool) -> Result<Vec<PathBuf>, String> {
    let rd = fs::read_dir(dir).map_err(|e| format!("read dir {}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() == want_dirs)
        .collect();
    out.sort();
    Ok(out)
}

fn read(path: &Path) -> Result<String, String> {
    let bytes = fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| format!("{} is not UTF-8: {e}", path.display()))
}

struct Report {
    failures: Vec<String>,
    counts: Vec<(String, usize)>,
}

impl Report {
    fn fail(&mut self, case: &Path, msg: impl std::fmt::Display) {
        self.failures.push(format!("{}: {msg}", case.display()));
    }

    fn count(&mut self, set: &str, n: usize) {
        if n == 0 {
            self.failures.push(format!("{set}: no cases found"));
        }
        self.counts.push((set.to_string(), n));
    }
}

fn check_dumps(root: &Path, r: &mut Report) -> Result<(), String> {
    let cases = entries(&root.join("parser"), true)?;
    r.count("parser", cases.len());
    for case in cases {
        let text = read(&case.join("Dockerfile"))?;
        let want = read(&case.join("result"))?;
        match parse(&text) {
            Ok(res) => {
                let got = res.root.dump() + "\n";
                if got != want {
                    r.fail(
                        &case,
                        format!("dump differs\n--- got\n{got}--- want\n{want}"),
                    );
                }
            }
            Err(e) => r.fail(&case, format!("parse failed: {e} (line {})", e.line)),
        }
    }
    Ok(())
}

fn check_negative(root: &Path, r: &mut Report) -> Result<(), String> {
    // The README lists the only messages these cases may produce.
    const DOCUMENTED: [&str; 3] = [
        "file with no instructions",
        "ENV must have two arguments",
        "when using JSON array syntax, arrays must be comprised of strings only",
    ];
    let cases = entries(&root.join("parser-negative"), true)?;
    r.count("parser-negative", cases.len());
    for case in cases {
        let text = read(&case.join("Dockerfile"))?;
        match parse(&text) {
            Ok(res) => r.fail(&case, format!("parsed but must fail:\n{}", res.root.dump())),
            Err(e) if !DOCUMENTED.contains(&e.message.as_str()) => {
                r.fail(&case, format!("unexpected error message {:?}", e.message))
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn check_lines(root: &Path, r: &mut Report) -> Result<(), String> {
    let cases = entries(&root.join("parser-lines"), true)?;
    r.count("parser-lines", cases.len());
    for case in cases {
        let text = read(&case.join("Dockerfile"))?;
        let expected = read(&case.join("expected"))?;
        let res = match parse(&text) {
            Ok(res) => res,
            Err(e) => {
                r.fail(&case, format!("parse failed: {e}"));
                continue;
            }
        };
        let mut rows = 0;
        for line in expected.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            let cols: Vec<&str> = line.split('\t').collect();
            let [name, start, end] = cols[..] else {
                r.fail(&case, format!("bad expected row {line:?}"));
                continue;
            };
            let (Ok(start), Ok(end)) = (start.parse::<usize>(), end.parse::<usize>()) else {
                r.fail(&case, format!("bad numbers in row {line:?}"));
                continue;
            };
            let node: Option<&Node> = if name == "root" {
                Some(&res.root)
            } else {
                name.strip_prefix("child[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| res.root.children.get(i))
            };
            rows += 1;
            match node {
                Some(n) if (n.start_line, n.end_line) == (start, end) => {}
                Some(n) => r.fail(
                    &case,
                    format!(
                        "{name}: got {}-{}, want {start}-{end}",
                        n.start_line, n.end_line
                    ),
                ),
                None => r.fail(&case, format!("{name}: no such node")),
            }
        }
        if rows == 0 {
            r.fail(&case, "expected file has no rows");
        }
    }
    Ok(())
}

fn check_warnings(root: &Path, r: &mut Report) -> Result<(), String> {
    let cases = entries(&root.join("parser-warnings"), true)?;
    r.count("parser-warnings", cases.len());
    for case in cases {
        let text = read(&case.join("Dockerfile"))?;
        let expected = read(&case.join("expected"))?;
        let res = match parse(&text) {
            Ok(res) => res,
            Err(e) => {
                r.fail(&case, format!("parse failed: {e}"));
                continue;
            }
        };
        for line in expected.lines().filter(|l| !l.trim().is_empty()) {
            let Some((key, value)) = line.split_once('\t') else {
                r.fail(&case, format!("bad expected row {line:?}"));
                continue;
            };
            if key == "count" {
                if value.parse::<usize>().ok() != Some(res.warnings.len()) {
                    r.fail(
                        &case,
                        format!("{} warnings, want {value}", res.warnings.len()),
                    );
                }
                continue;
            }
            // `warning[i].Short contains` / `warning[i].Detail[0] contains`
            let parsed = key
                .strip_prefix("warning[")
                .and_then(|s| s.split_once("]."))
                .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
            let Some((i, field)) = parsed else {
                r.fail(&case, format!("unknown expectation {key:?}"));
                continue;
            };
            let Some(w) = res.warnings.get(i) else {
                r.fail(&case, format!("no warning {i}"));
                continue;
            };
            let got = match field {
                "Short contains" => &w.message,
                "Detail[0] contains" => &w.detail,
                other => {
                    r.fail(&case, format!("unknown warning field {other:?}"));
                    continue;
                }
            };
            if !got.contains(value) {
                r.fail(&case, format!("warning {i} {field} {value:?}: got {got:?}"));
            }
        }
    }
    Ok(())
}

fn check_heredocs(root: &Path, r: &mut Report) -> Result<(), String> {
    let cases = entries(&root.join("parser-heredoc"), true)?;
    r.count("parser-heredoc", cases.len());
    for case in cases {
        let text = read(&case.join("Dockerfile"))?;
        let expected: serde_json::Value = serde_json::from_str(&read(&case.join("expected.json"))?)
            .map_err(|e| format!("{}: bad expected.json: {e}", case.display()))?;
        let res = match parse(&text) {
            Ok(res) => res,
            Err(e) => {
                r.fail(&case, format!("parse failed: {e}"));
                continue;
            }
        };
        let Some(items) = expected.as_array() else {
            r.fail(&case, "expected.json is not an array");
            continue;
        };
        for item in items {
            let Some(idx) = item["child_index"].as_u64() else {
                r.fail(&case, format!("entry without child_index: {item}"));
                continue;
            };
            let Some(child) = res.root.children.get(idx as usize) else {
                r.fail(&case, format!("child {idx} missing"));
                continue;
            };
            let want: Vec<serde_json::Value> = match &item["heredocs"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(a) => a.clone(),
                other => {
                    r.fail(&case, format!("child {idx}: bad heredocs {other}"));
                    continue;
                }
            };
            let got: Vec<serde_json::Value> = child
                .heredocs
                .iter()
                .map(|h| {
                    serde_json::json!({
                        "Name": h.name,
                        "Content": h.content,
                        "Expand": h.expand,
                        "Chomp": h.chomp,
                        "FileDescriptor": h.file_descriptor,
                    })
                })
                .collect();
            if got != want {
                r.fail(
                    &case,
                    format!(
                        "child {idx} ({}): heredocs {}\n  want {}",
                        child.original,
                        serde_json::Value::Array(got),
                        serde_json::Value::Array(want)
                    ),
                );
            }
        }
    }
    Ok(())
}

fn check_realworld(root: &Path, r: &mut Report) -> Result<(), String> {
    let files: Vec<PathBuf> = entries(&root.join("realworld"), false)?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("Dockerfile"))
        })
        .collect();
    r.count("realworld", files.len());
    for file in files {
        let text = read(&file)?;
        match parse(&text) {
            Ok(res) => {
                if let Err(e) = from_ast(&res.root) {
                    r.fail(
                        &file,
                        format!("from_ast failed at line {}: {e}", e.location.start_line),
                    );
                }
            }
            Err(e) => r.fail(&file, format!("parse failed at line {}: {e}", e.line)),
        }
    }
    Ok(())
}

#[test]
fn conformance_parser_all_cases() {
    let root = conformance_dir();
    assert!(
        root.is_dir(),
        "conformance data not found at {} (set STRATA_CONFORMANCE_DIR)",
        root.display()
    );
    let mut report = Report {
        failures: Vec::new(),
        counts: Vec::new(),
    };
    type Check = fn(&Path, &mut Report) -> Result<(), String>;
    let checks: [(&str, Check); 6] = [
        ("parser", check_dumps),
        ("parser-negative", check_negative),
        ("parser-lines", check_lines),
        ("parser-warnings", check_warnings),
        ("parser-heredoc", check_heredocs),
        ("realworld", check_realworld),
    ];
    for (name, check) in checks {
        if let Err(e) = check(&root, &mut report) {
            report.failures.push(format!("{name}: {e}"));
        }
    }
    eprintln!("conformance sets run: {:?}", report.counts);
    assert!(
        report.failures.is_empty(),
        "{} conformance failure(s):\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}

// Bad input must give an error, never a panic: mutate real Dockerfiles and random text.
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    #[test]
    fn conformance_fuzz_parse_never_panics(
        text in "(FROM|RUN|COPY|ADD|ONBUILD|ENV|ARG|HEALTHCHECK|LABEL|CMD|SHELL|# escape=|[ \t\\\\`'\"<\\-=\\[\\]{}$:,a-z0-9\u{a0}\u{85}é\n\r])*"
    ) {
        if let Ok(res) = parse(&text) {
            let _ = res.root.dump();
            let _ = from_ast(&res.root);
        }
    }

    #[test]
    fn conformance_fuzz_realworld_mutations(pick in 0usize..1000, cut in 0usize..100_000, len in 0usize..64) {
        let texts = realworld_texts();
        if texts.is_empty() {
            return Ok(());
        }
        let text = &texts[pick % texts.len()];
        let mut at = cut % text.len().max(1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + len).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mutated = format!("{}{}", &text[..at], &text[end..]);
        if let Ok(res) = parse(&mutated) {
            let _ = res.root.dump();
            let _ = from_ast(&res.root);
        }
    }
}

fn realworld_texts() -> &'static [String] {
    static TEXTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TEXTS.get_or_init(|| {
        entries(&conformance_dir().join("realworld"), false)
            .unwrap_or_default()
            .iter()
            .filter(|p| p.to_string_lossy().ends_with("Dockerfile"))
            .filter_map(|f| read(f).ok())
            .collect()
    })
}
