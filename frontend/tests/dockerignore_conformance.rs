//! moby/patternmatcher and fsutil test data (dockerignore/cases.tsv, compile.tsv,
//! readall/, walk.tsv), read from `$STRATA_CONFORMANCE_DIR` (default
//! `../../shared/conformance` from this crate). Each harness runs every row and fails
//! with the list of failing ones.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{conformance_dir, read, report};
use proptest::prelude::*;
use strata_frontend::dockerignore::{
    legacy_matches, read_ignore_file, walk_context, MatchInfo, MatchType, PatternMatcher,
};

/// A TSV file with a header row, as maps from column name to field.
fn tsv(rel: &str) -> Vec<HashMap<String, String>> {
    let text = read(rel);
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(str::to_string)
        .collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(
                    l.split('\t')
                        .map(str::to_string)
                        .chain(std::iter::repeat(String::new())),
                )
                .collect()
        })
        .collect()
}

fn field<'a>(row: &'a HashMap<String, String>, name: &str) -> &'a str {
    row.get(name).map(String::as_str).unwrap_or("")
}

fn strings(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("bad JSON string list {json:?}: {e}"))
}

/// Go's `filepath.Dir`.
fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => strata_frontend::dockerignore::go_clean(&path[..=i]),
        None => ".".to_string(),
    }
}

/// What a walk reaches with MatchesUsingParentResults, going down from the top dir the
/// way fsutil and upstream's test do.
fn chained_parent_results(pm: &PatternMatcher, path: &str) -> bool {
    let parent = parent_of(path);
    let mut info = MatchInfo::default();
    if parent != "." {
        let dirs: Vec<&str> = parent.split('/').collect();
        for n in 1..=dirs.len() {
            info = pm
                .matches_using_parent_results(&dirs[..n].join("/"), &info)
                .1;
        }
    }
    pm.matches_using_parent_results(path, &info).0
}

/// The deprecated single-result variant, chained the way upstream's test does.
fn chained_parent_result(pm: &PatternMatcher, path: &str) -> bool {
    let parent = parent_of(path);
    let mut matched = false;
    if parent != "." {
        let dirs: Vec<&str> = parent.split('/').collect();
        for n in 1..=dirs.len() {
            matched = pm.matches_using_parent_result(&dirs[..n].join("/"), matched);
        }
    }
    pm.matches_using_parent_result(path, matched)
}

#[test]
fn dockerignore_cases_conformance() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for row in tsv("dockerignore/cases.tsv") {
        if !matches!(field(&row, "platform"), "all" | "unix" | "") {
            continue;
        }
        ran += 1;
        let id = field(&row, "id");
        let patterns = strings(field(&row, "patterns_json"));
        let path = field(&row, "path");
        let expected = field(&row, "expected");
        let api = field(&row, "api");
        let got: Result<bool, String> = match api {
            "Matches" => legacy_matches(path, &patterns).map_err(|e| e.to_string()),
            "MatchesOrParentMatches" => PatternMatcher::new(&patterns).map_err(|e| e.to_string()).map(|pm| {
                let direct = pm.matches_or_parent_matches(path);
                // Upstream checks the walk-style API on the same rows.
                let fresh = pm.matches_using_parent_results(path, &MatchInfo::default()).0;
                let chained = chained_parent_results(&pm, path);
                if direct != fresh || direct != chained {
                    failures.push(format!("{id}: MatchesUsingParentResults gives {fresh} / {chained}, not {direct}"));
                }
                direct
            }),
            "MatchesUsingParentResults" => PatternMatcher::new(&patterns)
                .map_err(|e| e.to_string())
                .map(|pm| chained_parent_results(&pm, path)),
            "MatchesUsingParentResult" => PatternMatcher::new(&patterns)
                .map_err(|e| e.to_string())
                .map(|pm| chained_parent_result(&pm, path)),
            other => {
                failures.push(format!("{id}: unknown api {other:?}"));
                continue;
            }
        };
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(v), "true") => *v,
            (Ok(v), "false") => !*v,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{id}: {api} {patterns:?} {path:?}: want {expected}, got {got:?}"
            ));
        }
        // Whatever the API, the maintained matcher must agree on a cleaned path.
        if api == "Matches" && expected != "error" {
            let clean = strata_frontend::dockerignore::go_clean(path);
            if clean != "." {
                if let Ok(pm) = PatternMatcher::new(&patterns) {
                    if pm.matches_or_parent_matches(&clean) != (expected == "true") {
                        failures.push(format!(
                            "{id}: MatchesOrParentMatches disagrees with Matches"
                        ));
                    }
                }
            }
        }
    }
    report("cases.tsv", ran, &failures);
}

#[test]
fn dockerignore_compile_conformance() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for row in tsv("dockerignore/compile.tsv") {
        ran += 1;
        let pattern = field(&row, "pattern");
        let want_type = match field(&row, "match_type") {
            "error" | "" => {
                if PatternMatcher::new(&[pattern.to_string()]).is_ok() {
                    failures.push(format!("{pattern:?}: compiled, want an error"));
                }
                continue;
            }
            "exactMatch" => MatchType::Exact,
            "prefixMatch" => MatchType::Prefix,
            "suffixMatch" => MatchType::Suffix,
            "regexpMatch" => MatchType::Regexp,
            other => {
                failures.push(format!("{pattern:?}: unknown match type {other:?}"));
                continue;
            }
        };
        let want_re = field(&row, "regexp_slash");
        match PatternMatcher::new(&[pattern.to_string()]) {
            Err(e) => failures.push(format!("{pattern:?}: {e}")),
            Ok(pm) => {
                let info = pm.patterns();
                let Some(p) = info.first() else {
                    failures.push(format!("{pattern:?}: no pattern compiled"));
                    continue;
                };
                if p.match_type != want_type {
                    failures.push(format!(
                        "{pattern:?}: type want {want_type:?}, got {:?}",
                        p.match_type
                    ));
                }
                let got_re = p.regexp.clone().unwrap_or_default();
                if got_re != want_re {
                    failures.push(format!(
                        "{pattern:?}: regexp want {want_re:?}, got {got_re:?}"
                    ));
                }
            }
        }
    }
    report("compile.tsv", ran, &failures);
}

/// readall/ holds `input.dockerignore` + `expected` pairs, directly or in case dirs;
/// `<name>.dockerignore` + `<name>.expected` pairs are read too.
fn readall_cases(dir: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            readall_cases(&path, out);
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(stem) = name.strip_suffix(".dockerignore") else {
            continue;
        };
        let expected = if stem == "input" {
            dir.join("expected")
        } else {
            dir.join(format!("{stem}.expected"))
        };
        out.push((path.clone(), expected));
    }
}

#[test]
fn dockerignore_readall_conformance() {
    let mut cases = Vec::new();
    readall_cases(&conformance_dir().join("dockerignore/readall"), &mut cases);
    let mut failures = Vec::new();
    for (input, expected) in &cases {
        let bytes = std::fs::read(input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let text = String::from_utf8_lossy(&bytes);
        let want: Vec<String> = std::fs::read_to_string(expected)
            .unwrap_or_else(|e| panic!("{}: {e}", expected.display()))
            .lines()
            .map(str::to_string)
            .collect();
        let got = read_ignore_file(&text);
        if got != want {
            failures.push(format!("{}: want {want:?}, got {got:?}", input.display()));
        }
        // Everything ReadAll returns except a lone `!` must compile.
        let usable: Vec<String> = got.iter().filter(|p| *p != "!").cloned().collect();
        if let Err(e) = PatternMatcher::new(&usable) {
            failures.push(format!("{}: {e}", input.display()));
        }
    }
    report("readall", cases.len(), &failures);
}

fn make_tree(root: &Path, tree: &str) {
    for entry in tree.split_whitespace() {
        let (kind, rel) = entry
            .split_once(':')
            .unwrap_or_else(|| panic!("bad tree entry {entry:?}"));
        let path = root.join(rel);
        match kind {
            "dir" => std::fs::create_dir_all(&path).unwrap(),
            "file" => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).unwrap();
                }
                std::fs::write(&path, rel).unwrap();
            }
            other => panic!("unknown tree entry kind {other:?}"),
        }
    }
}

/// `walk_context` output in walk.tsv's notation (`file:x dir:y`).
fn walk_notation(listing: &[String]) -> Vec<String> {
    listing
        .iter()
        .map(|p| match p.strip_suffix('/') {
            Some(dir) => format!("dir:{dir}"),
            None => format!("file:{p}"),
        })
        .collect()
}

#[test]
fn dockerignore_walk_conformance() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for row in tsv("dockerignore/walk.tsv") {
        ran += 1;
        let id = field(&row, "id");
        let patterns = strings(field(&row, "exclude_patterns_json"));
        let tmp = tempfile::tempdir().unwrap();
        make_tree(tmp.path(), field(&row, "tree"));
        let pm = match PatternMatcher::new(&patterns) {
            Ok(pm) => pm,
            Err(e) => {
                failures.push(format!("{id}: {e}"));
                continue;
            }
        };
        let listing = match walk_context(tmp.path(), &pm) {
            Ok(l) => l,
            Err(e) => {
                failures.push(format!("{id}: walk failed: {e}"));
                continue;
            }
        };
        let walked = walk_notation(&listing);
        let expected = field(&row, "expected");
        match field(&row, "kind") {
            "walk" => {
                let want: Vec<String> = expected.split_whitespace().map(str::to_string).collect();
                if walked != want {
                    failures.push(format!("{id}: walk want {want:?}, got {walked:?}"));
                }
            }
            "open" => {
                for item in expected.split_whitespace() {
                    let (path, want) = item.rsplit_once('=').unwrap_or((item, ""));
                    let exists = tmp.path().join(path).is_file();
                    let got = if exists && !pm.matches_or_parent_matches(path) {
                        "ok"
                    } else {
                        "notexist"
                    };
                    if got != want {
                        failures.push(format!("{id}: open {path}: want {want}, got {got}"));
                    }
                }
            }
            "context" => {
                for item in expected.split_whitespace() {
                    let (state, path) = item.split_once(':').unwrap_or(("", item));
                    let present = listing.iter().any(|p| p.trim_end_matches('/') == path);
                    let ok = match state {
                        "present" => present,
                        "absent" => !present,
                        other => {
                            failures.push(format!("{id}: unknown state {other:?}"));
                            continue;
                        }
                    };
                    if !ok {
                        failures.push(format!(
                            "{id}: {path} should be {state}; context {walked:?}"
                        ));
                    }
                }
            }
            other => failures.push(format!("{id}: unknown kind {other:?}")),
        }
    }
    report("walk.tsv", ran, &failures);
}

#[test]
fn walk_keeps_symlinks_and_reincludes_below_globbed_exception() {
    let tmp = tempfile::tempdir().unwrap();
    make_tree(tmp.path(), "file:a/b/keep.txt file:a/b/drop.bin file:c");
    std::os::unix::fs::symlink("a", tmp.path().join("link")).unwrap();
    let pm = PatternMatcher::new(&["a".to_string(), "!**/*.txt".to_string()]).unwrap();
    let listing = walk_context(tmp.path(), &pm).unwrap();
    assert_eq!(listing, vec!["a/", "a/b/", "a/b/keep.txt", "c", "link"]);
}

#[test]
fn walk_of_missing_root_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let pm = PatternMatcher::default();
    assert!(walk_context(&tmp.path().join("nope"), &pm).is_err());
    assert_eq!(walk_context(tmp.path(), &pm).unwrap(), Vec::<String>::new());
}

proptest! {
    /// Matching never panics, and the walk-style matching agrees with
    /// MatchesOrParentMatches on the same path.
    #[test]
    fn matching_is_total_and_consistent(
        patterns in proptest::collection::vec("!?[a-c*?/\\[\\]\\\\^.-]{1,8}", 0..4),
        path in "[a-c./]{1,10}",
    ) {
        if let Ok(pm) = PatternMatcher::new(&patterns) {
            let direct = pm.matches_or_parent_matches(&path);
            let fresh = pm.matches_using_parent_results(&path, &MatchInfo::default()).0;
            prop_assert_eq!(direct, fresh);
            let _ = pm.may_match_below(&path);
        }
    }
}
