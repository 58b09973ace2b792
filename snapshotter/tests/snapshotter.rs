//! Snapshotter conformance suite (containerd's `testsuite.SnapshotterSuite` in spirit).
//! `suite!` runs every check against one implementation; each check gets a fresh root.
//! Needs root and overlayfs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use strata_snapshotter::mount::{self, MountGuard, CHDIR_OPTION};
use strata_snapshotter::{Error, Kind, OverlaySnapshotter, Snapshotter};

type Make = fn(&Path) -> Box<dyn Snapshotter>;

fn overlay(root: &Path) -> Box<dyn Snapshotter> {
    Box::new(OverlaySnapshotter::open(root).expect("open snapshotter"))
}

struct Env {
    dir: tempfile::TempDir,
    sn: Box<dyn Snapshotter>,
}

impl Env {
    fn new(make: Make) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let sn = make(&dir.path().join("root"));
        Env { dir, sn }
    }
    fn mnt(&self, name: &str) -> std::path::PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        fs::create_dir_all(&p).expect("mkdir mnt");
        p
    }
    /// Prepares `key` on `parent`, lets `f` change it through a mount, commits as `name`.
    fn layer(&self, name: &str, parent: &str, f: impl FnOnce(&Path)) {
        let key = format!("{name}-active");
        let m = self.sn.prepare(&key, parent).expect("prepare");
        let target = self.mnt(&key);
        let g = MountGuard::mount(&m, &target).expect("mount");
        f(&target);
        g.unmount().expect("unmount");
        self.sn.commit(name, &key, BTreeMap::new()).expect("commit");
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn basic(make: Make) {
    let e = Env::new(make);
    e.layer("base", "", |m| {
        fs::write(m.join("a"), "1").unwrap();
        fs::create_dir(m.join("d")).unwrap();
        fs::write(m.join("d/x"), "x").unwrap();
    });
    e.layer("next", "base", |m| {
        assert_eq!(fs::read_to_string(m.join("a")).unwrap(), "1");
        fs::write(m.join("a"), "2").unwrap();
        fs::write(m.join("b"), "b").unwrap();
    });
    let v = e.sn.view("v", "next").expect("view");
    let t = e.mnt("v");
    let _g = MountGuard::mount(&v, &t).expect("mount view");
    assert_eq!(fs::read_to_string(t.join("a")).unwrap(), "2");
    assert_eq!(fs::read_to_string(t.join("b")).unwrap(), "b");
    assert_eq!(fs::read_to_string(t.join("d/x")).unwrap(), "x");

    let info = e.sn.stat("next").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.parent.as_deref(), Some("base"));
    assert_eq!(e.sn.stat("base").unwrap().parent, None);
    assert_eq!(e.sn.stat("v").unwrap().kind, Kind::View);
    // Commit is metadata only: the committed upper holds exactly the layer's changes.
    let upper = e.sn.upper_dir("next").unwrap();
    assert_eq!(fs::read_to_string(upper.join("b")).unwrap(), "b");
    assert!(!upper.join("d").exists());
}

fn mount_shapes(make: Make) {
    let e = Env::new(make);
    let m = e.sn.prepare("a", "").unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].kind, "bind");
    assert!(m[0].options.contains(&"rw".to_string()));
    assert_eq!(e.sn.mounts("a").unwrap(), m);
    e.sn.commit("A", "a", BTreeMap::new()).unwrap();
    let v = e.sn.view("v1", "A").unwrap();
    assert_eq!(v[0].kind, "bind");
    assert!(v[0].options.contains(&"ro".to_string()));
    let p = e.sn.prepare("b", "A").unwrap();
    assert_eq!(p[0].kind, "overlay");
    assert!(p[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert!(p[0].options.iter().any(|o| o.starts_with("workdir=")));
    e.sn.commit("B", "b", BTreeMap::new()).unwrap();
    let v2 = e.sn.view("v2", "B").unwrap();
    assert_eq!(v2[0].kind, "overlay");
    let lower = v2[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    let parts: Vec<&str> = lower.split(':').collect();
    assert_eq!(parts.len(), 2);
    // Nearest parent first.
    assert_eq!(
        Path::new(parts[0]).parent().unwrap(),
        e.sn.upper_dir("B").unwrap().parent().unwrap()
    );
    assert!(!v2[0].options.iter().any(|o| o.starts_with("upperdir=")));
}

fn remove_rules(make: Make) {
    let e = Env::new(make);
    e.layer("A", "", |m| fs::write(m.join("f"), "a").unwrap());
    e.layer("B", "A", |_| {});
    let upper_b = e.sn.upper_dir("B").unwrap();
    assert!(matches!(
        e.sn.remove("A"),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(e.sn.remove("nope"), Err(Error::NotFound(_))));
    e.sn.remove("B").unwrap();
    assert!(!upper_b.exists(), "data of a removed snapshot is deleted");
    e.sn.remove("A").unwrap();
    assert!(matches!(e.sn.stat("A"), Err(Error::NotFound(_))));
    // Active and view snapshots go at any time.
    e.layer("C", "", |_| {});
    e.sn.prepare("act", "C").unwrap();
    e.sn.view("vw", "C").unwrap();
    assert!(matches!(
        e.sn.remove("C"),
        Err(Error::FailedPrecondition(_))
    ));
    e.sn.remove("act").unwrap();
    e.sn.remove("vw").unwrap();
    e.sn.remove("C").unwrap();
    let mut n = 0;
    e.sn.walk(&mut |_| n += 1).unwrap();
    assert_eq!(n, 0);
}

fn errors(make: Make) {
    let e = Env::new(make);
    e.sn.prepare("a", "").unwrap();
    assert!(matches!(
        e.sn.prepare("a", ""),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        e.sn.prepare("b", "missing"),
        Err(Error::NotFound(_))
    ));
    // An active snapshot is no parent.
    assert!(matches!(
        e.sn.prepare("b", "a"),
        Err(Error::FailedPrecondition(_))
    ));
    e.sn.commit("A", "a", BTreeMap::new()).unwrap();
    e.sn.view("v", "A").unwrap();
    assert!(matches!(
        e.sn.commit("V", "v", BTreeMap::new()),
        Err(Error::FailedPrecondition(_))
    ));
    e.sn.prepare("c", "A").unwrap();
    assert!(matches!(
        e.sn.commit("A", "c", BTreeMap::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        e.sn.commit("X", "nope", BTreeMap::new()),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        e.sn.prepare("", ""),
        Err(Error::InvalidArgument(_))
    ));
    // Nothing half-made is left behind by failed prepares.
    let snaps = e.dir.path().join("root/snapshots");
    if snaps.exists() {
        let stray: Vec<_> = fs::read_dir(&snaps)
            .unwrap()
            .filter_map(|d| d.ok())
            .filter(|d| d.file_name().to_string_lossy().starts_with("new-"))
            .collect();
        assert!(stray.is_empty(), "stray temp dirs: {stray:?}");
    }
}

fn deleted_files_in_child(make: Make) {
    let e = Env::new(make);
    e.layer("A", "", |m| {
        fs::write(m.join("gone"), "x").unwrap();
        fs::write(m.join("kept"), "k").unwrap();
        fs::create_dir_all(m.join("dir/sub")).unwrap();
        fs::write(m.join("dir/old"), "o").unwrap();
    });
    e.layer("B", "A", |m| {
        fs::remove_file(m.join("gone")).unwrap();
        fs::remove_dir_all(m.join("dir")).unwrap();
        fs::create_dir(m.join("dir")).unwrap();
        fs::write(m.join("dir/new"), "n").unwrap();
    });
    let v = e.sn.view("v", "B").unwrap();
    let t = e.mnt("v");
    let _g = MountGuard::mount(&v, &t).unwrap();
    assert!(!t.join("gone").exists());
    assert!(t.join("kept").exists());
    assert!(!t.join("dir/old").exists());
    assert!(!t.join("dir/sub").exists());
    assert!(t.join("dir/new").exists());
}

fn view_readonly(make: Make) {
    let e = Env::new(make);
    e.layer("A", "", |m| fs::write(m.join("f"), "a").unwrap());
    e.layer("B", "A", |m| fs::write(m.join("g"), "b").unwrap());
    for (key, parent) in [("v1", "A"), ("v2", "B")] {
        let v = e.sn.view(key, parent).unwrap();
        let t = e.mnt(key);
        let _g = MountGuard::mount(&v, &t).unwrap();
        assert_eq!(fs::read_to_string(t.join("f")).unwrap(), "a");
        let err = fs::write(t.join("new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}: {err}");
    }
}

fn labels_check(make: Make) {
    let e = Env::new(make);
    e.sn.prepare("a", "").unwrap();
    e.sn.commit("A", "a", labels(&[("x", "1"), ("y", "2")]))
        .unwrap();
    assert_eq!(
        e.sn.stat("A").unwrap().labels,
        labels(&[("x", "1"), ("y", "2")])
    );
    let info =
        e.sn.update_labels("A", labels(&[("x", ""), ("z", "3")]))
            .unwrap();
    assert_eq!(info.labels, labels(&[("y", "2"), ("z", "3")]));
    assert_eq!(e.sn.stat("A").unwrap().labels, info.labels);
    assert!(matches!(
        e.sn.update_labels("nope", BTreeMap::new()),
        Err(Error::NotFound(_))
    ));
}

fn walk_check(make: Make) {
    let e = Env::new(make);
    e.sn.prepare("a", "").unwrap();
    e.sn.commit("A", "a", BTreeMap::new()).unwrap();
    e.sn.prepare("b", "A").unwrap();
    e.sn.view("v", "A").unwrap();
    let mut seen = BTreeMap::new();
    e.sn.walk(&mut |i| {
        seen.insert(i.name.clone(), (i.kind, i.parent.clone()));
    })
    .unwrap();
    let want: BTreeMap<String, (Kind, Option<String>)> = [
        ("A".to_string(), (Kind::Committed, None)),
        ("b".to_string(), (Kind::Active, Some("A".into()))),
        ("v".to_string(), (Kind::View, Some("A".into()))),
    ]
    .into_iter()
    .collect();
    assert_eq!(seen, want);
}

fn persistence(make: Make) {
    let e = Env::new(make);
    e.layer("A", "", |m| fs::write(m.join("f"), "a").unwrap());
    let root = e.dir.path().join("root");
    drop(e.sn);
    let again = make(&root);
    assert_eq!(again.stat("A").unwrap().kind, Kind::Committed);
    assert_eq!(
        fs::read_to_string(again.upper_dir("A").unwrap().join("f")).unwrap(),
        "a"
    );
}

fn chain_200(make: Make) {
    let e = Env::new(make);
    let mut parent = String::new();
    for i in 0..200 {
        let key = format!("k{i}");
        e.sn.prepare(&key, &parent).unwrap();
        let up = e.sn.upper_dir(&key).unwrap();
        fs::write(up.join(format!("layer-{i}")), i.to_string()).unwrap();
        fs::write(up.join("top"), i.to_string()).unwrap();
        let name = format!("L{i}");
        e.sn.commit(&name, &key, BTreeMap::new()).unwrap();
        parent = name;
    }
    let m = e.sn.prepare("work", &parent).unwrap();
    let data: usize = m[0].options.iter().map(|o| o.len() + 1).sum();
    assert!(data < 4096, "mount data must fit a page, got {data}");
    assert!(m[0].options.iter().any(|o| o.starts_with(CHDIR_OPTION)));
    let t = e.mnt("work");
    let g = MountGuard::mount(&m, &t).unwrap();
    assert_eq!(fs::read_to_string(t.join("layer-0")).unwrap(), "0");
    assert_eq!(fs::read_to_string(t.join("layer-199")).unwrap(), "199");
    assert_eq!(fs::read_to_string(t.join("top")).unwrap(), "199");
    fs::write(t.join("written"), "w").unwrap();
    g.unmount().unwrap();
    assert!(e.sn.upper_dir("work").unwrap().join("written").exists());
    // The process cwd is untouched by the chdir mount.
    assert_ne!(std::env::current_dir().unwrap(), e.dir.path().join("root"));

    let v = e.sn.view("view", &parent).unwrap();
    let t = e.mnt("view");
    let _g = MountGuard::mount(&v, &t).unwrap();
    assert_eq!(fs::read_to_string(t.join("layer-100")).unwrap(), "100");
}

fn threads(make: Make) {
    let e = Env::new(make);
    let sn: Arc<dyn Snapshotter> = Arc::from(e.sn);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let sn = Arc::clone(&sn);
            std::thread::spawn(move || {
                for i in 0..10 {
                    let key = format!("t{t}-{i}");
                    sn.prepare(&key, "").unwrap();
                    sn.commit(&format!("C{key}"), &key, BTreeMap::new())
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut n = 0;
    sn.walk(&mut |i| {
        n += 1;
        ids.insert(sn_dir(&*sn, &i.name));
    })
    .unwrap();
    assert_eq!(n, 80);
    assert_eq!(ids.len(), 80, "every snapshot has its own directory");
}

fn sn_dir(sn: &dyn Snapshotter, key: &str) -> std::path::PathBuf {
    sn.upper_dir(key).unwrap()
}

macro_rules! suite {
    ($make:expr, $($name:ident),* $(,)?) => {
        $( #[test] fn $name() { super::$name($make) } )*
    };
}

mod overlay_suite {
    suite!(
        super::overlay,
        basic,
        mount_shapes,
        remove_rules,
        errors,
        deleted_files_in_child,
        view_readonly,
        labels_check,
        walk_check,
        persistence,
        chain_200,
        threads,
    );
}

/// Two processes (this test binary re-run) work on one root at the same time.
#[test]
fn two_processes_share_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    OverlaySnapshotter::open(&root).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = ["p", "q"]
        .iter()
        .map(|tag| {
            Command::new(&exe)
                .args(["--exact", "process_worker", "--ignored", "--nocapture"])
                .env("STRATA_SN_ROOT", &root)
                .env("STRATA_SN_TAG", tag)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let sn = OverlaySnapshotter::open(&root).unwrap();
    let mut names = Vec::new();
    sn.walk(&mut |i| names.push(i.name.clone())).unwrap();
    assert_eq!(names.len(), 60, "{names:?}");
}

/// Reads are answered from memory while nothing changed; a change through another handle
/// on the root (as another process would make it) is seen by the next read, and so is a
/// change made by an older binary that opens redb without writing the token.
#[test]
fn cached_reads_see_other_handles_writes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let a = OverlaySnapshotter::open(&root).unwrap();
    let b = OverlaySnapshotter::open(&root).unwrap();
    a.prepare("k", "").unwrap();
    a.commit("base", "k", labels(&[("x", "1")])).unwrap();
    assert_eq!(a.stat("base").unwrap().labels, labels(&[("x", "1")]));
    // Twice: the second read is the cached one.
    assert_eq!(a.stat("base").unwrap().labels, labels(&[("x", "1")]));
    b.update_labels("base", labels(&[("x", "2")])).unwrap();
    assert_eq!(a.stat("base").unwrap().labels, labels(&[("x", "2")]));
    b.prepare("k2", "base").unwrap();
    b.commit("child", "k2", BTreeMap::new()).unwrap();
    assert_eq!(a.stat("child").unwrap().parent.as_deref(), Some("base"));
    b.remove("child").unwrap();
    assert!(matches!(a.stat("child"), Err(Error::NotFound(_))));
    // A writer outside the snapshotter that follows the lock protocol: once `a` let the
    // database go, what it kept is not trusted again.
    assert!(a.stat("base").is_ok());
    a.release();
    b.release();
    {
        let lock = std::fs::File::options()
            .read(true)
            .write(true)
            .open(root.join("metadata.lock"))
            .unwrap();
        // SAFETY: flock on a descriptor owned here.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0
        );
        let db = redb::Database::create(root.join("metadata.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(redb::TableDefinition::<&str, &[u8]>::new("snapshots"))
            .unwrap()
            .remove("base")
            .unwrap();
        tx.commit().unwrap();
    }
    assert!(matches!(a.stat("base"), Err(Error::NotFound(_))));
}

#[test]
#[ignore = "helper run by two_processes_share_a_root"]
fn process_worker() {
    let (Ok(root), Ok(tag)) = (
        std::env::var("STRATA_SN_ROOT"),
        std::env::var("STRATA_SN_TAG"),
    ) else {
        return;
    };
    let sn = OverlaySnapshotter::open(Path::new(&root)).unwrap();
    let mut parent = String::new();
    for i in 0..30 {
        let key = format!("{tag}-{i}");
        sn.prepare(&key, &parent).unwrap();
        fs::write(sn.upper_dir(&key).unwrap().join(&key), "x").unwrap();
        let name = format!("{tag}-c{i}");
        sn.commit(&name, &key, BTreeMap::new()).unwrap();
        parent = name;
    }
}

#[test]
fn unmount_all_under_cleans_stale_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let a = base.join("run/a");
    let b = base.join("run/a/b");
    fs::create_dir_all(&a).unwrap();
    let src = base.join("src");
    fs::create_dir_all(src.join("b")).unwrap();
    let bind = strata_snapshotter::Mount {
        kind: "bind".into(),
        source: src.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "rw".into()],
    };
    mount::mount_all(std::slice::from_ref(&bind), &a).unwrap();
    let bsrc = base.join("src2");
    fs::create_dir_all(&bsrc).unwrap();
    fs::write(bsrc.join("marker"), "m").unwrap();
    let bind2 = strata_snapshotter::Mount {
        source: bsrc.to_string_lossy().into_owned(),
        ..bind
    };
    mount::mount_all(&[bind2], &b).unwrap();
    assert!(b.join("marker").exists());
    let n = mount::unmount_all_under(&base.join("run")).unwrap();
    assert_eq!(n, 2);
    assert!(!base.join("run/a/b").exists(), "the bind of src is gone");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(base.to_str().unwrap()));
}

/// A root whose path holds overlayfs' separators is mounted through `chdir=`.
#[test]
fn odd_root_path_still_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(&dir.path().join("we,ird:root")).unwrap();
    for (key, name, parent) in [("a", "A", ""), ("b", "B", "A")] {
        sn.prepare(key, parent).unwrap();
        fs::write(sn.upper_dir(key).unwrap().join(name), name).unwrap();
        sn.commit(name, key, BTreeMap::new()).unwrap();
    }
    let m = sn.prepare("c", "B").unwrap();
    assert!(m[0].options.iter().any(|o| o.starts_with(CHDIR_OPTION)));
    assert!(m[0]
        .options
        .iter()
        .all(|o| o.starts_with(CHDIR_OPTION) || !o.contains("we,ird")));
    let t = dir.path().join("mnt");
    fs::create_dir(&t).unwrap();
    let _g = MountGuard::mount(&m, &t).unwrap();
    assert_eq!(fs::read_to_string(t.join("A")).unwrap(), "A");
    assert_eq!(fs::read_to_string(t.join("B")).unwrap(), "B");
}
