//! Inputs kept from the cargo-fuzz targets (`fuzz/`), one directory per target under
//! `testdata/fuzz-regressions/`: crashes the fuzzers found (fixed since) and hand-picked
//! adversarial inputs. Each goes through the same calls as its fuzz target and must end
//! in a success or a proper error (a message, a line inside the file), quickly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_dag::image::ImageConfig;
use strata_dag::Platform;
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};
use strata_frontend::dockerignore::{legacy_matches, read_ignore_file, PatternMatcher};
use strata_frontend::shell::Lex;

/// Slow enough to call a hang (debug build, the biggest inputs take milliseconds).
const LIMIT: Duration = Duration::from_secs(5);

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/fuzz-regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// The fuzz target's resolver: every image exists (with ONBUILD triggers) except names
/// containing `missing`.
struct FakeResolver;

impl ImageResolver for FakeResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
        if reference.contains("missing") {
            return Err(format!("{reference}: not found"));
        }
        let mut config = ImageConfig::default();
        config.config.env = vec!["PATH=/bin".into(), "A=b".into()];
        config.config.on_build = vec!["RUN echo onbuild".into(), "ENV X=$A".into()];
        Ok(ResolvedImage {
            pinned: format!("example.com/{reference}@sha256:{}", "0".repeat(64)),
            config,
        })
    }
}

#[test]
fn parse_regressions() {
    for (path, data) in inputs("parse") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let started = Instant::now();
        let lines = text.split('\n').count();
        match strata_frontend::parser::parse(text) {
            Ok(parsed) => {
                let _ = parsed.root.dump();
                if let Err(e) = strata_frontend::instructions::from_parse_result(&parsed) {
                    assert!(!e.message.is_empty(), "{}", path.display());
                    assert!(
                        e.location.start_line >= 1 && e.location.start_line <= lines,
                        "{}: line {} of {lines}",
                        path.display(),
                        e.location.start_line
                    );
                }
            }
            Err(e) => {
                assert!(!e.message.is_empty(), "{}", path.display());
                assert!(
                    e.line >= 1 && e.line <= lines,
                    "{}: line {} of {lines}",
                    path.display(),
                    e.line
                );
            }
        }
        let mut opts = ConvertOptions {
            dockerfile_name: "Dockerfile".into(),
            ..Default::default()
        };
        opts.build_args.insert("A".into(), "x y".into());
        opts.build_args
            .insert("HTTP_PROXY".into(), "http://p".into());
        if let Err(e) = convert(text, &opts, &FakeResolver) {
            assert!(!e.message.is_empty(), "{}", path.display());
        }
        assert!(started.elapsed() < LIMIT, "{} is slow", path.display());
    }
}

#[test]
fn expand_regressions() {
    let env: Vec<(String, String)> = vec![
        ("PWD".into(), "/home".into()),
        ("SHELL".into(), "bash".into()),
        ("KOREAN".into(), "한국어".into()),
        ("EMPTY".into(), String::new()),
        ("SPACES".into(), " a  b ".into()),
        ("GLOB".into(), "*.t?t".into()),
        ("DOLLAR".into(), "$x${y}".into()),
    ];
    for (path, data) in inputs("expand") {
        let Some((&mode, rest)) = data.split_first() else {
            continue;
        };
        let Ok(word) = std::str::from_utf8(rest) else {
            continue;
        };
        let started = Instant::now();
        let mut lex = Lex::new(if mode & 1 == 0 { '\\' } else { '`' });
        lex.raw_quotes = mode & 2 != 0;
        lex.skip_unset_env = mode & 4 != 0;
        lex.raw_escapes = mode & 8 != 0;
        lex.skip_process_quotes = mode & 16 != 0;
        let results = [
            lex.process_word(word, &env).err(),
            lex.process_words(word, &env).err(),
            lex.process_word_with_matches(word, &env).err(),
        ];
        for e in results.into_iter().flatten() {
            assert!(
                e.0.starts_with("failed to process "),
                "{}: {}",
                path.display(),
                e.0
            );
        }
        assert!(started.elapsed() < LIMIT, "{} is slow", path.display());
    }
}

#[test]
fn dockerignore_regressions() {
    for (path, data) in inputs("dockerignore") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let started = Instant::now();
        let patterns = read_ignore_file(text);
        let last = text.rsplit('\n').next().unwrap_or_default();
        let paths = [last, "a/b/c", "foo.go", "dir/sub/file.txt", ".git", "", "/"];
        match PatternMatcher::new(&patterns) {
            Ok(pm) => {
                for p in paths {
                    let _ = pm.matches_or_parent_matches(p);
                    let _ = pm.matches_single_parent(p);
                    let _ = pm.may_match_below(p);
                    let _ = pm.matches_using_parent_result(p, true);
                    let (_, info) = pm.matches_using_parent_results(p, &Default::default());
                    let _ = pm.matches_using_parent_results(p, &info);
                }
                let _ = pm.patterns();
            }
            Err(e) => assert!(!e.to_string().is_empty(), "{}", path.display()),
        }
        for p in paths {
            let _ = legacy_matches(p, &patterns);
        }
        assert!(started.elapsed() < LIMIT, "{} is slow", path.display());
    }
}
