//! The Dockerfile frontend, in BuildKit's three steps:
//!
//! 1. [`parser`]: text -> untyped [`parser::Node`]s with line spans, directives, heredocs
//!    and flags (dumped in BuildKit's `Node.Dump()` format by `strata debug ast`);
//! 2. [`instructions`]: nodes -> typed [`instructions::Instruction`]s grouped in
//!    [`instructions::Stage`]s;
//! 3. [`convert`]: stages -> a [`strata_dag::Definition`] plus the image config, expanding
//!    ARG/ENV with the [`shell`] lexer.
//!
//! [`dockerignore`] implements moby's patternmatcher rules for the build context.

pub mod convert;
pub mod dockerignore;
pub mod instructions;
pub mod lint;
pub mod parser;
pub mod runmount;
pub mod shell;
pub mod suggest;
