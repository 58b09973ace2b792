//! Incremental context COPY (issue 4): after a change, the COPY step runs again but links
//! the files that did not change from its previous result instead of copying them, and the
//! image is exactly the one a `--no-cache` build (which links nothing) makes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const EPOCH_ARG: &str = "SOURCE_DATE_EPOCH=1700000000";
const FILES: usize = 40;

fn set_mtime(p: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    std::fs::File::open(p)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// `files/d0..d3/f0..f9.txt`, every mtime before the epoch (so the layer keeps them as
/// they are: a wrong time on a linked file or its directory changes the digest).
fn context(env: &TestEnv) -> PathBuf {
    let ctx = env.path("ctx");
    for d in 0..4 {
        let dir = ctx.join(format!("files/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..10 {
            let p = dir.join(format!("f{f}.txt"));
            std::fs::write(&p, format!("file {d}/{f}\n").repeat(20)).unwrap();
            set_mtime(&p, 1_600_000_000 + (d * 10 + f) as u64);
        }
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}/busybox:latest\nCOPY files/ /data/\nRUN find /data -type f | wc -l > /count\n",
            registry()
        ),
    )
    .unwrap();
    dir_times(&ctx);
    ctx
}

/// Directory mtimes before the epoch too (a file written into a directory changes it).
fn dir_times(ctx: &Path) {
    for d in 0..4 {
        set_mtime(&ctx.join(format!("files/d{d}")), 1_500_000_000 + d);
    }
}

/// Builds `ctx` in `env` with the epoch; returns the progress and the image digest.
fn build(env: &TestEnv, ctx: &Path, extra: &[&str]) -> (String, String) {
    let meta = env.path("meta.json");
    let mut args = vec![
        "--build-arg",
        EPOCH_ARG,
        "--metadata-file",
        meta.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().unwrap());
    let log = env.build_ok(&args);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    (
        log,
        v["containerimage.digest"].as_str().unwrap().to_string(),
    )
}

/// The upper dir of the newest COPY result in the store (the snapshots holding `data/`).
fn newest_copy_result(env: &TestEnv) -> PathBuf {
    let dir = env.root().join("snapshots/snapshots");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let id: u64 = e.file_name().to_str()?.parse().ok()?;
            e.path().join("fs/data").is_dir().then_some((id, e.path()))
        })
        .max()
        .map(|(_, p)| p.join("fs/data"))
        .unwrap_or_else(|| panic!("no COPY result under {}", dir.display()))
}

/// (inode, link count) of every file of a COPY result, by path.
fn inodes(data: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for d in 0..4 {
        for f in 0..10 {
            let rel = format!("d{d}/f{f}.txt");
            let m = std::fs::metadata(data.join(&rel)).unwrap();
            out.insert(rel, (m.ino(), m.nlink()));
        }
    }
    out
}

fn linked_line(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("unchanged files from the previous result"))
        .map(str::to_string)
}

fn assert_copy_ran(log: &str) {
    let ran = executed_steps(log);
    assert!(ran.iter().any(|s| s.contains("COPY files/")), "{ran:?}");
}

/// Asserts that exactly the `changed` files of `new` have their own inode and all others
/// are the inodes of `old`.
fn assert_shared_except(
    old: &BTreeMap<String, (u64, u64)>,
    new: &BTreeMap<String, (u64, u64)>,
    changed: &[&str],
) {
    for (path, (ino, nlink)) in new {
        if changed.contains(&path.as_str()) {
            assert_ne!(*ino, old[path].0, "{path} was linked");
            assert_eq!(*nlink, 1, "{path}");
        } else {
            assert_eq!(*ino, old[path].0, "{path} was not linked");
            assert!(*nlink >= 2, "{path}");
        }
    }
}

#[test]
fn a_changed_context_relinks_unchanged_files_and_gives_the_no_cache_image() {
    let env = TestEnv::new();
    let ctx = context(&env);
    // The reference: a second store where every build is --no-cache (a full copy).
    let reference = TestEnv::new();

    let (first, digest1) = build(&env, &ctx, &[]);
    assert!(linked_line(&first).is_none(), "{first}");
    let r1 = newest_copy_result(&env);
    let ino1 = inodes(&r1);
    assert!(ino1.values().all(|(_, n)| *n == 1));

    // One file's content changes, another's mtime only (a touch).
    let changed = ctx.join("files/d1/f3.txt");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&changed)
        .unwrap()
        .write_all(b"one more line\n")
        .unwrap();
    set_mtime(&changed, 1_600_000_500);
    set_mtime(&ctx.join("files/d0/f0.txt"), 1_600_000_600);
    dir_times(&ctx);

    let (second, digest2) = build(&env, &ctx, &[]);
    assert_copy_ran(&second);
    assert_eq!(
        linked_line(&second).as_deref(),
        Some(
            format!(
                "#3 linked {} unchanged files from the previous result",
                FILES - 2
            )
            .as_str()
        ),
        "{second}"
    );
    let r2 = newest_copy_result(&env);
    assert_ne!(r1, r2);
    let ino2 = inodes(&r2);
    assert_shared_except(&ino1, &ino2, &["d1/f3.txt", "d0/f0.txt"]);
    assert_eq!(
        std::fs::read(r2.join("d1/f3.txt")).unwrap(),
        std::fs::read(&changed).unwrap()
    );
    assert_ne!(digest1, digest2);
    let (full, full_digest) = build(&reference, &ctx, &["--no-cache"]);
    assert!(
        linked_line(&full).is_none(),
        "--no-cache links nothing:\n{full}"
    );
    assert_eq!(
        digest2, full_digest,
        "the incremental COPY differs from a full one"
    );

    // A mode-only change: the COPY runs again and that file is copied, not linked.
    std::fs::set_permissions(
        ctx.join("files/d2/f5.txt"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (third, digest3) = build(&env, &ctx, &[]);
    assert_copy_ran(&third);
    let ino3 = inodes(&newest_copy_result(&env));
    assert_shared_except(&ino2, &ino3, &["d2/f5.txt"]);
    assert_ne!(digest3, digest2);
    assert_eq!(digest3, build(&reference, &ctx, &["--no-cache"]).1);

    // An owner-only change is no change at all: context files are 0:0 in the image.
    std::os::unix::fs::lchown(ctx.join("files/d3/f1.txt"), Some(1234), Some(1234)).unwrap();
    let (fourth, digest4) = build(&env, &ctx, &[]);
    assert!(
        executed_steps(&fourth).is_empty(),
        "an owner change re-ran steps: {fourth}"
    );
    assert_eq!(digest4, digest3);
}

#[test]
fn a_pruned_previous_result_means_a_full_copy() {
    let env = TestEnv::new();
    let ctx = context(&env);
    build(&env, &ctx, &[]);
    let r1 = newest_copy_result(&env);
    run_ok(env.strata().args(["prune", "--all"]));
    assert!(!r1.exists(), "prune left the previous COPY result");

    std::fs::write(ctx.join("files/d3/f9.txt"), "new content\n").unwrap();
    set_mtime(&ctx.join("files/d3/f9.txt"), 1_600_000_700);
    dir_times(&ctx);
    let (log, digest) = build(&env, &ctx, &[]);
    assert_copy_ran(&log);
    assert!(linked_line(&log).is_none(), "{log}");
    let ino = inodes(&newest_copy_result(&env));
    assert!(ino.values().all(|(_, n)| *n == 1), "{ino:?}");
    let reference = TestEnv::new();
    assert_eq!(digest, build(&reference, &ctx, &["--no-cache"]).1);
}
