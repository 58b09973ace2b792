//! An interrupted build leaves no mount behind, and the next build works.

use std::time::{Duration, Instant};

use crate::common::*;

fn slow_context(env: &TestEnv) -> std::path::PathBuf {
    let dir = env.path("slow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {}/busybox:latest\nCOPY a.txt /a.txt\nRUN echo started-slow-step && sleep 30\n",
            registry()
        ),
    )
    .unwrap();
    dir
}

/// The step cgroups (`<cgroup2 mount>/strata/<pid>-<n>`) of builder `pid`.
fn step_cgroups_of(pid: u32) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mountinfo.lines().find_map(|l| {
        let (fields, fs) = l.split_once(" - ")?;
        fs.starts_with("cgroup2 ")
            .then(|| fields.split_whitespace().nth(4))
            .flatten()
    });
    let Some(mount) = mount else {
        return Vec::new();
    };
    let prefix = format!("{pid}-");
    std::fs::read_dir(std::path::Path::new(mount).join("strata"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn interrupt_with(signal: libc::c_int) {
    let env = TestEnv::new();
    let ctx = slow_context(&env);
    let log = env.path("stderr.log");
    let mut child = spawn_build_until_output(&env, &ctx, &log, "started-slow-step");
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the build did not stop promptly"
    );
    if signal != libc::SIGKILL {
        // The running step's cgroup went with the build, not left for the next one.
        assert_eq!(step_cgroups_of(child.id()), Vec::<String>::new());
    }
    if signal == libc::SIGINT {
        assert_eq!(
            status.code(),
            Some(130),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    // Give the sandbox (which dies with its parent) a moment, then check for leftovers.
    std::thread::sleep(Duration::from_millis(500));
    let next = env.path("next");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::write(
        next.join("Dockerfile"),
        format!(
            "FROM {}/busybox:latest\nRUN echo next-build-ok\n",
            registry()
        ),
    )
    .unwrap();
    let out = env.build_ok(&[next.to_str().unwrap()]);
    assert!(out.contains("next-build-ok"), "{out}");
    // A killed build's (empty) step cgroup is removed by the next build's first step.
    assert_eq!(step_cgroups_of(child.id()), Vec::<String>::new());
    assert_eq!(
        mounts_under(&env.root()),
        Vec::<String>::new(),
        "mounts left behind"
    );
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout)
            .lines()
            .any(|l| l.contains("started-slow-step")),
        "sandboxed process survived"
    );
}

#[test]
fn sigint_stops_the_build_with_130_and_leaves_no_mount() {
    interrupt_with(libc::SIGINT);
}

#[test]
fn sigkill_leaves_no_mount_after_the_next_start() {
    interrupt_with(libc::SIGKILL);
}
