//! End-to-end tests: the real `strata` binary, as root, against the test registry on
//! 127.0.0.1:5000 (started and seeded by `.ci/run`, see ../shared/testenv).

mod common;

mod build_outputs;
mod cache;
mod cache_export;
mod conformance;
mod diagnostics;
mod errors;
mod exporter;
mod incremental_copy;
mod interrupt;
mod parallel;
mod run_mounts;
mod solver;
mod store;
