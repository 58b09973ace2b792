//! Content checksums of what a COPY reads, for cache keys, and the persistent stat cache
//! that lets an unchanged context be re-checksummed from stats alone.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use strata_dag::CopyAction;

use crate::fileop::{
    io_err, plan_sources, walk_source_prefetched, FileOpError, Filter, ListingCache, Prefetch,
    SourceRoot, Visitor, WalkEntry, WalkEvent,
};

const DOMAIN: &[u8] = b"strata-contenthash-v1\0";
const EMPTY_DOMAIN: &[u8] = b"strata-contenthash-empty-v1\0";

/// The checksum of a wildcard source that matched nothing (allowed by the action).
pub fn empty_checksum() -> [u8; 32] {
    *blake3::hash(EMPTY_DOMAIN).as_bytes()
}

/// Content checksum of exactly what `action` would read from `root`: blake3 over relative
/// names, file types, contents, permission bits (incl. setuid/setgid/sticky), uid/gid (0:0
/// for context roots), symlink targets, device numbers and the hardlink structure. Times,
/// inode numbers and xattrs do not count. Paths excluded by `.dockerignore` or
/// `COPY --exclude` never count. A wildcard with no match hashes to [`empty_checksum`].
pub fn checksum(
    root: &SourceRoot,
    action: &CopyAction,
    cache: &StatCache,
) -> Result<[u8; 32], FileOpError> {
    let filter = Filter::new(root, action)?;
    let sources = plan_sources(root, action, &filter).map_err(|e| match e {
        FileOpError::NotFound { path } => FileOpError::CacheKeyNotFound { path },
        other => other,
    })?;
    if sources.is_empty() {
        return Ok(empty_checksum());
    }
    let mut v = HashVisitor {
        hasher: blake3::Hasher::new(),
        cache,
        is_context: root.is_context,
        links: HashMap::new(),
    };
    v.hasher.update(DOMAIN);
    for s in &sources {
        // Like the copier: hardlinks are tracked within one matched source.
        v.links.clear();
        v.hasher.update(b"S");
        v.put_bytes(s.name.as_bytes());
        let how = Prefetch {
            listings_to: root.is_context.then_some(&cache.listings),
            ..Prefetch::default()
        };
        walk_source_prefetched(root.path, &s.resolved, &filter, &mut v, &how)?;
    }
    Ok(*v.hasher.finalize().as_bytes())
}

struct HashVisitor<'a> {
    hasher: blake3::Hasher,
    cache: &'a StatCache,
    is_context: bool,
    /// (dev, ino) -> relative name of the first copy, as the copier links later ones to it.
    links: HashMap<(u64, u64), Vec<u8>>,
}

impl HashVisitor<'_> {
    fn put_bytes(&mut self, b: &[u8]) {
        self.hasher.update(&(b.len() as u64).to_le_bytes());
        self.hasher.update(b);
    }

    fn put_u32(&mut self, v: u32) {
        self.hasher.update(&v.to_le_bytes());
    }
}

impl Visitor for HashVisitor<'_> {
    fn visit(&mut self, event: WalkEvent, e: &WalkEntry) -> Result<(), FileOpError> {
        let rel = e.rel.as_os_str().as_bytes().to_vec();
        let ft = e.md.file_type();
        let tag: &[u8] = match event {
            WalkEvent::DirStart => b"D",
            WalkEvent::DirEnd => {
                self.hasher.update(b"E");
                return Ok(());
            }
            WalkEvent::Leaf if ft.is_file() => b"F",
            WalkEvent::Leaf if ft.is_symlink() => b"L",
            WalkEvent::Leaf => {
                use std::os::unix::fs::FileTypeExt;
                if ft.is_socket() {
                    // The copier skips sockets.
                    return Ok(());
                }
                b"N"
            }
        };
        if ft.is_file() && e.md.nlink() > 1 {
            let key = (e.md.dev(), e.md.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                self.hasher.update(b"H");
                self.put_bytes(&rel);
                self.put_bytes(&first);
                return Ok(());
            }
            self.links.insert(key, rel.clone());
        }
        self.hasher.update(tag);
        self.put_bytes(&rel);
        let (uid, gid) = if self.is_context {
            (0, 0)
        } else {
            (e.md.uid(), e.md.gid())
        };
        self.put_u32(if ft.is_symlink() {
            0
        } else {
            e.md.mode() & 0o7777
        });
        self.put_u32(uid);
        self.put_u32(gid);
        if ft.is_file() {
            let root_rel = e.root_rel.as_os_str().as_bytes();
            let digest = self.cache.file_digest(root_rel, e.abs, e.md)?;
            self.hasher.update(&digest);
        } else if ft.is_symlink() {
            let target = fs::read_link(e.abs).map_err(io_err("read link", e.abs))?;
            self.put_bytes(target.as_os_str().as_bytes());
        } else if !ft.is_dir() {
            self.hasher.update(&(e.md.mode() & 0o170000).to_le_bytes());
            self.hasher.update(&e.md.rdev().to_le_bytes());
        }
        Ok(())
    }
}

/// What identifies an unchanged file without reading it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct StatKey {
    path: Vec<u8>,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    mode: u32,
}

impl StatKey {
    fn of(path: &[u8], md: &fs::Metadata) -> Self {
        StatKey {
            path: path.to_vec(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
            mode: md.mode(),
        }
    }
}

struct Slot {
    digest: [u8; 32],
    used: bool,
    /// The file had no xattrs when hashed (setting one changes its ctime, so its key).
    no_xattrs: bool,
}

/// Entries are only recorded when the file's ctime is older than this at hashing time: a
/// file changed again within one timestamp tick would otherwise keep its old key.
const RACY_NANOS: i128 = 100_000_000;
/// Above this many entries, a save keeps only those used since the cache was opened.
const PRUNE_ABOVE: usize = 500_000;
const MAGIC: &[u8] = b"STRATA-STATCACHE-2\n";

/// Persistent stat cache: (path relative to its root, size, mtime, ctime, inode, mode) ->
/// blake3 of the content. Re-checksumming an unchanged tree reads only stats; a changed file
/// costs one file's hash. Thread-safe.
#[derive(Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<StatKey, Slot>>,
    hashed: AtomicU64,
    /// Whether an entry was added since the file was loaded or saved: an unchanged cache is
    /// not rewritten (for a 20,000-file context that is 2 MB and an fsync per build).
    dirty: AtomicBool,
    /// Listings the last context checksum walk read, for the copy that follows it.
    pub(crate) listings: ListingCache,
}

impl std::fmt::Debug for StatCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatCache")
            .field("path", &self.path)
            .field("entries", &self.len())
            .finish()
    }
}

impl StatCache {
    /// An in-memory cache; [`StatCache::save`] does nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads the cache stored at `path`. A missing, truncated or corrupt file gives an empty
    /// cache (that is saved to `path` later).
    pub fn open(path: &Path) -> Self {
        let entries = fs::read(path)
            .ok()
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default();
        StatCache {
            path: Some(path.to_path_buf()),
            entries: Mutex::new(entries),
            hashed: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            listings: ListingCache::default(),
        }
    }

    /// Writes the cache atomically (temp file + rename) to the path it was opened from, if
    /// an entry was added since it was loaded or last saved.
    pub fn save(&self) -> Result<(), FileOpError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = {
            let mut entries = self.lock();
            // Cleared under the lock, so an entry added while writing marks it dirty again.
            if !self.dirty.swap(false, Ordering::AcqRel) {
                return Ok(());
            }
            if entries.len() > PRUNE_ABOVE {
                entries.retain(|_, s| s.used);
            }
            encode(&entries)
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        let mut tmp_name = path.as_os_str().to_os_string();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let write = || -> io::Result<()> {
            // Not synced: a cache. A file torn by a crash fails its checksum on load and
            // the next build hashes the context again.
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.dirty.store(true, Ordering::Release);
            io_err("write stat cache", path)(e)
        })
    }

    /// How many files had their content read (cache misses) since this cache was created.
    pub fn hashed_files(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StatKey, Slot>> {
        // A panic while holding the lock cannot leave a half-written entry: recover the map.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blake3 of the regular file at `abs`, from the cache when its stat is unchanged.
    pub(crate) fn file_digest(
        &self,
        rel: &[u8],
        abs: &Path,
        md: &fs::Metadata,
    ) -> Result<[u8; 32], FileOpError> {
        let key = StatKey::of(rel, md);
        if let Some(slot) = self.lock().get_mut(&key) {
            slot.used = true;
            return Ok(slot.digest);
        }
        let started = now_nanos();
        let mut f = File::open(abs).map_err(io_err("open", abs))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io_err("read", abs))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let digest = *hasher.finalize().as_bytes();
        // Listed before the second stat: an xattr set meanwhile changes the ctime, and the
        // entry is then not recorded.
        let no_xattrs = {
            use xattr::FileExt;
            f.list_xattr().is_ok_and(|mut names| names.next().is_none())
        };
        let after = f.metadata().map_err(io_err("stat", abs))?;
        let stable = StatKey::of(rel, &after) == key;
        let ctime = i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec());
        if stable && started - ctime > RACY_NANOS {
            self.lock().insert(
                key,
                Slot {
                    digest,
                    used: true,
                    no_xattrs,
                },
            );
            self.dirty.store(true, Ordering::Release);
        }
        Ok(digest)
    }

    /// Whether the file with stat `md` at `rel` is known to have no xattrs: it is
    /// unchanged since it was hashed and had none then. Spares a copy listing them.
    pub(crate) fn known_without_xattrs(&self, rel: &[u8], md: &fs::Metadata) -> bool {
        self.lock()
            .get(&StatKey::of(rel, md))
            .is_some_and(|slot| slot.no_xattrs)
    }
}

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn encode(entries: &HashMap<StatKey, Slot>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + entries.len() * 100 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (k, s) in entries {
        out.extend_from_slice(&(k.path.len() as u32).to_le_bytes());
        out.extend_from_slice(&k.path);
        out.extend_from_slice(&k.size.to_le_bytes());
        out.extend_from_slice(&k.mtime.0.to_le_bytes());
        out.extend_from_slice(&k.mtime.1.to_le_bytes());
        out.extend_from_slice(&k.ctime.0.to_le_bytes());
        out.extend_from_slice(&k.ctime.1.to_le_bytes());
        out.extend_from_slice(&k.ino.to_le_bytes());
        out.extend_from_slice(&k.mode.to_le_bytes());
        out.extend_from_slice(&s.digest);
        out.push(u8::from(s.no_xattrs));
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<HashMap<StatKey, Slot>> {
    let body_len = bytes.len().checked_sub(32)?;
    let (body, sum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = body.strip_prefix(MAGIC)?;
    let count = u64::from_le_bytes(take(&mut r)?);
    // Each entry takes at least 77 bytes, so a corrupt count cannot reserve more than the
    // file could hold.
    let mut out = HashMap::with_capacity(usize::try_from(count).ok()?.min(r.len() / 77));
    for _ in 0..count {
        let plen = u32::from_le_bytes(take(&mut r)?) as usize;
        let path = r.get(..plen)?.to_vec();
        r = &r[plen..];
        let key = StatKey {
            path,
            size: u64::from_le_bytes(take(&mut r)?),
            mtime: (
                i64::from_le_bytes(take(&mut r)?),
                i64::from_le_bytes(take(&mut r)?),
            ),
            ctime: (
                i64::from_le_bytes(take(&mut r)?),
                i64::from_le_bytes(take(&mut r)?),
            ),
            ino: u64::from_le_bytes(take(&mut r)?),
            mode: u32::from_le_bytes(take(&mut r)?),
        };
        let digest: [u8; 32] = take(&mut r)?;
        let [flag] = take::<1>(&mut r)?;
        out.insert(
            key,
            Slot {
                digest,
                used: false,
                no_xattrs: flag == 1,
            },
        );
    }
    r.is_empty().then_some(out)
}

fn take<const N: usize>(r: &mut &[u8]) -> Option<[u8; N]> {
    let head: [u8; N] = r.get(..N)?.try_into().ok()?;
    *r = &r[N..];
    Some(head)
}
