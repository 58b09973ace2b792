//! Helpers shared by the solver's test binaries.

use strata_dag::CopyAction;

/// A COPY action as the Dockerfile frontend emits it.
pub fn cp(src: &str, dest: &str) -> CopyAction {
    CopyAction {
        src_input: 0,
        src: src.into(),
        dest: dest.into(),
        owner: None,
        mode: None,
        follow_symlinks: true,
        dir_contents_only: true,
        allow_wildcard: true,
        allow_empty_wildcard: true,
        create_dest_path: true,
        attempt_unpack: false,
        exclude: vec![],
    }
}
