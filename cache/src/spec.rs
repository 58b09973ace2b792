//! `--cache-to` / `--cache-from` values, with buildx's `key=value,...` syntax.

use std::collections::BTreeMap;
use std::path::PathBuf;

use strata_exporter::Compression;
use strata_registry::Reference;

use crate::{Error, Result};

/// Which records an export holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The steps whose results are layers of the final image.
    Min,
    /// Every step this build resolved, in every stage.
    Max,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    /// An OCI artifact pushed to `ref`.
    Registry(Reference),
    /// An OCI image layout directory.
    Local(PathBuf),
    /// The description inside the built image's config (its layers are the image's).
    Inline,
}

/// One `--cache-to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheTo {
    pub target: ExportTarget,
    pub mode: Mode,
    /// Also export the contents of the build's `RUN --mount=type=cache` mounts.
    pub cache_mounts: bool,
    /// For layers that have no blob yet (intermediate steps); the final image's layers
    /// keep the blobs the image export made.
    pub compression: Compression,
}

/// One `--cache-from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheFrom {
    /// A cache artifact, or an image carrying an inline cache description.
    Registry(Reference),
    /// An OCI layout directory written by `type=local`.
    Local(PathBuf),
}

fn fields(spec: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Error::InvalidSpec(format!("{part:?} in {spec:?} is not key=value")))?;
        if map
            .insert(k.trim().to_string(), v.trim().to_string())
            .is_some()
        {
            return Err(Error::InvalidSpec(format!("{k:?} given twice in {spec:?}")));
        }
    }
    Ok(map)
}

fn reference(fields: &BTreeMap<String, String>, spec: &str) -> Result<Reference> {
    let r = fields
        .get("ref")
        .ok_or_else(|| Error::InvalidSpec(format!("type=registry needs ref=NAME in {spec:?}")))?;
    Reference::parse(r).map_err(|e| Error::InvalidSpec(format!("ref {r:?}: {e}")))
}

fn path(fields: &BTreeMap<String, String>, key: &str, spec: &str) -> Result<PathBuf> {
    fields
        .get(key)
        .map(PathBuf::from)
        .ok_or_else(|| Error::InvalidSpec(format!("type=local needs {key}=DIR in {spec:?}")))
}

fn refuse_unknown(fields: &BTreeMap<String, String>, known: &[&str], spec: &str) -> Result<()> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Error::InvalidSpec(format!(
            "unknown key {k:?} in {spec:?} (want one of {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Parses `type=registry,ref=REF[,mode=min|max][,compression=gzip|zstd]`,
/// `type=local,dest=DIR[,mode=..][,compression=..]` or `type=inline`.
pub fn parse_cache_to(spec: &str) -> Result<CacheTo> {
    let f = fields(spec)?;
    let mode = match f.get("mode").map(String::as_str) {
        None | Some("min") => Mode::Min,
        Some("max") => Mode::Max,
        Some(other) => {
            return Err(Error::InvalidSpec(format!(
                "mode {other:?} (want min or max)"
            )))
        }
    };
    let level = f
        .get("compression-level")
        .map(|l| {
            l.parse::<i32>()
                .map_err(|_| Error::InvalidSpec(format!("compression-level {l:?} is not a number")))
        })
        .transpose()?;
    let compression = match f.get("compression") {
        Some(name) => Compression::from_name(name, level)
            .map_err(|e| Error::InvalidSpec(format!("compression: {e}")))?,
        None => Compression::default(),
    };
    let cache_mounts = match f.get("cache-mounts").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::InvalidSpec(format!(
                "cache-mounts {other:?} (want true or false)"
            )))
        }
    };
    let common = [
        "type",
        "mode",
        "compression",
        "compression-level",
        "cache-mounts",
    ];
    let target = match f.get("type").map(String::as_str) {
        Some("registry") => {
            refuse_unknown(&f, &[&common[..], &["ref"]].concat(), spec)?;
            ExportTarget::Registry(reference(&f, spec)?)
        }
        Some("local") => {
            refuse_unknown(&f, &[&common[..], &["dest"]].concat(), spec)?;
            ExportTarget::Local(path(&f, "dest", spec)?)
        }
        Some("inline") => {
            refuse_unknown(&f, &common, spec)?;
            if mode == Mode::Max || cache_mounts {
                return Err(Error::InvalidSpec(
                    "type=inline holds the final image's layers only: mode=max and cache-mounts=true need type=registry or type=local".into(),
                ));
            }
            ExportTarget::Inline
        }
        Some(other) => {
            return Err(Error::InvalidSpec(format!(
                "unknown cache type {other:?} (want registry, local or inline)"
            )))
        }
        None => return Err(Error::InvalidSpec(format!("{spec:?} needs type=..."))),
    };
    Ok(CacheTo {
        target,
        mode,
        cache_mounts,
        compression,
    })
}

/// Parses `type=registry,ref=REF`, `type=local,src=DIR`, or a bare image reference (a
/// cache artifact or an image with an inline cache, told apart by what is there).
pub fn parse_cache_from(spec: &str) -> Result<CacheFrom> {
    if !spec.contains('=') {
        let r = Reference::parse(spec.trim())
            .map_err(|e| Error::InvalidSpec(format!("cache source {spec:?}: {e}")))?;
        return Ok(CacheFrom::Registry(r));
    }
    let f = fields(spec)?;
    match f.get("type").map(String::as_str) {
        Some("registry") => {
            refuse_unknown(&f, &["type", "ref"], spec)?;
            Ok(CacheFrom::Registry(reference(&f, spec)?))
        }
        Some("local") => {
            refuse_unknown(&f, &["type", "src"], spec)?;
            Ok(CacheFrom::Local(path(&f, "src", spec)?))
        }
        Some(other) => Err(Error::InvalidSpec(format!(
            "unknown cache source type {other:?} (want registry or local)"
        ))),
        None => Err(Error::InvalidSpec(format!("{spec:?} needs type=..."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_to_forms() {
        let c = parse_cache_to("type=registry,ref=127.0.0.1:5000/c:main,mode=max,compression=zstd")
            .unwrap();
        assert_eq!(c.mode, Mode::Max);
        assert_eq!(c.compression, Compression::Zstd { level: 3 });
        match c.target {
            ExportTarget::Registry(r) => {
                assert_eq!(r.repository, "c");
                assert_eq!(r.tag.as_deref(), Some("main"));
            }
            other => panic!("{other:?}"),
        }
        let l = parse_cache_to("type=local,dest=/tmp/x").unwrap();
        assert_eq!(l.target, ExportTarget::Local("/tmp/x".into()));
        assert_eq!(l.mode, Mode::Min);
        assert!(!l.cache_mounts);
        assert!(
            parse_cache_to("type=local,dest=/tmp/x,cache-mounts=true")
                .unwrap()
                .cache_mounts
        );
        assert_eq!(
            parse_cache_to("type=inline").unwrap().target,
            ExportTarget::Inline
        );
    }

    #[test]
    fn cache_to_errors_name_the_problem() {
        let e = |s: &str| parse_cache_to(s).unwrap_err().to_string();
        assert!(
            e("type=registry").contains("ref=NAME"),
            "{}",
            e("type=registry")
        );
        assert!(e("type=local").contains("dest=DIR"));
        assert!(e("type=s3,bucket=x").contains("unknown cache type \"s3\""));
        assert!(e("type=registry,ref=a/b,mode=all").contains("mode \"all\""));
        assert!(e("type=registry,ref=a/b,compression=lz4").contains("compression"));
        assert!(e("type=inline,mode=max").contains("mode=max"));
        assert!(e("type=inline,cache-mounts=true").contains("cache-mounts=true need"));
        assert!(e("type=local,dest=x,cache-mounts=yes").contains("cache-mounts \"yes\""));
        assert!(e("type=local,dest=x,src=y").contains("unknown key \"src\""));
    }

    #[test]
    fn cache_from_forms() {
        match parse_cache_from("127.0.0.1:5000/app:1").unwrap() {
            CacheFrom::Registry(r) => assert_eq!(r.repository, "app"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_cache_from("type=local,src=/c").unwrap(),
            CacheFrom::Local("/c".into())
        );
        assert!(parse_cache_from("type=local,dest=/c")
            .unwrap_err()
            .to_string()
            .contains("unknown key \"dest\""));
    }
}
