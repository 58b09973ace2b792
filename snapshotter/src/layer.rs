//! Layers: OCI layer tar <-> a snapshot's upper directory.
//!
//! On disk a snapshot uses overlayfs' own format (a whiteout is a 0:0 char device, an
//! opaque dir has `trusted.overlay.opaque=y`); in a layer tar they are OCI's `.wh.<name>`
//! and `.wh..wh..opq`.
//!
//! Extraction never leaves `dest`: every parent directory is opened with openat2(2)
//! `RESOLVE_IN_ROOT`, so `..` and symlinks (absolute or relative) resolve as if `dest` were
//! `/`, and the final component is created relative to that directory fd without following
//! it. Entries naming `..` are refused outright.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use strata_dag::Digest;

use crate::{Error, Result};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR: &str = "SCHILY.xattr.";

/// What applying a layer produced.
#[derive(Clone, Debug)]
pub struct Applied {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    pub uncompressed_size: u64,
}

/// Options for writing a layer tar.
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// Clamp every entry's mtime to at most this (BuildKit's rewrite-timestamp).
    pub source_date_epoch: Option<i64>,
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

fn unsafe_entry(path: &[u8], reason: &str) -> Error {
    Error::UnsafeEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.to_string(),
    }
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

/// openat2(dirfd, path, O_PATH|O_DIRECTORY) with `dirfd` acting as the root.
fn open_in_root(root: &OwnedFd, path: &[u8]) -> io::Result<OwnedFd> {
    crate::sys::openat2(
        root,
        path,
        libc::O_PATH | libc::O_DIRECTORY,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

/// Opens the directory `comps` inside root, creating missing components (mode 0755).
fn resolve_dir(root: &OwnedFd, comps: &[&[u8]], create: bool) -> io::Result<OwnedFd> {
    let mut cur = open_in_root(root, b"")?;
    for i in 0..comps.len() {
        let prefix = join(&comps[..=i]);
        cur = match open_in_root(root, &prefix) {
            Ok(fd) => fd,
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                let name = cstr(comps[i])?;
                // SAFETY: valid dir fd and NUL-terminated name.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                    let err = last_err();
                    if err.kind() != io::ErrorKind::AlreadyExists {
                        return Err(err);
                    }
                }
                open_in_root(root, &prefix)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(cur)
}

fn proc_path(dir: &OwnedFd, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: stat is plain data filled in by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, writable stat buffer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(Some(st));
    }
    let err = last_err();
    if err.kind() == io::ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(err)
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Removes whatever `name` is in `dir` (a directory recursively, never following links).
fn remove_at(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    match lstat_at(dir, &c)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => fs::remove_dir_all(proc_path(dir, name)),
        Some(_) => {
            // SAFETY: valid fd and NUL-terminated name.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                return Err(last_err());
            }
            Ok(())
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

/// Splits an entry path into components, dropping a leading `/` and `.` parts; `None`
/// when it names `..`.
fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[derive(Default)]
struct Meta {
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: (i64, i64),
    xattrs: Vec<(String, Vec<u8>)>,
}

fn parse_pax_time(v: &str) -> Option<(i64, i64)> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: i64 = digits.parse().unwrap_or(0);
    Some((secs, nanos))
}

/// Extended header data (PAX `x`, GNU `L`/`K`) that applies to the next real entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    pax: Vec<(String, Vec<u8>)>,
}

/// Parses PAX records (`<len> <key>=<value>\n`). Values are binary-safe: the length
/// prefix, not a newline, ends a record (xattr values often contain `\n`).
fn parse_pax(data: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed pax record");
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let sp = rest.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > rest.len() {
            return Err(bad());
        }
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").ok_or_else(bad)?;
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let key = String::from_utf8(record[..eq].to_vec()).map_err(|_| bad())?;
        out.push((key, record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// A numeric header field; all-blank counts as 0 (as Go's archive/tar reads it).
fn num(field: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if field.iter().all(|b| *b == 0 || *b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

fn entry_meta(h: &tar::Header, pax: &[(String, Vec<u8>)]) -> io::Result<Meta> {
    let old = h.as_old();
    let mtime = num(&old.mtime, h.mtime())?;
    let mut m = Meta {
        uid: num(&old.uid, h.uid())?,
        gid: num(&old.gid, h.gid())?,
        mode: u32::try_from(num(&old.mode, h.mode().map(u64::from))?).unwrap_or(0) & 0o7777,
        mtime: (i64::try_from(mtime).unwrap_or(0), 0),
        xattrs: Vec::new(),
    };
    for (key, value) in pax {
        let text = std::str::from_utf8(value).unwrap_or("");
        match key.as_str() {
            "uid" => m.uid = text.parse().unwrap_or(m.uid),
            "gid" => m.gid = text.parse().unwrap_or(m.gid),
            "mtime" => m.mtime = parse_pax_time(text).unwrap_or(m.mtime),
            k => {
                if let Some(name) = k.strip_prefix(PAX_XATTR) {
                    m.xattrs.push((name.to_string(), value.clone()));
                }
            }
        }
    }
    Ok(m)
}

fn read_all<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    entry.read_to_end(&mut v)?;
    Ok(v)
}

fn set_times(dir: &OwnedFd, name: &CStr, (secs, nanos): (i64, i64)) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    let times = [ts, ts];
    // SAFETY: valid fd, name and a two-element timespec array.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Owner, then mode (chown clears setuid bits), then xattrs (chown clears capabilities).
fn set_meta(dir: &OwnedFd, name: &[u8], meta: &Meta, symlink: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let uid = u32::try_from(meta.uid).map_err(|_| io::Error::other("uid out of range"))?;
    let gid = u32::try_from(meta.gid).map_err(|_| io::Error::other("gid out of range"))?;
    // SAFETY: valid fd and NUL-terminated name; never follows a final symlink.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    if !symlink {
        // SAFETY: as above; the entry was just created by us and is not a symlink.
        check(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), meta.mode, 0) })?;
    }
    for (k, v) in &meta.xattrs {
        match xattr::set(proc_path(dir, name), k, v) {
            Ok(()) => {}
            // As Docker does: an xattr the filesystem cannot hold (or `user.*` on a
            // symlink, which Linux forbids) is dropped rather than failing the layer.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTSUP)
                    || (symlink && e.raw_os_error() == Some(libc::EPERM)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Applies a layer (gzip, zstd or plain tar, detected by magic bytes) into `dest`, the
/// upper dir of an active snapshot, converting OCI whiteouts to overlay whiteouts. Entries
/// that would escape `dest` are refused.
pub fn apply_layer(layer: impl Read, dest: &Path) -> Result<Applied> {
    let mut layer = layer;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match layer.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read layer", e)),
        }
    }
    let prefixed = Cursor::new(magic[..got].to_vec()).chain(layer);
    let decoded: Box<dyn Read> = if magic[..got].starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(prefixed))
    } else if magic[..got] == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::new(prefixed)
                .map_err(|e| Error::io("start zstd decoder", e))?,
        )
    } else {
        Box::new(prefixed)
    };
    let mut archive = tar::Archive::new(HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
        count: 0,
    });
    let root_file = fs::File::open(dest)
        .map_err(|e| Error::io(format!("open layer destination {}", dest.display()), e))?;
    let root = OwnedFd::from(root_file);
    let mut dir_times: Vec<(Vec<u8>, (i64, i64))> = Vec::new();
    // Raw entries: the tar crate's own PAX parsing splits records at newlines, which
    // corrupts binary xattr values, so extended headers are handled here.
    let mut pending = Pending::default();
    for entry in archive
        .entries()
        .map_err(|e| Error::io("read layer tar", e))?
        .raw(true)
    {
        let mut entry = entry.map_err(|e| Error::io("read layer tar entry", e))?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::XHeader => {
                let data = read_all(&mut entry).map_err(|e| Error::io("read pax header", e))?;
                for (k, v) in parse_pax(&data).map_err(|e| Error::io("read pax header", e))? {
                    match k.as_str() {
                        "path" => pending.path = Some(v),
                        "linkpath" => pending.linkpath = Some(v),
                        _ => pending.pax.push((k, v)),
                    }
                }
            }
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                let mut data =
                    read_all(&mut entry).map_err(|e| Error::io("read gnu long name", e))?;
                while data.last() == Some(&0) {
                    data.pop();
                }
                if kind == tar::EntryType::GNULongName {
                    pending.path = Some(data);
                } else {
                    pending.linkpath = Some(data);
                }
            }
            tar::EntryType::XGlobalHeader => {
                read_all(&mut entry).map_err(|e| Error::io("read pax global header", e))?;
            }
            _ => {
                let ext = std::mem::take(&mut pending);
                apply_entry(&root, &mut entry, ext, &mut dir_times)?;
            }
        }
    }
    // Directory times last: creating their children would have bumped them.
    for (path, t) in dir_times.iter().rev() {
        let Some(comps) = components(path) else {
            continue;
        };
        let Some((name, parents)) = comps.split_last() else {
            continue;
        };
        let r = resolve_dir(&root, parents, false).and_then(|d| set_times(&d, &cstr(name)?, *t));
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("set times of {}", String::from_utf8_lossy(path)),
                    e,
                ))
            }
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| Error::io("read layer trailer", e))?;
    Ok(Applied {
        diff_id: crate::sha256_digest(rest.hasher),
        uncompressed_size: rest.count,
    })
}

fn apply_entry<R: Read>(
    root: &OwnedFd,
    entry: &mut tar::Entry<'_, R>,
    ext: Pending,
    dir_times: &mut Vec<(Vec<u8>, (i64, i64))>,
) -> Result<()> {
    let path = ext.path.unwrap_or_else(|| entry.path_bytes().into_owned());
    let link_name = ext
        .linkpath
        .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
    let io_err = |action: &str, e: io::Error| {
        Error::io(format!("{action} {}", String::from_utf8_lossy(&path)), e)
    };
    let kind = entry.header().entry_type();
    // Entries are read raw (see apply_layer), so the tar crate neither expands sparse
    // files nor applies a PAX size; refuse them rather than write wrong data.
    let header_size = entry.header().size().unwrap_or(0).to_string();
    if kind == tar::EntryType::GNUSparse
        || ext.pax.iter().any(|(k, v)| {
            (k == "size" && v.as_slice() != header_size.as_bytes()) || k.starts_with("GNU.sparse.")
        })
    {
        return Err(Error::InvalidArgument(format!(
            "layer entry {:?}: sparse files and pax sizes are not supported",
            String::from_utf8_lossy(&path)
        )));
    }
    let comps = components(&path).ok_or_else(|| unsafe_entry(&path, "path contains \"..\""))?;
    let Some((&name, parents)) = comps.split_last() else {
        // The layer root itself: `dest` keeps its own metadata.
        return Ok(());
    };
    if comps
        .iter()
        .any(|c| c.starts_with(b".wh..wh.") && *c != OPAQUE_MARKER)
    {
        // aufs metadata (`.wh..wh.plnk/…`, `.wh..wh.aufs`): nothing to create, as in Docker.
        return Ok(());
    }
    let parent =
        resolve_dir(root, parents, true).map_err(|e| io_err("create parent directory of", e))?;
    let meta = entry_meta(entry.header(), &ext.pax).map_err(|e| io_err("read header of", e))?;

    if name == OPAQUE_MARKER {
        xattr::set(proc_path(&parent, b"."), OPAQUE_XATTR, b"y")
            .map_err(|e| io_err("mark opaque", e))?;
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(unsafe_entry(&path, "whiteout names no file"));
        }
        remove_at(&parent, hidden).map_err(|e| io_err("replace", e))?;
        let c = cstr(hidden).map_err(|e| io_err("whiteout", e))?;
        // SAFETY: valid fd and name; a 0:0 char device is overlayfs' whiteout.
        check(unsafe { libc::mknodat(parent.as_raw_fd(), c.as_ptr(), libc::S_IFCHR, 0) })
            .map_err(|e| io_err("create whiteout for", e))?;
        // Owner and time as recorded, so the layer written back is byte-identical.
        let wmeta = Meta {
            mode: 0,
            xattrs: Vec::new(),
            ..meta
        };
        set_meta(&parent, hidden, &wmeta, false).map_err(|e| io_err("set metadata of", e))?;
        set_times(&parent, &c, wmeta.mtime).map_err(|e| io_err("set times of", e))?;
        return Ok(());
    }

    let cname = cstr(name).map_err(|e| io_err("create", e))?;
    let existing = lstat_at(&parent, &cname).map_err(|e| io_err("stat", e))?;
    if kind.is_dir() {
        if !existing.as_ref().is_some_and(is_dir) {
            remove_at(&parent, name).map_err(|e| io_err("replace", e))?;
            // SAFETY: valid fd and name.
            check(unsafe { libc::mkdirat(parent.as_raw_fd(), cname.as_ptr(), 0o700) })
                .map_err(|e| io_err("create directory", e))?;
        }
        set_meta(&parent, name, &meta, false).map_err(|e| io_err("set metadata of", e))?;
        dir_times.push((path.clone(), meta.mtime));
        return Ok(());
    }
    if existing.is_some() {
        remove_at(&parent, name).map_err(|e| io_err("replace", e))?;
    }
    let pfd = parent.as_raw_fd();
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            // SAFETY: valid fd and name; O_EXCL|O_NOFOLLOW never opens an existing link.
            let fd = unsafe {
                libc::openat(
                    pfd,
                    cname.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(io_err("create file", last_err()));
            }
            // SAFETY: the fd was just returned by openat.
            let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            io::copy(entry, &mut file).map_err(|e| io_err("write file", e))?;
        }
        tar::EntryType::Symlink => {
            let target = link_name
                .as_deref()
                .ok_or_else(|| unsafe_entry(&path, "symlink without target"))?;
            let t = cstr(target).map_err(|e| io_err("create symlink", e))?;
            // SAFETY: valid fd and NUL-terminated strings.
            check(unsafe { libc::symlinkat(t.as_ptr(), pfd, cname.as_ptr()) })
                .map_err(|e| io_err("create symlink", e))?;
        }
        tar::EntryType::Link => {
            let target = link_name
                .as_deref()
                .ok_or_else(|| unsafe_entry(&path, "hardlink without target"))?;
            let tcomps = components(target)
                .ok_or_else(|| unsafe_entry(&path, "hardlink target contains \"..\""))?;
            let Some((&tname, tparents)) = tcomps.split_last() else {
                return Err(unsafe_entry(&path, "hardlink to the layer root"));
            };
            let tdir = resolve_dir(root, tparents, false)
                .map_err(|e| io_err("resolve hardlink target of", e))?;
            let tc = cstr(tname).map_err(|e| io_err("create hardlink", e))?;
            // SAFETY: valid fds and names; flags 0 links a final symlink itself.
            check(unsafe { libc::linkat(tdir.as_raw_fd(), tc.as_ptr(), pfd, cname.as_ptr(), 0) })
                .map_err(|e| io_err("create hardlink", e))?;
            // The inode's metadata came with its first entry.
            return Ok(());
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let h = entry.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            let ftype = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let dev = libc::makedev(major, minor);
            // SAFETY: valid fd and name.
            check(unsafe { libc::mknodat(pfd, cname.as_ptr(), ftype | 0o600, dev) })
                .map_err(|e| io_err("create device", e))?;
        }
        // Other types (sockets do not exist in tar; vendor extensions) carry no file.
        _ => return Ok(()),
    }
    let symlink = kind == tar::EntryType::Symlink;
    set_meta(&parent, name, &meta, symlink).map_err(|e| io_err("set metadata of", e))?;
    set_times(&parent, &cname, meta.mtime).map_err(|e| io_err("set times of", e))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Write
// ---------------------------------------------------------------------------------------

struct TarOut<W: Write> {
    out: HashingWriter<W>,
    /// (dev, ino) of multiply-linked files already written -> their tar path, as a range
    /// of `link_paths` (one buffer: after an incremental COPY every file of a 20,000-file
    /// layer has a second link, in the previous snapshot).
    links: HashMap<(u64, u64), (usize, usize)>,
    link_paths: Vec<u8>,
    epoch: Option<i64>,
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len = base + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// Stores `path` in the ustar name/prefix fields; false when it does not fit.
fn set_ustar_path(h: &mut tar::Header, path: &[u8]) -> bool {
    let Some(u) = h.as_ustar_mut() else {
        return false;
    };
    if path.len() <= u.name.len() {
        u.name[..path.len()].copy_from_slice(path);
        return true;
    }
    // Split at a '/' so the prefix holds at most 155 bytes and the name at most 100.
    for (i, b) in path.iter().enumerate() {
        if *b == b'/' && i <= u.prefix.len() && path.len() - i - 1 <= u.name.len() && i > 0 {
            let name = &path[i + 1..];
            if name.is_empty() {
                continue;
            }
            u.prefix[..i].copy_from_slice(&path[..i]);
            u.name[..name.len()].copy_from_slice(name);
            return true;
        }
    }
    let n = u.name.len();
    u.name.copy_from_slice(&path[..n]);
    false
}

fn pad(len: u64) -> usize {
    // Always < 512, so the cast cannot truncate.
    ((512 - (len % 512)) % 512) as usize
}

impl<W: Write> TarOut<W> {
    fn clamp(&self, mtime: i64) -> u64 {
        let t = match self.epoch {
            Some(e) if mtime > e => e,
            _ => mtime,
        };
        u64::try_from(t).unwrap_or(0)
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("write layer tar", e))
    }

    /// Writes one entry: a PAX header when needed, the ustar header, then `data`.
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        meta: &fs::Metadata,
        mode: u32,
        link: Option<&[u8]>,
        xattrs: &[(String, Vec<u8>)],
        data: Option<(Content, &Path, u64)>,
    ) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        h.set_mtime(self.clamp(meta.mtime()));
        h.set_size(data.as_ref().map_or(0, |(_, _, n)| *n));
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            let rdev = meta.rdev();
            h.set_device_major(libc::major(rdev))
                .map_err(|e| Error::io("set device number", e))?;
            h.set_device_minor(libc::minor(rdev))
                .map_err(|e| Error::io("set device number", e))?;
        }
        let mut records = Vec::new();
        if !set_ustar_path(&mut h, path) {
            records.extend(pax_record("path", path));
        }
        if let Some(l) = link {
            if l.len() <= 100 {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            } else {
                h.as_old_mut().linkname.copy_from_slice(&l[..100]);
                records.extend(pax_record("linkpath", l));
            }
        }
        for (k, v) in xattrs {
            records.extend(pax_record(&format!("{PAX_XATTR}{k}"), v));
        }
        if !records.is_empty() {
            let mut ph = tar::Header::new_ustar();
            ph.set_entry_type(tar::EntryType::XHeader);
            set_ustar_path(&mut ph, b"PaxHeader");
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(records.len() as u64);
            ph.set_cksum();
            self.raw(ph.as_bytes())?;
            self.raw(&records)?;
            self.raw(&[0u8; 512][..pad(records.len() as u64)])?;
        }
        h.set_cksum();
        self.raw(h.as_bytes())?;
        if let Some((content, src, size)) = data {
            let copied = match content {
                Content::Read(bytes) => {
                    self.raw(&bytes)?;
                    bytes.len() as u64
                }
                Content::Later => {
                    let f = open_path_regular(src).ok_or_else(|| {
                        Error::io(
                            format!("open {}", src.display()),
                            io::Error::other("no longer a regular file"),
                        )
                    })?;
                    io::copy(&mut f.take(size), &mut self.out)
                        .map_err(|e| Error::io(format!("copy {}", src.display()), e))?
                }
            };
            if copied != size {
                return Err(Error::io(
                    format!("copy {}", src.display()),
                    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while read"),
                ));
            }
            self.raw(&[0u8; 512][..pad(size)])?;
        }
        Ok(())
    }
}

/// The xattrs worth carrying in a layer, sorted; overlayfs' private ones stay behind.
fn layer_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    layer_xattrs_with(path, xattr::list(path), |name| xattr::get(path, name))
}

/// [`layer_xattrs`] of an open file (no path lookups).
fn layer_xattrs_of(file: &fs::File, path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    use xattr::FileExt;
    layer_xattrs_with(path, file.list_xattr(), |name| file.get_xattr(name))
}

fn layer_xattrs_with<I: Iterator<Item = std::ffi::OsString>>(
    path: &Path,
    names: io::Result<I>,
    get: impl Fn(&OsStr) -> io::Result<Option<Vec<u8>>>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let names = match names {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(Error::io(format!("list xattrs of {}", path.display()), e)),
    };
    for name in names {
        let Some(n) = name.to_str() else { continue };
        if n == "trusted.overlay.metacopy" || n == "trusted.overlay.redirect" {
            // The data or the contents live in another layer: an upper made with
            // metacopy=on or redirect_dir=on cannot be written as a standalone layer.
            return Err(Error::InvalidArgument(format!(
                "{} carries {n}; mount overlays with metacopy=off and redirect_dir=off",
                path.display()
            )));
        }
        if n.starts_with("trusted.overlay.") {
            continue;
        }
        if let Some(v) =
            get(&name).map_err(|e| Error::io(format!("read xattr of {}", path.display()), e))?
        {
            out.push((n.to_string(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the regular file `name` of `dir` for reading without following a symlink,
/// blocking on a FIFO or touching its access time (a layer export reads every file of
/// the snapshot: on relatime mounts an atime update is a journal write per file). `None`
/// when it is no longer a regular file there.
fn open_regular(dir: &fs::File, name: &OsStr) -> Option<fs::File> {
    let c = CString::new(name.as_bytes()).ok()?;
    let base = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    for flags in [base | libc::O_NOATIME, base] {
        // SAFETY: valid directory fd and NUL-terminated name.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd to us.
            return Some(fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        // O_NOATIME needs ownership (or CAP_FOWNER); without it, open plainly.
        if io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            return None;
        }
    }
    None
}

fn is_opaque(path: &Path) -> Result<bool> {
    match xattr::get(path, OPAQUE_XATTR) {
        Ok(v) => Ok(v.as_deref() == Some(b"y")),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(false),
        Err(e) => Err(Error::io(format!("read xattr of {}", path.display()), e)),
    }
}

// The walk is split in two threads: a reader that does all the filesystem work (listing,
// stats, xattrs, reading small files), a directory at a time and ahead of the tar, and the
// writer that formats and hashes the entries. For a tree of small files the syscalls are
// most of an export, and they then overlap with the hashing.

/// One entry of a directory as the reader found it.
struct Child {
    name: std::ffi::OsString,
    meta: fs::Metadata,
    kind: ChildKind,
}

enum ChildKind {
    Whiteout,
    /// Its own listing is the next one the reader sends.
    Dir {
        xattrs: Vec<(String, Vec<u8>)>,
        opaque: bool,
    },
    Symlink {
        target: std::path::PathBuf,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Regular {
        xattrs: Vec<(String, Vec<u8>)>,
        content: Content,
    },
    Node {
        kind: tar::EntryType,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    /// Sockets cannot be carried in a tar.
    Skip,
}

enum Content {
    Read(Vec<u8>),
    /// Too big to hold ahead: the writer opens and reads it when it gets there (keeping
    /// every such file open meanwhile could run out of descriptors in a big directory).
    Later,
}

/// Directory listings handed from the reader to the writer, in the order the writer
/// visits directories (depth first, children sorted by name).
type Listing = Result<Vec<Child>>;

/// Listings the reader may be ahead by, and the file data one listing holds at most
/// (files past it, and any file over [`READ_WHOLE_MAX`], are read by the writer).
const LISTINGS_AHEAD: usize = 2;
const LISTING_DATA_MAX: usize = 4 << 20;
const READ_WHOLE_MAX: u64 = 256 << 10;

/// Sends the listing of `dir`, then those of its subdirectories in order; false once the
/// writer is gone or a listing failed (the error was sent).
fn read_tree(dir: &Path, tx: &std::sync::mpsc::SyncSender<Listing>) -> bool {
    let listing = list_children(dir);
    let subdirs: Vec<std::path::PathBuf> = match &listing {
        Ok(children) => children
            .iter()
            .filter(|c| matches!(c.kind, ChildKind::Dir { .. }))
            .map(|c| dir.join(&c.name))
            .collect(),
        Err(_) => Vec::new(),
    };
    let ok = listing.is_ok();
    if tx.send(listing).is_err() || !ok {
        return false;
    }
    subdirs.iter().all(|d| read_tree(d, tx))
}

fn list_children(dir: &Path) -> Result<Vec<Child>> {
    // Files are opened relative to the directory: one name to resolve instead of the whole
    // path, and the open file answers the stat and the xattr listing.
    let dir_file =
        fs::File::open(dir).map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
    let mut names: Vec<(std::ffi::OsString, bool)> = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
        .map(|e| e.map(|e| (e.file_name(), e.file_type().is_ok_and(|t| t.is_file()))))
        .collect::<io::Result<_>>()
        .map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    names.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut budget = LISTING_DATA_MAX;
    let mut children = Vec::with_capacity(names.len());
    for (name, listed_as_file) in names {
        let full = dir.join(&name);
        if listed_as_file {
            if let Some(child) = read_regular(&dir_file, name.clone(), &full, &mut budget)? {
                children.push(child);
                continue;
            }
        }
        let meta = fs::symlink_metadata(&full)
            .map_err(|e| Error::io(format!("stat {}", full.display()), e))?;
        let ft = meta.file_type();
        let kind = if ft.is_char_device() && meta.rdev() == 0 {
            ChildKind::Whiteout
        } else if ft.is_dir() {
            ChildKind::Dir {
                xattrs: layer_xattrs(&full)?,
                opaque: is_opaque(&full)?,
            }
        } else if ft.is_symlink() {
            ChildKind::Symlink {
                target: fs::read_link(&full)
                    .map_err(|e| Error::io(format!("read link {}", full.display()), e))?,
                xattrs: layer_xattrs(&full)?,
            }
        } else if ft.is_file() {
            match read_regular(&dir_file, name.clone(), &full, &mut budget)? {
                Some(child) => {
                    children.push(child);
                    continue;
                }
                None => {
                    return Err(Error::io(
                        format!("open {}", full.display()),
                        io::Error::other("no longer a regular file"),
                    ))
                }
            }
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            ChildKind::Node {
                kind,
                xattrs: layer_xattrs(&full)?,
            }
        } else {
            ChildKind::Skip
        };
        children.push(Child { name, meta, kind });
    }
    Ok(children)
}

/// The regular file `name` of `dir`, its data read when it fits `budget`; `None` when it
/// is no longer a regular file there.
fn read_regular(
    dir: &fs::File,
    name: std::ffi::OsString,
    full: &Path,
    budget: &mut usize,
) -> Result<Option<Child>> {
    let Some(mut file) = open_regular(dir, &name) else {
        return Ok(None);
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", full.display()), e))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let xattrs = layer_xattrs_of(&file, full)?;
    let size = meta.len();
    let content = match usize::try_from(size) {
        Ok(n) if size <= READ_WHOLE_MAX && n <= *budget => {
            *budget -= n;
            let mut bytes = Vec::with_capacity(n);
            io::Read::by_ref(&mut file)
                .take(size)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(format!("copy {}", full.display()), e))?;
            Content::Read(bytes)
        }
        _ => Content::Later,
    };
    Ok(Some(Child {
        name,
        meta,
        kind: ChildKind::Regular { xattrs, content },
    }))
}

/// Opens the regular file at `path` as [`open_regular`] does.
fn open_path_regular(path: &Path) -> Option<fs::File> {
    let dir = fs::File::open(path.parent()?).ok()?;
    open_regular(&dir, path.file_name()?)
}

/// Writes the entries of the directory whose listing comes next from `rx`, and below.
fn write_tree<W: Write>(
    out: &mut TarOut<W>,
    rx: &std::sync::mpsc::Receiver<Listing>,
    dir: &Path,
    rel: &[u8],
) -> Result<()> {
    let children = rx
        .recv()
        .map_err(|_| Error::io("list layer files", io::Error::other("reader stopped")))??;
    for Child { name, meta, kind } in children {
        let full = dir.join(&name);
        let mut path = rel.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.as_bytes());
        let mode = meta.mode() & 0o7777;
        match kind {
            ChildKind::Whiteout => {
                let mut wh = rel.to_vec();
                if !wh.is_empty() {
                    wh.push(b'/');
                }
                wh.extend_from_slice(WHITEOUT_PREFIX);
                wh.extend_from_slice(name.as_bytes());
                // Mode 0 as overlayfs creates them; the device's own bits mean nothing.
                out.entry(&wh, tar::EntryType::Regular, &meta, 0, None, &[], None)?;
            }
            ChildKind::Dir { xattrs, opaque } => {
                let mut dpath = path.clone();
                dpath.push(b'/');
                out.entry(
                    &dpath,
                    tar::EntryType::Directory,
                    &meta,
                    mode,
                    None,
                    &xattrs,
                    None,
                )?;
                if opaque {
                    let mut marker = path.clone();
                    marker.push(b'/');
                    marker.extend_from_slice(OPAQUE_MARKER);
                    out.entry(&marker, tar::EntryType::Regular, &meta, 0, None, &[], None)?;
                }
                write_tree(out, rx, &full, &path)?;
            }
            ChildKind::Symlink { target, xattrs } => {
                out.entry(
                    &path,
                    tar::EntryType::Symlink,
                    &meta,
                    mode,
                    Some(target.as_os_str().as_bytes()),
                    &xattrs,
                    None,
                )?;
            }
            ChildKind::Regular { xattrs, content } => {
                write_regular(out, &path, &full, &meta, xattrs, content)?;
            }
            ChildKind::Node { kind, xattrs } => {
                out.entry(&path, kind, &meta, mode, None, &xattrs, None)?;
            }
            ChildKind::Skip => {}
        }
    }
    Ok(())
}

/// A regular file's entry; a hardlink entry when another path of this tree already wrote
/// its inode.
fn write_regular<W: Write>(
    out: &mut TarOut<W>,
    path: &[u8],
    full: &Path,
    meta: &fs::Metadata,
    xattrs: Vec<(String, Vec<u8>)>,
    content: Content,
) -> Result<()> {
    let mode = meta.mode() & 0o7777;
    // Only paths inside this tree become hardlink entries, to the first of them written:
    // an inode whose other links are outside it (an incremental COPY shares inodes with
    // the previous snapshot) is a regular file here.
    if meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = out
            .links
            .get(&key)
            .and_then(|&(start, end)| out.link_paths.get(start..end))
            .map(<[u8]>::to_vec)
        {
            return out.entry(
                path,
                tar::EntryType::Link,
                meta,
                mode,
                Some(&first),
                &[],
                None,
            );
        }
        let start = out.link_paths.len();
        out.link_paths.extend_from_slice(path);
        out.links.insert(key, (start, out.link_paths.len()));
    }
    let size = meta.len();
    out.entry(
        path,
        tar::EntryType::Regular,
        meta,
        mode,
        None,
        &xattrs,
        Some((content, full, size)),
    )
}

/// Writes the changes held in `upper` as an uncompressed, deterministic layer tar (entries
/// sorted; overlay whiteouts and opaque dirs become OCI ones; hardlinks kept) and returns
/// the diff ID (sha256 of the bytes written).
pub fn write_layer(upper: &Path, out: impl Write, opts: &DiffOptions) -> Result<Digest> {
    let mut t = TarOut {
        out: HashingWriter {
            inner: out,
            hasher: Sha256::new(),
        },
        links: HashMap::new(),
        link_paths: Vec::new(),
        epoch: opts.source_date_epoch,
    };
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(LISTINGS_AHEAD);
        s.spawn(move || read_tree(upper, &tx));
        // On an error `rx` is dropped here, so the reader's next send fails and it stops.
        write_tree(&mut t, &rx, upper, b"")
    })?;
    t.raw(&[0u8; 1024])?;
    t.out.flush().map_err(|e| Error::io("flush layer tar", e))?;
    Ok(crate::sha256_digest(t.out.hasher))
}
