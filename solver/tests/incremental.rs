//! Incremental context COPY: files unchanged since the previous result of the step are
//! hard-linked from it, everything else is copied, and the result equals a full copy.
//! Needs root (chown).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_dag::{CopyAction, FileAction, FileOp, Owner, UserSpec};
use strata_solver::contenthash::StatCache;
use strata_solver::fileop::{apply_file_op_with, FileOpOptions, FileOpOutcome, SourceRoot};
use strata_solver::incremental::{CopyManifest, PreviousCopy};
use tempfile::TempDir;

mod common;
use common::cp;

fn set_time(p: &Path, secs: u64) {
    let f = fs::File::options()
        .write(true)
        .open(p)
        .or_else(|_| fs::File::open(p))
        .unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(123);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

fn write(root: &Path, rel: &str, data: &str, secs: u64) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    set_time(&p, secs);
}

/// A context: `src/` with files in two directories, a hardlinked pair and a file with an
/// xattr; every time fixed and distinct.
fn context() -> TempDir {
    let d = TempDir::new().unwrap();
    let r = d.path();
    write(r, "src/a", "alpha", 1_500_000_001);
    write(r, "src/b", "bravo", 1_500_000_002);
    write(r, "src/c", "charlie", 1_500_000_003);
    write(r, "src/sub/d", "delta", 1_500_000_004);
    write(r, "src/sub/e", "echo", 1_500_000_005);
    write(r, "src/h1", "hard", 1_500_000_006);
    fs::hard_link(r.join("src/h1"), r.join("src/h2")).unwrap();
    write(r, "src/x", "xattr", 1_500_000_007);
    xattr::set(r.join("src/x"), "user.note", b"n").unwrap();
    set_time(&r.join("src/sub"), 1_400_000_001);
    set_time(&r.join("src"), 1_400_000_002);
    d
}

struct Run {
    dest: TempDir,
    outcome: FileOpOutcome,
}

/// Copies `src/` of `ctx` to `/out/` in a fresh destination (standing for a snapshot's
/// upper dir), recording a manifest, linking from `prev` when given.
fn copy(ctx: &Path, action: CopyAction, cache: &StatCache, prev: Option<&PreviousCopy>) -> Run {
    let dest = TempDir::new().unwrap();
    let op = FileOp {
        base_input: None,
        actions: vec![FileAction::Copy(action)],
    };
    let src = SourceRoot {
        path: ctx,
        ignore: None,
        is_context: true,
    };
    let opts = FileOpOptions {
        stat_cache: Some(cache),
        previous: prev,
    };
    let outcome = apply_file_op_with(dest.path(), &op, &[Some(src)], &opts).unwrap();
    Run { dest, outcome }
}

fn previous(run: &Run) -> PreviousCopy {
    PreviousCopy::open(run.dest.path(), run.outcome.manifest.clone().unwrap()).unwrap()
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// Everything an image layer holds of a tree: per path the type, content, owner, mode,
/// mtime (with nanoseconds) and which paths share an inode; not inode numbers or link
/// counts. The top directory's mtime (the time of the copy) is left out.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let body = if m.is_file() {
            let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
            format!(
                "file {:?} same-inode-as {first:?}",
                fs::read(e.path()).unwrap()
            )
        } else {
            "dir".to_string()
        };
        let mtime = if rel == Path::new("out") {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        };
        let xattrs: Vec<_> = xattr::list(e.path()).unwrap().collect();
        out.insert(
            rel,
            format!(
                "{body} {}:{} {:o} {mtime:?} {xattrs:?}",
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ),
        );
    }
    out
}

#[test]
fn unchanged_files_are_linked_and_the_result_equals_a_full_copy() {
    let ctx = context();
    let cache = StatCache::new();
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert!(first.outcome.links.is_empty(), "nothing to link from");
    // Recorded: the plain files, not the hardlinked pair or the file with an xattr.
    assert_eq!(first.outcome.manifest.as_ref().unwrap().len(), 5);
    let prev = previous(&first);

    // b's content changes; c's mode; sub/e only its mtime (a touch).
    let r = ctx.path();
    fs::write(r.join("src/b"), "bravo2").unwrap();
    set_time(&r.join("src/b"), 1_500_000_002);
    fs::set_permissions(r.join("src/c"), fs::Permissions::from_mode(0o600)).unwrap();
    set_time(&r.join("src/sub/e"), 1_500_000_099);

    let second = copy(ctx.path(), cp("src", "/out/"), &cache, Some(&prev));
    assert_eq!(second.outcome.links.len(), 2, "a and sub/d");
    let report = second
        .outcome
        .links
        .finish(second.dest.path(), &prev)
        .unwrap();
    assert_eq!((report.linked, report.copied), (2, 0));

    let (old, new) = (
        first.dest.path().join("out"),
        second.dest.path().join("out"),
    );
    for linked in ["a", "sub/d"] {
        assert_eq!(ino(&old.join(linked)), ino(&new.join(linked)), "{linked}");
        assert_eq!(fs::metadata(new.join(linked)).unwrap().nlink(), 2);
    }
    for copied in ["b", "c", "sub/e", "h1", "h2", "x"] {
        assert_ne!(ino(&old.join(copied)), ino(&new.join(copied)), "{copied}");
    }
    assert_eq!(fs::read(new.join("b")).unwrap(), b"bravo2");
    // The shared inodes were not touched: the first result is as it was.
    assert_eq!(fs::metadata(old.join("c")).unwrap().mode() & 0o7777, 0o644);

    // Exactly what a copy from nothing gives, directory times included.
    let full = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert_eq!(tree(second.dest.path()), tree(full.dest.path()));
    // The new manifest describes the new result: a third run links all five.
    let third = copy(
        ctx.path(),
        cp("src", "/out/"),
        &cache,
        Some(&previous(&second)),
    );
    assert_eq!(third.outcome.links.len(), 5);
}

#[test]
fn another_owner_is_never_linked() {
    let ctx = context();
    let cache = StatCache::new();
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    let prev = previous(&first);
    let mut chown = cp("src", "/out/");
    chown.owner = Some(Owner {
        user: UserSpec::Id(1234),
        group: Some(UserSpec::Id(5678)),
    });
    let second = copy(ctx.path(), chown.clone(), &cache, Some(&prev));
    assert!(second.outcome.links.is_empty());
    let m = fs::metadata(second.dest.path().join("out/a")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.nlink()), (1234, 5678, 1));
    // And the other way round: a previous result owned by someone else.
    let back = copy(
        ctx.path(),
        cp("src", "/out/"),
        &cache,
        Some(&previous(&second)),
    );
    assert!(back.outcome.links.is_empty());
}

#[test]
fn a_removed_or_replaced_previous_result_falls_back_to_copying() {
    let ctx = context();
    let cache = StatCache::new();
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    let prev = previous(&first);
    let second = copy(ctx.path(), cp("src", "/out/"), &cache, Some(&prev));
    assert_eq!(second.outcome.links.len(), 5);

    // Between the copy and the links: sub/ pruned, and `a` replaced by another inode with
    // the same content and attributes (which stands for a copy as well as the first).
    let old = first.dest.path().join("out");
    fs::remove_dir_all(old.join("sub")).unwrap();
    // (Made before the old one goes, so its inode number cannot be the freed one.)
    let md = fs::metadata(old.join("a")).unwrap();
    let other = first.dest.path().join("other");
    fs::write(&other, "alpha").unwrap();
    fs::set_permissions(&other, md.permissions()).unwrap();
    set_time(&other, 1_500_000_001);
    fs::rename(&other, old.join("a")).unwrap();

    let report = second
        .outcome
        .links
        .finish(second.dest.path(), &prev)
        .unwrap();
    assert_eq!((report.linked, report.copied), (3, 2));
    let new = second.dest.path().join("out");
    assert_eq!(ino(&old.join("a")), ino(&new.join("a")));
    assert_eq!(fs::metadata(new.join("sub/d")).unwrap().nlink(), 1);
    let full = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert_eq!(tree(second.dest.path()), tree(full.dest.path()));
}

#[test]
fn links_never_follow_a_symlink_in_the_previous_result() {
    let ctx = context();
    let cache = StatCache::new();
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    let prev = previous(&first);
    // The previous result's out/sub now leads elsewhere (to identical files).
    let old = first.dest.path().join("out");
    fs::rename(old.join("sub"), first.dest.path().join("elsewhere")).unwrap();
    symlink("../elsewhere", old.join("sub")).unwrap();
    let second = copy(ctx.path(), cp("src", "/out/"), &cache, Some(&prev));
    let report = second
        .outcome
        .links
        .finish(second.dest.path(), &prev)
        .unwrap();
    assert_eq!(
        (report.linked, report.copied),
        (3, 2),
        "a, b and c linked; sub/d and sub/e copied, not linked through the symlink"
    );
    let new = second.dest.path().join("out");
    assert_eq!(fs::metadata(new.join("sub/d")).unwrap().nlink(), 1);
    assert!(fs::symlink_metadata(new.join("sub")).unwrap().is_dir());
    let full = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert_eq!(tree(second.dest.path()), tree(full.dest.path()));
}

#[test]
fn manifests_round_trip_and_torn_ones_are_refused() {
    let ctx = context();
    let cache = StatCache::new();
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    let m = first.outcome.manifest.unwrap();
    let bytes = m.encode();
    assert_eq!(CopyManifest::decode(&bytes), Some(m.clone()));
    assert_eq!(CopyManifest::decode(&bytes[..bytes.len() - 1]), None);
    let mut flipped = bytes.clone();
    flipped[30] ^= 1;
    assert_eq!(CopyManifest::decode(&flipped), None);
    let path = first.dest.path().join("manifest");
    m.save(&path).unwrap();
    assert_eq!(CopyManifest::load(&path), Some(m));
}

#[test]
fn two_sources_writing_one_path_end_as_a_full_copy() {
    let ctx = TempDir::new().unwrap();
    let r = ctx.path();
    write(r, "s1/x", "first", 1_500_000_001);
    write(r, "s1/sub/y", "first y", 1_500_000_002);
    write(r, "s2/x", "second", 1_500_000_003);
    write(r, "s2/sub/y", "second y", 1_500_000_004);
    let cache = StatCache::new();
    let first = copy(r, cp("s*", "/out/"), &cache, None);
    assert_eq!(
        fs::read(first.dest.path().join("out/x")).unwrap(),
        b"second"
    );
    // The manifest holds what is there at the end: s2's files.
    let second = copy(r, cp("s*", "/out/"), &cache, Some(&previous(&first)));
    assert_eq!(second.outcome.links.len(), 2, "x and sub/y, both from s2");
    let report = second
        .outcome
        .links
        .finish(second.dest.path(), &previous(&first))
        .unwrap();
    assert_eq!((report.linked, report.copied), (2, 0));
    let full = copy(r, cp("s*", "/out/"), &cache, None);
    assert_eq!(tree(second.dest.path()), tree(full.dest.path()));
    assert_eq!(
        ino(&second.dest.path().join("out/sub/y")),
        ino(&first.dest.path().join("out/sub/y"))
    );
}

#[test]
fn a_file_copied_to_another_name_falls_back_to_its_own_source() {
    let ctx = context();
    let cache = StatCache::new();
    let mut single = cp("src/a", "/renamed");
    single.dir_contents_only = false;
    let first = copy(ctx.path(), single.clone(), &cache, None);
    let prev = previous(&first);
    let second = copy(ctx.path(), single.clone(), &cache, Some(&prev));
    assert_eq!(second.outcome.links.len(), 1);
    fs::remove_file(first.dest.path().join("renamed")).unwrap();
    let report = second
        .outcome
        .links
        .finish(second.dest.path(), &prev)
        .unwrap();
    assert_eq!((report.linked, report.copied), (0, 1));
    let full = copy(ctx.path(), single, &cache, None);
    assert_eq!(tree(second.dest.path()), tree(full.dest.path()));
}

#[test]
fn a_copy_writes_the_files_its_cache_key_was_computed_from() {
    let ctx = context();
    let cache = StatCache::new();
    let src = SourceRoot {
        path: ctx.path(),
        ignore: None,
        is_context: true,
    };
    let key = strata_solver::contenthash::checksum(&src, &cp("src", "/out/"), &cache).unwrap();
    // Between the key and the copy: a file appears in a directory the key's walk listed.
    write(ctx.path(), "src/sub/late", "late", 1_500_000_010);
    let run = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    let out = run.dest.path().join("out");
    assert!(out.join("sub/d").exists());
    assert!(
        !out.join("sub/late").exists(),
        "the copy used the listings the key was computed from"
    );
    // The listings are used once: the next copy sees the context as it is now.
    let again = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert!(again.dest.path().join("out/sub/late").exists());
    let now = strata_solver::contenthash::checksum(&src, &cp("src", "/out/"), &cache).unwrap();
    assert_ne!(key, now);
}

#[test]
fn an_xattr_set_after_the_context_was_hashed_is_copied() {
    let ctx = context();
    // Old enough for the stat cache to record it (and that it had no xattrs).
    std::thread::sleep(Duration::from_millis(300));
    let cache = StatCache::new();
    let src = SourceRoot {
        path: ctx.path(),
        ignore: None,
        is_context: true,
    };
    strata_solver::contenthash::checksum(&src, &cp("src", "/out/"), &cache).unwrap();
    assert_eq!(
        cache.len(),
        7,
        "a, b, c, sub/d, sub/e, h1 and x are recorded"
    );
    let first = copy(ctx.path(), cp("src", "/out/"), &cache, None);
    assert_eq!(
        xattr::get(first.dest.path().join("out/a"), "user.late").unwrap(),
        None
    );

    xattr::set(ctx.path().join("src/a"), "user.late", b"v").unwrap();
    let second = copy(
        ctx.path(),
        cp("src", "/out/"),
        &cache,
        Some(&previous(&first)),
    );
    let a = second.dest.path().join("out/a");
    assert_eq!(
        xattr::get(&a, "user.late").unwrap().as_deref(),
        Some(&b"v"[..]),
        "the new xattr changed the file's ctime, so its cached 'no xattrs' no longer applied"
    );
    assert_eq!(
        fs::metadata(&a).unwrap().nlink(),
        1,
        "a file with xattrs is never linked"
    );
}
