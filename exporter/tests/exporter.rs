//! End-to-end checks of the exporter against the real content store, umoci, skopeo and
//! the local registry at 127.0.0.1:5000.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use oci_spec::image::{ConfigBuilder, ImageConfiguration};
use strata_dag::Digest;
use strata_exporter::*;
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::layer::DiffOptions;

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hello.txt"), b"hello from strata\n").unwrap();
    fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("etc/link")).unwrap();
    fs::hard_link(root.join("etc/hello.txt"), root.join("etc/hard")).unwrap();
    // Compressible bulk so compressed sizes differ from the tar's.
    fs::write(root.join("usr/big"), vec![b'x'; 200_000]).unwrap();
}

fn config(label: &str) -> ImageConfiguration {
    let mut img = ImageConfiguration::default();
    let cfg = ConfigBuilder::default()
        .cmd(vec!["/usr/bin/tool".to_string()])
        .env(vec!["PATH=/usr/bin:/bin".to_string()])
        .labels(
            [
                ("org.strata.test".to_string(), label.to_string()),
                ("b".to_string(), "2".to_string()),
                ("a".to_string(), "1".to_string()),
            ]
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()
        .unwrap();
    img.set_config(Some(cfg));
    img.set_created(Some("2024-01-01T00:00:00Z".to_string()));
    img
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: ContentStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let store = ContentStore::open(&root.join("content")).unwrap();
    Fixture {
        _dir: dir,
        root,
        store,
    }
}

fn build_image(f: &Fixture, compression: &Compression, oci: bool) -> (LayerBlob, ImageRecord) {
    let upper = f.root.join("upper");
    if !upper.exists() {
        make_tree(&upper);
    }
    let layer = export_layer(&upper, &f.store, compression, &DiffOptions::default()).unwrap();
    let image = write_image(&f.store, std::slice::from_ref(&layer), config("x"), oci).unwrap();
    (layer, image)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn untar(tar_path: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    tar::Archive::new(fs::File::open(tar_path).unwrap())
        .unpack(dest)
        .unwrap();
}

#[test]
fn export_layer_twice_gives_the_same_blob() {
    let f = fixture();
    let upper = f.root.join("upper");
    make_tree(&upper);
    let opts = DiffOptions::default();
    let a = export_layer(&upper, &f.store, &Compression::default(), &opts).unwrap();
    let other = ContentStore::open(&f.root.join("content2")).unwrap();
    let b = export_layer(&upper, &other, &Compression::default(), &opts).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(f.store.size(&a.digest).unwrap(), a.size);
}

#[test]
fn compressions_share_the_diff_id() {
    let f = fixture();
    let upper = f.root.join("upper");
    make_tree(&upper);
    let opts = DiffOptions::default();
    let blobs: Vec<LayerBlob> = [
        Compression::Gzip { level: 9 },
        Compression::Zstd { level: 3 },
        Compression::Uncompressed,
    ]
    .iter()
    .map(|c| export_layer(&upper, &f.store, c, &opts).unwrap())
    .collect();
    assert_eq!(blobs[0].diff_id, blobs[1].diff_id);
    assert_eq!(blobs[1].diff_id, blobs[2].diff_id);
    // Uncompressed: the blob is the tar itself.
    assert_eq!(blobs[2].digest, blobs[2].diff_id);
    assert_eq!(blobs[2].size, blobs[2].uncompressed_size);
    assert_ne!(blobs[0].digest, blobs[1].digest);
    assert!(blobs[0].size < blobs[2].size && blobs[1].size < blobs[2].size);
    let plain = f.store.read(&blobs[2].digest).unwrap();
    let mut gz = Vec::new();
    flate2::read::GzDecoder::new(f.store.open_blob(&blobs[0].digest).unwrap())
        .read_to_end(&mut gz)
        .unwrap();
    let zs = zstd::decode_all(f.store.open_blob(&blobs[1].digest).unwrap()).unwrap();
    assert_eq!(gz, plain);
    assert_eq!(zs, plain);
    assert_eq!(Digest::of(&plain), blobs[0].diff_id);
}

#[test]
fn write_image_is_deterministic_and_readable() {
    let f = fixture();
    let (layer, image) = build_image(&f, &Compression::default(), true);
    let again = write_image(&f.store, std::slice::from_ref(&layer), config("x"), true).unwrap();
    assert_eq!(image, again);
    assert_eq!(
        image.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest = read_manifest(&f.store, &image).unwrap();
    assert_eq!(manifest.layers().len(), 1);
    assert_eq!(manifest.layers()[0].size(), layer.size);
    let cfg = read_config(&f.store, &image).unwrap();
    assert_eq!(cfg.rootfs().diff_ids(), &vec![layer.diff_id.to_string()]);
    assert_eq!(cfg.created().as_deref(), Some("2024-01-01T00:00:00Z"));
    assert_eq!(
        image.size,
        layer.size + f.store.size(&image.config_digest).unwrap()
    );

    let docker = write_image(&f.store, std::slice::from_ref(&layer), config("x"), false).unwrap();
    assert_eq!(docker.media_type, DOCKER_MANIFEST);
    let m = read_manifest(&f.store, &docker).unwrap();
    assert_eq!(m.config().media_type().as_ref(), DOCKER_CONFIG);
    assert_eq!(m.layers()[0].media_type().as_ref(), DOCKER_LAYER_GZIP);
    // Same config bytes in both flavours.
    assert_eq!(docker.config_digest, image.config_digest);

    let missing = LayerBlob {
        digest: Digest::of(b"nope"),
        ..layer
    };
    assert!(matches!(
        write_image(&f.store, &[missing], config("x"), true),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn oci_archive_unpacks_with_umoci_and_inspects_with_skopeo() {
    let f = fixture();
    let (layer, image) = build_image(&f, &Compression::default(), true);
    let tar_path = f.root.join("out/image.tar");
    fs::create_dir_all(tar_path.parent().unwrap()).unwrap();
    write_oci_archive(&f.store, &image, Some("v1"), &tar_path).unwrap();
    // Nothing but the archive is left in the directory (the temp file was renamed).
    assert_eq!(fs::read_dir(f.root.join("out")).unwrap().count(), 1);

    let layout = f.root.join("layout");
    untar(&tar_path, &layout);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    assert_eq!(
        index["manifests"][0]["digest"],
        image.manifest_digest.to_string()
    );
    let bundle = f.root.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        fs::read(rootfs.join("etc/hello.txt")).unwrap(),
        b"hello from strata\n"
    );
    assert_eq!(
        fs::read_link(rootfs.join("etc/link")).unwrap(),
        Path::new("hello.txt")
    );
    let tool = fs::metadata(rootfs.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o777, 0o755);
    let (a, b) = (
        fs::metadata(rootfs.join("etc/hello.txt")).unwrap(),
        fs::metadata(rootfs.join("etc/hard")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hardlink kept");

    let out = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", tar_path.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Layers"][0], layer.digest.to_string());
    assert_eq!(v["Labels"]["org.strata.test"], "x");
    assert_eq!(v["Digest"], image.manifest_digest.to_string());

    // Writing the same image again gives the same bytes.
    let tar2 = f.root.join("out/image2.tar");
    write_oci_archive(&f.store, &image, Some("v1"), &tar2).unwrap();
    assert_eq!(fs::read(&tar_path).unwrap(), fs::read(&tar2).unwrap());
}

#[test]
fn oci_dir_accumulates_images_by_ref_name() {
    let f = fixture();
    let (_, image) = build_image(&f, &Compression::Zstd { level: 3 }, true);
    let other = write_image(
        &f.store,
        &[export_layer(
            &f.root.join("upper"),
            &f.store,
            &Compression::default(),
            &DiffOptions::default(),
        )
        .unwrap()],
        config("y"),
        true,
    )
    .unwrap();
    let dir = f.root.join("ocidir");
    write_oci_dir(&f.store, &image, Some("a"), &dir).unwrap();
    write_oci_dir(&f.store, &other, Some("b"), &dir).unwrap();
    write_oci_dir(&f.store, &other, Some("a"), &dir).unwrap(); // "a" moves to the other image
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    for r in ["a", "b"] {
        let out = run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{r}", dir.display())));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Labels"]["org.strata.test"], "y", "ref {r}");
    }
}

#[test]
fn docker_archive_is_readable_by_skopeo() {
    for (compression, oci) in [
        (Compression::default(), false),
        (Compression::Zstd { level: 3 }, true),
    ] {
        let f = fixture();
        let (layer, image) = build_image(&f, &compression, oci);
        let tar_path = f.root.join("docker.tar");
        write_docker_archive(&f.store, &image, &["strata/app".to_string()], &tar_path).unwrap();
        let out = run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", tar_path.display())));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Labels"]["org.strata.test"], "x");
        assert_eq!(v["Layers"].as_array().unwrap().len(), 1);

        let unpacked = f.root.join("unpacked");
        untar(&tar_path, &unpacked);
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(unpacked.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "strata/app:latest");
        // Layers are written uncompressed: the file is the tar whose sha256 is the diff id.
        let layer_path = manifest[0]["Layers"][0].as_str().unwrap();
        assert_eq!(
            Digest::of(&fs::read(unpacked.join(layer_path)).unwrap()),
            layer.diff_id
        );

        // A full copy makes skopeo check every layer against the config's diff ids.
        run(Command::new("skopeo")
            .arg("copy")
            .arg("--quiet")
            .arg(format!("docker-archive:{}", tar_path.display()))
            .arg(format!("oci:{}:copied", f.root.join("copied").display())));
    }
}

#[test]
fn push_uploads_once_and_skopeo_sees_the_config() {
    let f = fixture();
    let (layer, image) = build_image(&f, &Compression::default(), true);
    let name = format!(
        "127.0.0.1:5000/strata-test/exporter-{}:t",
        std::process::id()
    );
    let reference = strata_registry::Reference::parse(&name).unwrap();
    let client = strata_registry::Client::new(Default::default());
    let first = push_image_report(&client, &f.store, &image, &reference).unwrap();
    assert_eq!(first.manifest_digest, image.manifest_digest);
    assert_eq!(
        first.uploaded,
        vec![layer.digest.clone(), image.config_digest.clone()]
    );
    assert!(first.existing.is_empty());

    let out = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{name}")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["Labels"]["org.strata.test"], "x");
    assert_eq!(v["rootfs"]["diff_ids"][0], layer.diff_id.to_string());

    let second = push_image_report(&client, &f.store, &image, &reference).unwrap();
    assert!(second.uploaded.is_empty(), "{second:?}");
    assert_eq!(second.existing.len(), 2);
    assert_eq!(
        push_image(&client, &f.store, &image, &reference).unwrap(),
        image.manifest_digest
    );
}

#[test]
fn copy_rootfs_keeps_metadata() {
    let f = fixture();
    let src = f.root.join("src");
    make_tree(&src);
    let tool = src.join("usr/bin/tool");
    std::os::unix::fs::chown(&tool, Some(1234), Some(5678)).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &src.join("etc"),
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();

    let dest = f.root.join("dest");
    // Something in the way gets replaced.
    fs::create_dir_all(dest.join("etc/hello.txt")).unwrap();
    copy_rootfs(&src, &dest).unwrap();

    assert_eq!(
        fs::read(dest.join("etc/hello.txt")).unwrap(),
        b"hello from strata\n"
    );
    let t = fs::metadata(dest.join("usr/bin/tool")).unwrap();
    assert_eq!((t.uid(), t.gid(), t.mode() & 0o7777), (1234, 5678, 0o4755));
    assert_eq!(
        fs::read_link(dest.join("etc/link")).unwrap(),
        Path::new("hello.txt")
    );
    assert_eq!(
        fs::metadata(dest.join("etc/hello.txt")).unwrap().ino(),
        fs::metadata(dest.join("etc/hard")).unwrap().ino()
    );
    use std::os::unix::fs::FileTypeExt;
    let fifo = fs::symlink_metadata(dest.join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    let null = fs::symlink_metadata(dest.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(
        fs::metadata(dest.join("etc")).unwrap().mtime(),
        1_000_000_000
    );
    assert_eq!(
        fs::metadata(dest.join("usr/big")).unwrap().mtime(),
        fs::metadata(src.join("usr/big")).unwrap().mtime()
    );
}

#[test]
fn equal_trees_made_at_different_times_give_equal_blobs_under_source_date_epoch() {
    let f = fixture();
    let (a, b) = (f.root.join("a"), f.root.join("b"));
    make_tree(&a);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    make_tree(&b);
    let opts = DiffOptions {
        source_date_epoch: Some(1_700_000_000),
    };
    for c in [Compression::default(), Compression::Zstd { level: 3 }] {
        let la = export_layer(&a, &f.store, &c, &opts).unwrap();
        let lb = export_layer(&b, &f.store, &c, &opts).unwrap();
        assert_eq!(la, lb, "{c:?}");
    }
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Slow (a 256 MiB layer); run alone: `cargo test -p strata-exporter -- --ignored big_layer`.
#[test]
#[ignore]
fn big_layer_exports_in_flat_memory() {
    let f = fixture();
    let upper = f.root.join("big");
    fs::create_dir_all(&upper).unwrap();
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(fs::File::create(upper.join("blob")).unwrap());
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..256 {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            w.write_all(&buf).unwrap();
        }
    }
    let before = peak_rss_kib();
    let blob = export_layer(
        &upper,
        &f.store,
        &Compression::Gzip { level: 1 },
        &DiffOptions::default(),
    )
    .unwrap();
    let grew = peak_rss_kib().saturating_sub(before);
    assert!(blob.uncompressed_size > 256 << 20);
    assert!(grew < 64 * 1024, "peak RSS grew by {grew} KiB");
}

#[test]
fn export_layers_keeps_input_order() {
    let f = fixture();
    let dirs: Vec<std::path::PathBuf> = (0..5)
        .map(|i| {
            let d = f.root.join(format!("u{i}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("n"), i.to_string().repeat(1000 * (i + 1))).unwrap();
            d
        })
        .collect();
    let refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let opts = DiffOptions::default();
    let all = export_layers(&refs, &f.store, &Compression::default(), &opts).unwrap();
    for (d, blob) in dirs.iter().zip(&all) {
        let one = export_layer(d, &f.store, &Compression::default(), &opts).unwrap();
        assert_eq!(&one, blob);
    }
    let mut bad = refs.clone();
    let missing = f.root.join("missing");
    bad.insert(2, &missing);
    assert!(export_layers(&bad, &f.store, &Compression::default(), &opts).is_err());
}

#[test]
fn copy_rootfs_refuses_to_copy_into_itself() {
    let f = fixture();
    let src = f.root.join("src");
    make_tree(&src);
    let err = copy_rootfs(&src, &src.join("etc/out")).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(!src.join("etc/out").exists());
    // Through a symlinked destination as well.
    std::os::unix::fs::symlink(&src, f.root.join("alias")).unwrap();
    assert!(copy_rootfs(&src, &f.root.join("alias/x")).is_err());
    // A symlink to a directory as the destination is followed.
    let real = f.root.join("real-out");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, f.root.join("out-link")).unwrap();
    copy_rootfs(&src, &f.root.join("out-link")).unwrap();
    assert!(real.join("etc/hello.txt").is_file());
}

#[test]
fn image_without_layers_exports_everywhere() {
    let f = fixture();
    let image = write_image(&f.store, &[], config("empty"), true).unwrap();
    let oci = f.root.join("empty-oci.tar");
    write_oci_archive(&f.store, &image, Some("latest"), &oci).unwrap();
    let out = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", oci.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(0));
    let docker = f.root.join("empty-docker.tar");
    write_docker_archive(&f.store, &image, &["e:1".to_string()], &docker).unwrap();
    let out = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", docker.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Labels"]["org.strata.test"], "empty");
}

#[test]
fn strata_config_keeps_docker_fields() {
    let f = fixture();
    let upper = f.root.join("upper");
    make_tree(&upper);
    let layer = export_layer(
        &upper,
        &f.store,
        &Compression::default(),
        &DiffOptions::default(),
    )
    .unwrap();
    let mut cfg = strata_dag::image::ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    };
    cfg.config.shell = vec!["/bin/bash".into(), "-c".into()];
    cfg.config.on_build = vec!["RUN true".into()];
    cfg.config.healthcheck = Some(strata_dag::image::HealthConfig {
        test: vec!["CMD".into(), "true".into()],
        retries: 3,
        ..Default::default()
    });
    cfg.history = vec![strata_dag::image::History {
        created_by: "COPY . /".into(),
        ..Default::default()
    }];
    let image = write_image_config(&f.store, std::slice::from_ref(&layer), &cfg, true).unwrap();
    let back = read_image_config(&f.store, &image).unwrap();
    assert_eq!(back.config, cfg.config);
    assert_eq!(back.rootfs.diff_ids, vec![layer.diff_id.to_string()]);
    assert_eq!(back.history, cfg.history);
    // Readable through oci-spec too.
    assert_eq!(
        read_config(&f.store, &image)
            .unwrap()
            .rootfs()
            .diff_ids()
            .len(),
        1
    );
}

#[test]
fn recompressed_blobs_keep_the_diff_id() {
    let f = fixture();
    let (gz, _) = build_image(&f, &Compression::default(), true);
    let zs = recompress_blob(&f.store, &gz, &Compression::Zstd { level: 3 }).unwrap();
    assert_eq!(zs.diff_id, gz.diff_id);
    assert_ne!(zs.digest, gz.digest);
    assert_eq!(zs.media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert_eq!(compression_of_media_type(&zs.media_type), Some("zstd"));
    let mut plain = Vec::new();
    layer_reader(&f.store, &zs.digest)
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(Digest::of(&plain), gz.diff_id);
    // A blob whose label lies about its diff id is refused.
    let mut lying = gz.clone();
    lying.diff_id = Digest::of(b"other");
    let err = recompress_blob(&f.store, &lying, &Compression::Uncompressed).unwrap_err();
    assert!(err.to_string().contains("not its diff id"), "{err}");
}

#[test]
fn docker_archive_loads_back_with_the_same_image_id() {
    let f = fixture();
    let (_, image) = build_image(&f, &Compression::Zstd { level: 3 }, true);
    let tar = f.root.join("saved.tar");
    write_docker_archive_multi(
        &f.store,
        &[(image.clone(), vec!["app:1".into(), "app:2".into()])],
        &tar,
    )
    .unwrap();
    let other = fixture();
    let loaded = load_docker_archive(&other.store, &tar).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].tags, ["app:1", "app:2"]);
    assert_eq!(loaded[0].record.config_digest, image.config_digest);
    let m = read_manifest(&other.store, &loaded[0].record).unwrap();
    assert_eq!(
        m.layers()[0].media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar"
    );
    // Not an image archive: a clear error.
    let bogus = f.root.join("bogus.tar");
    let mut b = tar::Builder::new(fs::File::create(&bogus).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
    b.finish().unwrap();
    let err = load_docker_archive(&other.store, &bogus).unwrap_err();
    assert!(err.to_string().contains("no manifest.json"), "{err}");
}
