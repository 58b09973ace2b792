//! Upper dir -> compressed layer blob, streaming.

use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use strata_dag::Digest;
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::layer::{write_layer, DiffOptions};

use crate::{Error, Result};

/// How layer blobs are compressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Compression {
    /// `level` 0..=9.
    Gzip {
        level: u32,
    },
    /// `level` as zstd understands it (1..=22, negative = faster).
    Zstd {
        level: i32,
    },
    Uncompressed,
}

impl Default for Compression {
    /// Gzip at level 6, what BuildKit (Go's `gzip.DefaultCompression`) and flate2 use.
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    /// The OCI media type of layers compressed this way.
    pub fn media_type(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd { .. } => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::Uncompressed => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// buildx's name for it: `gzip`, `zstd` or `uncompressed`.
    pub fn name(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => "gzip",
            Compression::Zstd { .. } => "zstd",
            Compression::Uncompressed => "uncompressed",
        }
    }

    /// Parses buildx's `compression=` / `compression-level=` values.
    pub fn from_name(name: &str, level: Option<i32>) -> Result<Self> {
        let c = match name {
            "gzip" => Compression::Gzip {
                level: match level {
                    None => 6,
                    Some(l) => u32::try_from(l).map_err(|_| {
                        Error::InvalidArgument(format!("gzip compression level {l} is not 0..=9"))
                    })?,
                },
            },
            "zstd" => Compression::Zstd {
                level: level.unwrap_or(3),
            },
            "uncompressed" => Compression::Uncompressed,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown compression {other:?} (want gzip, zstd or uncompressed)"
                )))
            }
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        match self {
            Compression::Gzip { level } if *level > 9 => Err(Error::InvalidArgument(format!(
                "gzip compression level {level} is not 0..=9"
            ))),
            Compression::Zstd { level } if !zstd::compression_level_range().contains(level) => {
                let r = zstd::compression_level_range();
                Err(Error::InvalidArgument(format!(
                    "zstd compression level {level} is not {}..={}",
                    r.start(),
                    r.end()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A layer blob in the content store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerBlob {
    /// Digest of the blob as stored (compressed).
    pub digest: Digest,
    /// Size of the blob as stored.
    pub size: u64,
    /// OCI media type; [`crate::write_image`] maps it to Docker's when asked.
    pub media_type: String,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    #[serde(default)]
    pub uncompressed_size: u64,
}

/// Diffs a snapshot's upper dir into a compressed blob in `store`.
///
/// The tar is written on a helper thread and handed over in bounded chunks, so the walk
/// and the compression overlap and memory does not grow with the layer. The diff ID is
/// hashed from the bytes as they pass, then checked against what `write_layer` reports.
pub fn export_layer(
    upper: &Path,
    store: &ContentStore,
    compression: &Compression,
    opts: &DiffOptions,
) -> Result<LayerBlob> {
    compression.validate()?;
    // `write_layer` hashes the tar as it writes it, which is the diff ID; an uncompressed
    // blob is the tar itself, so the content writer need not hash it a second time.
    let uncompressed = *compression == Compression::Uncompressed;
    let writer = if uncompressed {
        store.writer_for_known_digest()
    } else {
        store.writer()
    }
    .map_err(|e| Error::content("open content writer for layer", e))?;
    let (out, writer) = compress_pipeline(compression, writer, Hash::ByProducer, |w| {
        write_layer(upper, w, opts)
            .map_err(|e| Error::content(format!("write layer tar of {}", upper.display()), e))
    })?;
    let (digest, size) = writer
        .commit(uncompressed.then_some(&out.diff_id))
        .map_err(|e| Error::content("commit layer blob", e))?;
    Ok(LayerBlob {
        digest,
        size,
        media_type: compression.media_type().to_string(),
        diff_id: out.diff_id,
        uncompressed_size: out.uncompressed_size,
    })
}

/// [`export_layer`] for several upper dirs at once (a few in parallel: compression is
/// the CPU-bound part), results in input order. Stops at the first error.
pub fn export_layers(
    uppers: &[&Path],
    store: &ContentStore,
    compression: &Compression,
    opts: &DiffOptions,
) -> Result<Vec<LayerBlob>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    compression.validate()?;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(uppers.len());
    let results: Vec<Mutex<Option<Result<LayerBlob>>>> =
        uppers.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (Some(upper), Some(slot)) = (uppers.get(i), results.get(i)) else {
                        return;
                    };
                    let r = export_layer(upper, store, compression, opts);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(uppers.len());
    let mut first_err = None;
    for (slot, upper) in results.into_iter().zip(uppers) {
        match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(blob)) => out.push(blob),
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None if first_err.is_none() => {
                first_err = Some(Error::InvalidData(format!(
                    "layer {} was not exported",
                    upper.display()
                )))
            }
            None => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Re-compresses a stored layer blob with `compression` (for `force-compression`): the
/// blob is decompressed and compressed again as a stream, and the uncompressed bytes
/// must hash to the blob's diff ID, so the new blob is the same layer.
pub fn recompress_blob(
    store: &ContentStore,
    blob: &LayerBlob,
    compression: &Compression,
) -> Result<LayerBlob> {
    compression.validate()?;
    let file = store
        .open_blob(&blob.digest)
        .map_err(|e| Error::content(format!("open layer blob {}", blob.digest), e))?;
    let writer = store
        .writer()
        .map_err(|e| Error::content("open content writer for layer", e))?;
    let expected = blob.diff_id.clone();
    let (out, writer) = compress_pipeline(compression, writer, Hash::InPipeline, move |w| {
        let mut r = io::BufReader::new(file);
        let kind = {
            let head = io::BufRead::fill_buf(&mut r)
                .map_err(|e| Error::io("read layer blob to re-compress", e))?;
            detect(head)
        };
        let mut plain = decompressor(kind, r).map_err(|e| Error::io("decompress layer blob", e))?;
        io::copy(&mut plain, w).map_err(|e| Error::io("decompress layer blob", e))?;
        Ok(expected)
    })?;
    if out.reported != out.diff_id {
        return Err(Error::InvalidData(format!(
            "layer blob {} decompresses to {}, not its diff id {}",
            blob.digest, out.diff_id, out.reported
        )));
    }
    let (digest, size) = writer
        .commit(None)
        .map_err(|e| Error::content("commit re-compressed layer blob", e))?;
    Ok(LayerBlob {
        digest,
        size,
        media_type: compression.media_type().to_string(),
        diff_id: out.diff_id,
        uncompressed_size: out.uncompressed_size,
    })
}

/// The compression a layer media type (OCI or Docker) names.
pub fn compression_of_media_type(media_type: &str) -> Option<&'static str> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some("gzip"),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some("zstd"),
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some("uncompressed"),
        _ => None,
    }
}

pub(crate) struct PipelineOutput {
    /// sha256 of the uncompressed bytes, hashed here.
    pub diff_id: Digest,
    /// What the producer said the digest is.
    pub reported: Digest,
    pub uncompressed_size: u64,
}

const CHUNK: usize = 64 * 1024;
const CHUNKS_IN_FLIGHT: usize = 8;

/// Runs `produce` on a scoped thread writing into a bounded channel; this thread hashes and
/// compresses what arrives into `sink`, which is returned once the compressor is finished.
/// Who hashes the uncompressed bytes for the diff ID.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    /// The producer returns the digest of what it wrote (`write_layer` does): trusted.
    ByProducer,
    /// The pipeline hashes what passes; the producer returns what it should be.
    InPipeline,
}

pub(crate) fn compress_pipeline<W, F>(
    compression: &Compression,
    sink: W,
    hash: Hash,
    produce: F,
) -> Result<(PipelineOutput, W)>
where
    W: Write,
    F: FnOnce(&mut ChannelWriter) -> Result<Digest> + Send,
{
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            let reported = produce(&mut w)?;
            w.finish()
                .map_err(|e| Error::io("hand layer tar to compressor", e))?;
            Ok::<_, Error>(reported)
        });

        let consumed = consume(compression, sink, rx, hash == Hash::InPipeline);
        // The receiver is gone once `consume` returns, so a producer still writing fails
        // with a broken pipe instead of blocking forever.
        let produced = producer
            .join()
            .map_err(|_| Error::InvalidData("layer tar writer thread panicked".into()))?;
        match (produced, consumed) {
            (Ok(reported), Ok((hashed, uncompressed_size, sink))) => Ok((
                PipelineOutput {
                    diff_id: hashed.unwrap_or_else(|| reported.clone()),
                    reported,
                    uncompressed_size,
                },
                sink,
            )),
            // A compressor error explains a producer's broken pipe, not the other way round.
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
        }
    })
}

fn consume<W: Write>(
    compression: &Compression,
    sink: W,
    rx: mpsc::Receiver<Vec<u8>>,
    hash: bool,
) -> Result<(Option<Digest>, u64, W)> {
    let mut enc = Encoder::new(compression, sink)?;
    let mut hasher = hash.then(Sha256::new);
    let mut n = 0u64;
    for chunk in rx {
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        n += chunk.len() as u64;
        enc.write_all(&chunk)
            .map_err(|e| Error::io("compress layer", e))?;
    }
    let sink = enc
        .finish()
        .map_err(|e| Error::io("finish layer compression", e))?;
    let diff_id = match hasher {
        Some(h) => Some(
            Digest::parse(&format!("sha256:{}", hex::encode(h.finalize())))
                .ok_or_else(|| Error::InvalidData("sha256 produced a malformed digest".into()))?,
        ),
        None => None,
    };
    Ok((diff_id, n, sink))
}

/// The producer's end of the pipeline: buffers writes into chunks for the channel.
pub(crate) struct ChannelWriter {
    tx: mpsc::SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "layer compressor stopped"))
    }

    fn finish(mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) enum Encoder<W: Write> {
    Gzip(crate::pgzip::ParallelGzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(compression: &Compression, sink: W) -> Result<Self> {
        Ok(match compression {
            // GzBuilder's defaults: mtime 0, no file name, OS "unknown" -> equal input gives
            // equal bytes.
            // Blocks compressed on several threads into one ordinary gzip member.
            Compression::Gzip { level } => Encoder::Gzip(crate::pgzip::ParallelGzEncoder::new(
                sink,
                (*level).min(9),
                std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4)),
            )),
            Compression::Zstd { level } => Encoder::Zstd(
                zstd::Encoder::new(sink, *level)
                    .map_err(|e| Error::io("start zstd compression", e))?,
            ),
            Compression::Uncompressed => Encoder::Plain(sink),
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Plain(mut w) => {
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

/// Compression of a stored blob, told by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detected {
    Gzip,
    Zstd,
    Plain,
}

pub(crate) fn detect(head: &[u8]) -> Detected {
    if head.starts_with(&[0x1f, 0x8b]) {
        Detected::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Detected::Zstd
    } else {
        Detected::Plain
    }
}

/// A reader of the uncompressed bytes of `r`, whose first bytes were `kind`.
pub(crate) fn decompressor<'a, R: io::BufRead + 'a>(
    kind: Detected,
    r: R,
) -> io::Result<Box<dyn io::Read + 'a>> {
    Ok(match kind {
        Detected::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Detected::Zstd => Box::new(zstd::Decoder::with_buffer(r)?),
        Detected::Plain => Box::new(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let data = vec![7u8; 300_000];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "a/b.bin", &data[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn run(c: &Compression, input: &[u8]) -> (PipelineOutput, Vec<u8>) {
        compress_pipeline(c, Vec::new(), Hash::InPipeline, |w| {
            // Odd write sizes cross chunk boundaries.
            for part in input.chunks(10_007) {
                w.write_all(part).map_err(|e| Error::io("test write", e))?;
            }
            Ok(Digest::of(input))
        })
        .unwrap()
    }

    #[test]
    fn every_compression_round_trips_to_the_same_diff_id() {
        let tar = sample_tar();
        for c in [
            Compression::Gzip { level: 6 },
            Compression::Zstd { level: 3 },
            Compression::Uncompressed,
        ] {
            let (out, blob) = run(&c, &tar);
            assert_eq!(out.diff_id, Digest::of(&tar), "{c:?}");
            assert_eq!(out.reported, out.diff_id);
            assert_eq!(out.uncompressed_size, tar.len() as u64);
            let mut back = Vec::new();
            decompressor(detect(&blob), &blob[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, tar, "{c:?}");
            if c != Compression::Uncompressed {
                assert!(blob.len() < tar.len() / 10, "{c:?} did not compress");
            }
        }
    }

    #[test]
    fn gzip_output_is_deterministic_and_has_no_mtime() {
        let tar = sample_tar();
        let (_, a) = run(&Compression::default(), &tar);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (_, b) = run(&Compression::default(), &tar);
        assert_eq!(a, b);
        // Header: magic, CM, FLG (no FNAME), MTIME (4 bytes) all zero.
        assert_eq!(&a[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&a[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn producer_error_is_reported() {
        let err = compress_pipeline(&Compression::default(), Vec::new(), Hash::InPipeline, |w| {
            w.write_all(&[1; 200_000])
                .map_err(|e| Error::io("test write", e))?;
            Err(Error::InvalidArgument("boom".into()))
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    struct FailingSink;
    impl Write for FailingSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_error_stops_the_producer_without_hanging() {
        let err = compress_pipeline(
            &Compression::Uncompressed,
            FailingSink,
            Hash::InPipeline,
            |w| {
                for _ in 0..1000 {
                    w.write_all(&[0; 65536])
                        .map_err(|e| Error::io("test write", e))?;
                }
                Ok(Digest::of(b""))
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("compress layer"), "{err}");
    }

    #[test]
    fn compression_names_and_levels() {
        assert_eq!(
            Compression::from_name("zstd", None).unwrap(),
            Compression::Zstd { level: 3 }
        );
        assert_eq!(
            Compression::from_name("gzip", Some(9)).unwrap(),
            Compression::Gzip { level: 9 }
        );
        assert!(Compression::from_name("gzip", Some(10)).is_err());
        assert!(Compression::from_name("gzip", Some(-1)).is_err());
        assert!(Compression::from_name("zstd", Some(99)).is_err());
        assert!(Compression::from_name("lz4", None).is_err());
    }
}
