//! The page store: unique pages in independently decompressible zstd frames
//! (`pages`) plus their index (`pages.index.json`).
//!
//! ```text
//! pages:  [zstd frame 0][zstd frame 1]...[zstd frame N-1]      (no header, no padding)
//!          pages 0..P    pages P..2P       the last holds 1..=P pages
//! ```
//!
//! Every frame holds `pages_per_frame` (P) whole pages, the last one fewer, so
//! page id `i` lives in frame `i / P` at byte `(i % P) * page_size` of its
//! decompressed contents. Each frame is checksummed (xxh3-64 of the
//! decompressed bytes) in the index, and each can be decompressed alone: a
//! restore decompresses frames in parallel, a lazy restore fetches one.
//!
//! Writing: the dumper appends pages into the current frame buffer; full
//! buffers move (no copy) to compression threads, and one writer thread puts
//! the compressed frames into `pages` in order while hashing the file. A
//! fixed pool of frame buffers bounds memory and recycles allocations.
//! This module never reads or interprets process metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use super::types::{
    FrameEntry, PageId, PageIndex, MAX_FRAME_BYTES, MAX_PAGE_SIZE, MIN_PAGE_SIZE, PAGES_FILE,
    PAGE_INDEX_FILE,
};
use super::ImageError;

/// 1024 pages of 4 KiB: 4 MiB frames, big enough to compress well, small
/// enough for a lazy restore to fetch one.
pub const DEFAULT_PAGES_PER_FRAME: u64 = 1024;
/// zstd level 1: fast enough for >= 1 GiB/s of pages on two cores.
pub const DEFAULT_LEVEL: i32 = -1;

/// How the page store compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStoreOptions {
    /// Pages per zstd frame (every frame but the last).
    pub pages_per_frame: u64,
    /// zstd compression level.
    pub level: i32,
    /// Compression threads; 0 means one per core.
    pub workers: usize,
}

impl Default for PageStoreOptions {
    fn default() -> Self {
        PageStoreOptions {
            pages_per_frame: DEFAULT_PAGES_PER_FRAME,
            level: DEFAULT_LEVEL,
            workers: 0,
        }
    }
}

/// What [`PageStoreWriter::finish`] produced: the index to write as
/// `pages.index.json` and the identity of the `pages` file.
#[derive(Debug, Clone)]
pub struct PageStoreSummary {
    pub index: PageIndex,
    /// Size of `pages` in bytes.
    pub file_size: u64,
    /// xxh3-128 of `pages`, computed while writing.
    pub xxh3_128: u128,
}

/// One frame buffer on its way through the pipeline. `raw` always has the
/// full frame length once first used; `filled` says how much of it is pages.
struct Slot {
    raw: Vec<u8>,
    filled: usize,
    compressed: Vec<u8>,
    frame: u64,
    first_page: PageId,
    checksum: u64,
}

/// What a compression thread hands to the writer thread.
enum Compressed {
    Frame(Slot),
    /// Compression failed; the slot still comes back so the pool never runs dry.
    Failed(Slot, ImageError),
}

struct Shared {
    /// Set when the store is dropped unfinished: the writer thread stops writing.
    abort: AtomicBool,
    /// Set by any thread that failed; the appender stops at the next frame.
    failed: AtomicBool,
    bytes_compressed: AtomicU64,
}

struct WriterOutcome {
    frames: Vec<FrameEntry>,
    file_size: u64,
    xxh3_128: u128,
}

/// Appends unique pages; compresses full frames on worker threads.
pub struct PageStoreWriter {
    path: PathBuf,
    page_size: u64,
    pages_per_frame: u64,
    frame_bytes: usize,
    current: Option<Slot>,
    next_page: PageId,
    next_frame: u64,
    /// Pages handed out by the last [`reserve`](Self::reserve).
    reserved: u64,
    pool: Receiver<Slot>,
    jobs: Option<SyncSender<Slot>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<Result<WriterOutcome, ImageError>>>,
    /// First error a worker reported (workers also forward it to the writer thread).
    worker_error: Arc<Mutex<Option<ImageError>>>,
    shared: Arc<Shared>,
    finished: bool,
}

impl PageStoreWriter {
    /// Creates `dir/pages` (which must not exist) and starts the compression
    /// and writer threads.
    pub fn create(
        dir: &Path,
        page_size: u64,
        options: PageStoreOptions,
    ) -> Result<Self, ImageError> {
        // Only page sizes a reader accepts.
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(ImageError::BadOption {
                field: "page_size",
                value: page_size,
            });
        }
        if options.pages_per_frame == 0
            || options
                .pages_per_frame
                .checked_mul(page_size)
                .is_none_or(|bytes| bytes > MAX_FRAME_BYTES)
        {
            return Err(ImageError::BadOption {
                field: "pages_per_frame",
                value: options.pages_per_frame,
            });
        }
        let frame_bytes = usize::try_from(options.pages_per_frame * page_size).map_err(|_| {
            ImageError::BadOption {
                field: "pages_per_frame",
                value: options.pages_per_frame,
            }
        })?;
        let workers = if options.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.workers
        };
        let path = dir.join(PAGES_FILE);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| ImageError::io(&path, e))?;

        // Every frame in flight holds a slot: the pool size bounds memory to
        // roughly pool * 2 * frame_bytes whatever the relative thread speeds.
        let pool_size = workers * 2 + 1;
        let (pool_tx, pool) = mpsc::sync_channel::<Slot>(pool_size);
        for _ in 0..pool_size {
            let slot = Slot {
                raw: Vec::new(),
                filled: 0,
                compressed: Vec::new(),
                frame: 0,
                first_page: 0,
                checksum: 0,
            };
            pool_tx
                .send(slot)
                .map_err(|_| ImageError::WorkerPanicked { role: "pool" })?;
        }
        let shared = Arc::new(Shared {
            abort: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            bytes_compressed: AtomicU64::new(0),
        });
        let worker_error = Arc::new(Mutex::new(None));
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Slot>(workers);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::channel::<Compressed>();

        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let jobs_rx = Arc::clone(&jobs_rx);
            let done_tx = done_tx.clone();
            let shared = Arc::clone(&shared);
            let worker_error = Arc::clone(&worker_error);
            let level = options.level;
            let handle = std::thread::Builder::new()
                .name("cowsnap-zstd".into())
                .spawn(move || compress_loop(level, &jobs_rx, &done_tx, &shared, &worker_error))
                .map_err(|e| ImageError::io(&path, e))?;
            handles.push(handle);
        }
        drop(done_tx);
        let writer = {
            let shared = Arc::clone(&shared);
            let path = path.clone();
            let pages_per_frame = options.pages_per_frame;
            std::thread::Builder::new()
                .name("cowsnap-pages".into())
                .spawn(move || {
                    write_loop(
                        file,
                        &path,
                        page_size,
                        pages_per_frame,
                        &done_rx,
                        &pool_tx,
                        &shared,
                    )
                })
                .map_err(|e| ImageError::io(dir.join(PAGES_FILE), e))?
        };

        Ok(PageStoreWriter {
            path,
            page_size,
            pages_per_frame: options.pages_per_frame,
            frame_bytes,
            current: None,
            next_page: 0,
            next_frame: 0,
            reserved: 0,
            pool,
            jobs: Some(jobs_tx),
            workers: handles,
            writer: Some(writer),
            worker_error,
            shared,
            finished: false,
        })
    }

    /// Appends whole pages (`pages.len()` a multiple of the page size) and
    /// returns the id of the first; ids are dense, in call order.
    pub fn append(&mut self, pages: &[u8]) -> Result<PageId, ImageError> {
        if !(pages.len() as u64).is_multiple_of(self.page_size) {
            return Err(ImageError::PartialPage {
                len: pages.len(),
                page_size: self.page_size,
            });
        }
        let first = self.next_page;
        let mut rest = pages;
        while !rest.is_empty() {
            let frame_bytes = self.frame_bytes;
            let slot = self.current_slot()?;
            let n = rest.len().min(frame_bytes - slot.filled);
            slot.raw[slot.filled..slot.filled + n].copy_from_slice(&rest[..n]);
            slot.filled += n;
            let full = slot.filled == frame_bytes;
            rest = &rest[n..];
            self.next_page += n as u64 / self.page_size;
            if full {
                self.dispatch()?;
            }
        }
        self.reserved = 0;
        Ok(first)
    }

    /// The unwritten rest of the current frame (at least one page), to read
    /// pages straight into (e.g. with `process_vm_readv`), and the id its
    /// first page will get. Follow with [`commit_reserved`](Self::commit_reserved);
    /// bytes not committed are overwritten by the next append.
    pub fn reserve(&mut self) -> Result<(PageId, &mut [u8]), ImageError> {
        let first = self.next_page;
        let page_size = self.page_size;
        let filled = self.current_slot()?.filled;
        self.reserved = (self.frame_bytes - filled) as u64 / page_size;
        let slot = self.current_slot()?;
        Ok((first, &mut slot.raw[filled..]))
    }

    /// Marks the first `pages` pages of the last [`reserve`](Self::reserve)d
    /// space as appended; returns the id of the first.
    pub fn commit_reserved(&mut self, pages: u64) -> Result<PageId, ImageError> {
        if pages > self.reserved {
            return Err(ImageError::ReserveOverrun {
                pages,
                reserved: self.reserved,
            });
        }
        let first = self.next_page;
        if pages == 0 {
            return Ok(first);
        }
        let bytes = (pages * self.page_size) as usize;
        let frame_bytes = self.frame_bytes;
        let slot = self.current_slot()?;
        slot.filled += bytes;
        let full = slot.filled == frame_bytes;
        self.next_page += pages;
        self.reserved = 0;
        if full {
            self.dispatch()?;
        }
        Ok(first)
    }

    /// Unique pages appended so far.
    pub fn pages_written(&self) -> u64 {
        self.next_page
    }
    /// Compressed bytes produced so far (frames finished).
    pub fn bytes_compressed(&self) -> u64 {
        self.shared.bytes_compressed.load(Ordering::Relaxed)
    }
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    pub fn pages_per_frame(&self) -> u64 {
        self.pages_per_frame
    }

    /// Compresses what is left, waits for every frame to be written and
    /// synced, and returns the index. The store accepts no pages afterwards.
    pub fn finish(&mut self) -> Result<PageStoreSummary, ImageError> {
        if self.finished {
            return Err(ImageError::PageStoreFinished);
        }
        if self.current.as_ref().is_some_and(|slot| slot.filled > 0) {
            self.dispatch()?;
        }
        self.current = None;
        self.finished = true;
        let outcome = self.shut_down()?;
        let frames_total: u64 = outcome.frames.iter().map(|f| f.page_count).sum();
        if frames_total != self.next_page {
            return Err(ImageError::PageCountMismatch {
                page_count: self.next_page,
                frames_total,
            });
        }
        Ok(PageStoreSummary {
            index: PageIndex {
                page_size: self.page_size,
                pages_per_frame: self.pages_per_frame,
                page_count: self.next_page,
                frames: outcome.frames,
            },
            file_size: outcome.file_size,
            xxh3_128: outcome.xxh3_128,
        })
    }

    /// Stops the threads without writing anything more (what `Drop` does).
    pub fn abort(&mut self) {
        if self.jobs.is_none() && self.writer.is_none() {
            return;
        }
        self.finished = true;
        self.shared.abort.store(true, Ordering::SeqCst);
        self.current = None;
        // The outcome does not matter any more: the caller discards the image.
        let _ = self.shut_down();
    }

    fn current_slot(&mut self) -> Result<&mut Slot, ImageError> {
        if self.finished {
            return Err(ImageError::PageStoreFinished);
        }
        if self.current.is_none() {
            let mut slot = self.take_free_slot()?;
            if slot.raw.len() != self.frame_bytes {
                slot.raw = vec![0; self.frame_bytes];
            }
            slot.filled = 0;
            self.current = Some(slot);
        }
        // The branch above just filled `current`.
        self.current.as_mut().ok_or(ImageError::PageStoreFinished)
    }

    /// Waits for a free frame buffer; notices a dead thread instead of
    /// waiting forever.
    fn take_free_slot(&mut self) -> Result<Slot, ImageError> {
        loop {
            if self.shared.failed.load(Ordering::SeqCst) {
                return Err(self.fail());
            }
            match self.pool.recv_timeout(Duration::from_millis(100)) {
                Ok(slot) => return Ok(slot),
                Err(RecvTimeoutError::Timeout) => {
                    let dead = self.workers.iter().any(|h| h.is_finished())
                        || self.writer.as_ref().is_none_or(|h| h.is_finished());
                    if dead {
                        return Err(self.fail());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.fail()),
            }
        }
    }

    /// Hands the current frame to the compression threads.
    fn dispatch(&mut self) -> Result<(), ImageError> {
        let Some(mut slot) = self.current.take() else {
            return Ok(());
        };
        slot.frame = self.next_frame;
        slot.first_page = self.next_page - slot.filled as u64 / self.page_size;
        self.next_frame += 1;
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.fail());
        }
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(slot).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.fail());
        }
        Ok(())
    }

    /// Stops everything after a thread failed and returns the first error.
    fn fail(&mut self) -> ImageError {
        self.finished = true;
        self.shared.abort.store(true, Ordering::SeqCst);
        self.current = None;
        match self.shut_down() {
            Err(e) => e,
            Ok(_) => ImageError::WorkerPanicked {
                role: "compression",
            },
        }
    }

    /// Closes the job queue and joins every thread; the first error wins.
    fn shut_down(&mut self) -> Result<WriterOutcome, ImageError> {
        self.jobs = None;
        let mut first_error = None;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() && first_error.is_none() {
                first_error = Some(ImageError::WorkerPanicked {
                    role: "compression",
                });
            }
        }
        if let Ok(mut slot) = self.worker_error.lock() {
            if let Some(e) = slot.take() {
                first_error = Some(e);
            }
        }
        let outcome = match self.writer.take() {
            Some(handle) => match handle.join() {
                Ok(result) => result,
                Err(_) => Err(ImageError::WorkerPanicked { role: "writer" }),
            },
            None => Err(ImageError::PageStoreFinished),
        };
        match (first_error, outcome) {
            (Some(e), _) => Err(e),
            (None, outcome) => outcome,
        }
    }

    /// Path of the `pages` file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PageStoreWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

fn compress_loop(
    level: i32,
    jobs: &Mutex<Receiver<Slot>>,
    done: &Sender<Compressed>,
    shared: &Shared,
    worker_error: &Mutex<Option<ImageError>>,
) {
    let mut compressor = zstd::bulk::Compressor::new(level);
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut slot) = job else { return };
        let result = match &mut compressor {
            Ok(c) => compress_slot(c, &mut slot),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        let message = match result {
            Ok(()) => Compressed::Frame(slot),
            Err(source) => {
                shared.failed.store(true, Ordering::SeqCst);
                let frame = slot.frame;
                if let Ok(mut first) = worker_error.lock() {
                    first.get_or_insert(ImageError::Compress {
                        frame,
                        source: std::io::Error::new(source.kind(), source.to_string()),
                    });
                }
                Compressed::Failed(slot, ImageError::Compress { frame, source })
            }
        };
        if done.send(message).is_err() {
            return;
        }
    }
}

fn compress_slot(
    compressor: &mut zstd::bulk::Compressor<'_>,
    slot: &mut Slot,
) -> std::io::Result<()> {
    let data = &slot.raw[..slot.filled];
    slot.checksum = xxh3_64(data);
    let bound = zstd::zstd_safe::compress_bound(data.len());
    slot.compressed.clear();
    if slot.compressed.capacity() < bound {
        slot.compressed.reserve_exact(bound);
    }
    compressor.compress_to_buffer(data, &mut slot.compressed)?;
    Ok(())
}

/// Writes compressed frames to `pages` in frame order, hashing the file as
/// it goes, and returns every buffer to the pool.
fn write_loop(
    mut file: File,
    path: &Path,
    page_size: u64,
    pages_per_frame: u64,
    done: &Receiver<Compressed>,
    pool: &SyncSender<Slot>,
    shared: &Shared,
) -> Result<WriterOutcome, ImageError> {
    let mut pending: BTreeMap<u64, Slot> = BTreeMap::new();
    let mut next_frame = 0u64;
    let mut offset = 0u64;
    let mut hasher = Xxh3Default::new();
    let mut frames = Vec::new();
    let mut error: Option<ImageError> = None;
    for message in done.iter() {
        let slot = match message {
            Compressed::Frame(slot) => slot,
            Compressed::Failed(slot, e) => {
                error.get_or_insert(e);
                shared.failed.store(true, Ordering::SeqCst);
                // The pool must never run dry, or the appender would wait forever.
                let _ = pool.send(slot);
                continue;
            }
        };
        if error.is_some() || shared.abort.load(Ordering::SeqCst) {
            let _ = pool.send(slot);
            continue;
        }
        pending.insert(slot.frame, slot);
        while let Some(slot) = pending.remove(&next_frame) {
            if error.is_none() {
                match file.write_all(&slot.compressed) {
                    Ok(()) => {
                        hasher.update(&slot.compressed);
                        let len = slot.compressed.len() as u64;
                        frames.push(FrameEntry {
                            offset,
                            compressed_len: len,
                            first_page: slot.first_page,
                            page_count: slot.filled as u64 / page_size,
                            xxh3_64: format!("{:016x}", slot.checksum),
                            compressed_xxh3_64: Some(format!("{:016x}", xxh3_64(&slot.compressed))),
                        });
                        debug_assert_eq!(slot.first_page, next_frame * pages_per_frame);
                        offset += len;
                        shared.bytes_compressed.fetch_add(len, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.failed.store(true, Ordering::SeqCst);
                        error = Some(ImageError::io(path, e));
                    }
                }
            }
            next_frame += 1;
            // The appender may be gone (dropped store): then nobody needs it back.
            let _ = pool.send(slot);
        }
    }
    for (_, slot) in std::mem::take(&mut pending) {
        let _ = pool.send(slot);
    }
    if let Some(e) = error {
        return Err(e);
    }
    if shared.abort.load(Ordering::SeqCst) {
        return Err(ImageError::PageStoreFinished);
    }
    file.sync_all().map_err(|e| ImageError::io(path, e))?;
    Ok(WriterOutcome {
        frames,
        file_size: offset,
        xxh3_128: hasher.digest128(),
    })
}

/// Checks that the index describes a well-formed store of `file_size` bytes
/// with pages of `page_size` bytes, and returns the parsed frame checksums.
/// Decompresses nothing.
pub fn validate_index(
    index: &PageIndex,
    page_size: u64,
    file_size: u64,
) -> Result<Vec<u64>, ImageError> {
    if index.page_size != page_size {
        return Err(ImageError::PageSizeMismatch {
            file: PAGE_INDEX_FILE.into(),
            found: index.page_size,
            expected: page_size,
        });
    }
    let ppf = index.pages_per_frame;
    if ppf == 0 {
        return Err(ImageError::ZeroPagesPerFrame);
    }
    if ppf
        .checked_mul(page_size)
        .is_none_or(|bytes| bytes > MAX_FRAME_BYTES)
    {
        return Err(ImageError::FrameTooLarge {
            pages_per_frame: ppf,
            page_size,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut checksums = Vec::with_capacity(index.frames.len());
    let mut offset = 0u64;
    let mut first_page = 0u64;
    let last = index.frames.len().saturating_sub(1);
    for (i, frame) in index.frames.iter().enumerate() {
        if frame.offset != offset {
            return Err(ImageError::FrameNotContiguous {
                frame: i,
                offset: frame.offset,
                expected: offset,
            });
        }
        let end = frame.offset.checked_add(frame.compressed_len);
        if end.is_none_or(|end| end > file_size) {
            return Err(ImageError::TruncatedFrame {
                frame: i,
                offset: frame.offset,
                compressed_len: frame.compressed_len,
                file_size,
            });
        }
        if frame.first_page != first_page {
            return Err(ImageError::FramePagesNotContiguous {
                frame: i,
                first_page: frame.first_page,
                expected: first_page,
            });
        }
        let count_ok = if i == last {
            frame.page_count >= 1 && frame.page_count <= ppf
        } else {
            frame.page_count == ppf
        };
        if !count_ok {
            return Err(ImageError::FramePageCount {
                frame: i,
                page_count: frame.page_count,
                expected: ppf,
                pages_per_frame: ppf,
            });
        }
        // Frame bytes are bounded above, so this cannot overflow.
        let min = min_zstd_frame_len(frame.page_count * page_size);
        if frame.compressed_len < min {
            return Err(ImageError::FrameTooShort {
                frame: i,
                compressed_len: frame.compressed_len,
                page_count: frame.page_count,
                min,
            });
        }
        checksums.push(parse_hex_u64(
            &frame.xxh3_64,
            PAGE_INDEX_FILE,
            &format!("frames[{i}].xxh3_64"),
        )?);
        if let Some(c) = &frame.compressed_xxh3_64 {
            parse_hex_u64(
                c,
                PAGE_INDEX_FILE,
                &format!("frames[{i}].compressed_xxh3_64"),
            )?;
        }
        offset += frame.compressed_len;
        first_page += frame.page_count;
    }
    if first_page != index.page_count {
        return Err(ImageError::PageCountMismatch {
            page_count: index.page_count,
            frames_total: first_page,
        });
    }
    if offset != file_size {
        return Err(ImageError::PagesTrailingBytes {
            frames_end: offset,
            trailing: file_size - offset,
        });
    }
    Ok(checksums)
}

/// The shortest a zstd frame holding `content` bytes (> 0) can be: a frame
/// header of at least 6 bytes (magic, descriptor, window or size byte),
/// then blocks of at most 128 KiB of content each, every one at least 4
/// bytes (a 3-byte header and an RLE byte, or a compressed block's two
/// section headers). A longer claim of content than this is a lie.
pub fn min_zstd_frame_len(content: u64) -> u64 {
    const HEADER: u64 = 6;
    const BLOCK_CONTENT: u64 = 128 << 10;
    const BLOCK: u64 = 4;
    HEADER + content.div_ceil(BLOCK_CONTENT) * BLOCK
}

/// Parses exactly 16 lowercase or uppercase hex digits.
pub(crate) fn parse_hex_u64(value: &str, file: &str, field: &str) -> Result<u64, ImageError> {
    let bad = || ImageError::BadChecksumField {
        file: file.into(),
        field: field.into(),
        value: value.into(),
        digits: 16,
    };
    if value.len() != 16 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    u64::from_str_radix(value, 16).map_err(|_| bad())
}

/// Decompresses frame `frame` into `out` (exactly its length) and checks
/// the length; [`decode_frame`] checks its contents too.
fn decompress_frame(
    frame: usize,
    entry: &FrameEntry,
    page_size: u64,
    compressed: &[u8],
    out: &mut [u8],
) -> Result<(), ImageError> {
    let expected = entry.page_count.saturating_mul(page_size);
    if out.len() as u64 != expected {
        return Err(ImageError::FrameBufferSize {
            frame,
            expected,
            actual: out.len() as u64,
        });
    }
    let corrupt = |reason: String| ImageError::FrameCorrupt {
        frame,
        offset: entry.offset,
        reason,
    };
    match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(size)) if size != expected => {
            return Err(ImageError::FrameLength {
                frame,
                expected,
                actual: size,
            })
        }
        Ok(_) => {}
        Err(_) => return Err(corrupt("no valid zstd frame header".into())),
    }
    thread_local! {
        // One decompression context per thread, not one per frame.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let n = DCTX
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(zstd::bulk::Decompressor::new()?);
            }
            cell.as_mut()
                .expect("just made")
                .decompress_to_buffer(compressed, out)
        })
        .map_err(|e| corrupt(e.to_string()))?;
    if n as u64 != expected {
        return Err(ImageError::FrameLength {
            frame,
            expected,
            actual: n as u64,
        });
    }
    Ok(())
}

/// Decompresses frame `frame` (`entry` its index entry, `checksum` its
/// parsed `xxh3_64`) from its compressed bytes into `out`, which must be
/// exactly the frame's length, and checks its length and checksum. Reads no
/// file: [`PageStoreReader`] and the fuzz targets share it.
pub fn decode_frame(
    frame: usize,
    entry: &FrameEntry,
    page_size: u64,
    checksum: u64,
    compressed: &[u8],
    out: &mut [u8],
) -> Result<(), ImageError> {
    decompress_frame(frame, entry, page_size, compressed, out)?;
    let actual = xxh3_64(out);
    if actual != checksum {
        return Err(ImageError::FrameChecksum {
            frame,
            expected: format!("{checksum:016x}"),
            actual: format!("{actual:016x}"),
        });
    }
    Ok(())
}

/// Reads and decompresses frames of a page store. Shareable between threads
/// (`&self` everywhere) so frames can be decompressed in parallel.
pub struct PageStoreReader {
    path: PathBuf,
    file: File,
    /// The whole file mapped read-only, when it could be: frames are then
    /// checked and decompressed where they lie in the page cache, with no
    /// copy and no buffer. (A file truncated under a reader would fault;
    /// frames past the length it had at open are read, and refused, by
    /// `pread`.)
    map: Option<FileMap>,
    page_size: u64,
    pages_per_frame: u64,
    page_count: u64,
    frames: Vec<FrameEntry>,
    checksums: Vec<u64>,
    /// Every frame was checked through this reader ([`into_verified`]):
    /// reads only decompress (the bytes are those of the same open file).
    ///
    /// [`into_verified`]: PageStoreReader::into_verified
    verified: bool,
}

impl PageStoreReader {
    /// Opens `dir/pages` and checks the index against it (no decompression).
    pub fn open(dir: &Path, index: &PageIndex) -> Result<Self, ImageError> {
        let path = dir.join(PAGES_FILE);
        let file = File::open(&path).map_err(|e| ImageError::io(&path, e))?;
        let size = file.metadata().map_err(|e| ImageError::io(&path, e))?.len();
        let checksums = validate_index(index, index.page_size, size)?;
        let map = FileMap::new(&file, size);
        Ok(PageStoreReader {
            path,
            file,
            map,
            page_size: index.page_size,
            pages_per_frame: index.pages_per_frame,
            page_count: index.page_count,
            frames: index.frames.clone(),
            checksums,
            verified: false,
        })
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }
    pub fn page_count(&self) -> u64 {
        self.page_count
    }
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    pub fn pages_per_frame(&self) -> u64 {
        self.pages_per_frame
    }
    pub fn frame(&self, frame: usize) -> Option<&FrameEntry> {
        self.frames.get(frame)
    }
    /// Decompressed length of `frame` in bytes.
    pub fn frame_len(&self, frame: usize) -> Result<usize, ImageError> {
        let entry = self.entry(frame)?;
        Ok((entry.page_count * self.page_size) as usize)
    }
    /// The frame holding page `id` and the byte offset of the page in it.
    pub fn locate(&self, id: PageId) -> Result<(usize, usize), ImageError> {
        if id >= self.page_count {
            return Err(ImageError::PageIdOutOfRange {
                page_id: id,
                page_count: self.page_count,
            });
        }
        let frame = (id / self.pages_per_frame) as usize;
        let offset = ((id % self.pages_per_frame) * self.page_size) as usize;
        Ok((frame, offset))
    }

    /// Decompresses frame `frame` and checks its length and checksum.
    pub fn read_frame(&self, frame: usize) -> Result<Vec<u8>, ImageError> {
        let mut out = vec![0u8; self.frame_len(frame)?];
        self.read_frame_into(frame, &mut out)?;
        Ok(out)
    }

    /// Decompresses frame `frame` straight into `out`, which must be exactly
    /// [`frame_len`](Self::frame_len) bytes (e.g. the target mapping), and
    /// checks its length and checksum.
    pub fn read_frame_into(&self, frame: usize, out: &mut [u8]) -> Result<(), ImageError> {
        let entry = self.entry(frame)?;
        let expected = entry.page_count * self.page_size;
        if out.len() as u64 != expected {
            return Err(ImageError::FrameBufferSize {
                frame,
                expected,
                actual: out.len() as u64,
            });
        }
        // The checksum of the compressed bytes, where the index has one,
        // vouches for the contents as well (decompression is deterministic)
        // and costs half as much to compute.
        let want = self.compressed_checksum(frame);
        self.with_compressed(frame, &mut Vec::new(), |entry, compressed| {
            match (self.verified, want) {
                (true, _) => decompress_frame(frame, entry, self.page_size, compressed, out),
                (false, Some(want)) => check_compressed_bytes(frame, want, compressed)
                    .and_then(|()| decompress_frame(frame, entry, self.page_size, compressed, out)),
                (false, None) => self.decode(frame, entry, compressed, out),
            }
        })
    }

    /// Unmaps the file (reads go through `pread` from here on): for a
    /// process that inherited this reader and reads no more, so that it
    /// does not keep the image's file mapped.
    pub fn unmap(&mut self) {
        self.map = None;
    }

    /// Checks every frame ([`verify_frames`](Self::verify_frames)) and
    /// returns the reader marked so: its reads then decompress without
    /// checking each frame a second time (a restore checks the whole image
    /// before any process exists, then reads every frame once more through
    /// this same open file and mapping). A file replaced under its path
    /// later is not read: the reader keeps the file it opened.
    pub fn into_verified(mut self) -> Result<Self, ImageError> {
        self.verify_frames()?;
        self.verified = true;
        Ok(self)
    }

    /// [`read_frame_into`](Self::read_frame_into), always checking the
    /// decompressed contents' checksum (what `cowsnap verify` wants).
    fn read_frame_into_decompressed(&self, frame: usize, out: &mut [u8]) -> Result<(), ImageError> {
        self.with_compressed(frame, &mut Vec::new(), |entry, compressed| {
            self.decode(frame, entry, compressed, out)
        })
    }

    fn decode(
        &self,
        frame: usize,
        entry: &FrameEntry,
        compressed: &[u8],
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        decode_frame(
            frame,
            entry,
            self.page_size,
            self.checksums[frame],
            compressed,
            out,
        )
    }

    /// Checks every frame on every core (each thread reusing one buffer):
    /// by the checksum of its compressed bytes where the index has one (as
    /// fast as reading), else by decompressing it and checking its length
    /// and checksum. The failing frame with the lowest index is reported,
    /// so the result does not depend on scheduling.
    pub fn verify_frames(&self) -> Result<(), ImageError> {
        self.check_frames(false)
    }

    /// [`verify_frames`](Self::verify_frames), always decompressing (what
    /// `cowsnap verify` runs: lengths and contents too, not only bytes).
    pub fn verify_frames_decompressed(&self) -> Result<(), ImageError> {
        self.check_frames(true)
    }

    fn check_frames(&self, decompress: bool) -> Result<(), ImageError> {
        let frames = self.frame_count();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(frames.max(1));
        // Lowest failing frame so far: the others stop once past it.
        let failed_at = AtomicU64::new(u64::MAX);
        let first = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let failed_at = &failed_at;
                    scope.spawn(move || -> Option<(usize, ImageError)> {
                        let mut buf = Vec::new();
                        for frame in (t..frames).step_by(threads) {
                            if frame as u64 > failed_at.load(Ordering::Relaxed) {
                                break;
                            }
                            let fast = self.compressed_checksum(frame).filter(|_| !decompress);
                            let result = match fast {
                                Some(want) => self.check_compressed(frame, want, &mut buf),
                                None => self.frame_len(frame).and_then(|len| {
                                    buf.resize(len, 0);
                                    self.read_frame_into_decompressed(frame, &mut buf)
                                }),
                            };
                            if let Err(e) = result {
                                failed_at.fetch_min(frame as u64, Ordering::Relaxed);
                                return Some((frame, e));
                            }
                        }
                        None
                    })
                })
                .collect();
            let mut first: Option<(usize, ImageError)> = None;
            for handle in handles {
                let found = handle
                    .join()
                    .unwrap_or(Some((0, ImageError::WorkerPanicked { role: "verify" })));
                if let Some((frame, e)) = found {
                    if first.as_ref().is_none_or(|(f, _)| frame < *f) {
                        first = Some((frame, e));
                    }
                }
            }
            first
        });
        match first {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Frame `frame`'s compressed bytes (`entry` is its index entry): in
    /// the mapping, or read into `buf`.
    fn compressed<'a>(
        &'a self,
        frame: usize,
        entry: &FrameEntry,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ImageError> {
        if let Some(bytes) = self
            .map
            .as_ref()
            .and_then(|m| m.get(entry.offset, entry.compressed_len))
        {
            return Ok(bytes);
        }
        self.read_compressed(frame, entry, buf)?;
        Ok(&buf[..])
    }

    /// Frame `frame`'s compressed bytes (`entry` is its index entry) into `buf`.
    fn read_compressed(
        &self,
        frame: usize,
        entry: &FrameEntry,
        buf: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        buf.resize(entry.compressed_len as usize, 0);
        self.file
            .read_exact_at(buf, entry.offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ImageError::TruncatedFrame {
                    frame,
                    offset: entry.offset,
                    compressed_len: entry.compressed_len,
                    file_size: self.file.metadata().map_or(0, |m| m.len()),
                },
                _ => ImageError::io(&self.path, e),
            })
    }

    /// The frame's checksum of its compressed bytes, when the index has one.
    fn compressed_checksum(&self, frame: usize) -> Option<u64> {
        let c = self.frames.get(frame)?.compressed_xxh3_64.as_deref()?;
        u64::from_str_radix(c, 16).ok()
    }

    /// Reads frame `frame`'s compressed bytes into `buf` and checks them
    /// against `want` (what the dumper wrote; the contents then decompress
    /// to what it compressed).
    fn check_compressed(
        &self,
        frame: usize,
        want: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        self.with_compressed(frame, buf, |_, compressed| {
            check_compressed_bytes(frame, want, compressed)
        })
    }

    /// Runs `use_bytes` on frame `frame`'s index entry and compressed bytes
    /// (in the mapping, or read into `buf`), then drops them from the
    /// mapping ([`FileMap::release`]): every reader of frames goes through
    /// here, so none leaves the image resident.
    fn with_compressed<R>(
        &self,
        frame: usize,
        buf: &mut Vec<u8>,
        use_bytes: impl FnOnce(&FrameEntry, &[u8]) -> Result<R, ImageError>,
    ) -> Result<R, ImageError> {
        let entry = self.entry(frame)?;
        let result = use_bytes(entry, self.compressed(frame, entry, buf)?);
        if let Some(map) = &self.map {
            map.release(entry.offset, entry.compressed_len);
        }
        result
    }

    /// Contents of page `id` (decompresses its whole frame; restore should
    /// work frame by frame instead).
    pub fn read_page(&self, id: PageId) -> Result<Vec<u8>, ImageError> {
        let (frame, offset) = self.locate(id)?;
        let data = self.read_frame(frame)?;
        Ok(data[offset..offset + self.page_size as usize].to_vec())
    }

    fn entry(&self, frame: usize) -> Result<&FrameEntry, ImageError> {
        self.frames.get(frame).ok_or(ImageError::FrameOutOfRange {
            frame,
            frame_count: self.frames.len(),
        })
    }
}

/// Checks frame `frame`'s compressed bytes against `want`, the checksum
/// the dumper recorded for them.
fn check_compressed_bytes(frame: usize, want: u64, compressed: &[u8]) -> Result<(), ImageError> {
    let actual = xxh3_64(compressed);
    if actual != want {
        return Err(ImageError::FrameChecksum {
            frame,
            expected: format!("{want:016x} (compressed)"),
            actual: format!("{actual:016x}"),
        });
    }
    Ok(())
}

/// A read-only shared mapping of a whole file.
struct FileMap {
    addr: *const u8,
    len: u64,
}

// SAFETY: the mapping is read-only and lives until drop; `&FileMap` only
// hands out shared slices of it.
unsafe impl Send for FileMap {}
unsafe impl Sync for FileMap {}

impl FileMap {
    /// `len` bytes of `file` mapped, or None (an empty file, or mmap failed:
    /// the reader then uses `pread`).
    fn new(file: &File, len: u64) -> Option<FileMap> {
        use std::os::fd::AsRawFd;
        if len == 0 || usize::try_from(len).is_err() {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping of an open file; nothing
        // else is at the address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        // Every frame is read (checked, then decompressed): start reading
        // a file that is not in the page cache now, in large requests.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(addr, len as usize, libc::MADV_WILLNEED) };
        Some(FileMap {
            addr: addr as *const u8,
            len,
        })
    }

    /// Drops this process's page table entries for the whole pages inside
    /// [offset, offset + len) once they have been read: the page cache keeps
    /// them, and the reader's resident memory stays a frame or two instead
    /// of growing to the image's size.
    fn release(&self, offset: u64, len: u64) {
        const PAGE: u64 = 4096;
        let start = offset.next_multiple_of(PAGE);
        let end = offset.saturating_add(len).min(self.len) / PAGE * PAGE;
        if start < end {
            // SAFETY: a range inside our own read-only file mapping; dropping
            // its entries changes no contents (they fault back in if read).
            unsafe {
                libc::madvise(
                    self.addr.add(start as usize) as *mut libc::c_void,
                    (end - start) as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }

    fn get(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [offset, end) lies inside the mapping, which outlives `self`.
        Some(unsafe { std::slice::from_raw_parts(self.addr.add(offset as usize), len as usize) })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    fn page(seed: u64) -> Vec<u8> {
        // Half pseudo-random, half zero, like the reference workload.
        let mut out = vec![0u8; PS as usize];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for chunk in out[..PS as usize / 2].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        out
    }

    fn options(pages_per_frame: u64, workers: usize) -> PageStoreOptions {
        PageStoreOptions {
            pages_per_frame,
            level: 1,
            workers,
        }
    }

    #[test]
    fn round_trip_many_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(4, 3)).unwrap();
        let mut expected = Vec::new();
        // Mixed batch sizes so appends straddle frame boundaries.
        let mut seed = 0;
        for batch in [1u64, 3, 7, 2, 9, 1, 5] {
            let mut buf = Vec::new();
            for _ in 0..batch {
                buf.extend_from_slice(&page(seed));
                expected.push(page(seed));
                seed += 1;
            }
            let first = w.append(&buf).unwrap();
            assert_eq!(first + batch, w.pages_written());
        }
        let summary = w.finish().unwrap();
        let index = &summary.index;
        assert_eq!(index.page_count, 28);
        assert_eq!(index.frames.len(), 7);
        let file = std::fs::read(dir.path().join(PAGES_FILE)).unwrap();
        assert_eq!(file.len() as u64, summary.file_size);
        assert_eq!(xxhash_rust::xxh3::xxh3_128(&file), summary.xxh3_128);

        let r = PageStoreReader::open(dir.path(), index).unwrap();
        assert_eq!(r.frame_count(), 7);
        for (id, want) in expected.iter().enumerate() {
            assert_eq!(&r.read_page(id as u64).unwrap(), want, "page {id}");
        }
        assert!(matches!(
            r.read_page(28),
            Err(ImageError::PageIdOutOfRange { page_id: 28, .. })
        ));
    }

    #[test]
    fn last_frame_partial_and_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(3, 1)).unwrap();
        w.append(&page(1)).unwrap();
        let (first, space) = w.reserve().unwrap();
        assert_eq!(first, 1);
        assert_eq!(space.len() as u64, 2 * PS);
        space[..PS as usize].copy_from_slice(&page(2));
        assert!(matches!(
            w.commit_reserved(3),
            Err(ImageError::ReserveOverrun {
                pages: 3,
                reserved: 2
            })
        ));
        assert_eq!(w.commit_reserved(1).unwrap(), 1);
        w.append(&[page(3), page(4)].concat()).unwrap();
        let summary = w.finish().unwrap();
        let counts: Vec<u64> = summary.index.frames.iter().map(|f| f.page_count).collect();
        assert_eq!(counts, vec![3, 1]);
        let r = PageStoreReader::open(dir.path(), &summary.index).unwrap();
        for (id, seed) in [1u64, 2, 3, 4].iter().enumerate() {
            assert_eq!(r.read_page(id as u64).unwrap(), page(*seed));
        }
        assert!(matches!(
            w.append(&page(5)),
            Err(ImageError::PageStoreFinished)
        ));
    }

    #[test]
    fn empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(4, 2)).unwrap();
        let summary = w.finish().unwrap();
        assert_eq!(summary.index.page_count, 0);
        assert!(summary.index.frames.is_empty());
        assert_eq!(summary.file_size, 0);
        let r = PageStoreReader::open(dir.path(), &summary.index).unwrap();
        assert_eq!(r.frame_count(), 0);
    }

    #[test]
    fn refuses_partial_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(4, 1)).unwrap();
        assert!(matches!(
            w.append(&[0u8; 100]),
            Err(ImageError::PartialPage {
                len: 100,
                page_size: PS
            })
        ));
    }

    fn index(pages_per_frame: u64, frames: Vec<FrameEntry>) -> PageIndex {
        PageIndex {
            page_size: PS,
            pages_per_frame,
            page_count: frames.iter().map(|f| f.page_count).sum(),
            frames,
        }
    }

    fn frame_entry(offset: u64, compressed_len: u64, first_page: u64, pages: u64) -> FrameEntry {
        FrameEntry {
            offset,
            compressed_len,
            first_page,
            page_count: pages,
            xxh3_64: "0".repeat(16),
            compressed_xxh3_64: None,
        }
    }

    /// Found by reviewing the parsers; replayed by the fuzz corpus (input `fuzz/corpus/page_index/regress-huge-frame`): an
    /// index claiming 2^40 pages in one frame of 10149 bytes made
    /// `inspect` allocate 4 TiB per page counter and abort.
    #[test]
    fn refuses_frames_larger_than_their_bytes_allow() {
        let huge = index(1 << 40, vec![frame_entry(0, 10149, 0, 1 << 40)]);
        assert!(matches!(
            validate_index(&huge, PS, 10149),
            Err(ImageError::FrameTooLarge {
                pages_per_frame: 0x100_0000_0000,
                ..
            })
        ));
        let over = index(u64::MAX, vec![frame_entry(0, 100, 0, 1)]);
        assert!(matches!(
            validate_index(&over, PS, 100),
            Err(ImageError::FrameTooLarge { .. })
        ));
        // 256 MiB frames are allowed, but not from 20 bytes.
        let ppf = MAX_FRAME_BYTES / PS;
        let short = index(ppf, vec![frame_entry(0, 20, 0, ppf)]);
        let min = 6 + 4 * (MAX_FRAME_BYTES >> 17);
        assert!(matches!(
            validate_index(&short, PS, 20),
            Err(ImageError::FrameTooShort { frame: 0, compressed_len: 20, min: m, .. }) if m == min
        ));
        let tiny = index(1, vec![frame_entry(0, 9, 0, 1)]);
        assert!(matches!(
            validate_index(&tiny, PS, 9),
            Err(ImageError::FrameTooShort { min: 10, .. })
        ));
    }

    /// The shortest frames zstd really makes (4 MiB of zeros, at any level)
    /// are not refused as too short.
    #[test]
    fn the_most_compressed_frames_pass_the_length_bound() {
        for level in [-5, 1, 19] {
            let dir = tempfile::tempdir().unwrap();
            let options = PageStoreOptions {
                pages_per_frame: 1024,
                level,
                workers: 1,
            };
            let mut w = PageStoreWriter::create(dir.path(), PS, options).unwrap();
            w.append(&vec![0u8; 1025 * PS as usize]).unwrap();
            let summary = w.finish().unwrap();
            let frame = &summary.index.frames[0];
            assert!(
                frame.compressed_len >= min_zstd_frame_len(1024 * PS),
                "level {level}: {} bytes",
                frame.compressed_len
            );
            validate_index(&summary.index, PS, summary.file_size).expect("valid");
            let reader = PageStoreReader::open(dir.path(), &summary.index).unwrap();
            reader.verify_frames_decompressed().unwrap();
        }
    }

    #[test]
    fn refuses_bad_options() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            PageStoreWriter::create(dir.path(), PS, options(0, 1)),
            Err(ImageError::BadOption {
                field: "pages_per_frame",
                ..
            })
        ));
        assert!(matches!(
            PageStoreWriter::create(dir.path(), 3000, options(4, 1)),
            Err(ImageError::BadOption {
                field: "page_size",
                ..
            })
        ));
        // What a reader would refuse, the writer does not write.
        assert!(matches!(
            PageStoreWriter::create(dir.path(), 1 << 21, options(4, 1)),
            Err(ImageError::BadOption {
                field: "page_size",
                ..
            })
        ));
        assert!(matches!(
            PageStoreWriter::create(dir.path(), PS, options(MAX_FRAME_BYTES / PS + 1, 1)),
            Err(ImageError::BadOption {
                field: "pages_per_frame",
                ..
            })
        ));
    }

    #[test]
    fn dropped_writer_stops_threads() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(2, 2)).unwrap();
        for i in 0..50 {
            w.append(&page(i)).unwrap();
        }
        drop(w);
        // The file may hold some frames; what matters is that drop returned
        // (threads joined) and the file can be removed by the image writer.
        std::fs::remove_file(dir.path().join(PAGES_FILE)).unwrap();
    }

    /// A full filesystem fails the writer thread mid-stream: the appender
    /// must get the I/O error (naming `pages`), not hang on the buffer pool.
    #[test]
    fn write_error_reaches_appender() {
        struct Tmpfs(PathBuf);
        impl Drop for Tmpfs {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "cowsnap-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        let _mount = Tmpfs(dir.path().into());
        let mut w = PageStoreWriter::create(dir.path(), PS, options(4, 2)).unwrap();
        let mut result = Ok(0);
        for seed in 0..400 {
            result = w.append(&page(seed));
            if result.is_err() {
                break;
            }
        }
        let err = match result {
            Err(e) => e,
            Ok(_) => w.finish().map(|_| ()).unwrap_err(),
        };
        match err {
            ImageError::Io { path, source } => {
                assert_eq!(path, dir.path().join(PAGES_FILE));
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("expected ENOSPC on pages, got {other}"),
        }
        drop(w);
    }

    #[test]
    fn frame_checksum_and_buffer_size_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(2, 1)).unwrap();
        w.append(&[page(1), page(2), page(3)].concat()).unwrap();
        let mut index = w.finish().unwrap().index;
        // Where the index has the compressed bytes' checksum, reading checks
        // that one; without it, the contents' checksum.
        let mut compressed_wrong = index.clone();
        compressed_wrong.frames[1].compressed_xxh3_64 = Some(format!("{:016x}", 12345u64));
        let r = PageStoreReader::open(dir.path(), &compressed_wrong).unwrap();
        assert!(r.read_frame(0).is_ok());
        assert!(matches!(
            r.read_frame(1),
            Err(ImageError::FrameChecksum { frame: 1, expected, .. }) if expected.ends_with("(compressed)")
        ));
        index.frames[1].xxh3_64 = format!("{:016x}", 12345u64);
        index.frames[1].compressed_xxh3_64 = None;
        let r = PageStoreReader::open(dir.path(), &index).unwrap();
        assert!(r.read_frame(0).is_ok());
        assert!(matches!(
            r.read_frame(1),
            Err(ImageError::FrameChecksum { frame: 1, .. })
        ));
        let mut small = vec![0u8; 10];
        assert!(matches!(
            r.read_frame_into(0, &mut small),
            Err(ImageError::FrameBufferSize { frame: 0, .. })
        ));
        assert!(matches!(
            r.read_frame(2),
            Err(ImageError::FrameOutOfRange {
                frame: 2,
                frame_count: 2
            })
        ));
    }

    #[test]
    fn verify_frames_reports_the_lowest_bad_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(1, 2)).unwrap();
        w.append(&(0..9).map(page).collect::<Vec<_>>().concat())
            .unwrap();
        let mut index = w.finish().unwrap().index;
        PageStoreReader::open(dir.path(), &index)
            .unwrap()
            .verify_frames()
            .expect("an intact store verifies");
        // Checked by the compressed bytes' checksum (no decompression).
        let intact = index.clone();
        for bad in [7, 3, 5] {
            index.frames[bad].compressed_xxh3_64 = Some(format!("{:016x}", 12345u64));
        }
        let r = PageStoreReader::open(dir.path(), &index).unwrap();
        let err = r.verify_frames().expect_err("three bad frames");
        assert!(
            matches!(err, ImageError::FrameChecksum { frame: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("frame 3"), "{err}");
        // An index without them (format 1.0) is checked by decompressing.
        let mut old = intact;
        for f in &mut old.frames {
            f.compressed_xxh3_64 = None;
        }
        PageStoreReader::open(dir.path(), &old)
            .unwrap()
            .verify_frames()
            .expect("an intact 1.0 store verifies");
        for bad in [6, 4] {
            old.frames[bad].xxh3_64 = format!("{:016x}", 12345u64);
        }
        let err = PageStoreReader::open(dir.path(), &old)
            .unwrap()
            .verify_frames()
            .expect_err("two bad frames");
        assert!(
            matches!(err, ImageError::FrameChecksum { frame: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_verified_reader_reads_the_file_it_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(dir.path(), PS, options(1, 2)).unwrap();
        let pages: Vec<Vec<u8>> = (0..6).map(page).collect();
        w.append(&pages.concat()).unwrap();
        let index = w.finish().unwrap().index;
        // A bad frame is refused, naming it.
        let mut bad_index = index.clone();
        bad_index.frames[1].compressed_xxh3_64 = Some(format!("{:016x}", 12345u64));
        let err = PageStoreReader::open(dir.path(), &bad_index)
            .unwrap()
            .into_verified()
            .map(|_| ())
            .expect_err("a bad frame");
        assert!(
            matches!(err, ImageError::FrameChecksum { frame: 1, .. }),
            "{err}"
        );
        let reader = PageStoreReader::open(dir.path(), &index)
            .unwrap()
            .into_verified()
            .expect("an intact store verifies");
        // Another store of the same shape replaces `pages` under its name:
        // the verified reader still reads the file it opened and checked.
        let other = tempfile::tempdir().unwrap();
        let mut w = PageStoreWriter::create(other.path(), PS, options(1, 2)).unwrap();
        w.append(&(10..16).map(page).collect::<Vec<_>>().concat())
            .unwrap();
        w.finish().unwrap();
        std::fs::rename(other.path().join(PAGES_FILE), dir.path().join(PAGES_FILE)).unwrap();
        for (id, want) in pages.iter().enumerate() {
            assert_eq!(&reader.read_page(id as PageId).unwrap(), want, "page {id}");
        }
    }
}
