//! Outputs as files: OCI layout (directory or tar) and `docker load` tars.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, MediaType, Platform, ANNOTATION_REF_NAME};
use sha2::{Digest as _, Sha256};
use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;

use crate::image::{read_config, read_manifest_bytes, ImageRecord};
use crate::layer::{decompressor, detect};
use crate::names::parse_image_name;
use crate::{canonical_json, dag_digest, oci_digest, Error, Result};

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Every blob of the image (manifest, config, layers), each once, with its size.
fn image_blobs(store: &ContentStore, image: &ImageRecord) -> Result<Vec<(Digest, u64)>> {
    let (_, manifest) = read_manifest_bytes(store, image)?;
    let mut out = vec![(image.manifest_digest.clone(), image.manifest_size)];
    let descs = std::iter::once(manifest.config()).chain(manifest.layers().iter());
    for d in descs {
        let digest = dag_digest(d.digest())?;
        if !out.iter().any(|(have, _)| *have == digest) {
            out.push((digest, d.size()));
        }
    }
    Ok(out)
}

/// The index entry for the image: manifest descriptor with platform and ref name.
fn index_descriptor(
    store: &ContentStore,
    image: &ImageRecord,
    ref_name: Option<&str>,
) -> Result<Descriptor> {
    let config = read_config(store, image)?;
    let mut desc = Descriptor::new(
        MediaType::from(image.media_type.as_str()),
        image.manifest_size,
        oci_digest(&image.manifest_digest)?,
    );
    let mut platform = Platform::default();
    platform.set_os(config.os().clone());
    platform.set_architecture(config.architecture().clone());
    platform.set_variant(config.variant().clone());
    desc.set_platform(Some(platform));
    if let Some(r) = ref_name {
        if r.is_empty() {
            return Err(Error::InvalidArgument("empty OCI ref name".into()));
        }
        desc.set_annotations(Some(HashMap::from([(
            ANNOTATION_REF_NAME.to_string(),
            r.to_string(),
        )])));
    }
    Ok(desc)
}

fn index_json(manifests: Vec<Descriptor>) -> Result<Vec<u8>> {
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(manifests);
    canonical_json("oci index", &index)
}

/// Opens a stored blob and checks its size against the descriptor's.
fn open_blob(store: &ContentStore, digest: &Digest, size: u64) -> Result<File> {
    let f = store
        .open_blob(digest)
        .map_err(|e| Error::content(format!("open blob {digest}"), e))?;
    let actual = f
        .metadata()
        .map_err(|e| Error::io(format!("stat blob {digest}"), e))?
        .len();
    if actual != size {
        return Err(Error::InvalidData(format!(
            "blob {digest} is {actual} bytes, its descriptor says {size}"
        )));
    }
    Ok(f)
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    tar.append_data(&mut h, path, io::empty())
        .map_err(|e| Error::io(format!("write archive entry {path}"), e))
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
    tar.append_data(&mut h, path, bytes)
        .map_err(|e| Error::io(format!("write archive entry {path}"), e))
}

fn append_reader<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    r: impl Read,
) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, size, 0o644);
    // `take` keeps a file that grew from corrupting the archive; one that shrank fails.
    tar.append_data(&mut h, path, r.take(size))
        .map_err(|e| Error::io(format!("write archive entry {path}"), e))
}

/// Writes the image as an OCI layout tar to `w` (e.g. stdout).
pub fn write_oci_archive_to(
    store: &ContentStore,
    image: &ImageRecord,
    ref_name: Option<&str>,
    w: impl Write,
) -> Result<()> {
    let index = index_json(vec![index_descriptor(store, image, ref_name)?])?;
    let blobs = image_blobs(store, image)?;
    let mut tar = tar::Builder::new(w);
    append_bytes(&mut tar, "oci-layout", OCI_LAYOUT)?;
    append_bytes(&mut tar, "index.json", &index)?;
    append_dir(&mut tar, "blobs/")?;
    append_dir(&mut tar, "blobs/sha256/")?;
    for (digest, size) in &blobs {
        let f = open_blob(store, digest, *size)?;
        append_reader(
            &mut tar,
            &format!("blobs/sha256/{}", digest.hex()),
            *size,
            BufReader::new(f),
        )?;
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| Error::io("finish oci archive", e))
}

/// Writes to a temp file beside `out` and renames it into place, so `out` is either
/// absent/old or complete.
fn write_atomically(out: &Path, f: impl FnOnce(&mut BufWriter<&File>) -> Result<()>) -> Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io(format!("create temp file in {}", dir.display()), e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        f(&mut w)?;
        w.flush()
            .map_err(|e| Error::io(format!("write {}", tmp.path().display()), e))?;
    }
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(format!("write {}", tmp.path().display()), e))?;
    tmp.persist(out)
        .map_err(|e| Error::io(format!("rename into {}", out.display()), e.error))?;
    Ok(())
}

/// Writes the image as an OCI layout tar at `out` (`index.json` names it `ref_name`).
pub fn write_oci_archive(
    store: &ContentStore,
    image: &ImageRecord,
    ref_name: Option<&str>,
    out: &Path,
) -> Result<()> {
    write_atomically(out, |w| write_oci_archive_to(store, image, ref_name, w))
}

/// Writes the image into an OCI layout directory, creating it or adding to an existing
/// layout: blobs already there are kept, and `index.json` keeps other images except one
/// with the same ref name (or, without a ref name, the same manifest).
pub fn write_oci_dir(
    store: &ContentStore,
    image: &ImageRecord,
    ref_name: Option<&str>,
    out_dir: &Path,
) -> Result<()> {
    let desc = index_descriptor(store, image, ref_name)?;
    let blob_dir = out_dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir)
        .map_err(|e| Error::io(format!("create {}", blob_dir.display()), e))?;
    for (digest, size) in image_blobs(store, image)? {
        let dest = blob_dir.join(digest.hex());
        if fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == size) {
            continue;
        }
        let mut src = open_blob(store, &digest, size)?;
        write_atomically(&dest, |w| {
            io::copy(&mut src, w)
                .map(|_| ())
                .map_err(|e| Error::io(format!("copy blob {digest}"), e))
        })?;
    }
    let layout = out_dir.join("oci-layout");
    if !layout.exists() {
        write_atomically(&layout, |w| {
            w.write_all(OCI_LAYOUT)
                .map_err(|e| Error::io(format!("write {}", layout.display()), e))
        })?;
    }

    let index_path = out_dir.join("index.json");
    let mut manifests = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<ImageIndex>(&bytes)
            .map_err(|e| Error::json(format!("parse {}", index_path.display()), e))?
            .manifests()
            .clone(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(format!("read {}", index_path.display()), e)),
    };
    let ref_of = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REF_NAME).cloned())
    };
    let ours = ref_of(&desc);
    manifests.retain(|d| match &ours {
        Some(r) => ref_of(d).as_ref() != Some(r),
        None => !(ref_of(d).is_none() && d.digest() == desc.digest()),
    });
    manifests.push(desc);
    let index = index_json(manifests)?;
    write_atomically(&index_path, |w| {
        w.write_all(&index)
            .map_err(|e| Error::io(format!("write {}", index_path.display()), e))
    })
}

/// Writes the image in `docker load` format to `w`: `manifest.json`, `repositories`,
/// `<config hex>.json` and one uncompressed `<diff id hex>/layer.tar` per layer.
///
/// Layers are decompressed twice (once to learn the tar size the entry header needs, once
/// to write it) rather than buffered, so memory and scratch space stay flat.
pub fn write_docker_archive_to(
    store: &ContentStore,
    image: &ImageRecord,
    tags: &[String],
    w: impl Write,
) -> Result<()> {
    write_docker_archive_multi_to(store, &[(image.clone(), tags.to_vec())], w)
}

/// [`write_docker_archive_to`] for several images (each with its tags) in one archive, as
/// `docker save A B` makes; layers and configs they share are written once.
pub fn write_docker_archive_multi_to(
    store: &ContentStore,
    images: &[(ImageRecord, Vec<String>)],
    w: impl Write,
) -> Result<()> {
    let mut tar = tar::Builder::new(w);
    let mut written = HashSet::new();
    let mut entries = Vec::new();
    let mut repos: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (image, tags) in images {
        let repo_tags = tags
            .iter()
            .map(|t| parse_image_name(t))
            .collect::<Result<Vec<_>>>()?;
        let (_, manifest) = read_manifest_bytes(store, image)?;
        let config = read_config(store, image)?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(Error::InvalidData(format!(
                "image {}: {} layers but {} diff ids",
                image.manifest_digest,
                manifest.layers().len(),
                diff_ids.len()
            )));
        }
        let config_name = format!("{}.json", image.config_digest.hex());
        if written.insert(config_name.clone()) {
            let config_size = manifest.config().size();
            let f = open_blob(store, &image.config_digest, config_size)?;
            append_reader(&mut tar, &config_name, config_size, BufReader::new(f))?;
        }
        let mut layer_paths = Vec::new();
        for (desc, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let diff_id = Digest::parse(diff_id)
                .ok_or_else(|| Error::InvalidData(format!("invalid diff id {diff_id:?}")))?;
            let dir = diff_id.hex().to_string();
            let path = format!("{dir}/layer.tar");
            if written.insert(dir.clone()) {
                let blob = dag_digest(desc.digest())?;
                let size = uncompressed_size(store, &blob, desc.size(), &diff_id)?;
                append_dir(&mut tar, &format!("{dir}/"))?;
                let r = open_uncompressed(store, &blob, desc.size())?;
                append_reader(&mut tar, &path, size, r)?;
            }
            layer_paths.push(path);
        }
        if let Some(top) = layer_paths.last().and_then(|p| p.split('/').next()) {
            for (n, t) in &repo_tags {
                repos
                    .entry(n.clone())
                    .or_default()
                    .insert(t.clone(), top.to_string());
            }
        }
        entries.push(serde_json::json!({
            "Config": config_name,
            "RepoTags": repo_tags.iter().map(|(n, t)| format!("{n}:{t}")).collect::<Vec<_>>(),
            "Layers": layer_paths,
        }));
    }
    append_bytes(
        &mut tar,
        "manifest.json",
        &canonical_json("docker manifest.json", &serde_json::Value::Array(entries))?,
    )?;
    if !repos.is_empty() {
        append_bytes(
            &mut tar,
            "repositories",
            &canonical_json("docker repositories", &repos)?,
        )?;
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| Error::io("finish docker archive", e))
}

/// Several images in one `docker load` tar at `out`.
pub fn write_docker_archive_multi(
    store: &ContentStore,
    images: &[(ImageRecord, Vec<String>)],
    out: &Path,
) -> Result<()> {
    write_atomically(out, |w| write_docker_archive_multi_to(store, images, w))
}

/// Writes the image as a `docker load` tar at `out`, tagged with `tags` (`app`,
/// `app:v1`; `:latest` is added when no tag is given).
pub fn write_docker_archive(
    store: &ContentStore,
    image: &ImageRecord,
    tags: &[String],
    out: &Path,
) -> Result<()> {
    write_atomically(out, |w| write_docker_archive_to(store, image, tags, w))
}

fn open_uncompressed(
    store: &ContentStore,
    blob: &Digest,
    size: u64,
) -> Result<Box<dyn Read + 'static>> {
    let f = open_blob(store, blob, size)?;
    let mut r = BufReader::new(f);
    let kind = {
        let head =
            io::BufRead::fill_buf(&mut r).map_err(|e| Error::io(format!("read blob {blob}"), e))?;
        detect(head)
    };
    decompressor(kind, r).map_err(|e| Error::io(format!("decompress blob {blob}"), e))
}

/// The uncompressed size of a layer blob, checking that its content hashes to `diff_id`.
fn uncompressed_size(
    store: &ContentStore,
    blob: &Digest,
    size: u64,
    diff_id: &Digest,
) -> Result<u64> {
    let mut r = open_uncompressed(store, blob, size)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r
            .read(&mut buf)
            .map_err(|e| Error::io(format!("decompress blob {blob}"), e))?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != diff_id.as_str() {
        return Err(Error::InvalidData(format!(
            "layer {blob} uncompresses to {actual}, the config says {diff_id}"
        )));
    }
    Ok(n)
}
