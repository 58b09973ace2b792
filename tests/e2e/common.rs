//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn strata_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// `../shared` beside the repository (this crate lives in `cli/`).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn registry() -> String {
    std::env::var("STRATA_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

/// A unique suffix for names pushed to the shared registry.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{}", std::process::id(), nanos)
}

/// A fresh store and a scratch directory, removed at the end of the test.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> Self {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("strata-e2e-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn strata(&self) -> Command {
        let mut c = Command::new(strata_bin());
        c.arg("--root").arg(self.root());
        c
    }

    /// Runs `strata build ARGS` and returns its output (not asserting success).
    pub fn build(&self, args: &[&str]) -> Output {
        let out = self
            .strata()
            .arg("build")
            .arg("--progress=plain")
            .args(args)
            .output()
            .unwrap();
        eprintln!(
            "strata build {:?}: {}\n--- stderr ---\n{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn build_ok(&self, args: &[&str]) -> String {
        let out = self.build(args);
        assert!(
            out.status.success(),
            "build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Copies a directory into the scratch dir and returns the copy's path.
    pub fn copy_context(&self, src: &Path, name: &str) -> PathBuf {
        let dest = self.path(name);
        let status = Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success());
        dest
    }

    /// Unpacks an OCI archive with skopeo + umoci (independent tools) and returns the rootfs.
    pub fn unpack_oci_archive(&self, tar: &Path, name: &str) -> PathBuf {
        let layout = self.path(&format!("{name}-layout"));
        let bundle = self.path(&format!("{name}-bundle"));
        run_ok(
            Command::new("skopeo")
                .arg("copy")
                .arg("-q")
                .arg(format!("oci-archive:{}", tar.display()))
                .arg(format!("oci:{}:img", layout.display())),
        );
        run_ok(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:img", layout.display()))
                .arg(&bundle),
        );
        bundle.join("rootfs")
    }

    /// The image config of an OCI archive, read by skopeo.
    pub fn oci_archive_config(&self, tar: &Path) -> serde_json::Value {
        let out = run_ok(
            Command::new("skopeo")
                .arg("inspect")
                .arg("--config")
                .arg(format!("oci-archive:{}", tar.display())),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Mount points under `dir` in this (the host's) mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Names of the steps whose plain progress (`#N [..] name`, then `#N DONE 0.1s` or
/// `#N CACHED`) ends with a status line accepted by `status`.
fn steps_with(stderr: &str, status: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names = std::collections::HashMap::new();
    let mut found = Vec::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let Some((id, text)) = rest.split_once(' ') else {
            continue;
        };
        if text.starts_with('[') {
            names
                .entry(id.to_string())
                .or_insert_with(|| text.to_string());
        } else if status(text) {
            if let Some(n) = names.get(id) {
                found.push(n.clone());
            }
        }
    }
    found
}

/// Steps that ran (not cached).
pub fn executed_steps(stderr: &str) -> Vec<String> {
    steps_with(stderr, |t| t.starts_with("DONE"))
}

/// Steps reused from the cache.
pub fn cached_steps(stderr: &str) -> Vec<String> {
    steps_with(stderr, |t| t == "CACHED")
}

/// Waits until a step has printed `marker` as a line of its own output (`#N marker` in plain
/// progress), which means its sandbox runs. The step's header (`#N [..] RUN echo marker`) is
/// printed before its snapshot exists, so matching the text anywhere would fire too early.
pub fn wait_for_step_output(log: &Path, marker: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let printed = text.lines().any(|l| {
            l.strip_prefix('#')
                .and_then(|rest| rest.split_once(' '))
                .is_some_and(|(id, out)| id.chars().all(|c| c.is_ascii_digit()) && out == marker)
        });
        if printed {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the step never printed {marker:?}:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Starts `strata build --progress=plain CTX` with its progress going to `log`, and returns
/// the running build once a step has printed `marker` (see [`wait_for_step_output`]).
pub fn spawn_build_until_output(
    env: &TestEnv,
    ctx: &Path,
    log: &Path,
    marker: &str,
) -> std::process::Child {
    let child = env
        .strata()
        .args(["build", "--progress=plain", ctx.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for_step_output(log, marker);
    child
}
