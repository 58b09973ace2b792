//! Parallel gzip in the manner of pigz: the input is cut into fixed-size blocks, each
//! deflated on a worker thread (primed with the previous block's last 32 KiB, so the
//! ratio matches serial gzip) and ended with a sync flush, so the pieces concatenate
//! into one ordinary single-member gzip stream. Blocks are fixed-size and the compressor
//! deterministic, so equal input gives equal bytes whatever the thread count.
//!
//! Memory stays bounded: at most `in_flight` blocks (input plus output) exist at once.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use flate2::{Compress, Crc, FlushCompress, Status};

/// Input per block: large enough that per-block overhead is negligible, small enough
/// that a few in flight stay cheap.
const BLOCK: usize = 1 << 20;
/// Deflate's window: what a block may refer back to in the previous one.
const WINDOW: usize = 32 * 1024;

struct Job {
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
    reply: mpsc::SyncSender<io::Result<Vec<u8>>>,
}

/// A `Write` that gzips onto `sink` using `threads` compressing threads.
pub(crate) struct ParallelGzEncoder<W: Write> {
    sink: Option<W>,
    level: u32,
    pending: Vec<u8>,
    /// The last `WINDOW` bytes of the previous block, to prime the next one.
    dict: Vec<u8>,
    crc: Crc,
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
    header_written: bool,
}

fn deflate_block(level: u32, dict: &[u8], data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level.min(9)), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out: Vec<u8> = Vec::with_capacity(data.len() / 2 + 64 * 1024);
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 16 * 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let before = c.total_in();
        let status = c
            .compress_vec(input, &mut out, flush)
            .map_err(io::Error::other)?;
        let consumed = usize::try_from(c.total_in() - before).unwrap_or(input.len());
        input = &input[consumed.min(input.len())..];
        if status == Status::StreamEnd {
            break;
        }
        // zlib's rule: a flush is complete once a call leaves output space unused.
        if !last && input.is_empty() && out.len() < out.capacity() {
            break;
        }
    }
    Ok(out)
}

impl<W: Write> ParallelGzEncoder<W> {
    pub(crate) fn new(sink: W, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || loop {
                    let job = {
                        let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    let Ok(job) = job else {
                        return;
                    };
                    let r = deflate_block(level, &job.dict, &job.data, job.last);
                    let _ = job.reply.send(r);
                })
            })
            .collect();
        ParallelGzEncoder {
            sink: Some(sink),
            level,
            pending: Vec::with_capacity(BLOCK),
            dict: Vec::new(),
            crc: Crc::new(),
            jobs: Some(tx),
            workers,
            in_flight: VecDeque::new(),
            max_in_flight: threads * 2,
            header_written: false,
        }
    }

    fn sink(&mut self) -> io::Result<&mut W> {
        self.sink
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))
    }

    fn write_header(&mut self) -> io::Result<()> {
        if self.header_written {
            return Ok(());
        }
        // Magic, deflate, no flags, mtime 0, XFL as gzip sets it, OS unknown: the same
        // header flate2's GzBuilder writes.
        let xfl = match self.level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        let header = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255];
        self.sink()?.write_all(&header)?;
        self.header_written = true;
        Ok(())
    }

    /// Writes the oldest finished block to the sink.
    fn drain_one(&mut self) -> io::Result<()> {
        let Some(rx) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let bytes = rx
            .recv()
            .map_err(|_| io::Error::other("gzip worker thread stopped"))??;
        self.sink()?.write_all(&bytes)
    }

    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        self.write_header()?;
        while self.in_flight.len() >= self.max_in_flight {
            self.drain_one()?;
        }
        let data = std::mem::replace(&mut self.pending, Vec::with_capacity(BLOCK));
        let dict = std::mem::replace(
            &mut self.dict,
            data[data.len().saturating_sub(WINDOW)..].to_vec(),
        );
        let (reply, rx) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?
            .send(Job {
                data,
                dict,
                last,
                reply,
            })
            .map_err(|_| io::Error::other("gzip worker threads stopped"))?;
        self.in_flight.push_back(rx);
        Ok(())
    }

    /// Compresses what is left, writes the trailer and returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        let crc = self.crc.sum();
        let len = self.crc.amount();
        let mut sink = self
            .sink
            .take()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?;
        sink.write_all(&crc.to_le_bytes())?;
        sink.write_all(&len.to_le_bytes())?;
        sink.flush()?;
        Ok(sink)
    }
}

impl<W: Write> Write for ParallelGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = BLOCK - self.pending.len();
        let n = buf.len().min(room);
        self.pending.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.pending.len() == BLOCK {
            self.dispatch(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzEncoder<W> {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once their current block is done.
        self.jobs.take();
        self.in_flight.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(n: usize) -> Vec<u8> {
        // Compressible but not trivial: numbers as text, like the benchmark's layer.
        let mut v = Vec::with_capacity(n);
        let mut i = 0u64;
        while v.len() < n {
            v.extend_from_slice(format!("{i}\n").as_bytes());
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                % 100_000;
        }
        v.truncate(n);
        v
    }

    fn gz(data: &[u8], threads: usize, chunk: usize) -> Vec<u8> {
        let mut e = ParallelGzEncoder::new(Vec::new(), 6, threads);
        for c in data.chunks(chunk.max(1)) {
            e.write_all(c).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn output_is_one_gzip_member_any_decoder_reads() {
        for size in [0, 1, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345] {
            let data = sample(size);
            let out = gz(&data, 3, 70_001);
            let mut back = Vec::new();
            // The single-member decoder: a multi-member stream would stop after one.
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "size {size}");
        }
    }

    #[test]
    fn thread_count_and_write_sizes_do_not_change_the_bytes() {
        let data = sample(2 * BLOCK + 777);
        let a = gz(&data, 1, 4096);
        assert_eq!(a, gz(&data, 4, 1 << 22));
        assert_eq!(a, gz(&data, 2, 99));
        assert_eq!(&a[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "no mtime");
    }

    #[test]
    fn ratio_matches_serial_gzip() {
        let data = sample(4 * BLOCK);
        let parallel = gz(&data, 2, 1 << 16).len();
        let mut serial = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        serial.write_all(&data).unwrap();
        let serial = serial.finish().unwrap().len();
        assert!(
            (parallel as f64) < serial as f64 * 1.01,
            "parallel {parallel} vs serial {serial}"
        );
    }

    #[test]
    fn system_gzip_reads_it() {
        let data = sample(BLOCK + 5);
        let out = gz(&data, 2, 1 << 16);
        let mut child = std::process::Command::new("gzip")
            .args(["-t"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&out).unwrap();
        assert!(child.wait().unwrap().success());
    }
}
