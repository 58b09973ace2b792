//! The store over its life: `prune` (plain, --all, --keep-storage, --filter until), `du`,
//! crash leftovers, a SIGKILL'd build's snapshot, a 150-layer build, reproducible layers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use strata_snapshotter::{Kind, OverlaySnapshotter, Snapshotter};
use strata_solver::cache::DbCache;

use crate::common::*;

fn context(env: &TestEnv, name: &str, dockerfile: &str) -> PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

fn strata_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = run_ok(env.strata().args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("strata {args:?}:\n{stdout}");
    stdout
}

/// The `Total:` line of prune's output, in bytes as printed (`0B`, `10.51MB`).
fn total_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Total:"))
        .unwrap_or_else(|| panic!("no Total line in {out}"))
        .trim()
        .to_string()
}

/// Snapshot names and kinds in the store (read directly, not through strata).
fn snapshots(env: &TestEnv) -> Vec<(String, Kind)> {
    let s = OverlaySnapshotter::open(&env.root().join("snapshots")).unwrap();
    let mut out = Vec::new();
    s.walk(&mut |i| out.push((i.name.clone(), i.kind))).unwrap();
    out
}

fn cache_records(env: &TestEnv) -> Vec<String> {
    let snapshotter = OverlaySnapshotter::open(&env.root().join("snapshots")).unwrap();
    DbCache::in_snapshotter(std::sync::Arc::new(snapshotter), env.root().join("locks"))
        .entries()
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Every file and directory under `dir`, relative.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn assert_steps(stderr: &str, executed: usize, cached: usize) {
    assert_eq!(
        (executed_steps(stderr).len(), cached_steps(stderr).len()),
        (executed, cached),
        "executed {:?}, cached {:?}",
        executed_steps(stderr),
        cached_steps(stderr)
    );
}

#[test]
fn prune_all_leaves_only_the_empty_structure_and_a_rebuild_runs_every_step() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        &format!(
            "FROM {}/busybox:latest\nCOPY a.txt /a.txt\n\
             RUN --mount=type=cache,target=/cache \
             (test -e /cache/k && echo had > /state || echo fresh > /state) && echo k > /cache/k\n\
             RUN echo two > /two\n",
            registry()
        ),
    );
    std::fs::write(ctx.join("a.txt"), "a\n").unwrap();
    let tar = env.path("out.tar");
    let oci = format!("type=oci,dest={}", tar.display());
    // No -t: no tagged image may keep a blob, so the store must end up empty.
    env.build_ok(&["--output", &oci, ctx.to_str().unwrap()]);
    assert!(!snapshots(&env).is_empty());
    assert!(!cache_records(&env).is_empty());
    assert!(
        std::fs::read_dir(env.root().join("cache-mounts"))
            .unwrap()
            .next()
            .is_some(),
        "the cache mount was not kept"
    );

    let du = strata_ok(&env, &["du"]);
    assert!(du.contains("result-"), "du lists no result snapshot: {du}");
    let blobs = du.lines().find(|l| l.starts_with("Blobs:")).unwrap();
    assert!(!blobs.contains("(0)"), "{blobs}");

    let out = strata_ok(&env, &["prune", "--all"]);
    assert_ne!(total_line(&out), "0B");
    assert!(out.contains("cache mounts"), "{out}");

    assert_eq!(snapshots(&env), Vec::new());
    assert_eq!(cache_records(&env), Vec::<String>::new());
    let structure: BTreeSet<String> = [
        "cache-mounts",
        "content",
        "content/blobs",
        "content/blobs/sha256",
        "content/ingest",
        "content/sources",
        "images",
        "images/images.json",
        "images/images.lock",
        "locks",
        "mounts",
        "snapshots",
        "snapshots/metadata.lock",
        "snapshots/metadata.lock.want",
        "snapshots/metadata.redb",
        "snapshots/snapshots",
        "store.lock",
        "usage-v1.json",
        "usage-v1.lock",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let left = tree(&env.root());
    let extra: Vec<&String> = left.difference(&structure).collect();
    assert!(extra.is_empty(), "left after prune --all: {extra:?}");
    let usage = std::fs::read_to_string(env.root().join("usage-v1.json")).unwrap();
    assert_eq!(usage.trim(), "{}");

    // Every step runs again (the pull, COPY and both RUNs), and the cache mount starts
    // empty: the RUN finds no file from the first build.
    let stderr = env.build_ok(&["--output", &oci, ctx.to_str().unwrap()]);
    assert_steps(&stderr, 4, 0);
    let rootfs = env.unpack_oci_archive(&tar, "img");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("state")).unwrap(),
        "fresh\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("two")).unwrap(),
        "two\n"
    );
}

#[test]
fn prune_keeps_what_the_cache_references_and_removes_replaced_results() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        &format!(
            "FROM {}/busybox:latest\nRUN echo one > /one\nRUN echo two > /two\n",
            registry()
        ),
    );
    env.build_ok(&[ctx.to_str().unwrap()]);
    let first: BTreeSet<String> = snapshots(&env).into_iter().map(|(n, _)| n).collect();
    // Nothing is unreferenced yet.
    assert_eq!(total_line(&strata_ok(&env, &["prune"])), "0B");
    assert_eq!(
        snapshots(&env)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<BTreeSet<_>>(),
        first
    );

    // A --no-cache rebuild replaces both RUN records: their old results are orphans.
    let stderr = env.build_ok(&["--no-cache", ctx.to_str().unwrap()]);
    assert_steps(&stderr, 2, 1);
    let second: BTreeSet<String> = snapshots(&env).into_iter().map(|(n, _)| n).collect();
    let replaced: Vec<&String> = first.iter().filter(|n| n.starts_with("result-")).collect();
    assert_eq!(replaced.len(), 2, "{first:?}");
    assert_eq!(second.len(), first.len() + 2, "{second:?}");

    let out = strata_ok(&env, &["prune"]);
    assert_ne!(total_line(&out), "0B");
    let third: BTreeSet<String> = snapshots(&env).into_iter().map(|(n, _)| n).collect();
    for r in &replaced {
        assert!(!third.contains(*r), "orphan {r} survived prune");
        assert!(out.contains(r.as_str()), "prune did not list {r}: {out}");
    }
    assert_eq!(third.len(), first.len(), "{third:?}");
    // Every record still names an existing snapshot, and the rebuild is fully cached.
    for v in cache_records(&env) {
        let name = v.strip_prefix("snapshot:").unwrap();
        assert!(third.contains(name), "record {v} names a removed snapshot");
    }
    let stderr = env.build_ok(&[ctx.to_str().unwrap()]);
    assert_steps(&stderr, 0, 3);
    assert_eq!(
        cached_steps(&stderr)[1..],
        [
            "[stage-0 2/3] RUN echo one > /one",
            "[stage-0 3/3] RUN echo two > /two"
        ]
    );
}

#[test]
fn keep_storage_removes_least_recently_used_first_and_until_spares_recent_cache() {
    let env = TestEnv::new();
    // Two 10 MiB results on the shared busybox layer (about 2 MB unpacked, 1 MB blob).
    let a = context(
        &env,
        "a",
        &format!(
            "FROM {}/busybox:latest\nRUN dd if=/dev/zero of=/a bs=1M count=10\n",
            registry()
        ),
    );
    let b = context(
        &env,
        "b",
        &format!(
            "FROM {}/busybox:latest\nRUN dd if=/dev/zero of=/b bs=1M count=10\n",
            registry()
        ),
    );
    env.build_ok(&[a.to_str().unwrap()]);
    env.build_ok(&[b.to_str().unwrap()]);
    // A cached rebuild of b makes it the most recently used.
    assert_steps(&env.build_ok(&[b.to_str().unwrap()]), 0, 2);

    // About 24 MB of cache; 18 MiB is only met once a's 10 MiB result goes, and is met then.
    let out = strata_ok(&env, &["prune", "--keep-storage", "18MiB"]);
    let removed: Vec<&str> = out.lines().filter(|l| l.starts_with("result-")).collect();
    assert_eq!(removed.len(), 1, "{out}");
    assert_steps(&env.build_ok(&[b.to_str().unwrap()]), 0, 2);
    let stderr = env.build_ok(&[a.to_str().unwrap()]);
    assert_eq!(
        executed_steps(&stderr),
        ["[stage-0 2/2] RUN dd if=/dev/zero of=/a bs=1M count=10"],
        "{stderr}"
    );

    // Nothing has been unused for an hour: --all with that filter removes nothing.
    let out = strata_ok(&env, &["prune", "--all", "--filter", "until=1h"]);
    assert_eq!(total_line(&out), "0B");
    assert_steps(&env.build_ok(&[a.to_str().unwrap()]), 0, 2);
    // Everything is older than a second after two.
    std::thread::sleep(Duration::from_secs(2));
    let out = strata_ok(&env, &["prune", "--all", "--filter", "until=1s"]);
    assert_ne!(total_line(&out), "0B");
    assert_eq!(snapshots(&env), Vec::new());
    assert_steps(&env.build_ok(&[a.to_str().unwrap()]), 2, 0);

    // An explicit 0 keeps nothing.
    env.build_ok(&[b.to_str().unwrap()]);
    let du = strata_ok(&env, &["du"]);
    assert!(!du.contains("Snapshots:\t0B"), "{du}");
    let out = strata_ok(&env, &["prune", "--keep-storage", "0"]);
    assert_ne!(total_line(&out), "0B");
    assert_eq!(snapshots(&env), Vec::new());
    assert_eq!(cache_records(&env), Vec::<String>::new());
    let du = strata_ok(&env, &["du"]);
    assert!(du.contains("Snapshots:\t0B (0)"), "{du}");

    let bad = env
        .strata()
        .args(["prune", "--filter", "type=regular"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unsupported prune filter"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn prune_reaps_the_snapshot_of_a_killed_build_and_crash_leftovers() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "slow",
        &format!(
            "FROM {}/busybox:latest\nRUN echo started-slow-step && dd if=/dev/zero of=/x bs=1M count=2 && sleep 30\n",
            registry()
        ),
    );
    let log = env.path("stderr.log");
    let mut child = spawn_build_until_output(&env, &ctx, &log, "started-slow-step");
    let pid = child.id();
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let prefix = format!("active-{pid}-");
    let active: Vec<String> = snapshots(&env)
        .into_iter()
        .filter(|(n, k)| n.starts_with(&prefix) && *k == Kind::Active)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(active.len(), 1, "{:?}", snapshots(&env));

    // What a crash between the snapshotter's steps or during a download leaves.
    let dirs = env.root().join("snapshots/snapshots");
    std::fs::create_dir_all(dirs.join("new-crashed/fs")).unwrap();
    std::fs::create_dir_all(dirs.join("rm-999/fs/etc")).unwrap();
    std::fs::write(env.root().join("content/ingest/ingest-dead"), b"half").unwrap();

    let out = strata_ok(&env, &["prune"]);
    assert!(out.contains(&active[0]), "{out}");
    assert_ne!(total_line(&out), "0B");
    let left = snapshots(&env);
    assert!(
        left.iter()
            .all(|(n, k)| *k == Kind::Committed && !n.contains(&prefix)),
        "{left:?}"
    );
    // Only the pulled layer is left, and only its directory.
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(std::fs::read_dir(&dirs).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_dir(env.root().join("content/ingest"))
            .unwrap()
            .count(),
        0
    );
    // The next build works and reuses the pulled layer.
    let next = context(
        &env,
        "next",
        &format!("FROM {}/busybox:latest\nRUN echo next > /n\n", registry()),
    );
    let stderr = env.build_ok(&[next.to_str().unwrap()]);
    assert_eq!(executed_steps(&stderr).len(), 1, "{stderr}");
}

fn deep_dockerfile(steps: usize) -> String {
    let mut d = format!("FROM {}/busybox:latest\n", registry());
    for i in 0..steps {
        d.push_str(&format!("RUN echo {i} > /f{i}\n"));
    }
    d
}

#[test]
fn a_150_step_build_unpacks_with_umoci_to_every_file() {
    let env = TestEnv::new();
    let ctx = context(&env, "deep", &deep_dockerfile(150));
    let tar = env.path("deep.tar");
    let stderr = env.build_ok(&[
        "--output",
        &format!("type=oci,dest={}", tar.display()),
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(executed_steps(&stderr).len(), 151, "pull and 150 RUNs");
    let rootfs = env.unpack_oci_archive(&tar, "deep");
    for i in 0..150 {
        assert_eq!(
            std::fs::read_to_string(rootfs.join(format!("f{i}"))).unwrap(),
            format!("{i}\n"),
            "/f{i}"
        );
    }
    let files = std::fs::read_dir(&rootfs)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.strip_prefix('f')
                .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    assert_eq!(files, 150);
    let config = env.oci_archive_config(&tar);
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 151);
}

/// The layer digests of an OCI archive's manifest, read by skopeo.
fn layer_digests(tar: &Path) -> Vec<String> {
    let out = run_ok(
        std::process::Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", tar.display())),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_same_dockerfile_from_two_empty_stores_gives_identical_layer_blobs() {
    let dockerfile = format!(
        "FROM {}/busybox:latest\n\
         COPY files/ /files/\n\
         RUN mkdir -p /d/sub && echo x > /d/sub/x && ln -s x /d/sub/link && ln /d/sub/x /d/hard \
         && chmod 4755 /d/sub/x && mkfifo /d/fifo\n\
         RUN rm -rf /etc/hostname /files/b && echo y >> /d/sub/x\n\
         RUN for i in $(seq 1 20); do echo $i > /d/n$i; done\n",
        registry()
    );
    let mut digests = Vec::new();
    for run in ["one", "two"] {
        let env = TestEnv::new();
        let ctx = context(&env, "ctx", &dockerfile);
        std::fs::create_dir_all(ctx.join("files")).unwrap();
        std::fs::write(ctx.join("files/a"), "a\n").unwrap();
        std::fs::write(ctx.join("files/b"), "b\n").unwrap();
        let tar = env.path("img.tar");
        // Files RUN steps create get the build's wall-clock mtimes, so without
        // SOURCE_DATE_EPOCH (which clamps them) two builds could not give the same bytes.
        let out = env
            .strata()
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args([
                "build",
                "--progress=plain",
                "--output",
                &format!("type=oci,dest={}", tar.display()),
                ctx.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        digests.push(layer_digests(&tar));
        if run == "one" {
            // Let the second build run at another second, so unclamped times would differ.
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    assert_eq!(digests[0].len(), 5, "{digests:?}");
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn prune_all_keeps_the_blobs_of_tagged_images() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        &format!("FROM {}/busybox:latest\nRUN echo tagged > /t\n", registry()),
    );
    env.build_ok(&["-t", "kept:1", ctx.to_str().unwrap()]);
    let out = strata_ok(&env, &["prune", "--all"]);
    assert_ne!(total_line(&out), "0B");
    assert_eq!(snapshots(&env), Vec::new());
    // The manifest, the config and the two layers stay; nothing else does.
    let blobs = std::fs::read_dir(env.root().join("content/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 4);
    // A plain prune now has nothing to remove.
    assert_eq!(total_line(&strata_ok(&env, &["prune"])), "0B");
    // The image is whole: it saves, and reads back with an independent tool.
    let tar = env.path("saved.tar");
    strata_ok(&env, &["save", "-o", tar.to_str().unwrap(), "kept:1"]);
    let out = run_ok(
        std::process::Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", tar.display())),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2, "{v}");
}

#[test]
fn prune_waits_for_a_running_build_and_never_pulls_its_snapshots_away() {
    let env = TestEnv::new();
    let ctx = context(
        &env,
        "ctx",
        &format!(
            "FROM {}/busybox:latest\nRUN echo started-step && sleep 3 && echo one > /one\n\
             RUN cat /one > /two\n",
            registry()
        ),
    );
    let log = env.path("build.log");
    let mut build = spawn_build_until_output(&env, &ctx, &log, "started-step");
    let prune_err = env.path("prune.log");
    let mut prune = env
        .strata()
        .args(["prune", "--all"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&prune_err).unwrap())
        .spawn()
        .unwrap();
    // The prune holds off while the build runs ...
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        prune.try_wait().unwrap().is_none(),
        "prune ran during a build"
    );
    let status = build.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // ... then removes everything the build left.
    let out = prune.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = std::fs::read_to_string(&prune_err).unwrap();
    assert!(stderr.contains("waiting for"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(total_line(&stdout), "0B");
    assert_eq!(snapshots(&env), Vec::new());
    assert_steps(&env.build_ok(&[ctx.to_str().unwrap()]), 3, 0);
}
