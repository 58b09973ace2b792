//! Issue 9: every case of the builds conformance set (`STRATA_BUILDS_DIR`, default
//! ../shared/conformance/builds) goes through the set's own `run-case` with the freshly
//! built binary; any FAIL fails the test.
//!
//! `STRATA_CONFORMANCE_XFAIL` may name cases (comma-separated) whose input is known to be
//! damaged on this machine; they still run, and the test fails if they unexpectedly pass,
//! so the list cannot silently go stale.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;

fn builds_dir() -> PathBuf {
    std::env::var_os("STRATA_BUILDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shared_dir().join("conformance/builds"))
}

#[test]
fn conformance_builds_match_buildkit() {
    let dir = builds_dir();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    let xfail: Vec<String> = std::env::var("STRATA_CONFORMANCE_XFAIL")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();

    let env = TestEnv::new();
    let out = Command::new(dir.join("run-case"))
        .arg("--builder")
        .arg("strata")
        .args(&cases)
        .env("STRATA", strata_bin())
        .env(
            "STRATA_BUILD_FLAGS",
            format!("--root {}", env.root().display()),
        )
        .env("TMPDIR", env.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    let mut unexpected = Vec::new();
    let mut passed = 0;
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        let (Some(status), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let name = name.trim_end_matches(':');
        match status {
            "ok" | "ok-error" => {
                passed += 1;
                if xfail.iter().any(|x| x == name) {
                    unexpected.push(format!(
                        "{name} passed but is listed in STRATA_CONFORMANCE_XFAIL"
                    ));
                }
            }
            "FAIL" | "UNSTABLE" if !xfail.iter().any(|x| x == name) => {
                unexpected.push(line.to_string())
            }
            _ => {}
        }
    }
    assert!(passed > 0, "no case passed:\n{stdout}");
    assert!(
        unexpected.is_empty(),
        "conformance failures:\n{}",
        unexpected.join("\n")
    );
}
