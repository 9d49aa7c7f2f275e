//! Memory of the dumped processes: every VMA with its page runs, each
//! physical page stored once. **Identity of a page = its PFN (or swap
//! entry)**: a page seen before in this dump, in any process at any address,
//! gets the same `PageId`. This scanner thread only walks pagemap, reads
//! contents through `/proc/PID/mem` in large runs (never process_vm_readv, see `read_batch`), checks for zero pages
//! and looks up the dedup map; compression happens on the page store's threads.
//! It never writes to the dumped processes.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::time::Instant;

use crate::image::pagestore::PageStoreWriter;
use crate::image::types::{PageId, PageRun, Vma, VmaKind};
use crate::image::ImageError;
use crate::sys::pagemap::{Pagemap, PagemapEntry, PagemapError};
use crate::sys::process::{ProcMem, ProcessError};
use crate::sys::procfs::MapsEntry;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("pid {pid}: {source}")]
    Pagemap {
        pid: i32,
        #[source]
        source: PagemapError,
    },
    #[error("pid {pid}: reading page {addr:#x}: {source}")]
    Read {
        pid: i32,
        addr: u64,
        #[source]
        source: ProcessError,
    },
    /// Writing the image failed (disk full, ...): no matter whose pages.
    #[error("page store: {source}")]
    Store {
        #[source]
        source: ImageError,
    },
    #[error("page store returned id {got} for a batch expected at {want}")]
    IdMismatch { got: PageId, want: PageId },
    #[error("interrupted by a signal")]
    Interrupted,
}

/// Where unique pages go. The image's [`PageStoreWriter`] in a dump; a plain
/// buffer in tests. Pages are read straight into the sink's own buffer.
pub trait PageSink {
    /// Space for at least one whole page, and the id its first page will get.
    fn reserve(&mut self) -> Result<(PageId, &mut [u8]), ImageError>;
    /// Keeps the first `pages` pages of the last reserved space.
    fn commit_reserved(&mut self, pages: u64) -> Result<PageId, ImageError>;
    /// The id the next page will get.
    fn next_id(&self) -> PageId;
    /// Compressed bytes written so far (for progress reports).
    fn bytes_written(&self) -> u64 {
        0
    }
}

impl PageSink for PageStoreWriter {
    fn reserve(&mut self) -> Result<(PageId, &mut [u8]), ImageError> {
        PageStoreWriter::reserve(self)
    }
    fn commit_reserved(&mut self, pages: u64) -> Result<PageId, ImageError> {
        PageStoreWriter::commit_reserved(self, pages)
    }
    fn next_id(&self) -> PageId {
        self.pages_written()
    }
    fn bytes_written(&self) -> u64 {
        self.bytes_compressed()
    }
}

/// Figures of the scan so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Present or swapped pages looked at (in VMAs whose contents are kept).
    pub pages_scanned: u64,
    /// Unique pages appended to the store.
    pub pages_stored: u64,
    /// Page references that are zero (kernel zero page or all-zero contents).
    pub zero_pages: u64,
    /// Page references resolved from the dedup map (no read).
    pub dedup_hits: u64,
    /// Bytes of page contents read from processes.
    pub bytes_read: u64,
}

/// Which pages of a VMA have contents worth keeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Nothing: the contents come from elsewhere (file, kernel).
    Nothing,
    /// Anonymous pages: present or swapped.
    Anon,
    /// Private file mapping: only COW copies (present without the file bit) and swapped.
    CowCopies,
    /// Shmem-like: every present or swapped page.
    AllPresent,
}

/// Kind of a VMA from its maps line.
pub fn classify(m: &MapsEntry) -> VmaKind {
    let path = m.path.as_str();
    match path {
        "[heap]" => return VmaKind::Heap,
        "[vdso]" => return VmaKind::Vdso,
        "[vvar]" | "[vvar_vclock]" => return VmaKind::Vvar,
        "[vsyscall]" => return VmaKind::Vsyscall,
        _ => {}
    }
    if path == "[stack]" || path.starts_with("[stack:") {
        return VmaKind::Stack;
    }
    if m.has_flag("io") || m.has_flag("pf") {
        return VmaKind::Other;
    }
    if path.is_empty() || path.starts_with("[anon:") || path.starts_with("[anon_shmem:") {
        return if m.shared {
            VmaKind::SharedAnon
        } else {
            VmaKind::PrivateAnon
        };
    }
    if m.shared && m.deleted && path == "/dev/zero" {
        return VmaKind::SharedAnon;
    }
    if path.starts_with("/memfd:") {
        return VmaKind::Memfd;
    }
    if m.shared && path.starts_with("/SYSV") {
        return VmaKind::SysvShm;
    }
    if path.starts_with('/') {
        return if m.shared {
            VmaKind::SharedFile
        } else {
            VmaKind::PrivateFile
        };
    }
    VmaKind::Other
}

/// Which pages of shared-memory mapping `m` of `pid` hold data in the
/// shmem object behind it (`SEEK_DATA`/`SEEK_HOLE` on
/// /proc/PID/map_files), mapped here or not; None when it cannot be told
/// (then only mapped pages are kept, as before).
fn shmem_data_pages(pid: i32, m: &MapsEntry, ps: u64) -> Option<Vec<bool>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)).ok()?;
    let pages = ((m.end - m.start) / ps) as usize;
    let mut data = vec![false; pages];
    let (lo, hi) = (m.offset as i64, (m.offset + (m.end - m.start)) as i64);
    let mut at = lo;
    while at < hi {
        let Ok(start) = lseek(file.as_raw_fd(), at, Whence::SeekData) else {
            break; // ENXIO: no data past `at`
        };
        if start >= hi {
            break;
        }
        let end = lseek(file.as_raw_fd(), start, Whence::SeekHole).map_or(hi, |e| e.min(hi));
        let first = ((start - lo) as u64 / ps) as usize;
        let last = ((end - lo) as u64).div_ceil(ps) as usize;
        for d in &mut data[first..last.min(pages)] {
            *d = true;
        }
        at = end;
    }
    Some(data)
}

fn keep_for(kind: VmaKind) -> Keep {
    match kind {
        VmaKind::PrivateAnon | VmaKind::Heap | VmaKind::Stack => Keep::Anon,
        VmaKind::PrivateFile => Keep::CowCopies,
        VmaKind::SharedAnon | VmaKind::Memfd | VmaKind::SysvShm => Keep::AllPresent,
        // A deleted one included: its contents are a saved file's
        // (`dump::saved_files`), so its pages are the file's pages.
        VmaKind::SharedFile
        | VmaKind::Vdso
        | VmaKind::Vvar
        | VmaKind::Vsyscall
        | VmaKind::Other => Keep::Nothing,
    }
}

/// Dedup-map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Stored(PageId),
    Zero,
    /// Being read in the current chunk: index into the chunk's read list.
    Pending(u32),
}

/// What one virtual page turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Absent,
    /// A file page present in the page tables, contents from the file.
    Mapped,
    Zero,
    Stored(PageId),
    /// Waiting for the read of entry `i` of the chunk's read list.
    Read(u32),
}

/// Key space: PFNs below 2^55; swap entries tagged with bit 62.
const SWAP_KEY_TAG: u64 = 1 << 62;

/// Pagemap entries per pagemap read (64 MiB of address space, 128 KiB of entries).
const CHUNK_PAGES: usize = 16 * 1024;
/// Pages per read batch.
const READ_BATCH_PAGES: usize = 1024;

/// Hashes a dedup key (a PFN or a tagged swap entry) with one multiply:
/// the keys are integers of no adversary's choosing, and SipHash was a
/// twentieth of a dump's time.
#[derive(Default)]
struct PfnHasher(u64);

impl std::hash::Hasher for PfnHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k;
    }
}

/// Scans processes one after another, sharing one dedup map.
pub struct MemoryScanner {
    page_size: u64,
    zero_pfn: Option<u64>,
    dedup: HashMap<u64, Slot, BuildHasherDefault<PfnHasher>>,
    stats: ScanStats,
    zero_page: Vec<u8>,
    /// /proc/kpageflags, to tell the kernel's zero pages from allocated
    /// pages that hold zeros (None: unreadable, every zero page is "zero").
    kpageflags: Option<std::fs::File>,
    /// Checked between batches; returning true aborts the scan.
    interrupted: fn() -> bool,
    progress: Option<Progress>,
    /// Shared-memory pages faulted in while scanning the last process:
    /// (address, pages) runs.
    unmapped_shmem: Vec<[u64; 2]>,
}

struct Progress {
    started: Instant,
    last: Instant,
    /// Lines on stderr, for people.
    stderr: bool,
    /// Typed events (`--progress-json`).
    log: super::progress::ProgressLog,
    /// When the tree was stopped: the frozen time so far.
    stopped_at: Instant,
}

impl MemoryScanner {
    pub fn new(page_size: u64, zero_pfn: Option<u64>) -> MemoryScanner {
        MemoryScanner {
            page_size,
            zero_pfn,
            dedup: HashMap::default(),
            stats: ScanStats::default(),
            zero_page: vec![0u8; page_size as usize],
            kpageflags: std::fs::File::open("/proc/kpageflags").ok(),
            interrupted: || false,
            progress: None,
            unmapped_shmem: Vec::new(),
        }
    }

    /// Checks `f` between batches and stops with [`MemoryError::Interrupted`].
    pub fn set_interrupt_check(&mut self, f: fn() -> bool) {
        self.interrupted = f;
    }

    /// Reports progress at most twice a second: a line on stderr when
    /// `stderr`, a `pages` event to `log` (the tree stopped at
    /// `stopped_at`).
    pub fn enable_progress(
        &mut self,
        stderr: bool,
        log: super::progress::ProgressLog,
        stopped_at: Instant,
    ) {
        let now = Instant::now();
        self.progress = Some(Progress {
            started: now,
            last: now,
            stderr,
            log,
            stopped_at,
        });
    }

    /// The page figures so far, `sink` being the page store.
    pub fn counts(&self, sink: &dyn PageSink, stopped_at: Instant) -> super::progress::PageCounts {
        super::progress::PageCounts {
            pages_scanned: self.stats.pages_scanned,
            pages_stored: self.stats.pages_stored,
            bytes_written: sink.bytes_written(),
            frozen_ms: stopped_at.elapsed().as_millis() as u64,
        }
    }

    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The shared-memory pages the last scanned process had not mapped
    /// (faulted in by the scan), as (address, pages) runs.
    pub fn take_unmapped_shmem(&mut self) -> Vec<[u64; 2]> {
        std::mem::take(&mut self.unmapped_shmem)
    }

    /// Every VMA of `pid` with its page runs. `maps` from /proc/PID/smaps.
    pub fn scan_process(
        &mut self,
        pid: i32,
        maps: &[MapsEntry],
        sink: &mut dyn PageSink,
    ) -> Result<Vec<Vma>, MemoryError> {
        let pagemap = Pagemap::open(pid).map_err(|source| MemoryError::Pagemap { pid, source })?;
        let mem = ProcMem::open(pid).map_err(|source| MemoryError::Read {
            pid,
            addr: 0,
            source,
        })?;
        let mut vmas = Vec::with_capacity(maps.len());
        let mut ctx = ProcCtx {
            pid,
            pagemap,
            mem,
            entries: Vec::with_capacity(CHUNK_PAGES),
            outcomes: Vec::with_capacity(CHUNK_PAGES),
            reads: Vec::new(),
        };
        for m in maps {
            let kind = classify(m);
            let keep = keep_for(kind);
            let runs = self.scan_vma(&mut ctx, m, keep, sink)?;
            vmas.push(Vma {
                start: m.start,
                end: m.end,
                prot: m.prot(),
                shared: m.shared,
                kind,
                path: if m.path.is_empty() {
                    None
                } else {
                    Some(m.path.clone())
                },
                deleted: m.deleted,
                dev: m.dev(),
                inode: m.inode,
                offset: m.offset,
                vm_flags: m.vm_flags.clone(),
                pages: runs,
            });
        }
        Ok(vmas)
    }

    fn scan_vma(
        &mut self,
        ctx: &mut ProcCtx,
        m: &MapsEntry,
        keep: Keep,
        sink: &mut dyn PageSink,
    ) -> Result<Vec<PageRun>, MemoryError> {
        let ps = self.page_size;
        let total = (m.end - m.start) / ps;
        let mut runs = RunBuilder::default();
        let empty = m.rss_kb == Some(0) && m.swap_kb.unwrap_or(0) == 0;
        // File mappings: present page-cache pages are recorded as `Mapped`
        // so restore maps them again (their share of PSS comes back).
        let file = matches!(classify(m), VmaKind::PrivateFile | VmaKind::SharedFile);
        if (keep == Keep::Nothing && !file) || empty || m.start >= 1 << 47 {
            runs.push_n(m.start, total, Outcome::Absent, ps);
            return Ok(runs.runs);
        }
        let readable = m.read;
        // Shared memory (shmem) holds pages no page table of this process
        // maps (written by a process since gone, or not touched here yet):
        // they are part of the object all the same, so they are faulted in
        // here (a read of /proc/PID/mem maps the object's own page, it
        // allocates nothing) and stored by their PFN like the others.
        let shmem = if matches!(classify(m), VmaKind::SharedAnon | VmaKind::Memfd) {
            shmem_data_pages(ctx.pid, m, ps)
        } else {
            None
        };
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK_PAGES as u64) as usize;
            let chunk_start = m.start + done * ps;
            ctx.read_pagemap(chunk_start, n)?;
            if let Some(data) = &shmem {
                let mut touched = false;
                for i in 0..n {
                    let page = done as usize + i;
                    let e = ctx.entries[i];
                    if !(e.present() || e.swapped()) && data.get(page).copied().unwrap_or(false) {
                        let addr = chunk_start + i as u64 * ps;
                        match self.unmapped_shmem.last_mut() {
                            Some(run) if run[0] + run[1] * ps == addr => run[1] += 1,
                            _ => self.unmapped_shmem.push([addr, 1]),
                        }
                        let mut byte = [0u8; 1];
                        ctx.mem.read_exact_at(&mut byte, addr).map_err(|source| {
                            MemoryError::Read {
                                pid: ctx.pid,
                                addr,
                                source,
                            }
                        })?;
                        touched = true;
                    }
                }
                if touched {
                    ctx.read_pagemap(chunk_start, n)?;
                }
            }
            ctx.outcomes.clear();
            ctx.reads.clear();
            for i in 0..n {
                let e = ctx.entries[i];
                let addr = chunk_start + i as u64 * ps;
                let outcome = self.classify_page(e, keep, file, addr, &mut ctx.reads);
                ctx.outcomes.push(outcome);
            }
            // Read what must be read, in batches, resolving the dedup slots.
            let mut results: Vec<Outcome> = Vec::with_capacity(ctx.reads.len());
            let mut i = 0;
            while i < ctx.reads.len() {
                if (self.interrupted)() {
                    return Err(MemoryError::Interrupted);
                }
                let j = (i + READ_BATCH_PAGES).min(ctx.reads.len());
                self.read_batch(ctx, i, j, readable, &mut results, sink)?;
                i = j;
                self.report_progress(sink);
            }
            for (k, o) in ctx.outcomes.iter().enumerate() {
                let resolved = match *o {
                    Outcome::Read(idx) => results[idx as usize],
                    other => other,
                };
                runs.push_n(chunk_start + k as u64 * ps, 1, resolved, ps);
            }
            done += n as u64;
        }
        Ok(runs.runs)
    }

    fn classify_page(
        &mut self,
        e: PagemapEntry,
        keep: Keep,
        file: bool,
        addr: u64,
        reads: &mut Vec<(u64, Option<u64>)>,
    ) -> Outcome {
        let wanted = match keep {
            Keep::Nothing => false,
            Keep::Anon | Keep::AllPresent => e.present() || e.swapped(),
            Keep::CowCopies => (e.present() && !e.file_or_shared_anon()) || e.swapped(),
        };
        if !wanted {
            return if file && e.present() && e.file_or_shared_anon() {
                Outcome::Mapped
            } else {
                Outcome::Absent
            };
        }
        self.stats.pages_scanned += 1;
        let key = match (e.pfn(), e.swap_entry()) {
            (Some(pfn), _) if pfn != 0 => {
                if Some(pfn) == self.zero_pfn {
                    self.stats.zero_pages += 1;
                    return Outcome::Zero;
                }
                Some(pfn)
            }
            // PFNs hidden (no CAP_SYS_ADMIN): no identity, read every page.
            (Some(_), _) => None,
            (None, Some(_)) => Some(SWAP_KEY_TAG | (e.0 & ((1 << 55) - 1))),
            (None, None) => None,
        };
        if let Some(k) = key {
            match self.dedup.get(&k) {
                Some(Slot::Stored(id)) => {
                    self.stats.dedup_hits += 1;
                    return Outcome::Stored(*id);
                }
                Some(Slot::Zero) => {
                    self.stats.dedup_hits += 1;
                    self.stats.zero_pages += 1;
                    return Outcome::Zero;
                }
                Some(Slot::Pending(idx)) => {
                    // Same frame twice in one chunk (KSM, or shmem mapped twice).
                    self.stats.dedup_hits += 1;
                    return Outcome::Read(*idx);
                }
                None => {
                    self.dedup.insert(k, Slot::Pending(reads.len() as u32));
                }
            }
        }
        reads.push((addr, key));
        Outcome::Read(reads.len() as u32 - 1)
    }

    /// Reads `ctx.reads[from..to]` straight into space reserved in the sink,
    /// drops zero pages from it, and commits the rest, which get their ids.
    fn read_batch(
        &mut self,
        ctx: &mut ProcCtx,
        from: usize,
        to: usize,
        readable: bool,
        results: &mut Vec<Outcome>,
        sink: &mut dyn PageSink,
    ) -> Result<(), MemoryError> {
        let ps = self.page_size as usize;
        let pid = ctx.pid;
        let store_err = |source| MemoryError::Store { source };
        let mut k = from;
        while k < to {
            let (first_id, space) = sink.reserve().map_err(store_err)?;
            let n = (space.len() / ps).min(to - k);
            let batch = &ctx.reads[k..k + n];
            let buf = &mut space[..n * ps];
            // Read through /proc/PID/mem, never process_vm_readv: the latter
            // pins pages (FOLL_PIN), and since Linux 5.19 a read-only pin of
            // a copy-on-write shared anonymous page makes the kernel unshare
            // it, giving the dumped process a private copy and destroying the
            // very sharing we record. /proc/PID/mem takes plain references
            // (FOLL_GET) and leaves the page tables alone; it also reads
            // PROT_NONE ranges of a seized task.
            let _ = readable;
            let mut j = 0usize;
            while j < n {
                let start = j;
                while j + 1 < n && batch[j + 1].0 == batch[j].0 + ps as u64 {
                    j += 1;
                }
                j += 1;
                let addr = batch[start].0;
                ctx.mem
                    .read_exact_at(&mut buf[start * ps..j * ps], addr)
                    .map_err(|source| MemoryError::Read { pid, addr, source })?;
            }
            self.stats.bytes_read += (n * ps) as u64;
            // Compact: keep non-zero pages in order; the j-th kept gets first_id + j.
            let mut kept = 0usize;
            for (j, &(_, key)) in batch.iter().enumerate() {
                let read = j * ps;
                // An allocated page of zeros is stored like any other (it
                // compresses to nothing): restore allocates it again, and
                // shared with whoever shared it, so memory use comes back
                // as it was. Only a kernel zero page, or a page without
                // identity, is recorded as "zero" and left unallocated.
                let allocated = key.is_some_and(|k| {
                    k & SWAP_KEY_TAG != 0
                        || self.kpageflags.as_ref().is_some_and(|f| {
                            crate::sys::pagemap::is_kernel_zero_frame(f, k) == Some(false)
                        })
                });
                let outcome = if !allocated && buf[read..read + ps] == self.zero_page[..] {
                    self.stats.zero_pages += 1;
                    Outcome::Zero
                } else {
                    if kept != j {
                        buf.copy_within(read..read + ps, kept * ps);
                    }
                    let id = first_id + kept as u64;
                    kept += 1;
                    self.stats.pages_stored += 1;
                    Outcome::Stored(id)
                };
                if let Some(key) = key {
                    let slot = match outcome {
                        Outcome::Stored(id) => Slot::Stored(id),
                        _ => Slot::Zero,
                    };
                    self.dedup.insert(key, slot);
                }
                results.push(outcome);
            }
            let committed = sink.commit_reserved(kept as u64).map_err(store_err)?;
            if committed != first_id {
                return Err(MemoryError::IdMismatch {
                    got: committed,
                    want: first_id,
                });
            }
            k += n;
        }
        Ok(())
    }

    fn report_progress(&mut self, sink: &mut dyn PageSink) {
        let Some(p) = self.progress.as_ref() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(p.last).as_millis() < 500 {
            return;
        }
        if p.log.is_on() {
            let counts = self.counts(sink, p.stopped_at);
            p.log.emit(&super::progress::DumpEvent::Pages(counts));
        }
        let Some(p) = self.progress.as_mut() else {
            return;
        };
        p.last = now;
        if !p.stderr {
            return;
        }
        let secs = now.duration_since(p.started).as_secs_f64().max(1e-9);
        let mib = self.stats.bytes_read as f64 / (1 << 20) as f64;
        eprintln!(
            "cowsnap: scanned {} pages, stored {} ({} written), {:.0} MiB read, {:.0} MiB/s",
            self.stats.pages_scanned,
            self.stats.pages_stored,
            sink.next_id(),
            mib,
            mib / secs
        );
    }
}

struct ProcCtx {
    pid: i32,
    pagemap: Pagemap,
    mem: ProcMem,
    entries: Vec<PagemapEntry>,
    outcomes: Vec<Outcome>,
    /// Pages to read in this chunk: (address, dedup key).
    reads: Vec<(u64, Option<u64>)>,
}

impl ProcCtx {
    /// The pagemap entries of `n` pages from `start` into `entries`.
    fn read_pagemap(&mut self, start: u64, n: usize) -> Result<(), MemoryError> {
        self.pagemap
            .read(start, n, &mut self.entries)
            .map_err(|source| MemoryError::Pagemap {
                pid: self.pid,
                source,
            })
    }
}

/// Merges per-page outcomes into runs.
#[derive(Default)]
struct RunBuilder {
    runs: Vec<PageRun>,
}

impl RunBuilder {
    fn push_n(&mut self, addr: u64, n: u64, outcome: Outcome, ps: u64) {
        if n == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            let contiguous = last.start() + last.pages() * ps == addr;
            match (last, outcome) {
                (PageRun::Zero { pages, .. }, Outcome::Zero) if contiguous => {
                    *pages += n;
                    return;
                }
                (PageRun::Absent { pages, .. }, Outcome::Absent) if contiguous => {
                    *pages += n;
                    return;
                }
                (PageRun::Mapped { pages, .. }, Outcome::Mapped) if contiguous => {
                    *pages += n;
                    return;
                }
                (PageRun::Stored { pages, first, .. }, Outcome::Stored(id))
                    if contiguous && n == 1 && *first + *pages == id =>
                {
                    *pages += 1;
                    return;
                }
                _ => {}
            }
        }
        self.runs.push(match outcome {
            Outcome::Zero => PageRun::Zero {
                start: addr,
                pages: n,
            },
            Outcome::Absent | Outcome::Read(_) => PageRun::Absent {
                start: addr,
                pages: n,
            },
            Outcome::Mapped => PageRun::Mapped {
                start: addr,
                pages: n,
            },
            Outcome::Stored(id) => PageRun::Stored {
                start: addr,
                pages: 1,
                first: id,
            },
        });
    }
}

/// A page sink that keeps pages in memory (tests, dry runs).
#[derive(Debug, Default)]
pub struct VecSink {
    pub page_size: usize,
    pub data: Vec<u8>,
    /// Pages at the end of `data` handed out by the last reserve.
    pub reserved: usize,
}

impl PageSink for VecSink {
    fn reserve(&mut self) -> Result<(PageId, &mut [u8]), ImageError> {
        let first = self.next_id();
        let len = self.data.len();
        self.data.resize(len + 256 * self.page_size, 0);
        self.reserved = 256;
        Ok((first, &mut self.data[len..]))
    }
    fn commit_reserved(&mut self, pages: u64) -> Result<PageId, ImageError> {
        let keep = self.data.len() - (self.reserved - pages as usize) * self.page_size;
        self.data.truncate(keep);
        self.reserved = 0;
        Ok(self.next_id() - pages)
    }
    fn next_id(&self) -> PageId {
        ((self.data.len() - self.reserved * self.page_size) / self.page_size.max(1)) as PageId
    }
}

impl VecSink {
    pub fn page(&self, id: PageId) -> &[u8] {
        let ps = self.page_size;
        &self.data[id as usize * ps..(id as usize + 1) * ps]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pagemap::{page_size, zero_page_pfn};
    use crate::sys::procfs::read_smaps;
    use crate::sys::testing::{map_anon, mprotect, mremap_fixed, poke, touch, TestChild};

    fn pattern(page: usize, salt: u8) -> Vec<u8> {
        let ps = page_size() as usize;
        (0..ps)
            .map(|i| (i as u8).wrapping_mul(31) ^ (page as u8) ^ salt ^ ((page >> 8) as u8) | 1)
            .collect()
    }

    /// The VMAs of `pid` that lie inside [lo, hi).
    fn scan(
        scanner: &mut MemoryScanner,
        sink: &mut VecSink,
        pid: i32,
        ranges: &[(usize, usize)],
    ) -> Vec<Vma> {
        let maps: Vec<MapsEntry> = read_smaps(pid)
            .expect("smaps")
            .into_iter()
            .filter(|m| {
                // Overlapping, not inside: the kernel merges neighbouring
                // anonymous mappings into one VMA (ids() keeps to the ranges).
                ranges
                    .iter()
                    .any(|&(lo, hi)| m.start < hi as u64 && m.end > lo as u64)
            })
            .collect();
        scanner.scan_process(pid, &maps, sink).expect("scan")
    }

    /// Page id (or None for zero/absent) of every page of `vmas` in [lo, hi).
    fn ids(vmas: &[Vma], lo: usize, hi: usize) -> Vec<Option<PageId>> {
        let ps = page_size();
        let mut out = Vec::new();
        for v in vmas {
            for r in &v.pages {
                for i in 0..r.pages() {
                    let addr = r.start() + i * ps;
                    if addr < lo as u64 || addr >= hi as u64 {
                        continue;
                    }
                    out.push(match *r {
                        PageRun::Stored { first, .. } => Some(first + i),
                        _ => None,
                    });
                }
            }
        }
        out
    }

    fn count_kind(vmas: &[Vma], f: fn(&PageRun) -> bool) -> u64 {
        vmas.iter()
            .flat_map(|v| v.pages.iter())
            .filter(|r| f(r))
            .map(|r| r.pages())
            .sum()
    }

    #[test]
    fn forked_child_shares_pages_and_moved_pages_dedup() {
        let ps = page_size() as usize;
        let npages = 2048; // 8 MiB
        let region = map_anon(npages * ps, false);
        let moved_to = map_anon(100 * ps, false);
        let shared = map_anon(16 * ps, true);
        let hidden = map_anon(4 * ps, false);

        let parent = TestChild::fork(move || {
            for p in 0..1024 {
                poke(region + p * ps, &pattern(p, 0));
            }
            // Written, but with zeros: allocated pages, stored (with their
            // identity: the child shares them) so restore allocates them too.
            for p in 1024..1536 {
                poke(region + p * ps, &vec![0u8; ps]);
            }
            for p in 0..16 {
                poke(shared + p * ps, &pattern(p, 7));
            }
            for p in 0..4 {
                poke(hidden + p * ps, &pattern(p, 9));
            }
            mprotect(hidden, 4 * ps, libc::PROT_NONE);
            let child = TestChild::fork(move || {
                for p in 0..100 {
                    poke(region + p * ps, &pattern(p, 3));
                }
                // fork copies no PTEs of shared mappings: fault them in.
                for p in 0..16 {
                    touch(shared + p * ps);
                }
                // Move pages 200..300 (still shared with the parent) elsewhere.
                mremap_fixed(region + 200 * ps, 100 * ps, moved_to);
                0
            });
            child.leak() as i64
        });
        let child = TestChild::adopt(parent.value as i32);

        let zero_pfn = zero_page_pfn().expect("zero pfn");
        let mut sink = VecSink {
            page_size: ps,
            data: Vec::new(),
            reserved: 0,
        };
        let mut scanner = MemoryScanner::new(ps as u64, zero_pfn);
        let ranges = [
            (region, region + npages * ps),
            (moved_to, moved_to + 100 * ps),
            (shared, shared + 16 * ps),
            (hidden, hidden + 4 * ps),
        ];
        let pv = scan(&mut scanner, &mut sink, parent.pid, &ranges);
        let cv = scan(&mut scanner, &mut sink, child.pid, &ranges);

        // Parent: 1024 unique + 512 zero-filled + 16 shared + 4 PROT_NONE
        // pages stored; none is a kernel zero page.
        let p_ids = ids(&pv, region, region + npages * ps);
        assert_eq!(p_ids.len(), npages);
        assert!(p_ids[..1536].iter().all(|i| i.is_some()));
        assert!(p_ids[1536..].iter().all(|i| i.is_none()));
        assert_eq!(count_kind(&pv, |r| matches!(r, PageRun::Zero { .. })), 0);
        assert_eq!(sink.page(p_ids[1100].expect("id")), &vec![0u8; ps][..]);
        for p in [0usize, 1, 500, 1023] {
            assert_eq!(
                sink.page(p_ids[p].expect("id")),
                &pattern(p, 0)[..],
                "page {p}"
            );
        }
        let h_ids = ids(&pv, hidden, hidden + 4 * ps);
        for (p, id) in h_ids.iter().enumerate() {
            assert_eq!(
                sink.page(id.expect("PROT_NONE page stored")),
                &pattern(p, 9)[..]
            );
        }

        // Child: 100 own copies, the rest the parent's ids; moved pages keep theirs.
        let c_ids = ids(&cv, region, region + npages * ps);
        for p in 0..100 {
            let id = c_ids[p].expect("dirty page stored");
            assert_ne!(Some(id), p_ids[p]);
            assert_eq!(sink.page(id), &pattern(p, 3)[..]);
        }
        for p in (100..200).chain(300..1536) {
            assert_eq!(
                c_ids[p - if p >= 300 { 100 } else { 0 }],
                p_ids[p],
                "page {p}"
            );
        }
        let m_ids = ids(&cv, moved_to, moved_to + 100 * ps);
        assert_eq!(&m_ids[..], &p_ids[200..300]);
        let s_p = ids(&pv, shared, shared + 16 * ps);
        let s_c = ids(&cv, shared, shared + 16 * ps);
        assert!(s_p.iter().all(|i| i.is_some()));
        assert_eq!(s_p, s_c);
        assert!(pv.iter().any(|v| v.kind == VmaKind::SharedAnon));

        let st = scanner.stats();
        assert_eq!(st.pages_stored, 1024 + 512 + 16 + 4 + 100);
        assert_eq!(sink.next_id(), st.pages_stored);
        assert_eq!(st.zero_pages, 0);
    }

    /// Throughput of scan + store on a child with 512 MiB of half-random pages.
    /// A benchmark, not a check: run with
    /// `cargo test --release -p cowsnap --lib scan_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn scan_throughput() {
        use crate::image::pagestore::{PageStoreOptions, PageStoreWriter};
        let ps = page_size() as usize;
        let npages = 128 * 1024;
        let region = map_anon(npages * ps, false);
        let child = TestChild::fork(move || {
            let mut x: u64 = 0x9e3779b97f4a7c15;
            for p in 0..npages {
                let mut half = vec![0u8; ps / 2];
                for chunk in half.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_ne_bytes());
                }
                poke(region + p * ps, &half);
            }
            0
        });
        let zero_pfn = zero_page_pfn().expect("zero pfn");
        {
            // Scanner alone (pages kept in memory), for comparison.
            let t0 = Instant::now();
            let mut sink = VecSink {
                page_size: ps,
                data: Vec::with_capacity(npages * ps),
                reserved: 0,
            };
            let mut scanner = MemoryScanner::new(ps as u64, zero_pfn);
            let maps: Vec<MapsEntry> = read_smaps(child.pid).expect("smaps");
            scanner
                .scan_process(child.pid, &maps, &mut sink)
                .expect("scan");
            eprintln!("scanner alone: {:.3} s", t0.elapsed().as_secs_f64());
        }
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = PageStoreWriter::create(dir.path(), ps as u64, PageStoreOptions::default())
            .expect("store");
        let t0 = Instant::now();
        let mut scanner = MemoryScanner::new(ps as u64, zero_pfn);
        let maps: Vec<MapsEntry> = read_smaps(child.pid).expect("smaps");
        let vmas = scanner
            .scan_process(child.pid, &maps, &mut store)
            .expect("scan");
        let t_scan = t0.elapsed().as_secs_f64();
        let summary = store.finish().expect("finish");
        let secs = t0.elapsed().as_secs_f64();
        let mib = (scanner.stats().pages_stored * ps as u64) as f64 / (1 << 20) as f64;
        eprintln!(
            "{} vmas, {mib:.0} MiB unique: scan {t_scan:.3} s, with store {secs:.3} s = {:.0} MiB/s; pages file {} bytes",
            vmas.len(),
            mib / secs,
            summary.file_size
        );
        assert!(scanner.stats().pages_stored >= npages as u64);
    }

    #[test]
    fn classify_kinds() {
        let m = |path: &str, shared: bool, deleted: bool| MapsEntry {
            path: path.into(),
            shared,
            deleted,
            ..Default::default()
        };
        assert_eq!(classify(&m("", false, false)), VmaKind::PrivateAnon);
        assert_eq!(classify(&m("/dev/zero", true, true)), VmaKind::SharedAnon);
        assert_eq!(classify(&m("/memfd:x", true, true)), VmaKind::Memfd);
        assert_eq!(classify(&m("/SYSV00000000", true, true)), VmaKind::SysvShm);
        assert_eq!(
            classify(&m("/usr/lib/libc.so.6", false, false)),
            VmaKind::PrivateFile
        );
        assert_eq!(classify(&m("/data", true, false)), VmaKind::SharedFile);
        assert_eq!(classify(&m("[heap]", false, false)), VmaKind::Heap);
        assert_eq!(classify(&m("[stack]", false, false)), VmaKind::Stack);
        assert_eq!(classify(&m("[vvar_vclock]", false, false)), VmaKind::Vvar);
        assert_eq!(classify(&m("[vsyscall]", false, false)), VmaKind::Vsyscall);
        assert_eq!(
            classify(&m("[anon:jit]", false, false)),
            VmaKind::PrivateAnon
        );
        assert_eq!(
            classify(&m("anon_inode:dmabuf", true, false)),
            VmaKind::Other
        );
    }

    /// The code this test runs is a present page-cache page of the test
    /// binary's text: recorded as `Mapped` (restore maps it again), never
    /// stored, and the VMA's runs still cover it exactly.
    #[test]
    fn present_file_pages_are_recorded_as_mapped() {
        let ps = page_size();
        let here = present_file_pages_are_recorded_as_mapped as *const () as u64;
        let pid = std::process::id() as i32;
        let maps: Vec<MapsEntry> = read_smaps(pid)
            .expect("smaps")
            .into_iter()
            .filter(|m| m.start <= here && here < m.end)
            .collect();
        assert_eq!(maps.len(), 1, "one VMA holds this function");
        assert_eq!(classify(&maps[0]), VmaKind::PrivateFile);
        let mut scanner = MemoryScanner::new(ps, zero_page_pfn().ok().flatten());
        let mut sink = VecSink {
            page_size: ps as usize,
            ..VecSink::default()
        };
        let vmas = scanner.scan_process(pid, &maps, &mut sink).expect("scan");
        let page = here & !(ps - 1);
        let run = vmas[0]
            .pages
            .iter()
            .find(|r| r.start() <= page && page < r.start() + r.pages() * ps)
            .expect("a run covers the page");
        assert!(matches!(run, PageRun::Mapped { .. }), "{run:?}");
        assert_eq!(
            count_kind(&vmas, |r| matches!(r, PageRun::Stored { .. })),
            0
        );
        assert_eq!(sink.next_id(), 0, "nothing stored for a text mapping");
    }

    #[test]
    fn runs_merge_only_consecutive_ids() {
        let mut b = RunBuilder::default();
        for (i, o) in [
            Outcome::Stored(5),
            Outcome::Stored(6),
            Outcome::Stored(9),
            Outcome::Zero,
            Outcome::Zero,
            Outcome::Absent,
        ]
        .into_iter()
        .enumerate()
        {
            b.push_n(0x1000 * i as u64, 1, o, 0x1000);
        }
        assert_eq!(
            b.runs,
            vec![
                PageRun::Stored {
                    start: 0,
                    pages: 2,
                    first: 5
                },
                PageRun::Stored {
                    start: 0x2000,
                    pages: 1,
                    first: 9
                },
                PageRun::Zero {
                    start: 0x3000,
                    pages: 2
                },
                PageRun::Absent {
                    start: 0x5000,
                    pages: 1
                },
            ]
        );
    }
}
