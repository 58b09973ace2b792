//! Helpers shared by the conformance harnesses.

// Each test binary compiles its own copy of this module and uses only some of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// The conformance test data: `$STRATA_CONFORMANCE_DIR`, else `../../shared/conformance`
/// from this crate.
pub fn conformance_dir() -> PathBuf {
    match std::env::var_os("STRATA_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    }
}

/// The file `rel` under [`conformance_dir`]; panics naming it when it cannot be read.
pub fn read(rel: &str) -> String {
    let path = conformance_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Fails with every failing row of the harness `name` listed (and when no row ran at all).
pub fn report(name: &str, ran: usize, failures: &[String]) {
    eprintln!("{name}: {ran} rows, {} failed", failures.len());
    assert!(ran > 0, "{name}: no rows ran");
    assert!(
        failures.is_empty(),
        "{name}: {} of {ran} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
