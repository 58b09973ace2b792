//! Property: for random trees A and B, where B is made by changing A through a real
//! overlay mount (so the kernel writes the whiteouts and opaque dirs), the layers written
//! from the two upper dirs and applied again into fresh snapshots reproduce B exactly.
//! Needs root and overlayfs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{read_tree, Tree};
use proptest::prelude::*;
use strata_snapshotter::layer::{apply_layer, write_layer, DiffOptions};
use strata_snapshotter::mount::MountGuard;
use strata_snapshotter::{OverlaySnapshotter, Snapshotter};

const CAP: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];
const FILE_MODES: &[u32] = &[0o644, 0o755, 0o600, 0o4755, 0o2750, 0o444];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o1777, 0o2775];
const OWNERS: &[(u32, u32)] = &[(0, 0), (1000, 1000), (65534, 100), (12345, 0)];
const TARGETS: &[&str] = &["a", "../b", "/etc/passwd", "c/a", "missing", "a/b/c"];
const VALUES: &[&[u8]] = &[b"v", b"line1\nline2", b"\x00\xff\n\x01", b""];

/// All paths of a small namespace: names a, b, c nested up to three deep.
fn paths() -> Vec<PathBuf> {
    let names = ["a", "b", "c"];
    let mut out = Vec::new();
    for x in names {
        out.push(PathBuf::from(x));
        for y in names {
            out.push(Path::new(x).join(y));
            for z in names {
                out.push(Path::new(x).join(y).join(z));
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    File {
        path: usize,
        content: u8,
        mode: usize,
        owner: usize,
    },
    Append {
        path: usize,
    },
    Dir {
        path: usize,
        mode: usize,
        owner: usize,
    },
    Symlink {
        path: usize,
        target: usize,
    },
    Hardlink {
        path: usize,
        src: usize,
    },
    Remove {
        path: usize,
    },
    Chmod {
        path: usize,
        mode: usize,
    },
    Chown {
        path: usize,
        owner: usize,
    },
    Xattr {
        path: usize,
        value: usize,
    },
    Cap {
        path: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..39usize;
    prop_oneof![
        4 => (p.clone(), any::<u8>(), 0..FILE_MODES.len(), 0..OWNERS.len())
            .prop_map(|(path, content, mode, owner)| Op::File { path, content, mode, owner }),
        1 => p.clone().prop_map(|path| Op::Append { path }),
        3 => (p.clone(), 0..DIR_MODES.len(), 0..OWNERS.len())
            .prop_map(|(path, mode, owner)| Op::Dir { path, mode, owner }),
        1 => (p.clone(), 0..TARGETS.len()).prop_map(|(path, target)| Op::Symlink { path, target }),
        1 => (p.clone(), p.clone()).prop_map(|(path, src)| Op::Hardlink { path, src }),
        2 => p.clone().prop_map(|path| Op::Remove { path }),
        1 => (p.clone(), 0..FILE_MODES.len()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (p.clone(), 0..OWNERS.len()).prop_map(|(path, owner)| Op::Chown { path, owner }),
        1 => (p.clone(), 0..VALUES.len()).prop_map(|(path, value)| Op::Xattr { path, value }),
        1 => p.prop_map(|path| Op::Cap { path }),
    ]
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        // Missing, a parent is not a directory, or a parent is a symlink loop: nothing to
        // remove.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
            ) => {}
        Err(e) => panic!("stat {}: {e}", p.display()),
    }
}

/// Makes every ancestor of `rel` a real directory (replacing files and symlinks).
fn make_parents(root: &Path, rel: &Path) {
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len() - 1] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => fs::remove_file(&cur).unwrap(),
            Err(_) => {}
        }
        fs::create_dir(&cur).unwrap();
    }
}

fn is(p: &Path, f: impl Fn(&fs::Metadata) -> bool) -> bool {
    fs::symlink_metadata(p).map(|m| f(&m)).unwrap_or(false)
}

fn run(root: &Path, op: &Op, all: &[PathBuf]) {
    let at = |i: usize| root.join(&all[i]);
    match *op {
        Op::File {
            path,
            content,
            mode,
            owner,
        } => {
            make_parents(root, &all[path]);
            let p = at(path);
            remove_any(&p);
            fs::write(&p, vec![content; usize::from(content % 7) * 100]).unwrap();
            let (u, g) = OWNERS[owner];
            lchown(&p, Some(u), Some(g)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(FILE_MODES[mode])).unwrap();
        }
        Op::Append { path } => {
            let p = at(path);
            if is(&p, fs::Metadata::is_file) {
                let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
                f.write_all(b"appended").unwrap();
            }
        }
        Op::Dir { path, mode, owner } => {
            make_parents(root, &all[path]);
            let p = at(path);
            remove_any(&p);
            fs::create_dir(&p).unwrap();
            let (u, g) = OWNERS[owner];
            lchown(&p, Some(u), Some(g)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(DIR_MODES[mode])).unwrap();
        }
        Op::Symlink { path, target } => {
            make_parents(root, &all[path]);
            let p = at(path);
            remove_any(&p);
            symlink(TARGETS[target], &p).unwrap();
        }
        Op::Hardlink { path, src } => {
            let (p, s) = (at(path), at(src));
            if path == src || !is(&s, fs::Metadata::is_file) {
                return;
            }
            make_parents(root, &all[path]);
            remove_any(&p);
            if is(&s, fs::Metadata::is_file) {
                fs::hard_link(&s, &p).unwrap();
            }
        }
        Op::Remove { path } => remove_any(&at(path)),
        Op::Chmod { path, mode } => {
            let p = at(path);
            if is(&p, |m| m.is_file()) {
                fs::set_permissions(&p, fs::Permissions::from_mode(FILE_MODES[mode])).unwrap();
            } else if is(&p, fs::Metadata::is_dir) {
                fs::set_permissions(&p, fs::Permissions::from_mode(DIR_MODES[mode % 4])).unwrap();
            }
        }
        Op::Chown { path, owner } => {
            let p = at(path);
            if fs::symlink_metadata(&p).is_ok() {
                let (u, g) = OWNERS[owner];
                lchown(&p, Some(u), Some(g)).unwrap();
            }
        }
        Op::Xattr { path, value } => {
            let p = at(path);
            if is(&p, |m| m.is_file() || m.is_dir()) {
                xattr::set(&p, "user.prop", VALUES[value]).unwrap();
            }
        }
        Op::Cap { path } => {
            let p = at(path);
            if is(&p, fs::Metadata::is_file) {
                xattr::set(&p, "security.capability", CAP).unwrap();
            }
        }
    }
}

fn layer(upper: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    write_layer(upper, &mut out, &DiffOptions::default()).unwrap();
    out
}

/// Runs the property for one pair of op lists; returns the entry names of B's layer.
fn check(a_ops: &[Op], b_ops: &[Op]) -> Vec<String> {
    let all = paths();
    let dir = tempfile::tempdir().unwrap();
    let sn = OverlaySnapshotter::open(&dir.path().join("root")).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();

    // A: written straight into a base snapshot.
    sn.prepare("a", "").unwrap();
    let up_a = sn.upper_dir("a").unwrap();
    for o in a_ops {
        run(&up_a, o, &all);
    }
    sn.commit("A", "a", BTreeMap::new()).unwrap();

    // B: changes made through the overlay, so the kernel records deletions its own way.
    let m = sn.prepare("b", "A").unwrap();
    let g = MountGuard::mount(&m, &mnt).unwrap();
    for o in b_ops {
        run(&mnt, o, &all);
    }
    let want: Tree = read_tree(&mnt);
    g.unmount().unwrap();
    sn.commit("B", "b", BTreeMap::new()).unwrap();

    let la = layer(&up_a);
    let up_b = sn.upper_dir("B").unwrap();
    let lb = layer(&up_b);
    assert_eq!(layer(&up_b), lb, "same tree, same bytes");

    sn.prepare("ra", "").unwrap();
    apply_layer(la.as_slice(), &sn.upper_dir("ra").unwrap()).unwrap();
    sn.commit("RA", "ra", BTreeMap::new()).unwrap();
    sn.prepare("rb", "RA").unwrap();
    apply_layer(lb.as_slice(), &sn.upper_dir("rb").unwrap()).unwrap();
    sn.commit("RB", "rb", BTreeMap::new()).unwrap();
    assert_eq!(
        layer(&sn.upper_dir("RB").unwrap()),
        lb,
        "an applied layer writes back to the same bytes"
    );

    let v = sn.view("rv", "RB").unwrap();
    let g = MountGuard::mount(&v, &mnt).unwrap();
    let got = read_tree(&mnt);
    g.unmount().unwrap();
    assert_eq!(got, want);
    common::tar_names(&lb)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn layers_reproduce_the_overlay_tree(
        a_ops in proptest::collection::vec(op(), 0..25),
        b_ops in proptest::collection::vec(op(), 0..25),
    ) {
        check(&a_ops, &b_ops);
    }
}

/// The cases the property is about, pinned: opaque dir, whiteout, dir <-> file swaps.
#[test]
fn replaced_and_deleted_entries() {
    // a, a/a, a/a/a, a/b, a/b/a, a/c -> hardlink of b, b, c
    let a = vec![
        Op::Dir {
            path: 0,
            mode: 0,
            owner: 0,
        },
        Op::Dir {
            path: 1,
            mode: 1,
            owner: 1,
        },
        Op::File {
            path: 2,
            content: 3,
            mode: 0,
            owner: 1,
        },
        Op::Dir {
            path: 5,
            mode: 0,
            owner: 0,
        },
        Op::File {
            path: 6,
            content: 4,
            mode: 3,
            owner: 2,
        },
        Op::File {
            path: 13,
            content: 5,
            mode: 3,
            owner: 0,
        },
        Op::Hardlink { path: 9, src: 13 },
        Op::File {
            path: 26,
            content: 1,
            mode: 0,
            owner: 0,
        },
    ];
    let b = vec![
        Op::File {
            path: 1,
            content: 1,
            mode: 0,
            owner: 0,
        }, // dir -> file
        Op::Dir {
            path: 5,
            mode: 2,
            owner: 3,
        }, // recreated: opaque
        Op::File {
            path: 7,
            content: 2,
            mode: 1,
            owner: 0,
        },
        Op::Remove { path: 13 }, // whiteout; a/c keeps the content
        Op::Dir {
            path: 26,
            mode: 0,
            owner: 0,
        }, // file -> dir
        Op::File {
            path: 27,
            content: 6,
            mode: 0,
            owner: 0,
        },
        Op::Cap { path: 7 },
        Op::Xattr { path: 0, value: 2 },
        Op::Chown { path: 9, owner: 1 }, // copy-up of a hardlinked file
    ];
    let names = check(&a, &b);
    for n in [".wh.b", "a/b/", "a/b/.wh..wh..opq", "a/a", "c/", "a/c"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
}
