//! Issue 3: what the frontend tells the user. Errors as BuildKit words them, rendered with
//! the file, line, column, source and what was expected (insta snapshots of the whole
//! text); build-check warnings that do not stop the build; proxy build args; and
//! `strata debug ast` against every parser conformance case.

use std::path::{Path, PathBuf};

use crate::common::*;

fn context_with(env: &TestEnv, dockerfile: &str) -> PathBuf {
    let dir = env.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// Builds `dockerfile` (expecting exit code 1) and returns the rendered error: stderr
/// from the first line of the diagnostic on, with the test registry's address replaced.
fn rendered_error(dockerfile: &str, extra: &[&str]) -> String {
    let env = TestEnv::new();
    let ctx = context_with(&env, dockerfile);
    let mut args: Vec<&str> = extra.to_vec();
    let ctx_arg = ctx.to_str().unwrap().to_string();
    args.push(&ctx_arg);
    let out = env.build(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let start = err
        .lines()
        .position(|l| l.starts_with("Dockerfile") || l.starts_with("ERROR:"))
        .unwrap_or_else(|| panic!("no diagnostic in {err}"));
    err.lines()
        .skip(start)
        .collect::<Vec<_>>()
        .join("\n")
        .replace(&registry(), "[registry]")
}

#[test]
fn unknown_instruction_with_suggestion() {
    insta::assert_snapshot!(rendered_error(
        "FROM scratch\nENV A=1\n\nCOPPY a /\nCMD [\"x\"]\n",
        &[]
    ));
}

#[test]
fn unknown_flag_points_at_the_flag() {
    insta::assert_snapshot!(rendered_error(
        "FROM scratch\nRUN --mout=type=cache,target=/x true\n",
        &[]
    ));
}

#[test]
fn missing_arguments() {
    insta::assert_snapshot!(rendered_error("FROM scratch\nCOPY onlyone\n", &[]));
}

#[test]
fn bad_env_and_bad_json() {
    insta::assert_snapshot!("bad_env", rendered_error("FROM scratch\nENV A\n", &[]));
    insta::assert_snapshot!(
        "bad_json",
        rendered_error("FROM scratch\nENTRYPOINT [\"sh\", 1]\n", &[])
    );
}

#[test]
fn from_unknown_image() {
    insta::assert_snapshot!(rendered_error(
        &format!("FROM {}/no-such-image:1 AS base\nRUN true\n", registry()),
        &[]
    ));
}

#[test]
fn invalid_chmod() {
    insta::assert_snapshot!(rendered_error("FROM scratch\nCOPY --chmod=8888 a /\n", &[]));
}

#[test]
fn target_not_found_lists_stages() {
    insta::assert_snapshot!(rendered_error(
        "FROM scratch AS build\nFROM scratch AS test\n",
        &["--target", "tset"]
    ));
}

#[test]
fn warnings_are_printed_and_not_fatal() {
    let env = TestEnv::new();
    let ctx = context_with(
        &env,
        "FROM scratch AS Base\nMAINTAINER someone\nENV A 1\nCMD run me\n",
    );
    let out = env.build(&[
        "--build-arg",
        "UNUSED=1",
        "--build-arg",
        "OTHER=2",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = " 4 warnings found:\n \
        - StageNameCasing: Stage name 'Base' should be lowercase (line 1)\n \
        - MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 2)\n \
        - LegacyKeyValueFormat: \"ENV key=value\" should be used instead of legacy \"ENV key value\" format (line 3)\n \
        - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 4)\n\
        [Warning] One or more build-args [OTHER UNUSED] were not consumed\n";
    assert!(err.contains(want), "{err}");
}

#[test]
fn proxy_build_args_reach_run_but_not_the_cache_key() {
    let env = TestEnv::new();
    let ctx = context_with(
        &env,
        &format!(
            "FROM {}/busybox:latest\nRUN echo \"p=$HTTP_PROXY n=$no_proxy\" > /proxy.txt\n",
            registry()
        ),
    );
    let dest = env.path("out");
    let output = format!("type=local,dest={}", dest.display());
    let first = env.build_ok(&[
        "--build-arg",
        "HTTP_PROXY=http://proxy.invalid:3128",
        "--build-arg",
        "no_proxy=localhost",
        "--output",
        &output,
        ctx.to_str().unwrap(),
    ]);
    assert!(!first.contains("were not consumed"), "{first}");
    assert_eq!(
        std::fs::read_to_string(dest.join("proxy.txt")).unwrap(),
        "p=http://proxy.invalid:3128 n=localhost\n"
    );
    // Another proxy: the same cache key, so the step is not run again (as in BuildKit).
    let second = env.build_ok(&[
        "--build-arg",
        "HTTP_PROXY=http://other.invalid:1",
        ctx.to_str().unwrap(),
    ]);
    assert!(
        cached_steps(&second).iter().any(|s| s.contains("RUN echo")),
        "{second}"
    );
    assert!(
        !executed_steps(&second)
            .iter()
            .any(|s| s.contains("RUN echo")),
        "{second}"
    );
}

fn conformance_dir() -> PathBuf {
    std::env::var_os("STRATA_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shared_dir().join("conformance"))
}

fn debug_ast(file: &Path) -> std::process::Output {
    std::process::Command::new(strata_bin())
        .args(["debug", "ast"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn debug_ast_matches_every_parser_case() {
    let dir = conformance_dir().join("parser");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Dockerfile").is_file() && p.join("result").is_file())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let out = debug_ast(&case.join("Dockerfile"));
        let want = std::fs::read(case.join("result")).unwrap();
        if !out.status.success() || out.stdout != want {
            failures.push(format!(
                "{}: exit {}\n--- got\n{}--- want\n{}--- stderr\n{}",
                case.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&want),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn debug_ast_reports_parse_errors_with_the_line() {
    let env = TestEnv::new();
    let file = env.path("Dockerfile");
    std::fs::write(&file, "FROM a\nCMD [\"x\", 2]\n").unwrap();
    let out = debug_ast(&file);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Dockerfile:2:5\n"), "{err}");
    assert!(err.contains("   2 | >>> CMD [\"x\", 2]"), "{err}");
}

#[test]
fn check_directive_skips_rules_and_can_make_warnings_fatal() {
    let env = TestEnv::new();
    let ctx = context_with(
        &env,
        "# check=skip=MaintainerDeprecated;error=true\nFROM scratch\nMAINTAINER x\nCMD run\n",
    );
    let out = env.build(&[ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            " 1 warning found:\n - JSONArgsRecommended: JSON arguments recommended for CMD \
             to prevent unintended behavior related to OS signals (line 4)\n\
             ERROR: failed to solve: lint violation found for rules: JSONArgsRecommended\n"
        ),
        "{err}"
    );
    assert!(!err.contains("MaintainerDeprecated"), "{err}");
    // The build arg overrides the directive.
    let out = env.build(&[
        "--build-arg",
        "BUILDKIT_DOCKERFILE_CHECK=skip=all",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("warning"), "{err}");
}
