//! CI build caching: two runners with separate stores share a build through
//! `--cache-to` / `--cache-from` (a registry artifact, or an OCI layout directory).
//!
//! Runner A builds cold and exports a `mode=max` cache; runner B starts empty, imports it,
//! executes no step, fetches only the final image's layers and produces the same image
//! digest (SOURCE_DATE_EPOCH pins the config's timestamps). Then a source file changes on
//! B, and only the steps after its COPY run.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

const EPOCH_ARG: &str = "SOURCE_DATE_EPOCH=1700000000";

fn context() -> std::path::PathBuf {
    repo_dir().join("testdata/cache-export")
}

/// The manifest digest from a `--metadata-file`.
fn manifest_digest(path: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["containerimage.digest"].as_str().unwrap().to_string()
}

/// Bytes written by the cache export, from its progress line.
fn exported_bytes(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("#exporting cache to "))
        .unwrap_or_else(|| panic!("no cache export line in:\n{stderr}"));
    let (_, after) = line.split_once(" blobs (").unwrap();
    after.split(' ').next().unwrap().parse().unwrap()
}

/// Every blob in a store's content store.
fn stored_blobs(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root.join("content/blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect()
}

/// The manifest, config and layer digests of an image in a store's content store.
fn image_blobs(root: &Path, manifest: &str) -> BTreeSet<String> {
    let hex = manifest.trim_start_matches("sha256:");
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("content/blobs/sha256").join(hex)).unwrap(),
    )
    .unwrap();
    let mut set = BTreeSet::from([manifest.to_string()]);
    set.insert(m["config"]["digest"].as_str().unwrap().to_string());
    for l in m["layers"].as_array().unwrap() {
        set.insert(l["digest"].as_str().unwrap().to_string());
    }
    set
}

struct Runs {
    cold: Duration,
    warm: Duration,
    cache_bytes: u64,
}

fn two_runners(cache_to: &str, cache_from: &str) -> Runs {
    // Runner A: cold, exports the cache.
    let a = TestEnv::new();
    let ctx_a = a.copy_context(&context(), "ctx");
    let meta_a = a.path("meta.json");
    let start = Instant::now();
    let a_log = a.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-to",
        cache_to,
        "--metadata-file",
        meta_a.to_str().unwrap(),
        ctx_a.to_str().unwrap(),
    ]);
    let cold = start.elapsed();
    let ran_a = executed_steps(&a_log);
    assert_eq!(
        ran_a.iter().filter(|s| s.contains("] RUN ")).count(),
        4,
        "runner A should run every RUN: {ran_a:?}"
    );
    let cache_bytes = exported_bytes(&a_log);
    assert!(
        a_log.contains(": 9 records,"),
        "mode=max exports every step:\n{a_log}"
    );

    // Runner B: an empty store, the same sources in another directory.
    let b = TestEnv::new();
    let ctx_b = b.copy_context(&context(), "ctx");
    let meta_b = b.path("meta.json");
    let start = Instant::now();
    let b_log = b.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-from",
        cache_from,
        "--metadata-file",
        meta_b.to_str().unwrap(),
        ctx_b.to_str().unwrap(),
    ]);
    let warm = start.elapsed();
    assert_eq!(
        executed_steps(&b_log),
        Vec::<String>::new(),
        "runner B executed steps"
    );
    assert!(
        cached_steps(&b_log)
            .iter()
            .any(|s| s.contains("RUN cat /app/app.txt")),
        "{b_log}"
    );
    let digest = manifest_digest(&meta_b);
    assert_eq!(
        digest,
        manifest_digest(&meta_a),
        "an imported hit changed the image"
    );
    // Only the final image's chain was fetched: the deps stage's 8 MiB layer stayed in
    // the cache, and nothing else is in B's content store.
    let have = stored_blobs(&b.root());
    let image = image_blobs(&b.root(), &digest);
    assert!(
        have.is_subset(&image),
        "runner B fetched blobs its image does not use: {:?}",
        have.difference(&image).collect::<Vec<_>>()
    );

    // A source file changes: only the steps after its COPY run again.
    std::fs::write(ctx_b.join("app.txt"), "application source v2\n").unwrap();
    let out = b.path("rootfs");
    let changed = b.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-from",
        cache_from,
        "--output",
        &format!("type=local,dest={}", out.display()),
        ctx_b.to_str().unwrap(),
    ]);
    let ran = executed_steps(&changed);
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert!(ran[0].contains("COPY app.txt"), "{ran:?}");
    assert!(ran[1].contains("RUN cat /app/app.txt"), "{ran:?}");
    let combined = std::fs::read_to_string(out.join("app/combined.txt")).unwrap();
    assert_eq!(combined, "application source v2\nLIBRARY SOURCE V1\n");

    Runs {
        cold,
        warm,
        cache_bytes,
    }
}

fn report(kind: &str, runs: &Runs) {
    eprintln!(
        "BENCH cache {kind}: cache bytes written {} ; runner A cold {:.2}s ; runner B from cache {:.2}s",
        runs.cache_bytes,
        runs.cold.as_secs_f64(),
        runs.warm.as_secs_f64()
    );
}

#[test]
fn registry_cache_lets_an_empty_runner_skip_every_step() {
    let reference = format!("{}/strata-e2e/cache:{}", registry(), unique());
    let runs = two_runners(
        &format!("type=registry,ref={reference},mode=max"),
        &format!("type=registry,ref={reference}"),
    );
    report("registry", &runs);
}

#[test]
fn local_cache_lets_an_empty_runner_skip_every_step() {
    let dir = tempfile::Builder::new()
        .prefix("strata-e2e-cache-")
        .tempdir()
        .unwrap();
    let d = dir.path().join("cache");
    let runs = two_runners(
        &format!("type=local,dest={},mode=max", d.display()),
        &format!("type=local,src={}", d.display()),
    );
    report("local", &runs);
}

#[test]
fn a_missing_cache_is_a_warning_and_the_build_runs() {
    let env = TestEnv::new();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}/busybox:latest\nRUN echo hi > /hi\n", registry()),
    )
    .unwrap();
    let missing = format!("{}/strata-e2e/no-such-cache:{}", registry(), unique());
    let log = env.build_ok(&[
        "--cache-from",
        &format!("type=registry,ref={missing}"),
        "--cache-from",
        &format!("type=local,src={}", env.path("nowhere").display()),
        ctx.to_str().unwrap(),
    ]);
    assert!(
        log.contains(&format!("WARNING: no build cache at {missing}")),
        "{log}"
    );
    assert!(
        executed_steps(&log)
            .iter()
            .any(|s| s.contains("RUN echo hi")),
        "{log}"
    );

    let bad = env.build(&["--cache-to", "type=registry", ctx.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("type=registry needs ref=NAME"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn inline_cache_in_a_pushed_image_serves_the_next_runner() {
    let image = format!("{}/strata-e2e/inline-cache:{}", registry(), unique());
    let a = TestEnv::new();
    let ctx_a = a.copy_context(&context(), "ctx");
    let meta_a = a.path("meta.json");
    a.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "-t",
        &image,
        "--push",
        "--cache-to",
        "type=inline",
        "--metadata-file",
        meta_a.to_str().unwrap(),
        ctx_a.to_str().unwrap(),
    ]);

    let b = TestEnv::new();
    let ctx_b = b.copy_context(&context(), "ctx");
    let meta_b = b.path("meta.json");
    let log = b.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-from",
        &image,
        // B writes its own inline cache too; carrying A's records over, it is the same.
        "--cache-to",
        "type=inline",
        "--metadata-file",
        meta_b.to_str().unwrap(),
        ctx_b.to_str().unwrap(),
    ]);
    // mode=min: the final stage's steps and its base; the deps stage is not in it.
    assert!(
        log.contains(&format!(
            "#importing cache manifest from {image}: 5 records"
        )),
        "{log}"
    );
    assert_eq!(executed_steps(&log), Vec::<String>::new(), "{log}");
    assert_eq!(manifest_digest(&meta_b), manifest_digest(&meta_a));
}

#[test]
fn cache_mount_contents_travel_to_the_next_runner() {
    // The RUN's key changes with V, so runner B runs it; its cache mount starts with what
    // runner A left there only if the mount came through the cache.
    let dockerfile = format!(
        "FROM {}/busybox:latest\nARG V\nRUN --mount=type=cache,id=strata-e2e-runs,target=/cache \
         echo \"run $V\" >> /cache/runs && cp /cache/runs /runs\n",
        registry()
    );
    let dir = tempfile::Builder::new()
        .prefix("strata-e2e-cache-")
        .tempdir()
        .unwrap();
    let cache = dir.path().join("cache");
    let a = TestEnv::new();
    let ctx_a = a.path("ctx");
    std::fs::create_dir_all(&ctx_a).unwrap();
    std::fs::write(ctx_a.join("Dockerfile"), &dockerfile).unwrap();
    let a_log = a.build_ok(&[
        "--build-arg",
        "V=1",
        "--cache-to",
        &format!("type=local,dest={},cache-mounts=true", cache.display()),
        ctx_a.to_str().unwrap(),
    ]);
    assert!(a_log.contains(", 1 cache mounts,"), "{a_log}");

    let b = TestEnv::new();
    let ctx_b = b.path("ctx");
    std::fs::create_dir_all(&ctx_b).unwrap();
    std::fs::write(ctx_b.join("Dockerfile"), &dockerfile).unwrap();
    let out = b.path("rootfs");
    let b_log = b.build_ok(&[
        "--build-arg",
        "V=2",
        "--cache-from",
        &format!("type=local,src={}", cache.display()),
        "--output",
        &format!("type=local,dest={}", out.display()),
        ctx_b.to_str().unwrap(),
    ]);
    assert!(
        b_log.contains("#restored cache mount strata-e2e-runs"),
        "{b_log}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("runs")).unwrap(),
        "run 1\nrun 2\n"
    );
}

#[test]
fn a_tampered_cache_layer_is_refused_and_its_step_runs() {
    let dir = tempfile::Builder::new()
        .prefix("strata-e2e-cache-")
        .tempdir()
        .unwrap();
    let cache = dir.path().join("cache");
    let a = TestEnv::new();
    let ctx_a = a.copy_context(&context(), "ctx");
    a.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-to",
        &format!("type=local,dest={},mode=max", cache.display()),
        ctx_a.to_str().unwrap(),
    ]);
    // The top layer of the final image's chain (the longest record) gets other bytes.
    let blob = |d: &str| {
        cache
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let desc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let longest = desc["records"]
        .as_object()
        .unwrap()
        .values()
        .max_by_key(|c| c.as_array().unwrap().len())
        .unwrap();
    let top = longest
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap() as usize;
    let top_digest = desc["layers"][top]["digest"].as_str().unwrap().to_string();
    let path = blob(&top_digest);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let b = TestEnv::new();
    let ctx_b = b.copy_context(&context(), "ctx");
    let log = b.build_ok(&[
        "--build-arg",
        EPOCH_ARG,
        "--cache-from",
        &format!("type=local,src={}", cache.display()),
        ctx_b.to_str().unwrap(),
    ]);
    assert!(log.contains("WARNING: import cache record"), "{log}");
    assert!(log.contains(&top_digest), "{log}");
    // The step whose layer was refused runs; the one below it is still an imported hit.
    let ran = executed_steps(&log);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].contains("RUN cat /app/app.txt"), "{ran:?}");
    assert!(
        cached_steps(&log)
            .iter()
            .any(|s| s.contains("COPY app.txt")),
        "{log}"
    );
}
