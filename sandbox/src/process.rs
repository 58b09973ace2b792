//! The step process's environment and executable lookup.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PATH given to steps whose environment has none (runc's and BuildKit's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The step's environment: `env` plus PATH and HOME when they are missing.
pub(crate) fn build_env(env: &[String], home: &str) -> Vec<String> {
    let has = |key: &str| {
        env.iter()
            .any(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    };
    let mut out = env.to_vec();
    if !has("PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOME") {
        out.push(format!("HOME={home}"));
    }
    out
}

fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    // The last assignment wins, as in a shell.
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
}

/// Finds `name` the way execvp does, but in the step's PATH (not the init's), with paths
/// interpreted under `root`. Returns the path as seen inside the root.
pub(crate) fn lookup(root: &Path, name: &str, env: &[String]) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("exec: no command".to_string());
    }
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env_value(env, "PATH").unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        let on_host = if candidate.is_absolute() {
            root.join(candidate.strip_prefix("/").unwrap_or(&candidate))
        } else {
            candidate.clone()
        };
        if let Ok(meta) = std::fs::metadata(&on_host) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "exec: \"{name}\": executable file not found in $PATH"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn env_gets_default_path_and_home() {
        assert_eq!(
            build_env(&s(&["A=1"]), "/home/app"),
            s(&["A=1", &format!("PATH={DEFAULT_PATH}"), "HOME=/home/app"])
        );
        assert_eq!(
            build_env(&s(&["PATH=/x", "HOME=/h"]), "/root"),
            s(&["PATH=/x", "HOME=/h"])
        );
    }

    #[test]
    fn lookup_searches_step_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("opt/bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        let exe = dir.path().join("opt/bin/tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let noexec = dir.path().join("bin/tool");
        std::fs::write(&noexec, "").unwrap();
        let env = s(&["PATH=/bin:/opt/bin"]);
        assert_eq!(
            lookup(dir.path(), "tool", &env).unwrap(),
            PathBuf::from("/opt/bin/tool")
        );
        assert_eq!(
            lookup(dir.path(), "missing", &env).unwrap_err(),
            "exec: \"missing\": executable file not found in $PATH"
        );
        assert_eq!(
            lookup(dir.path(), "./x", &env).unwrap(),
            PathBuf::from("./x")
        );
    }
}
