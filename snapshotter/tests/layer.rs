//! Layer write/apply: formats, determinism, whiteouts, and hostile tars. Needs root.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::{mknod, read_tree, set_mtime, tar_names, Body};
use strata_dag::Digest;
use strata_snapshotter::layer::{apply_layer, write_layer, DiffOptions};
use strata_snapshotter::Error;

const CAP: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// An upper dir with one of everything a layer can carry.
fn rich_upper(dir: &Path) {
    fs::create_dir_all(dir.join("etc/sub")).unwrap();
    fs::write(dir.join("etc/file"), "content").unwrap();
    fs::write(dir.join("etc/sub/deep"), "deep").unwrap();
    fs::write(dir.join("suid"), "s").unwrap();
    fs::set_permissions(dir.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(dir.join("tmp")).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(dir.join("owned"), "o").unwrap();
    std::os::unix::fs::lchown(dir.join("owned"), Some(1234), Some(5678)).unwrap();
    symlink("etc/file", dir.join("link")).unwrap();
    symlink("/nowhere/at/all", dir.join("dangling")).unwrap();
    std::os::unix::fs::lchown(dir.join("dangling"), Some(7), Some(8)).unwrap();
    fs::write(dir.join("hard1"), "shared").unwrap();
    fs::hard_link(dir.join("hard1"), dir.join("etc/hard2")).unwrap();
    mknod(&dir.join("null"), libc::S_IFCHR, 1, 3);
    mknod(&dir.join("blk"), libc::S_IFBLK, 7, 0);
    mknod(&dir.join("fifo"), libc::S_IFIFO, 0, 0);
    fs::write(dir.join("cap"), "binary").unwrap();
    xattr::set(dir.join("cap"), "security.capability", CAP).unwrap();
    xattr::set(dir.join("etc/file"), "user.note", b"hello\nworld").unwrap();
    // Overlay's own format: a whiteout and an opaque directory.
    mknod(&dir.join("deleted"), libc::S_IFCHR, 0, 0);
    fs::create_dir(dir.join("opaque")).unwrap();
    fs::write(dir.join("opaque/inside"), "i").unwrap();
    xattr::set(dir.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    // A socket is skipped.
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    let long = "d".repeat(120);
    fs::create_dir_all(dir.join(&long).join(&long)).unwrap();
    fs::write(dir.join(&long).join(&long).join("f".repeat(150)), "long").unwrap();
    symlink("t".repeat(200), dir.join("longlink")).unwrap();
    for f in ["etc/file", "suid", "owned", "hard1", "cap"] {
        set_mtime(&dir.join(f), 1_000_000_000);
    }
}

fn layer_of(upper: &Path, opts: &DiffOptions) -> (Vec<u8>, Digest) {
    let mut out = Vec::new();
    let d = write_layer(upper, &mut out, opts).unwrap();
    (out, d)
}

#[test]
fn write_then_apply_round_trips_everything() {
    let src = tempfile::tempdir().unwrap();
    rich_upper(src.path());
    let (tar, diff_id) = layer_of(src.path(), &DiffOptions::default());
    assert_eq!(diff_id, Digest::of(&tar));

    let names = tar_names(&tar);
    assert!(names.contains(&".wh.deleted".to_string()), "{names:?}");
    assert!(names.contains(&"opaque/.wh..wh..opq".to_string()));
    let opq = names
        .iter()
        .position(|n| n == "opaque/.wh..wh..opq")
        .unwrap();
    assert_eq!(names[opq - 1], "opaque/");
    assert!(!names.iter().any(|n| n == "sock"));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names.iter().filter(|n| n.ends_with("deep")).count(), 1);

    // Hardlink: the first path (in walk order) is the file, the second a link to it.
    let mut a = tar::Archive::new(tar.as_slice());
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let p = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let h = e.header();
        assert!(h.username_bytes().is_none_or(<[u8]>::is_empty));
        if p == "hard1" {
            assert_eq!(h.entry_type(), tar::EntryType::Link);
            assert_eq!(&*e.link_name_bytes().unwrap(), b"etc/hard2");
        }
        if p == "etc/hard2" {
            assert_eq!(h.entry_type(), tar::EntryType::Regular);
        }
    }

    let dst = tempfile::tempdir().unwrap();
    let applied = apply_layer(tar.as_slice(), dst.path()).unwrap();
    assert_eq!(applied.diff_id, diff_id);
    assert_eq!(applied.uncompressed_size, tar.len() as u64);

    let mut want = read_tree(src.path());
    want.remove(Path::new("sock"));
    // A whiteout is recreated as overlayfs makes them: mode 0.
    if let Some(n) = want.get_mut(Path::new("deleted")) {
        n.mode = 0;
    }
    let got = read_tree(dst.path());
    assert_eq!(got, want);
    assert_eq!(got[Path::new("deleted")].body, Body::Char(0, 0));
    assert_eq!(
        xattr::get(dst.path().join("opaque"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(got[Path::new("suid")].mode, 0o4755);
    assert_eq!(got[Path::new("tmp")].mode, 0o1777);
    assert_eq!(got[Path::new("cap")].xattrs["security.capability"], CAP);
    assert_eq!(got[Path::new("owned")].uid, 1234);

    // The applied tree writes back to the very same bytes.
    let (again, _) = layer_of(dst.path(), &DiffOptions::default());
    if let Some(i) = (0..tar.len()).find(|i| again.get(*i) != tar.get(*i)) {
        let block = i / 512 * 512;
        panic!(
            "rewritten layer differs at {i} in header {:?}",
            String::from_utf8_lossy(&tar[block..block + 100])
        );
    }
}

#[test]
fn same_tree_gives_same_bytes_and_epoch_clamps() {
    let src = tempfile::tempdir().unwrap();
    rich_upper(src.path());
    let (a, da) = layer_of(src.path(), &DiffOptions::default());
    let (b, db) = layer_of(src.path(), &DiffOptions::default());
    assert_eq!(a, b);
    assert_eq!(da, db);

    let epoch = 1_100_000_000;
    let (c, _) = layer_of(
        src.path(),
        &DiffOptions {
            source_date_epoch: Some(epoch),
        },
    );
    let mut ar = tar::Archive::new(c.as_slice());
    let mut old = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let m = e.header().mtime().unwrap();
        assert!(m <= epoch as u64);
        if m == 1_000_000_000 {
            old += 1;
        }
    }
    assert_eq!(
        old, 6,
        "older mtimes are kept as they are (5 files, one a hardlink pair)"
    );
}

#[test]
fn compressed_layers_are_detected() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), "x".repeat(10_000)).unwrap();
    let (tar, diff_id) = layer_of(src.path(), &DiffOptions::default());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 3).unwrap();
    for (name, bytes) in [("plain", &tar), ("gzip", &gz), ("zstd", &zst)] {
        let dst = tempfile::tempdir().unwrap();
        let applied = apply_layer(bytes.as_slice(), dst.path()).unwrap();
        assert_eq!(applied.diff_id, diff_id, "{name}");
        assert_eq!(
            fs::read(dst.path().join("f")).unwrap().len(),
            10_000,
            "{name}"
        );
    }
    let dst = tempfile::tempdir().unwrap();
    assert!(apply_layer(&b"garbage that is no tar at all"[..], dst.path()).is_err());
}

// --- hostile tars ----------------------------------------------------------------------

enum Raw<'a> {
    File(&'a [u8], &'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
}

/// Builds a tar with names written verbatim (tar::Builder would refuse these).
fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, kind, link, data): (&[u8], _, &[u8], &[u8]) = match e {
            Raw::File(n, d) => (n, tar::EntryType::Regular, b"", d),
            Raw::Symlink(n, t) => (n, tar::EntryType::Symlink, t, b""),
            Raw::Hardlink(n, t) => (n, tar::EntryType::Link, t, b""),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

struct Hostile {
    base: tempfile::TempDir,
}

impl Hostile {
    fn new() -> Self {
        let base = tempfile::tempdir().unwrap();
        fs::create_dir_all(base.path().join("a/b/dest")).unwrap();
        Hostile { base }
    }
    fn dest(&self) -> std::path::PathBuf {
        self.base.path().join("a/b/dest")
    }
    fn outside_clean(&self) -> bool {
        let mut entries: Vec<_> = walkdir::WalkDir::new(self.base.path())
            .into_iter()
            .map(|e| e.unwrap().path().to_path_buf())
            .filter(|p| !p.starts_with(self.dest()))
            .collect();
        entries.sort();
        entries
            == vec![
                self.base.path().to_path_buf(),
                self.base.path().join("a"),
                self.base.path().join("a/b"),
            ]
    }
}

#[test]
fn dotdot_is_refused() {
    let h = Hostile::new();
    let r = apply_layer(
        raw_tar(&[Raw::File(b"../x", b"evil")]).as_slice(),
        &h.dest(),
    );
    assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
    let r = apply_layer(
        raw_tar(&[Raw::File(b"ok/../../../x", b"evil")]).as_slice(),
        &h.dest(),
    );
    assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
    assert!(h.outside_clean());
}

#[test]
fn absolute_paths_stay_inside() {
    let h = Hostile::new();
    let marker = h.base.path().join("marker");
    let abs = marker.to_str().unwrap().as_bytes().to_vec();
    apply_layer(raw_tar(&[Raw::File(&abs, b"evil")]).as_slice(), &h.dest()).unwrap();
    assert!(!marker.exists());
    assert!(h.outside_clean());
    let inside = h.dest().join(marker.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inside).unwrap(), b"evil");
}

#[test]
fn symlinks_cannot_lead_outside() {
    let h = Hostile::new();
    let marker = h.base.path().join("marker");
    let rel_marker = marker.strip_prefix("/").unwrap().to_str().unwrap();
    let through_root = format!("root/{rel_marker}");
    let through_up = "up/marker".to_string();
    let tar = raw_tar(&[
        Raw::Symlink(b"root", b"/"),
        Raw::File(through_root.as_bytes(), b"evil1"),
        Raw::Symlink(b"up", b"../../.."),
        Raw::File(through_up.as_bytes(), b"evil2"),
        // A symlink replaced by a file: the file must not be written through the link.
        Raw::Symlink(b"over", marker.to_str().unwrap().as_bytes()),
        Raw::File(b"over", b"evil3"),
    ]);
    apply_layer(tar.as_slice(), &h.dest()).unwrap();
    assert!(!marker.exists());
    assert!(h.outside_clean());
    // Contained: both resolve as if dest were /.
    assert_eq!(fs::read(h.dest().join(rel_marker)).unwrap(), b"evil1");
    assert_eq!(fs::read(h.dest().join("marker")).unwrap(), b"evil2");
    assert_eq!(fs::read(h.dest().join("over")).unwrap(), b"evil3");
    assert!(fs::symlink_metadata(h.dest().join("over"))
        .unwrap()
        .is_file());
}

#[test]
fn hardlinks_cannot_reach_outside() {
    let h = Hostile::new();
    let before = fs::read("/etc/passwd").unwrap();
    let r = apply_layer(
        raw_tar(&[Raw::Hardlink(b"pw", b"/etc/passwd")]).as_slice(),
        &h.dest(),
    );
    assert!(r.is_err(), "a link to a file absent from the layer fails");
    let r = apply_layer(
        raw_tar(&[Raw::Hardlink(b"pw", b"../../../../../../etc/passwd")]).as_slice(),
        &h.dest(),
    );
    assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
    // Through a symlink to /: resolves to dest/etc/passwd, which does not exist.
    let r = apply_layer(
        raw_tar(&[
            Raw::Symlink(b"r", b"/"),
            Raw::Hardlink(b"pw", b"r/etc/passwd"),
        ])
        .as_slice(),
        &h.dest(),
    );
    assert!(r.is_err());
    assert!(!h.dest().join("pw").exists());
    // Then writing through the link name must not touch the real file either.
    let r = apply_layer(
        raw_tar(&[
            Raw::File(b"etc/passwd", b"inside"),
            Raw::Hardlink(b"pw2", b"/etc/passwd"),
            Raw::File(b"pw2", b"rewritten"),
        ])
        .as_slice(),
        &h.dest(),
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(fs::read("/etc/passwd").unwrap(), before);
    assert!(h.outside_clean());
}

#[test]
fn sparse_entries_are_refused() {
    let mut tar = raw_tar(&[Raw::File(b"sparse", b"")]);
    // Turn the regular entry into a GNU sparse one ('S') and fix the checksum.
    let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    let dst = tempfile::tempdir().unwrap();
    let r = apply_layer(tar.as_slice(), dst.path());
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert!(!dst.path().join("sparse").exists());
}

/// GNU tar reads our layers, long names, PAX xattrs and all.
#[test]
fn gnu_tar_reads_written_layers() {
    let src = tempfile::tempdir().unwrap();
    rich_upper(src.path());
    let (tar, _) = layer_of(src.path(), &DiffOptions::default());
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("layer.tar");
    fs::write(&file, &tar).unwrap();
    let list = std::process::Command::new("tar")
        .args(["--xattrs", "-tvf"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&format!(
        "{}/{}/{}",
        "d".repeat(120),
        "d".repeat(120),
        "f".repeat(150)
    )));
    assert!(text.contains(&format!("longlink -> {}", "t".repeat(200))));
    assert!(text.contains("hard1 link to etc/hard2"), "{text}");
}

#[test]
fn oci_whiteouts_become_overlay_ones() {
    let tar = raw_tar(&[
        Raw::File(b"a/.wh.b", b""),
        Raw::File(b"x/.wh..wh..opq", b""),
        Raw::File(b"x/kept", b"k"),
        Raw::File(b".wh..wh.plnk/123.45", b"aufs"),
        Raw::File(b".wh..", b""),
    ]);
    let dst = tempfile::tempdir().unwrap();
    let r = apply_layer(tar.as_slice(), dst.path());
    assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
    let tar = raw_tar(&[
        Raw::File(b"a/.wh.b", b""),
        Raw::File(b"x/.wh..wh..opq", b""),
        Raw::File(b"x/kept", b"k"),
        Raw::File(b".wh..wh.plnk/123.45", b"aufs"),
    ]);
    let dst = tempfile::tempdir().unwrap();
    apply_layer(tar.as_slice(), dst.path()).unwrap();
    let tree = read_tree(dst.path());
    assert_eq!(tree[Path::new("a/b")].body, Body::Char(0, 0));
    assert!(!dst.path().join(".wh..wh.plnk").exists());
    assert!(!dst.path().join("a/.wh.b").exists());
    assert_eq!(
        xattr::get(dst.path().join("x"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(fs::read(dst.path().join("x/kept")).unwrap(), b"k");
}

#[test]
fn metacopy_uppers_are_refused() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), "").unwrap();
    xattr::set(src.path().join("f"), "trusted.overlay.metacopy", b"").unwrap();
    let r = write_layer(src.path(), Vec::new(), &DiffOptions::default());
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

/// Builds the same upper twice, once with fresh files and once with every file a hardlink
/// of an inode outside the upper (as an incremental COPY links files from the previous
/// snapshot): `b` and `c` share one inode in both.
fn upper_with_links(dir: &Path, outside: Option<&Path>) {
    fs::create_dir_all(dir.join("d")).unwrap();
    for (name, body) in [("a", "alpha"), ("d/b", "pair")] {
        let path = dir.join(name);
        match outside {
            Some(o) => {
                let src = o.join(name.replace('/', "_"));
                fs::write(&src, body).unwrap();
                fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
                set_mtime(&src, 1_000_000_000);
                fs::hard_link(&src, &path).unwrap();
            }
            None => {
                fs::write(&path, body).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
                set_mtime(&path, 1_000_000_000);
            }
        }
    }
    fs::hard_link(dir.join("d/b"), dir.join("d/c")).unwrap();
    set_mtime(&dir.join("d"), 1_000_000_000);
}

#[test]
fn files_linked_from_outside_the_upper_are_regular_entries() {
    let fresh = tempfile::tempdir().unwrap();
    upper_with_links(fresh.path(), None);
    let outside = tempfile::tempdir().unwrap();
    let linked = tempfile::tempdir().unwrap();
    upper_with_links(linked.path(), Some(outside.path()));
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(linked.path().join("a")).unwrap().nlink(), 2);
        assert_eq!(fs::metadata(linked.path().join("d/b")).unwrap().nlink(), 3);
    }

    let (tar, _) = layer_of(linked.path(), &DiffOptions::default());
    let mut ar = tar::Archive::new(tar.as_slice());
    let kinds: Vec<(String, tar::EntryType, u64)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            (name, e.header().entry_type(), e.header().size().unwrap())
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("a".to_string(), tar::EntryType::Regular, 5),
            ("d/".to_string(), tar::EntryType::Directory, 0),
            ("d/b".to_string(), tar::EntryType::Regular, 4),
            ("d/c".to_string(), tar::EntryType::Link, 0),
        ],
        "a link outside the tree is no tar hardlink; the first path of an inode inside it is the file"
    );
    // Byte for byte the layer of the same files copied fresh.
    assert_eq!(tar, layer_of(fresh.path(), &DiffOptions::default()).0);
}

#[test]
fn writing_a_layer_leaves_access_times_alone() {
    use std::os::unix::fs::MetadataExt;
    let upper = tempfile::tempdir().unwrap();
    fs::create_dir(upper.path().join("d")).unwrap();
    fs::write(upper.path().join("d/f"), b"content").unwrap();
    // Atime and mtime a year back: on a relatime (or strictatime) mount any read updates it.
    set_mtime(&upper.path().join("d/f"), 1_700_000_000);
    let before = fs::symlink_metadata(upper.path().join("d/f")).unwrap();
    assert_eq!(before.atime(), 1_700_000_000);

    let (tar, _) = layer_of(upper.path(), &DiffOptions::default());
    let mut ar = tar::Archive::new(tar.as_slice());
    let file = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| &*e.path_bytes() == b"d/f")
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        });
    assert_eq!(
        file.as_deref(),
        Some("content"),
        "the file's data is in the layer"
    );
    let after = fs::symlink_metadata(upper.path().join("d/f")).unwrap();
    assert_eq!(
        (after.atime(), after.atime_nsec()),
        (before.atime(), before.atime_nsec()),
        "the export read the file without touching its access time"
    );
}

/// A sink that takes `left` bytes, then fails.
struct FailingSink {
    left: usize,
}

impl Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_sink_stops_the_export_instead_of_hanging_its_reader() {
    // More directories than the reader may read ahead, each with files, so the reader is
    // blocked handing over a listing when the writer fails.
    let upper = tempfile::tempdir().unwrap();
    for d in 0..20 {
        let dir = upper.path().join(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..20 {
            fs::write(dir.join(format!("f{f:02}")), vec![b'x'; 3000]).unwrap();
        }
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let path = upper.path().to_path_buf();
    std::thread::spawn(move || {
        let r = write_layer(&path, FailingSink { left: 10_000 }, &DiffOptions::default());
        let _ = done_tx.send(r.map(|_| ()).map_err(|e| {
            let mut chain = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                chain.push_str(&format!(": {s}"));
                source = s.source();
            }
            chain
        }));
    });
    let result = done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the export returned");
    let err = result.expect_err("the sink failed");
    assert!(err.contains("disk full"), "{err}");
}
