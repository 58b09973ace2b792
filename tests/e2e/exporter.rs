//! Exporter, registry and image commands (issue 7): every output type read back by an
//! independent tool, push behaviour against the registries (skip, auth, retry),
//! reproducible digests, compression, and the local image commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::{registry, run_ok, unique, TestEnv};

const DOCKERFILE: &str = "\
FROM 127.0.0.1:5000/busybox:latest
RUN echo hello > /hello.txt && mkdir -p /app && echo ran > /app/ran.txt
COPY data.txt /app/data.txt
CMD [\"cat\", \"/hello.txt\"]
";

fn context(env: &TestEnv) -> PathBuf {
    let dir = env.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(dir.join("data.txt"), "some data\n").unwrap();
    dir
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn metadata(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn skopeo_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args(args));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Sha256 of a blob's uncompressed bytes, by the system's gzip/zstd.
fn diff_id_of(blob: &Path, media_type: &str) -> String {
    let tool = if media_type.ends_with("zstd") {
        "zstd"
    } else {
        "gzip"
    };
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("{tool} -dc < '{}' | sha256sum", blob.display())),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

#[test]
fn every_output_type_is_read_back_by_a_real_tool() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let name = format!("{}/strata-test/outputs-{}:v1", registry(), unique());
    let (oci_tar, oci_dir, docker_tar, rootfs_tar, local) = (
        env.path("img.oci.tar"),
        env.path("layout"),
        env.path("img.docker.tar"),
        env.path("rootfs.tar"),
        env.path("local"),
    );
    let meta = env.path("meta.json");
    env.build_ok(&[
        "-t",
        &name,
        "--output",
        &format!("type=oci,dest={}", s(&oci_tar)),
        "--output",
        &format!("type=oci,dest={},tar=false", s(&oci_dir)),
        "--output",
        &format!("type=docker,dest={}", s(&docker_tar)),
        "--output",
        &format!("type=tar,dest={}", s(&rootfs_tar)),
        "--output",
        &format!("type=local,dest={}", s(&local)),
        "--output",
        "type=registry",
        "--metadata-file",
        &s(&meta),
        &s(&ctx),
    ]);

    // OCI archive: skopeo + umoci unpack; the RUN's file is there.
    let rootfs = env.unpack_oci_archive(&oci_tar, "ociarchive");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
        "hello\n"
    );
    // OCI layout directory: umoci unpacks it directly (ref name is the -t name).
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci_dir.join("index.json")).unwrap()).unwrap();
    let ref_name = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap()
        .to_string();
    let bundle = env.path("dir-bundle");
    run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{ref_name}", s(&oci_dir)))
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/app/data.txt")).unwrap(),
        "some data\n"
    );
    // Docker archive: skopeo reads it and copies it into an OCI layout umoci unpacks.
    let docker_layout = env.path("from-docker");
    run_ok(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("docker-archive:{}", s(&docker_tar)),
        &format!("oci:{}:img", s(&docker_layout)),
    ]));
    let bundle = env.path("docker-bundle");
    run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:img", s(&docker_layout)))
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/app/ran.txt")).unwrap(),
        "ran\n"
    );
    // type=tar: the whole final filesystem (base image included) in one tar.
    let listing = run_ok(Command::new("tar").arg("-tf").arg(&rootfs_tar));
    let listing = String::from_utf8_lossy(&listing.stdout);
    for want in ["hello.txt", "app/data.txt", "bin/busybox"] {
        assert!(
            listing
                .lines()
                .any(|l| l.trim_start_matches("./").trim_end_matches('/') == want),
            "{want} missing from type=tar output:\n{listing}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(local.join("hello.txt")).unwrap(),
        "hello\n"
    );
    // Registry: skopeo sees the manifest digest the metadata file reports.
    let m = metadata(&meta);
    let inspected = skopeo_json(&["inspect", "--tls-verify=false", &format!("docker://{name}")]);
    assert_eq!(inspected["Digest"], m["containerimage.digest"]);
    assert_eq!(m["image.name"], name.as_str());
    assert_eq!(
        m["containerimage.descriptor"]["digest"],
        m["containerimage.digest"]
    );
    let config = skopeo_json(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]);
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["cat", "/hello.txt"])
    );

    // type=tar,dest=- writes the tar to stdout.
    let out = env
        .strata()
        .args(["build", "--progress=plain", "--output", "type=tar,dest=-"])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut tar = Command::new("tar")
        .arg("-t")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tar.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let listed = tar.wait_with_output().unwrap();
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("hello.txt"));
}

#[test]
fn unknown_output_attributes_fail_before_building() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let out = env.build(&["--output", "type=image,name=x,colour=blue", &s(&ctx)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown attribute \"colour\""), "{err}");
    assert!(!err.contains("RUN echo"), "nothing should run: {err}");
    let out = env.build(&[
        "--output",
        "type=oci,dest=x.tar,compression=brotli",
        &s(&ctx),
    ]);
    assert!(
        stderr(&out).contains("unknown compression"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_second_push_uploads_no_blob() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let name = format!("{}/strata-test/repush-{}:1", registry(), unique());
    env.build_ok(&["-t", &name, &s(&ctx)]);
    let push = |env: &TestEnv| {
        let out = env.strata().args(["push", &name]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let first = push(&env);
    // The base layer came from busybox on the same registry: mounted, not uploaded. The
    // two built layers and the config are new to this repository.
    assert!(
        first.contains("3 blobs uploaded, 1 mounted, 0 already present"),
        "{first}"
    );
    let second = push(&env);
    assert!(
        second.contains("0 blobs uploaded, 0 mounted, 4 already present"),
        "{second}"
    );
    let inspected = skopeo_json(&["inspect", "--tls-verify=false", &format!("docker://{name}")]);
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);

    // As in Docker's store, the local image keeps its built layers uncompressed (the
    // pulled base layer stays as pulled); the push compressed them, under the same config.
    let images: serde_json::Value = metadata(&env.root().join("images/images.json"));
    let record = images["images"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["record"]
        .clone();
    let blob = |digest: &str| {
        env.root()
            .join("content/blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let local = metadata(&blob(record["manifest_digest"].as_str().unwrap()));
    let local_types: Vec<&str> = local["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        local_types,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar"
        ]
    );
    let raw = skopeo_json(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]);
    assert_eq!(raw["config"]["digest"], local["config"]["digest"]);
    let diff_ids =
        metadata(&blob(local["config"]["digest"].as_str().unwrap()))["rootfs"]["diff_ids"].clone();
    for (i, layer) in raw["layers"].as_array().unwrap().iter().enumerate() {
        let media_type = layer["mediaType"].as_str().unwrap();
        assert_eq!(media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(diff_id_of(&blob(digest), media_type), diff_ids[i]);
    }
}

#[test]
fn push_to_the_auth_registry_needs_login() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let home = env.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let name = format!("127.0.0.1:5001/strata-test/auth-{}:1", unique());
    env.build_ok(&["-t", &name, &s(&ctx)]);
    let strata = || {
        let mut c = env.strata();
        c.env("HOME", &home)
            .env("DOCKER_CONFIG", home.join(".docker"));
        c
    };
    let out = strata().args(["push", &name]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("authentication required"), "{err}");
    assert!(err.contains("strata login 127.0.0.1:5001"), "{err}");

    let mut login = strata()
        .args([
            "login",
            "127.0.0.1:5001",
            "-u",
            "strata",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    login
        .stdin
        .take()
        .unwrap()
        .write_all(b"strata-pass\n")
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Login Succeeded"));

    let out = strata().args(["push", &name]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let inspected = skopeo_json(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "strata:strata-pass",
        &format!("docker://{name}"),
    ]);
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);
}

/// A proxy in front of the plain registry that answers the first blob PUT with a 500
/// and forwards everything else, one request per connection.
struct FlakyProxy {
    port: u16,
    puts: Arc<AtomicUsize>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<String>)> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    Some((first.trim_end().to_string(), headers))
}

fn content_length(headers: &[String]) -> u64 {
    headers
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn serve(client: TcpStream, upstream: &str, puts: &AtomicUsize) -> Option<()> {
    let mut reader = BufReader::new(client.try_clone().ok()?);
    let mut client = client;
    let (first, headers) = read_head(&mut reader)?;
    let mut body = Vec::new();
    (&mut reader)
        .take(content_length(&headers))
        .read_to_end(&mut body)
        .ok()?;
    let is_blob_put = first.starts_with("PUT ") && first.contains("/blobs/uploads/");
    if is_blob_put && puts.fetch_add(1, Ordering::SeqCst) == 0 {
        client
            .write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .ok()?;
        return Some(());
    }
    let mut up = TcpStream::connect(upstream).ok()?;
    let mut head = format!("{first}\r\n");
    for h in headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("connection:"))
    {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).ok()?;
    up.write_all(&body).ok()?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).ok()?;
    client.write_all(&response).ok()?;
    let _ = client.shutdown(Shutdown::Both);
    Some(())
}

impl FlakyProxy {
    fn start(upstream: &'static str) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let puts = Arc::new(AtomicUsize::new(0));
        let counter = puts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || serve(conn, upstream, &counter));
            }
        });
        FlakyProxy { port, puts }
    }
}

#[test]
fn a_500_on_the_first_blob_put_is_retried() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let proxy = FlakyProxy::start("127.0.0.1:5000");
    let name = format!("127.0.0.1:{}/strata-test/retry-{}:1", proxy.port, unique());
    env.build_ok(&["-t", &name, &s(&ctx)]);
    let out = env.strata().args(["push", &name]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // 4 blobs, one of them sent twice.
    assert_eq!(proxy.puts.load(Ordering::SeqCst), 5);
    let direct = name.replace(&format!("127.0.0.1:{}", proxy.port), &registry());
    let inspected = skopeo_json(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{direct}"),
    ]);
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);
}

#[test]
fn same_source_date_epoch_on_two_empty_stores_gives_the_same_digest() {
    let a = TestEnv::new();
    let b = TestEnv::new();
    let ctx_a = context(&a);
    let ctx_b = context(&b);
    // Store A first builds without the epoch: the unclamped blobs it remembers must not
    // be reused for the epoch build.
    a.build_ok(&["--metadata-file", &s(&a.path("plain.json")), &s(&ctx_a)]);
    a.build_ok(&[
        "--build-arg",
        "SOURCE_DATE_EPOCH=1700000000",
        "--metadata-file",
        &s(&a.path("m.json")),
        &s(&ctx_a),
    ]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = b
        .strata()
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "--progress=plain", "--metadata-file"])
        .arg(b.path("m.json"))
        .arg("--output")
        .arg(format!("type=oci,dest={}", s(&b.path("img.tar"))))
        .arg(&ctx_b)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (ma, mb) = (metadata(&a.path("m.json")), metadata(&b.path("m.json")));
    assert_eq!(ma["containerimage.digest"], mb["containerimage.digest"]);
    assert_ne!(
        metadata(&a.path("plain.json"))["containerimage.digest"],
        ma["containerimage.digest"]
    );
    let config = b.oci_archive_config(&b.path("img.tar"));
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["created"], "2023-11-14T22:13:20Z");
    // File mtimes in the new layers are clamped.
    let rootfs = b.unpack_oci_archive(&b.path("img.tar"), "epoch");
    use std::os::unix::fs::MetadataExt;
    let mtime = std::fs::metadata(rootfs.join("hello.txt")).unwrap().mtime();
    assert_eq!(mtime, 1_700_000_000);
}

#[test]
fn zstd_and_gzip_images_pull_back_with_the_same_diff_ids() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let base = format!("{}/strata-test/compression-{}", registry(), unique());
    let (gz, zs) = (format!("{base}:gzip"), format!("{base}:zstd"));
    env.build_ok(&[
        "--output",
        &format!("type=registry,name={gz}"),
        "--output",
        &format!(
            "type=registry,name={zs},compression=zstd,compression-level=3,force-compression=true"
        ),
        &s(&ctx),
    ]);
    let mut diff_ids = Vec::new();
    for (name, want) in [(&gz, "gzip"), (&zs, "zstd")] {
        let layout = env.path(&format!("pulled-{want}"));
        run_ok(Command::new("skopeo").args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            &format!("docker://{name}"),
            &format!("oci:{}:img", s(&layout)),
        ]));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let blob = |d: &str| {
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3);
        let mut ids = Vec::new();
        for l in layers {
            let mt = l["mediaType"].as_str().unwrap();
            assert!(mt.ends_with(want), "{name}: layer media type {mt}");
            ids.push(diff_id_of(&blob(l["digest"].as_str().unwrap()), mt));
        }
        assert_eq!(
            serde_json::json!(ids),
            config["rootfs"]["diff_ids"],
            "{name}"
        );
        diff_ids.push(ids);
    }
    assert_eq!(diff_ids[0], diff_ids[1]);
}

#[test]
fn docker_media_types_when_asked() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let name = format!("{}/strata-test/dockertypes-{}:1", registry(), unique());
    env.build_ok(&[
        "--output",
        &format!("type=image,name={name},push=true,oci-mediatypes=false"),
        &s(&ctx),
    ]);
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        m["layers"][2]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    // push=true with type=image also stores it locally.
    let out = env.strata().args(["images"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("dockertypes"));
}

#[test]
fn image_commands_round_trip() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let iid = env.path("iid");
    env.build_ok(&["-t", "app:1", "--iidfile", &s(&iid), &s(&ctx)]);
    let id = std::fs::read_to_string(&iid).unwrap();
    assert!(id.starts_with("sha256:"), "{id}");

    // inspect: the config exactly as stored (it hashes to the image ID).
    let out = run_ok(env.strata().args(["inspect", "app:1"]));
    let config_bytes = out.stdout.strip_suffix(b"\n").unwrap().to_vec();
    let hash = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("sha256sum < '{}'", {
                let p = env.path("config.json");
                std::fs::write(&p, &config_bytes).unwrap();
                s(&p)
            })),
    );
    assert!(id.ends_with(
        String::from_utf8_lossy(&hash.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    ));

    // history: newest first, the image ID on the top line only.
    let out = run_ok(env.strata().args(["history", "app:1"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("IMAGE") && lines[0].contains("CREATED BY"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&id["sha256:".len().."sha256:".len() + 12]),
        "{text}"
    );
    assert!(lines[1].contains("CMD [\"cat\" \"/hello.txt\"]"), "{text}");
    assert!(lines[3].contains("RUN /bin/sh -c echo hello"), "{text}");
    assert!(lines[3].starts_with("<missing>"), "{text}");

    // tag, then save both names and load them into another store.
    run_ok(env.strata().args(["tag", "app:1", "other/app:2"]));
    let out = env
        .strata()
        .args(["tag", "nope:1", "x:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no such image: nope:1"),
        "{}",
        stderr(&out)
    );
    let saved = env.path("saved.tar");
    run_ok(
        env.strata()
            .args(["save", "-o"])
            .arg(&saved)
            .args(["app:1", "other/app:2"]),
    );
    let other = TestEnv::new();
    let out = run_ok(other.strata().args(["load", "-i"]).arg(&saved));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("Loaded image: app:1") && said.contains("Loaded image: other/app:2"),
        "{said}"
    );
    let loaded = run_ok(other.strata().args(["inspect", "other/app:2"]));
    assert_eq!(
        loaded.stdout,
        out_of(env.strata().args(["inspect", "app:1"]))
    );
    // The loaded image builds on: push it and skopeo reads it back.
    let name = format!("{}/strata-test/loaded-{}:1", registry(), unique());
    run_ok(other.strata().args(["tag", "app:1", &name]));
    run_ok(other.strata().args(["push", &name]));
    let inspected = skopeo_json(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]);
    assert_eq!(
        inspected["config"]["Cmd"],
        serde_json::json!(["cat", "/hello.txt"])
    );

    // pull into a fresh store: the manifest digest is the registry's, blobs are local.
    let fresh = TestEnv::new();
    let busybox = format!("{}/busybox:latest", registry());
    let out = run_ok(fresh.strata().args(["pull", &busybox]));
    let remote = skopeo_json(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{busybox}"),
    ]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(remote["Digest"].as_str().unwrap()), "{said}");
    let images = out_of(fresh.strata().arg("images"));
    assert!(String::from_utf8_lossy(&images).contains(&format!("{}/busybox", registry())));
    let config = out_of(fresh.strata().args(["inspect", &busybox]));
    let remote_config = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--config",
        "--tls-verify=false",
        &format!("docker://{busybox}"),
    ]));
    assert_eq!(
        config.strip_suffix(b"\n").unwrap(),
        remote_config.stdout.as_slice()
    );
    // ... and saves to a tar skopeo reads (layers decompressed from the pulled blobs).
    let pulled_tar = fresh.path("busybox.tar");
    run_ok(
        fresh
            .strata()
            .args(["save", "-o"])
            .arg(&pulled_tar)
            .arg(&busybox),
    );
    let meta = skopeo_json(&["inspect", &format!("docker-archive:{}", s(&pulled_tar))]);
    assert_eq!(
        meta["Layers"].as_array().unwrap().len(),
        remote["Layers"].as_array().unwrap().len()
    );
}

fn out_of(cmd: &mut Command) -> Vec<u8> {
    run_ok(cmd).stdout
}

#[test]
fn insecure_registries_come_from_the_config_file() {
    let env = TestEnv::new();
    let cfg = env.path("config.toml");
    std::fs::write(&cfg, "insecure-registries = \"not-a-list\"\n").unwrap();
    let out = env
        .strata()
        .env("STRATA_CONFIG", &cfg)
        .args(["pull", &format!("{}/busybox:latest", registry())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("parse config"), "{}", stderr(&out));
    // A listed registry that is not a loopback name is reached over plain HTTP. The
    // machine's host name resolves to 127.0.0.1 on the test VMs (else this part is skipped).
    let host = String::from_utf8_lossy(&run_ok(&mut Command::new("hostname")).stdout)
        .trim()
        .to_string();
    let resolves_local = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 5000))
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if host.is_empty() || host == "localhost" || !resolves_local {
        eprintln!("skipping: host name {host:?} does not resolve to loopback");
        return;
    }
    let image = format!("{host}:5000/busybox:latest");
    std::fs::write(&cfg, "# nothing here\n").unwrap();
    let out = env
        .strata()
        .env("STRATA_CONFIG", &cfg)
        .args(["pull", &image])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{host}:5000 should have needed https"
    );
    std::fs::write(&cfg, format!("insecure-registries = [\"{host}:5000\"]\n")).unwrap();
    let out = env
        .strata()
        .env("STRATA_CONFIG", &cfg)
        .args(["pull", &image])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn load_without_a_name_keeps_the_image_unnamed() {
    let env = TestEnv::new();
    let ctx = context(&env);
    let iid = env.path("iid");
    env.build_ok(&["--load", "--iidfile", &s(&iid), &s(&ctx)]);
    assert!(std::fs::read_to_string(&iid)
        .unwrap()
        .starts_with("sha256:"));
    let out = run_ok(env.strata().arg("images"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}
