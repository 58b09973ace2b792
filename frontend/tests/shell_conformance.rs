//! BuildKit's shell lexer test data (shell/envVarTest, shell/wordsTest,
//! shell/process_word.tsv), read from `$STRATA_CONFORMANCE_DIR` (default
//! `../../shared/conformance` from this crate). Each harness runs every row and fails
//! with the list of failing ones.

mod common;

use std::collections::BTreeMap;

use common::{read, report};
use proptest::prelude::*;
use strata_frontend::shell::{Lex, ShellError};

fn show(r: &Result<String, ShellError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error({})", e.0),
    }
}

#[test]
fn shell_env_var_test_conformance() {
    let env: BTreeMap<String, String> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let lex = Lex::new('\\');
    let mut ran = 0;
    let mut failures = Vec::new();
    for (n, line) in read("shell/envVarTest").lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        if fields.len() != 3 {
            failures.push(format!("line {}: malformed {line:?}", n + 1));
            continue;
        }
        let (platform, input, expected) = (fields[0], fields[1], fields[2]);
        if platform == "W" {
            continue;
        }
        ran += 1;
        let got = lex.process_word(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(v), exp) if exp != "error" => v == exp,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "line {}: {input:?}: want {expected:?}, got {}",
                n + 1,
                show(&got)
            ));
        }
    }
    report("envVarTest", ran, &failures);
}

#[test]
fn shell_words_test_conformance() {
    let lex = Lex::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();
    let mut ran = 0;
    let mut failures = Vec::new();
    for (n, line) in read("shell/wordsTest").lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            let rest = rest.trim_start();
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            env.push((k.to_string(), v.to_string()));
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        if fields.len() != 2 {
            failures.push(format!("line {}: malformed {line:?}", n + 1));
            continue;
        }
        ran += 1;
        let input = fields[0].trim();
        let expected: Vec<String> = fields[1]
            .trim_start()
            .split(',')
            .map(str::to_string)
            .collect();
        let got = match lex.process_words(input, &env) {
            Ok(words) => words,
            Err(_) => vec!["error".to_string()],
        };
        if got != expected {
            failures.push(format!(
                "line {}: {input:?}: want {expected:?}, got {got:?}",
                n + 1
            ));
        }
    }
    report("wordsTest", ran, &failures);
}

fn parse_names(json: &str) -> Option<Vec<String>> {
    if json == "-" {
        return None;
    }
    Some(serde_json::from_str(json).unwrap_or_else(|e| panic!("bad name list {json:?}: {e}")))
}

#[test]
fn shell_process_word_tsv_conformance() {
    let text = read("shell/process_word.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header row").split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    let (c_test, c_input, c_env, c_expected, c_err, c_matched, c_unmatched) = (
        col("upstream_test"),
        col("input"),
        col("env_json"),
        col("expected"),
        col("error_contains"),
        col("matched_json"),
        col("unmatched_json"),
    );
    let lex = Lex::new('\\');
    let mut ran = 0;
    let mut failures = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let get = |c: usize| f.get(c).copied().unwrap_or("");
        ran += 1;
        let row = format!(
            "row {} ({}) {:?} env {}",
            n + 2,
            get(c_test),
            get(c_input),
            get(c_env)
        );
        let env: BTreeMap<String, String> =
            serde_json::from_str(get(c_env)).unwrap_or_else(|e| panic!("{row}: bad env: {e}"));
        let got = lex.process_word_with_matches(get(c_input), &env);
        let expected = get(c_expected);
        match (&got, expected) {
            (Err(e), "error") => {
                let want = get(c_err);
                if !want.is_empty() && !e.0.contains(want) {
                    failures.push(format!("{row}: error {:?} lacks {want:?}", e.0));
                }
                continue;
            }
            (Err(e), _) => {
                failures.push(format!("{row}: want {expected:?}, got error {:?}", e.0));
                continue;
            }
            (Ok(x), "error") => {
                failures.push(format!("{row}: want error, got {:?}", x.value));
                continue;
            }
            (Ok(x), _) if x.value != expected => {
                failures.push(format!("{row}: want {expected:?}, got {:?}", x.value));
                continue;
            }
            (Ok(_), _) => {}
        }
        let Ok(x) = got else { continue };
        if let Some(want) = parse_names(get(c_matched)) {
            let have: Vec<String> = x.matched.iter().cloned().collect();
            if have != want {
                failures.push(format!("{row}: matched want {want:?}, got {have:?}"));
            }
        }
        if let Some(want) = parse_names(get(c_unmatched)) {
            let have: Vec<String> = x.unmatched.iter().cloned().collect();
            if have != want {
                failures.push(format!("{row}: unmatched want {want:?}, got {have:?}"));
            }
        }
    }
    report("process_word.tsv", ran, &failures);
}

fn arb_env() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("[A-C]", "[a-c*?/ \\\\{}$]{0,6}", 0..3)
}

proptest! {
    #[test]
    fn expansion_never_panics(word in "[a-cA-C$ {}:?+#%/\\-\\\\'\"`*<\\PC]{0,24}", env in arb_env(), backtick in any::<bool>()) {
        let mut lex = Lex::new(if backtick { '`' } else { '\\' });
        let plain = lex.process_word(&word, &env);
        let with = lex.process_word_with_matches(&word, &env);
        prop_assert_eq!(plain.clone().ok(), with.as_ref().ok().map(|x| x.value.clone()));
        prop_assert_eq!(plain.is_err(), lex.process_words(&word, &env).is_err());
        lex.raw_quotes = true;
        lex.skip_unset_env = true;
        lex.raw_escapes = true;
        let _ = lex.process_words(&word, &env);
    }

    /// A word without quote, escape or `$` characters expands to itself, and splitting
    /// gives its white-space separated fields.
    #[test]
    fn plain_words_are_unchanged(word in "[a-z0-9 ./_-]{0,30}") {
        let lex = Lex::new('\\');
        let env: BTreeMap<String, String> = BTreeMap::new();
        prop_assert_eq!(lex.process_word(&word, &env).ok(), Some(word.clone()));
        let fields: Vec<String> = word.split_whitespace().map(str::to_string).collect();
        prop_assert_eq!(lex.process_words(&word, &env).ok(), Some(fields));
    }
}
