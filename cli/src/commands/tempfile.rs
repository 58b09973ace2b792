//! Temporary files created beside their final place, so a rename moves them in atomically.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A new file `.{prefix}-{pid}-{n}` in `dir`, created exclusively (an existing name is
/// skipped, never reused).
pub(super) fn tempfile_in(dir: &Path, prefix: &str) -> Result<(PathBuf, std::fs::File)> {
    for i in 0..100u32 {
        let p = dir.join(format!(".{prefix}-{}-{i}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("create {}", p.display())),
        }
    }
    bail!("create a temp file in {}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_never_reuse_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("strata-tempfile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, _) = tempfile_in(&dir, "load").unwrap();
        let (b, _) = tempfile_in(&dir, "load").unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with(&format!(".load-{}-", std::process::id())),
            "{name}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
