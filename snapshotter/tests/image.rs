//! Real layers made by other tools: busybox-multilayer from the local test registry
//! (fetched with skopeo), applied into a snapshot chain. Needs root, overlayfs, skopeo and
//! the registry at 127.0.0.1:5000.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::layer::{apply_layer, write_layer, DiffOptions};
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::{OverlaySnapshotter, Snapshotter};

fn json(store: &ContentStore, d: &str) -> Value {
    let d = Digest::parse(d).unwrap();
    serde_json::from_slice(&store.read(&d).unwrap()).unwrap()
}

#[test]
fn registry_multilayer_image_applies_with_whiteouts() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let st = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "-q"])
        .arg("docker://127.0.0.1:5000/busybox-multilayer:latest")
        .arg(format!("oci:{}:x", layout.display()))
        .status()
        .expect("run skopeo");
    assert!(st.success());
    // An OCI layout is a content store: the same blobs/sha256/<hex> layout.
    let store = ContentStore::open(&layout).unwrap();
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = json(&store, index["manifests"][0]["digest"].as_str().unwrap());
    let config = json(&store, manifest["config"]["digest"].as_str().unwrap());
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(layers.len(), 3);

    let sn = OverlaySnapshotter::open(&dir.path().join("snap")).unwrap();
    let mut parent = String::new();
    for (i, (l, want)) in layers.iter().zip(diff_ids).enumerate() {
        let blob = Digest::parse(l["digest"].as_str().unwrap()).unwrap();
        let key = format!("extract-{i}");
        sn.prepare(&key, &parent).unwrap();
        let applied = apply_layer(
            store.open_blob(&blob).unwrap(),
            &sn.upper_dir(&key).unwrap(),
        )
        .unwrap();
        assert_eq!(
            applied.diff_id.as_str(),
            want.as_str().unwrap(),
            "layer {i}"
        );
        let name = format!("layer-{i}");
        sn.commit(&name, &key, BTreeMap::new()).unwrap();
        parent = name;
    }

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let g = MountGuard::mount(&sn.view("v", &parent).unwrap(), &mnt).unwrap();
    assert!(!mnt.join("etc/strata-base-only").exists());
    assert_eq!(
        fs::read_to_string(mnt.join("etc/strata-layer")).unwrap(),
        "3\n"
    );
    let opaque: Vec<_> = fs::read_dir(mnt.join("opt/opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(opaque, vec!["c".to_string()]);
    assert!(mnt.join("bin/busybox").is_file());
    assert!(
        fs::symlink_metadata(mnt.join("bin/sh"))
            .unwrap()
            .is_symlink()
            || mnt.join("bin/sh").is_file()
    );
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "-c", "echo ok"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    drop(g);

    // The third layer's upper, written back, carries the same changes as OCI entries.
    let mut tar = Vec::new();
    write_layer(
        &sn.upper_dir("layer-2").unwrap(),
        &mut tar,
        &DiffOptions::default(),
    )
    .unwrap();
    let names: Vec<String> = tar::Archive::new(tar.as_slice())
        .entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect();
    for n in [
        "etc/.wh.strata-base-only",
        "opt/opaque/",
        "opt/opaque/.wh..wh..opq",
        "opt/opaque/c",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing in {names:?}");
    }
    assert!(!Path::new(&mnt).join("bin/busybox").exists(), "unmounted");
}
