//! Incremental COPY of the build context: when a context COPY misses the cache, the files
//! whose source is unchanged since the previous result of the same step are hard-linked
//! from that result's upper dir instead of copied.
//!
//! - Every context COPY records a [`CopyManifest`] next to its snapshot's upper dir: for
//!   each destination file, the blake3 of the content it was copied from (the stat cache's
//!   checksum, so recording costs no reads when the cache key was just computed) and the
//!   owner, permission bits, size and mtime it was given. Only
//!   plain files are recorded: one source inode per destination (no source hardlinks) and
//!   no xattrs, so the recorded file is fully described by its content, owner, mode, size
//!   and times.
//! - On the next run, a file is linked only when its content checksum and the attributes
//!   a fresh copy would get (owner, permission bits, size, mtime with nanoseconds) equal
//!   the manifest's, AND the inode linked has those attributes (checked on the link
//!   itself, after it is made); anything else is copied as before.
//!   A linked inode is never chmod-ed, chown-ed or touched: attributes go only to fresh
//!   copies. Committed snapshots never change and overlayfs copies a lower file up before
//!   writing it, so the shared inode stays as it is in both results.
//! - The links cannot be made while the active snapshot is mounted (changing an overlay's
//!   upper dir under a mounted overlay is undefined), so [`PendingLinks::finish`] makes
//!   them once it is unmounted, then restores the times of the directories it linked into
//!   (a link changes its directory's mtime). A file going into a directory the copy did
//!   not create itself first gets an empty placeholder through the overlay, so that the
//!   directory is copied up and the path is taken, as after a full copy; `finish`
//!   replaces it. A link that fails (the previous snapshot was pruned meanwhile,
//!   `EXDEV`, a different inode) falls back to copying the file there.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fileop::{io_err, FileOpError};

/// The manifest's file name, in the snapshot's directory beside its upper dir (`fs/`), so it
/// is made before the commit and removed with the snapshot.
pub const MANIFEST_FILE: &str = "copy-manifest";

const MAGIC: &[u8] = b"STRATA-COPY-MANIFEST-2\n";
/// Path key, content digest, then uid, gid, perm (u32 each), size, mtime secs (u64/i64)
/// and mtime nanos (i64).
const ENTRY_LEN: usize = 16 + 32 + 12 + 24;
const PATH_DOMAIN: &[u8] = b"strata-copy-manifest-path-v1\0";

/// 128 bits of blake3 of a destination path: keeps a 20,000-file manifest under 1 MB.
type PathKey = [u8; 16];

fn path_key(rel: &Path) -> PathKey {
    let mut h = blake3::Hasher::new();
    h.update(PATH_DOMAIN);
    h.update(rel.as_os_str().as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&h.finalize().as_bytes()[..16]);
    key
}

/// What a context COPY wrote: destination path (relative to the root filesystem, as in the
/// snapshot's upper dir) -> blake3 of the content copied there, and the attributes the
/// copy got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyManifest {
    entries: HashMap<PathKey, Copied>,
}

/// One recorded file: its content's blake3 and the attributes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    pub digest: [u8; 32],
    pub uid: u32,
    pub gid: u32,
    pub perm: u32,
    pub size: u64,
    pub mtime: (i64, i64),
}

impl Copied {
    pub(crate) fn new(digest: [u8; 32], a: &FileAttrs) -> Self {
        Copied {
            digest,
            uid: a.uid,
            gid: a.gid,
            perm: a.perm,
            size: a.size,
            mtime: a.mtime,
        }
    }
}

impl CopyManifest {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn insert(&mut self, rel: &Path, copied: Copied) {
        self.entries.insert(path_key(rel), copied);
    }

    pub(crate) fn remove(&mut self, rel: &Path) {
        self.entries.remove(&path_key(rel));
    }

    pub fn get(&self, rel: &Path) -> Option<&Copied> {
        self.entries.get(&path_key(rel))
    }

    /// Magic, count, sorted entries, then a blake3 of all of it: a torn or corrupt file is
    /// detected on load and simply not used.
    pub fn encode(&self) -> Vec<u8> {
        let mut sorted: Vec<_> = self.entries.iter().collect();
        sorted.sort_by_key(|(k, _)| **k);
        let mut out = Vec::with_capacity(MAGIC.len() + 8 + sorted.len() * ENTRY_LEN + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
        for (k, c) in sorted {
            out.extend_from_slice(k);
            out.extend_from_slice(&c.digest);
            out.extend_from_slice(&c.uid.to_le_bytes());
            out.extend_from_slice(&c.gid.to_le_bytes());
            out.extend_from_slice(&c.perm.to_le_bytes());
            out.extend_from_slice(&c.size.to_le_bytes());
            out.extend_from_slice(&c.mtime.0.to_le_bytes());
            out.extend_from_slice(&c.mtime.1.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let rest = body.strip_prefix(MAGIC)?;
        let (count, rest) = rest.split_at_checked(8)?;
        let count = usize::try_from(u64::from_le_bytes(count.try_into().ok()?)).ok()?;
        if rest.len() != count.checked_mul(ENTRY_LEN)? {
            return None;
        }
        let mut entries = HashMap::with_capacity(count);
        for chunk in rest.chunks_exact(ENTRY_LEN) {
            let (k, c) = chunk.split_at(16);
            let (digest, c) = c.split_at(32);
            let u32_at = |i: usize| Some(u32::from_le_bytes(c.get(i..i + 4)?.try_into().ok()?));
            let u64_at = |i: usize| Some(u64::from_le_bytes(c.get(i..i + 8)?.try_into().ok()?));
            let copied = Copied {
                digest: digest.try_into().ok()?,
                uid: u32_at(0)?,
                gid: u32_at(4)?,
                perm: u32_at(8)?,
                size: u64_at(12)?,
                mtime: (u64_at(20)? as i64, u64_at(28)? as i64),
            };
            entries.insert(k.try_into().ok()?, copied);
        }
        Some(CopyManifest { entries })
    }

    /// The manifest stored at `path`; `None` when missing, torn or corrupt.
    pub fn load(path: &Path) -> Option<Self> {
        Self::decode(&fs::read(path).ok()?)
    }

    /// Writes the manifest (temp file + rename). No fsync: the snapshot's own files are not
    /// synced either, a torn manifest fails its checksum and is ignored, and every linked
    /// file is checked against the previous inode's size and times anyway.
    pub fn save(&self, path: &Path) -> Result<(), FileOpError> {
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        fs::write(&tmp, self.encode()).map_err(io_err("write copy manifest", &tmp))?;
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("write copy manifest", path)(e)
        })
    }
}

/// What a fresh copy gives a file: owner, permission bits (incl. setuid/setgid/sticky),
/// size and times. A previous inode stands for a copy only if all of these but the access
/// time (never part of an image) are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileAttrs {
    pub uid: u32,
    pub gid: u32,
    pub perm: u32,
    pub size: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

/// The previous result of the same step: its upper dir and manifest.
pub struct PreviousCopy {
    upper: PathBuf,
    root: OwnedFd,
    manifest: CopyManifest,
}

impl std::fmt::Debug for PreviousCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviousCopy")
            .field("upper", &self.upper)
            .field("entries", &self.manifest.len())
            .finish()
    }
}

impl PreviousCopy {
    /// Opens the previous result's upper dir (kept open, so paths below it resolve from it).
    pub fn open(upper: &Path, manifest: CopyManifest) -> Result<Self, FileOpError> {
        let root = File::open(upper).map_err(io_err("open previous result", upper))?;
        Ok(PreviousCopy {
            upper: upper.to_path_buf(),
            root: OwnedFd::from(root),
            manifest,
        })
    }

    pub fn upper(&self) -> &Path {
        &self.upper
    }

    pub fn manifest(&self) -> &CopyManifest {
        &self.manifest
    }
}

/// Whether the previous result's file at `rel` was copied from content `digest` with
/// `attrs`, as the manifest says: then a link of it stands for a fresh copy.
/// [`PendingLinks::finish`] checks the attributes again on the inode it links (a stat
/// now would only be repeated there).
pub(crate) fn linkable(
    prev: &PreviousCopy,
    rel: &Path,
    digest: &[u8; 32],
    attrs: &FileAttrs,
) -> bool {
    prev.manifest.get(rel) == Some(&Copied::new(*digest, attrs))
}

/// Whether an inode is a regular file with the attributes a fresh copy gets.
fn same_attrs(st: &libc::stat, attrs: &FileAttrs) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
        && st.st_mode & 0o7777 == attrs.perm
        && st.st_uid == attrs.uid
        && st.st_gid == attrs.gid
        && u64::try_from(st.st_size).ok() == Some(attrs.size)
        && (st.st_mtime, st.st_mtime_nsec) == attrs.mtime
}

struct PendingLink {
    /// The source file's directory, shared by the links of its files.
    src_dir: Arc<Path>,
    /// The source file's name when it is not the destination's (a file copied to a
    /// new name).
    src_name: Option<Box<OsStr>>,
    attrs: FileAttrs,
    /// Whether the copy left an empty file at the path (else nothing is there).
    placeholder: bool,
}

impl PendingLink {
    fn src(&self, name: &OsStr) -> PathBuf {
        self.src_dir.join(self.src_name.as_deref().unwrap_or(name))
    }
}

/// The files pending in one directory, by name, in the order the copy visited them.
type DirLinks = Vec<(Box<OsStr>, PendingLink)>;

/// Files a copy left to be linked from the previous result, by destination directory in
/// the order the copy visited them (a 20,000-file copy keeps about 150 bytes per file).
#[derive(Default)]
pub struct PendingLinks {
    dirs: Vec<(PathBuf, DirLinks)>,
    index: HashMap<PathBuf, usize>,
    src_dir: Option<Arc<Path>>,
}

/// What [`PendingLinks::finish`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkReport {
    pub linked: usize,
    /// Files whose link failed and that were copied instead.
    pub copied: usize,
}

fn split(path: &Path) -> Option<(&Path, &OsStr)> {
    Some((path.parent().unwrap_or(Path::new("")), path.file_name()?))
}

impl PendingLinks {
    pub fn len(&self) -> usize {
        self.dirs.iter().map(|(_, f)| f.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.iter().all(|(_, f)| f.is_empty())
    }

    /// The files pending in `dir` (copies visit one directory's files in a row).
    fn group(&mut self, dir: &Path) -> &mut DirLinks {
        let i = match self.dirs.last() {
            Some((d, _)) if d == dir => self.dirs.len() - 1,
            _ => match self.index.get(dir) {
                Some(i) => *i,
                None => {
                    self.dirs.push((dir.to_path_buf(), Vec::new()));
                    self.index.insert(dir.to_path_buf(), self.dirs.len() - 1);
                    self.dirs.len() - 1
                }
            },
        };
        &mut self.dirs[i].1
    }

    /// Adds the file at `rel`, which must not be pending already (see [`Self::cancel`]).
    pub(crate) fn add(&mut self, rel: &Path, src: &Path, attrs: FileAttrs, placeholder: bool) {
        let (Some((dir, name)), Some((sdir, sname))) = (split(rel), split(src)) else {
            return;
        };
        let src_dir = match &self.src_dir {
            Some(d) if **d == *sdir => d.clone(),
            _ => {
                let d: Arc<Path> = Arc::from(sdir);
                self.src_dir = Some(d.clone());
                d
            }
        };
        let link = PendingLink {
            src_dir,
            src_name: (sname != name).then(|| Box::from(sname)),
            attrs,
            placeholder,
        };
        self.group(dir).push((Box::from(name), link));
    }

    /// Drops the pending link at `rel`: something else is written there. A scan of its
    /// directory, so only called when something was in the way.
    pub(crate) fn cancel(&mut self, rel: &Path) {
        if let Some((dir, name)) = split(rel) {
            if let Some(&i) = self.index.get(dir) {
                self.dirs[i].1.retain(|(n, _)| **n != *name);
            }
        }
    }

    /// Replaces each placeholder in `upper` (the new result's upper dir, no longer
    /// mounted) by a link of the previous result's file, or by a fresh copy of the source
    /// when the link cannot be made. The directories' times are put back as the copy left
    /// them (a link changes its directory's mtime).
    pub fn finish(&self, upper: &Path, prev: &PreviousCopy) -> Result<LinkReport, FileOpError> {
        use rayon::prelude::*;
        let root = OwnedFd::from(File::open(upper).map_err(io_err("open", upper))?);
        // Directories are independent (a link changes only its own directory), so they
        // are linked on all cores.
        let reports = self
            .dirs
            .par_iter()
            .filter(|(_, f)| !f.is_empty())
            .map(|(dir, files)| link_dir(&root, upper, prev, dir, files))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(reports
            .iter()
            .fold(LinkReport::default(), |a, r| LinkReport {
                linked: a.linked + r.linked,
                copied: a.copied + r.copied,
            }))
    }
}

/// [`PendingLinks::finish`] for the files of one directory.
fn link_dir(
    root: &OwnedFd,
    upper: &Path,
    prev: &PreviousCopy,
    dir: &Path,
    files: &DirLinks,
) -> Result<LinkReport, FileOpError> {
    let mut report = LinkReport::default();
    let abs_dir = upper.join(dir);
    let dfd = open_beneath(root, dir, libc::O_RDONLY | libc::O_DIRECTORY)
        .map_err(io_err("open", &abs_dir))?;
    let times = fstat(&dfd).map_err(io_err("stat", &abs_dir))?;
    let prev_dir = open_beneath(&prev.root, dir, libc::O_PATH | libc::O_DIRECTORY).ok();
    for (name, link) in files {
        let path = abs_dir.join(&**name);
        let c = cstr(name).map_err(io_err("link", &path))?;
        if link.placeholder {
            // Only ever our own empty placeholder is replaced.
            match stat_at(&dfd, name).map_err(io_err("stat", &path))? {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 => {}
                _ => {
                    return Err(FileOpError::Io {
                        action: "link",
                        path,
                        source: io::Error::other("the placeholder changed"),
                    })
                }
            }
            // SAFETY: valid directory fd and NUL-terminated name.
            check(unsafe { libc::unlinkat(dfd.as_raw_fd(), c.as_ptr(), 0) })
                .map_err(io_err("remove", &path))?;
        }
        if prev_dir
            .as_ref()
            .is_some_and(|p| link_from(p, &dfd, &c, link))
        {
            report.linked += 1;
        } else {
            copy_into(&dfd, &c, &path, &link.src(name), &link.attrs)?;
            report.copied += 1;
        }
    }
    let ts = [timespec(times.0), timespec(times.1)];
    // SAFETY: valid fd and a two-element timespec array.
    check(unsafe { libc::futimens(dfd.as_raw_fd(), ts.as_ptr()) })
        .map_err(io_err("set times of", &abs_dir))?;
    // The links are made after the overlay's unmount, whose sync covered the rest of the
    // copy: they must be on disk before the snapshot is committed, or a crash could leave
    // a cache record for a snapshot missing files. (On ext4 the first fsync commits the
    // journal with every directory's links; the others find nothing left.)
    // SAFETY: fsync on a directory descriptor this function owns.
    check(unsafe { libc::fsync(dfd.as_raw_fd()) }).map_err(io_err("sync", &abs_dir))?;
    Ok(report)
}

/// Links `name` of `from` to `name` in `to`, and keeps it only if that inode is a regular
/// file with the attributes a fresh copy would get.
fn link_from(from: &OwnedFd, to: &OwnedFd, name: &CString, link: &PendingLink) -> bool {
    // SAFETY: valid directory fds and NUL-terminated names; flags 0 never follows a link.
    let rc = unsafe {
        libc::linkat(
            from.as_raw_fd(),
            name.as_ptr(),
            to.as_raw_fd(),
            name.as_ptr(),
            0,
        )
    };
    if rc != 0 {
        return false;
    }
    match stat_at(to, OsStr::from_bytes(name.as_bytes())) {
        Ok(Some(st)) if same_attrs(&st, &link.attrs) => true,
        _ => {
            // SAFETY: as above.
            unsafe { libc::unlinkat(to.as_raw_fd(), name.as_ptr(), 0) };
            false
        }
    }
}

/// A fresh copy, as the copier makes it: content, then owner, then mode (chown clears
/// setuid bits), then times. The source had no xattrs (or it would not be linkable).
fn copy_into(
    dir: &OwnedFd,
    name: &CString,
    path: &Path,
    src: &Path,
    a: &FileAttrs,
) -> Result<(), FileOpError> {
    let mut input = File::open(src).map_err(io_err("open", src))?;
    // SAFETY: valid directory fd and name; O_EXCL|O_NOFOLLOW never opens an existing file.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io_err("create", path)(io::Error::last_os_error()));
    }
    // SAFETY: the fd was just returned by openat and is owned by nothing else.
    let mut out = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    io::copy(&mut input, &mut out).map_err(io_err("copy to", path))?;
    // SAFETY: valid fd of the file just created.
    check(unsafe { libc::fchown(out.as_raw_fd(), a.uid, a.gid) }).map_err(io_err("chown", path))?;
    // SAFETY: as above.
    check(unsafe { libc::fchmod(out.as_raw_fd(), a.perm) }).map_err(io_err("chmod", path))?;
    let ts = [timespec(a.atime), timespec(a.mtime)];
    // SAFETY: valid fd and a two-element timespec array.
    check(unsafe { libc::futimens(out.as_raw_fd(), ts.as_ptr()) })
        .map_err(io_err("set times of", path))?;
    // Written after the unmount's sync, like the links (see `link_dir`).
    out.sync_all().map_err(io_err("sync", path))
}

fn timespec((secs, nanos): (i64, i64)) -> libc::timespec {
    libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(b: &OsStr) -> io::Result<CString> {
    CString::new(b.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

/// Opens `rel` below `root` with openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: no
/// component may be a symlink or climb out, so a path of one snapshot never leads into
/// another or onto the host.
fn open_beneath(root: &OwnedFd, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    strata_snapshotter::sys::openat2(
        root,
        rel.as_os_str().as_bytes(),
        flags,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
}

/// lstat of `name` in `dir`; `None` when it does not exist.
fn stat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    // SAFETY: stat is plain data filled in by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, writable stat buffer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(Some(st));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(err)
    }
}

/// (atime, mtime) of an open file.
fn fstat(fd: &OwnedFd) -> io::Result<((i64, i64), (i64, i64))> {
    // SAFETY: stat is plain data filled in by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a writable stat buffer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
    ))
}
