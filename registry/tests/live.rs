//! Against the live test registries (127.0.0.1:5000 open, :5001 basic auth), which CI
//! starts with `testenv/registry start && testenv/seed-images`.

use std::io::Read;

use strata_dag::{Digest, Platform};
use strata_registry::{media_types, Client, ClientConfig, Error, Reference};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn registry() -> String {
    env_or("STRATA_TEST_REGISTRY", "127.0.0.1:5000")
}

fn auth_registry() -> String {
    env_or("STRATA_TEST_AUTH_REGISTRY", "127.0.0.1:5001")
}

fn auth_user() -> (String, String) {
    (
        env_or("STRATA_TEST_AUTH_USER", "strata"),
        env_or("STRATA_TEST_AUTH_PASS", "strata-pass"),
    )
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("parse {s}: {e}"))
}

/// A client whose credentials come from an empty temporary docker config, so the
/// developer's own `~/.docker/config.json` never leaks into a test.
fn client(dir: &tempfile::TempDir) -> Client {
    Client::new(ClientConfig::default()).with_docker_config_dir(dir.path())
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn arm64() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: None,
    }
}

#[test]
fn resolves_oci_and_docker_manifests_and_indexes() {
    let dir = tmp();
    let c = client(&dir);
    let amd64 = Platform::default();

    let oci = c
        .resolve(&r(&format!("{}/busybox:latest", registry())), &amd64)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(oci.manifest_media_type, media_types::OCI_MANIFEST);
    assert_eq!(Digest::of(&oci.manifest_bytes), oci.manifest_digest);
    assert_eq!(oci.config.architecture().to_string(), "amd64");
    assert_eq!(oci.config.os().to_string(), "linux");
    assert_eq!(
        Digest::of(&oci.config_bytes).to_string(),
        oci.manifest.config().digest().to_string()
    );
    assert_eq!(oci.manifest.layers().len(), 1);

    let docker = c
        .resolve(&r(&format!("{}/busybox:v2s2", registry())), &amd64)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docker.manifest_media_type, media_types::DOCKER_MANIFEST);
    assert_ne!(docker.manifest_digest, oci.manifest_digest);
    // Same image content: the config bytes are identical across media types.
    assert_eq!(docker.config_bytes, oci.config_bytes);
    assert_eq!(docker.manifest.layers().len(), 1);
    assert_eq!(
        docker.manifest.layers()[0].media_type().to_string(),
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );

    for (name, single) in [("busybox-index", &oci), ("busybox-list", &docker)] {
        let res = c
            .resolve(&r(&format!("{}/{name}:latest", registry())), &amd64)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(res.manifest_digest, single.manifest_digest, "{name}");
        assert_eq!(res.config.architecture().to_string(), "amd64", "{name}");
        let cmd = res.config.config().as_ref().and_then(|c| c.cmd().clone());
        assert_eq!(
            cmd,
            Some(vec!["sh".to_string()]),
            "{name}: got the marker image"
        );

        // The arm64 entry is the marker image: choosing it proves selection is by platform.
        let arm = c
            .resolve(&r(&format!("{}/{name}:latest", registry())), &arm64())
            .unwrap_or_else(|e| panic!("{name} arm64: {e}"));
        assert_eq!(arm.config.architecture().to_string(), "arm64");
        assert_ne!(arm.manifest_digest, single.manifest_digest);

        let s390x = Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        };
        match c.resolve(&r(&format!("{}/{name}:latest", registry())), &s390x) {
            Err(Error::NoPlatform { platform, .. }) => assert_eq!(platform, "linux/s390x"),
            other => panic!("{name}: expected NoPlatform, got {other:?}"),
        }
    }

    // A single-platform image of another architecture is refused, not silently used.
    match c.resolve(&r(&format!("{}/busybox:latest", registry())), &arm64()) {
        Err(Error::NoPlatform { .. }) => {}
        other => panic!("expected NoPlatform, got {other:?}"),
    }
}

#[test]
fn resolve_by_digest_verifies_and_reports_missing() {
    let dir = tmp();
    let c = client(&dir);
    let by_tag = c
        .resolve(
            &r(&format!("{}/busybox:latest", registry())),
            &Platform::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let pinned = r(&format!(
        "{}/busybox@{}",
        registry(),
        by_tag.manifest_digest
    ));
    let by_digest = c
        .resolve(&pinned, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_digest.manifest_bytes, by_tag.manifest_bytes);

    let (bytes, media_type, digest) = c
        .fetch_manifest(&r(&format!("{}/busybox-list:latest", registry())))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(media_type, media_types::DOCKER_LIST);
    assert_eq!(Digest::of(&bytes), digest);

    let missing = r(&format!("{}/busybox:no-such-tag", registry()));
    match c.resolve(&missing, &Platform::default()) {
        Err(e @ Error::NotFound { .. }) => {
            assert!(e.to_string().contains("busybox:no-such-tag"), "{e}")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let absent = Digest::of(b"no such manifest");
    match c.fetch_manifest(&r(&format!("{}/busybox@{absent}", registry()))) {
        Err(Error::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn fetch_blob_streams_and_verifies() {
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/busybox:latest", registry()));
    let res = c
        .resolve(&reference, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let layer = &res.manifest.layers()[0];
    let digest = Digest::parse(layer.digest().as_ref()).unwrap_or_else(|| panic!("digest"));
    let mut out = Vec::new();
    let n = c
        .fetch_blob(&reference, &digest, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, layer.size());
    assert_eq!(out.len() as u64, layer.size());
    assert_eq!(Digest::of(&out), digest);
    // gzip magic: we got the layer itself, not an error page.
    assert_eq!(&out[..2], &[0x1f, 0x8b]);

    // A real registry never serves wrong bytes, so the mismatch case is in fake_server.rs.
    let absent = Digest::of(b"absent");
    match c.fetch_blob(&reference, &absent, &mut Vec::new()) {
        Err(Error::NotFound { reference: shown }) => assert!(shown.contains(absent.as_str())),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn unique_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[test]
fn push_blob_and_manifest_then_skip_existing() {
    let dir = tmp();
    let c = client(&dir);
    let seed = unique_seed();
    let repo = format!(
        "{}/strata-test/regtest-{}-{seed:x}",
        registry(),
        std::process::id()
    );
    let target = r(&format!("{repo}:v1"));

    let layer = random_bytes(300_000, seed);
    let layer_digest = Digest::of(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["true"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}},"history":[{{"created_by":"strata registry test {seed}"}}]}}"#
    )
    .into_bytes();
    let config_digest = Digest::of(&config);

    assert!(!c
        .blob_exists(&target, &layer_digest)
        .unwrap_or_else(|e| panic!("{e}")));
    let mut opens = 0;
    let pushed = c
        .push_blob(&target, &layer_digest, layer.len() as u64, &mut || {
            opens += 1;
            Ok(Box::new(std::io::Cursor::new(layer.clone())) as Box<dyn Read>)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(pushed);
    assert_eq!(opens, 1);
    assert!(c
        .blob_exists(&target, &layer_digest)
        .unwrap_or_else(|e| panic!("{e}")));
    let cfg = config.clone();
    assert!(c
        .push_blob(&target, &config_digest, config.len() as u64, &mut || {
            Ok(Box::new(std::io::Cursor::new(cfg.clone())) as Box<dyn Read>)
        })
        .unwrap_or_else(|e| panic!("{e}")));

    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        media_types::OCI_MANIFEST,
        config.len(),
        layer.len()
    )
    .into_bytes();
    let md = c
        .push_manifest(&target, media_types::OCI_MANIFEST, &manifest)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(md, Digest::of(&manifest));

    // Read it back through the resolver: digest, config and layer all round-trip.
    let res = c
        .resolve(&target, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.manifest_digest, md);
    assert_eq!(res.config_bytes, config);
    let mut back = Vec::new();
    c.fetch_blob(&target, &layer_digest, &mut back)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, layer);

    // Second push: the HEAD finds the blob; nothing is opened or uploaded.
    let before = c.request_count();
    let mut opened_again = false;
    let again = c
        .push_blob(&target, &layer_digest, layer.len() as u64, &mut || {
            opened_again = true;
            Ok(Box::new(std::io::empty()) as Box<dyn Read>)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!again);
    assert!(!opened_again);
    assert_eq!(c.request_count() - before, 1, "only the HEAD request");

    // Push by digest (no tag) and a digest-pinned reference that does not match.
    let by_digest = r(&format!("{repo}@{md}"));
    assert_eq!(
        c.push_manifest(&by_digest, media_types::OCI_MANIFEST, &manifest)
            .ok(),
        Some(md.clone())
    );
    match c.push_manifest(&by_digest, media_types::OCI_MANIFEST, b"{}") {
        Err(Error::DigestMismatch { .. }) => {}
        other => panic!("expected DigestMismatch, got {other:?}"),
    }

    // Cross-repository mount into a second new repository.
    let other = r(&format!(
        "{}/strata-test/regtest-mount-{}-{seed:x}:v1",
        registry(),
        std::process::id()
    ));
    let from = target.repository.clone();
    assert!(c
        .mount_blob(&other, &layer_digest, &from)
        .unwrap_or_else(|e| panic!("{e}")));
    assert!(c
        .blob_exists(&other, &layer_digest)
        .unwrap_or_else(|e| panic!("{e}")));
    let absent = Digest::of(b"never pushed");
    assert!(!c
        .mount_blob(&other, &absent, &from)
        .unwrap_or_else(|e| panic!("{e}")));
}

#[test]
fn push_rejects_wrong_digest() {
    let dir = tmp();
    let c = client(&dir);
    let target = r(&format!(
        "{}/strata-test/regtest-bad-{}:v1",
        registry(),
        std::process::id()
    ));
    let content = random_bytes(1000, unique_seed());
    let claimed = Digest::of(b"something else");
    let result = c.push_blob(&target, &claimed, content.len() as u64, &mut || {
        Ok(Box::new(std::io::Cursor::new(content.clone())) as Box<dyn Read>)
    });
    match result {
        Err(e @ Error::Http { .. }) => assert!(e.to_string().contains("HTTP 400"), "{e}"),
        other => panic!("expected an HTTP 400 error, got {other:?}"),
    }
}

#[test]
fn auth_registry_requires_credentials() {
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/busybox:latest", auth_registry()));
    match c.resolve(&reference, &Platform::default()) {
        Err(e @ Error::Unauthorized { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("authentication required"), "{msg}");
            assert!(
                msg.contains(&format!("strata login {}", auth_registry())),
                "{msg}"
            );
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    // Wrong credentials in the config are refused too.
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"username":"strata","password":"wrong"}}}}}}"#,
            auth_registry()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = client(&dir);
    assert!(matches!(
        c.resolve(&reference, &Platform::default()),
        Err(Error::Unauthorized { .. })
    ));
}

#[test]
fn login_stores_credentials_that_resolve_uses() {
    let dir = tmp();
    let (user, pass) = auth_user();
    let c = client(&dir);
    match c.login(&auth_registry(), &user, "wrong-password") {
        Err(Error::LoginFailed { registry }) => assert_eq!(registry, auth_registry()),
        other => panic!("expected LoginFailed, got {other:?}"),
    }
    assert!(!dir.path().join("config.json").exists());

    c.login(&auth_registry(), &user, &pass)
        .unwrap_or_else(|e| panic!("{e}"));
    let raw =
        std::fs::read_to_string(dir.path().join("config.json")).unwrap_or_else(|e| panic!("{e}"));
    assert!(raw.contains(&auth_registry()), "{raw}");

    let fresh = client(&dir);
    let reference = r(&format!("{}/busybox:latest", auth_registry()));
    let res = fresh
        .resolve(&reference, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.config.architecture().to_string(), "amd64");
    let layer = Digest::parse(res.manifest.layers()[0].digest().as_ref())
        .unwrap_or_else(|| panic!("digest"));
    let n = fresh
        .fetch_blob(&reference, &layer, &mut std::io::sink())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, res.manifest.layers()[0].size());

    assert!(fresh
        .logout(&auth_registry())
        .unwrap_or_else(|e| panic!("{e}")));
    assert!(!fresh
        .logout(&auth_registry())
        .unwrap_or_else(|e| panic!("{e}")));
    assert!(matches!(
        client(&dir).resolve(&reference, &Platform::default()),
        Err(Error::Unauthorized { .. })
    ));
}

#[test]
fn open_registry_login_needs_no_challenge() {
    let dir = tmp();
    let c = client(&dir);
    c.login(&registry(), "anyone", "anything")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(dir.path().join("config.json").exists());
}

#[test]
fn unreachable_registry_is_a_transport_error() {
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    let dir = tmp();
    let c = client(&dir).with_retry_delay(std::time::Duration::from_millis(1));
    match c.resolve(&r("127.0.0.1:9/busybox:latest"), &Platform::default()) {
        Err(e @ Error::Transport { .. }) => {
            assert!(e.to_string().contains("127.0.0.1:9/busybox:latest"), "{e}")
        }
        other => panic!("expected Transport, got {other:?}"),
    }
    assert_eq!(c.request_count(), 4, "first attempt and three retries");
}
