//! Helpers shared by the layer tests: a comparable model of a directory tree.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub body: Body,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Other paths in the tree sharing this inode (non-directories only).
    pub links: Vec<PathBuf>,
    /// mtime of regular files and symlinks (directory times move as children change).
    pub mtime: Option<i64>,
}

pub type Tree = BTreeMap<PathBuf, Node>;

/// Reads every entry below `root` (not `root` itself). Overlay-private xattrs are left out.
pub fn read_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let ft = m.file_type();
        let body = if ft.is_dir() {
            Body::Dir
        } else if ft.is_symlink() {
            Body::Symlink(fs::read_link(e.path()).unwrap())
        } else if ft.is_file() {
            Body::File(fs::read(e.path()).unwrap())
        } else if ft.is_char_device() {
            Body::Char(libc::major(m.rdev()), libc::minor(m.rdev()))
        } else if ft.is_block_device() {
            Body::Block(libc::major(m.rdev()), libc::minor(m.rdev()))
        } else if ft.is_fifo() {
            Body::Fifo
        } else {
            Body::Socket
        };
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(e.path()).unwrap() {
            let n = name.to_string_lossy().into_owned();
            if n.starts_with("trusted.overlay.") {
                continue;
            }
            if let Some(v) = xattr::get(e.path(), &name).unwrap() {
                xattrs.insert(n, v);
            }
        }
        if !ft.is_dir() {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        let mtime = (ft.is_file() || ft.is_symlink()).then(|| m.mtime());
        tree.insert(
            rel,
            Node {
                body,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                xattrs,
                links: Vec::new(),
                mtime,
            },
        );
    }
    for paths in inodes.values() {
        if paths.len() > 1 {
            for p in paths {
                let others: Vec<PathBuf> = paths.iter().filter(|o| *o != p).cloned().collect();
                if let Some(n) = tree.get_mut(p) {
                    n.links = others;
                }
            }
        }
    }
    tree
}

/// Names of the entries of an uncompressed tar, in order.
pub fn tar_names(bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect()
}

pub fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn set_mtime(path: &Path, secs: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0);
}
