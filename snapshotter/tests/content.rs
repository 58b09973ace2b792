//! Content store suite.

use std::fs;
use std::io::Write;
use std::sync::Arc;

use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::Error;

fn store() -> (tempfile::TempDir, ContentStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = ContentStore::open(dir.path()).unwrap();
    (dir, s)
}

fn ingest_is_empty(dir: &tempfile::TempDir) -> bool {
    fs::read_dir(dir.path().join("ingest")).unwrap().count() == 0
}

#[test]
fn put_read_walk_delete() {
    let (dir, s) = store();
    let (d, n) = s.put(b"hello", None).unwrap();
    assert_eq!(d, Digest::of(b"hello"));
    assert_eq!(n, 5);
    assert!(s.exists(&d));
    assert_eq!(s.read(&d).unwrap(), b"hello");
    assert_eq!(s.size(&d).unwrap(), 5);
    assert_eq!(s.path(&d), dir.path().join("blobs/sha256").join(d.hex()));
    let (d2, _) = s.put(b"world", Some(&Digest::of(b"world"))).unwrap();
    let mut seen = Vec::new();
    s.walk(&mut |d, n| seen.push((d.clone(), n))).unwrap();
    let mut want = vec![(d.clone(), 5), (d2.clone(), 5)];
    want.sort();
    assert_eq!(seen, want);
    s.delete(&d).unwrap();
    assert!(!s.exists(&d));
    assert!(matches!(s.read(&d), Err(Error::BlobNotFound(_))));
    assert!(matches!(s.size(&d), Err(Error::BlobNotFound(_))));
    assert!(matches!(s.delete(&d), Err(Error::BlobNotFound(_))));
    assert!(ingest_is_empty(&dir));
}

#[test]
fn digest_mismatch_is_rejected_and_leaves_nothing() {
    let (dir, s) = store();
    let wrong = Digest::of(b"something else");
    let err = s.put(b"actual", Some(&wrong)).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!s.exists(&wrong));
    assert!(!s.exists(&Digest::of(b"actual")));
    assert!(ingest_is_empty(&dir));
    let mut n = 0;
    s.walk(&mut |_, _| n += 1).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn streaming_writer_and_abandoned_writer() {
    let (dir, s) = store();
    let mut w = s.writer().unwrap();
    for _ in 0..100 {
        w.write_all(b"0123456789").unwrap();
    }
    assert_eq!(w.size(), 1000);
    let (d, n) = w.commit(None).unwrap();
    assert_eq!(n, 1000);
    assert_eq!(d, Digest::of("0123456789".repeat(100).as_bytes()));
    let mut w = s.writer().unwrap();
    w.write_all(b"partial").unwrap();
    drop(w);
    assert!(ingest_is_empty(&dir));
    assert!(!s.exists(&Digest::of(b"partial")));
}

#[test]
fn duplicate_and_concurrent_commits_are_fine() {
    let (dir, s) = store();
    let (a, _) = s.put(b"same", None).unwrap();
    let (b, _) = s.put(b"same", Some(&a)).unwrap();
    assert_eq!(a, b);
    let s = Arc::new(s);
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let data = Arc::new(data);
    let want = Digest::of(&data);
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let (s, data, want) = (Arc::clone(&s), Arc::clone(&data), want.clone());
            std::thread::spawn(move || {
                let mut w = s.writer().unwrap();
                for chunk in data.chunks(4096) {
                    w.write_all(chunk).unwrap();
                }
                w.commit(Some(&want)).unwrap()
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap().0, want);
    }
    assert_eq!(s.read(&want).unwrap(), *data);
    assert!(ingest_is_empty(&dir));
}

#[test]
fn a_writer_for_a_known_digest_commits_under_that_digest_only() {
    let (dir, s) = store();
    let mut w = s.writer_for_known_digest().unwrap();
    w.write_all(b"layer tar").unwrap();
    assert!(
        w.commit(None).is_err(),
        "nothing to name the blob by: refused"
    );
    assert!(ingest_is_empty(&dir));

    let d = Digest::of(b"layer tar");
    let mut w = s.writer_for_known_digest().unwrap();
    w.write_all(b"layer tar").unwrap();
    assert_eq!(w.commit(Some(&d)).unwrap(), (d.clone(), 9));
    assert_eq!(s.read(&d).unwrap(), b"layer tar");
    assert!(ingest_is_empty(&dir));
}

#[test]
fn putting_a_stored_blob_again_writes_nothing() {
    let (dir, s) = store();
    let (d, _) = s.put(b"config", None).unwrap();
    // Without the ingest directory no blob can be written: a second put of the same
    // bytes succeeds only because it writes nothing.
    fs::remove_dir(dir.path().join("ingest")).unwrap();
    assert_eq!(s.put(b"config", Some(&d)).unwrap(), (d.clone(), 6));
    assert_eq!(s.put(b"config", None).unwrap(), (d, 6));
    assert!(s.put(b"other", None).is_err());
}

#[test]
fn a_blob_bigger_than_the_writeback_stride_is_stored_whole() {
    let (dir, s) = store();
    // 20 MiB in odd-sized writes: writeback is started twice while writing.
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = s.writer().unwrap();
    for part in data.chunks(1_000_003) {
        w.write_all(part).unwrap();
    }
    let (d, n) = w.commit(None).unwrap();
    assert_eq!((d.clone(), n), (Digest::of(&data), data.len() as u64));
    assert_eq!(s.read(&d).unwrap(), data);
    assert!(ingest_is_empty(&dir));
}

/// A blob of whole windows and an unaligned tail, in odd-sized writes, stored in `dir`.
fn big_unaligned_blob_round_trips(dir: &std::path::Path) {
    let s = ContentStore::open(dir).unwrap();
    // Past the first window the file is written with O_DIRECT where the filesystem takes
    // it; the tail (not a whole block) goes through the page cache at commit.
    let data: Vec<u8> = (0..(9u32 << 20) + 12_345)
        .map(|i| (i * 13 % 241) as u8)
        .collect();
    let mut w = s.writer_for_known_digest().unwrap();
    for part in data.chunks(777_777) {
        w.write_all(part).unwrap();
    }
    assert_eq!(w.size(), data.len() as u64);
    let (d, n) = w.commit(Some(&Digest::of(&data))).unwrap();
    assert_eq!((d.clone(), n), (Digest::of(&data), data.len() as u64));
    assert_eq!(s.read(&d).unwrap(), data);
    assert_eq!(fs::read_dir(dir.join("ingest")).unwrap().count(), 0);
}

#[test]
fn a_blob_with_an_unaligned_tail_is_stored_whole() {
    let dir = tempfile::tempdir().unwrap();
    big_unaligned_blob_round_trips(dir.path());
}

#[test]
fn a_big_blob_is_stored_whole_on_tmpfs_too() {
    // tmpfs may refuse O_DIRECT: the writer then stays with buffered writes.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    big_unaligned_blob_round_trips(dir.path());
}
