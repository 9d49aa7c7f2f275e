//! Loading the restorer blob: the last step of restoring one process.
//!
//! This module owns the bytes of `restorer-blob/` (built and flattened by
//! `shim/build.rs`), the argument block it reads ([`abi`], the one shared
//! definition), and the jump into it. It must never return into the runtime
//! once it jumped: everything that can fail in the runtime (finding a hole,
//! mapping, building frames) fails in [`prepare`] with a [`BlobError`];
//! afterwards only the blob can fail, and it reports through a [`Status`]
//! word and its exit code (see [`BlobFailure`]).
//!
//! Memory of one loaded blob, at a hole free in both the runtime's layout
//! (`/proc/self/maps`) and the target's (maps, move destinations, keeps):
//!
//! ```text
//! base  +------------------+  blob bytes (R-X after relocation)
//!       | args block       |  ArgHeader, tables, rt_sigframes (RW-)
//!       | main stack       |  the blob's stack for thread 0 (RW-)
//!       | thread stacks    |  one small stack per cloned thread (RW-)
//!       | scratch          |  reserved hole for cyclic moves; unmapped by the blob
//!       +------------------+
//! ```
//!
//! The blob, block and stacks stay mapped in the restored process (the blob
//! cannot unmap the code it runs); the restore engine removes them from
//! outside (ptrace-injected `munmap`, as CRIU does) or leaves them.

#[allow(dead_code)]
#[path = "../../../../restorer-blob/src/abi.rs"]
pub mod abi;

#[cfg(test)]
mod tests;

mod meta {
    include!(concat!(env!("OUT_DIR"), "/restorer_blob_meta.rs"));
}

pub use abi::{PrctlMmMap, Range, Status};
pub use meta::{BLOB, BLOB_MEM_SIZE, BLOB_RELATIVE_RELOCS};

use crate::image::types::{Rseq, SigAltStack, UserRegs};
use std::fmt;
use std::mem::size_of;

const PAGE: u64 = 4096;
/// Stack of thread 0 while it runs the blob.
const MAIN_STACK: u64 = 64 * 1024;
/// Stack of each cloned thread while it runs the blob.
const THREAD_STACK: u64 = 16 * 1024;
const SS_DISABLE: i32 = 2;
/// `struct rt_sigframe` rounded to the 64-byte alignment XRSTOR needs for what follows.
const FRAME_SIZE: u64 = 448;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("reading /proc/self/maps: {0}")]
    ReadMaps(#[source] std::io::Error),
    #[error("/proc/self/maps line {line:?}: cannot parse")]
    ParseMaps { line: String },
    #[error("no hole of {size:#x} bytes free in both the runtime and the target layout")]
    NoHole { size: u64 },
    #[error("blob placement {addr:#x}+{size:#x} overlaps {what} {start:#x}-{end:#x}")]
    PlacementOverlaps {
        addr: u64,
        size: u64,
        what: &'static str,
        start: u64,
        end: u64,
    },
    #[error("mmap of the blob at {addr:#x} ({size:#x} bytes): errno {errno}")]
    Map { addr: u64, size: u64, errno: i32 },
    #[error("mprotect of the blob at {addr:#x}: errno {errno}")]
    Protect { addr: u64, errno: i32 },
    #[error("{what} at {addr:#x} (len {len:#x}) is not page aligned")]
    Unaligned {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("thread {thread}: {reason}")]
    Thread { thread: usize, reason: String },
    #[error("no thread given: the blob needs at least the calling thread")]
    NoThread,
    #[error("seccomp filter {index}: {len} bytes is not a whole number of sock_filter entries (max 65535)")]
    Filter { index: usize, len: usize },
    #[error("vdso: {0}")]
    Vdso(String),
    #[error("dropping the runtime's rseq registration at {ptr:#x}: errno {errno}")]
    Rseq { ptr: u64, errno: i32 },
    #[error("status page: mmap failed with errno {errno}")]
    StatusPage { errno: i32 },
}

/// The blob's report of a failed restore, decoded from the [`Status`] word
/// (or, without one, from the exit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFailure {
    pub step: u32,
    pub errno: u32,
    pub thread: u32,
    pub index: u64,
    pub addr: u64,
}

impl BlobFailure {
    pub fn step_name(&self) -> &'static str {
        abi::step_name(self.step)
    }

    /// From a failed status word; `None` if it reports no failure.
    pub fn from_status(s: &Status) -> Option<BlobFailure> {
        (s.state == abi::STATE_FAILED).then_some(BlobFailure {
            step: s.step,
            errno: s.errno,
            thread: s.thread,
            index: s.index,
            addr: s.addr,
        })
    }

    /// The step a process died in, from its exit code alone (`EXIT_BASE + step`).
    pub fn step_from_exit_code(code: i32) -> Option<u32> {
        let step = code.checked_sub(abi::EXIT_BASE)?;
        (1..=abi::STEP_LAST as i32)
            .contains(&step)
            .then_some(step as u32)
    }
}

impl fmt::Display for BlobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restorer failed at step {} ({}): errno {} ({}), thread {}, entry {}, address {:#x}",
            self.step,
            self.step_name(),
            self.errno,
            std::io::Error::from_raw_os_error(self.errno as i32),
            self.thread,
            self.index,
            self.addr
        )
    }
}

/// A `MAP_SHARED` anonymous page holding a [`Status`]: create it before
/// forking the process that loads the blob, read it after that process
/// exited (or stopped at its barrier).
pub struct StatusPage {
    addr: u64,
}

impl StatusPage {
    pub fn new() -> Result<StatusPage, BlobError> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BlobError::StatusPage { errno: errno() });
        }
        Ok(StatusPage { addr: p as u64 })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn range(&self) -> Range {
        Range {
            start: self.addr,
            len: PAGE,
        }
    }

    pub fn read(&self) -> Status {
        // SAFETY: the page is mapped for our lifetime and holds a plain-data
        // Status; volatile because another process writes it.
        unsafe { (self.addr as *const Status).read_volatile() }
    }

    /// `Some` when the blob reported a failure.
    pub fn failure(&self) -> Option<BlobFailure> {
        BlobFailure::from_status(&self.read())
    }
}

impl Drop for StatusPage {
    fn drop(&mut self) {
        // SAFETY: unmaps only the page this value created.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, PAGE as usize) };
    }
}

/// FPU state a thread gets back with its registers.
#[derive(Debug, Clone)]
pub enum FpuState {
    /// Initial FPU state (`fpstate = 0` in the frame).
    Init,
    /// A legacy 512-byte FXSAVE area: x87 + SSE only.
    Fxsave(Box<[u8; 512]>),
    /// A standard-format XSAVE area (e.g. the NT_X86_XSTATE regset). Its
    /// `sw_reserved` bytes are used when they carry FP_XSTATE_MAGIC1, else filled in.
    Xsave(Vec<u8>),
}

/// One thread to restore. Index 0 (the first pushed) is the thread that
/// runs the blob; its `set_tid` is ignored (it keeps its id).
#[derive(Debug, Clone)]
pub struct ThreadSpec {
    pub regs: UserRegs,
    pub fpu: FpuState,
    pub sigmask: u64,
    pub altstack: SigAltStack,
    /// `clone3` `set_tid`, innermost pid namespace first (at most 4); empty: any.
    pub set_tid: Vec<i32>,
    pub clear_child_tid: u64,
    pub rseq: Option<Rseq>,
    /// Thread-directed pending signals (128-byte siginfos, oldest first)
    /// the thread queues to itself in the blob, all signals blocked.
    pub pending: Vec<[u8; abi::SIGINFO_SIZE]>,
}

impl ThreadSpec {
    pub fn new(regs: UserRegs) -> ThreadSpec {
        ThreadSpec {
            regs,
            fpu: FpuState::Init,
            sigmask: 0,
            altstack: SigAltStack::default(),
            set_tid: Vec::new(),
            clear_child_tid: 0,
            rseq: None,
            pending: Vec::new(),
        }
    }
}

/// Creds every thread takes back last (ids, groups, capabilities, securebits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredsSpec {
    /// real, effective, saved, fs.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub securebits: u32,
}

/// The file side of a file mapping: an fd opened before the jump, the file
/// offset, and whether the blob closes the fd once mapped (the target never
/// had it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFd {
    pub fd: i32,
    pub offset: u64,
    pub close: bool,
}

/// Where to put the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The highest hole free in both layouts.
    Auto,
    /// Exactly here (must be free in both layouts).
    At(u64),
}

/// Builder of the argument block: what the blob must do, in the target's words.
#[derive(Debug, Clone, Default)]
pub struct BlobArgs {
    unmaps: Vec<Range>,
    keeps: Vec<Range>,
    unmap_runtime: bool,
    moves: Vec<abi::Move>,
    maps: Vec<abi::Map>,
    protects: Vec<abi::Protect>,
    advises: Vec<abi::Advise>,
    mm: Option<(PrctlMmMap, Vec<[u64; 2]>)>,
    vdso_to: Option<u64>,
    threads: Vec<ThreadSpec>,
    creds: Option<CredsSpec>,
    no_new_privs: bool,
    filters: Vec<Vec<u8>>,
    barrier: Option<(u64, u32)>,
    clear_pdeathsig: bool,
    status: Option<u64>,
    post_barrier_unmaps: Vec<Range>,
    populates: Vec<Range>,
    unpopulates: Vec<Range>,
    posix_timers: Vec<abi::PosixTimer>,
    drop_rseq: bool,
}

impl BlobArgs {
    /// By default the blob unmaps everything of the runtime that is not kept
    /// (see [`BlobArgs::push_keep`]) and drops the calling thread's glibc rseq.
    pub fn new() -> BlobArgs {
        BlobArgs {
            unmap_runtime: true,
            drop_rseq: true,
            ..BlobArgs::default()
        }
    }

    /// Whether to unmap the complement of the kept ranges (default true).
    /// Without it only [`BlobArgs::push_unmap`] ranges go.
    pub fn unmap_runtime(&mut self, yes: bool) -> &mut Self {
        self.unmap_runtime = yes;
        self
    }

    /// Whether the loader drops the calling thread's glibc rseq registration (default true).
    pub fn drop_runtime_rseq(&mut self, yes: bool) -> &mut Self {
        self.drop_rseq = yes;
        self
    }

    /// A range to unmap explicitly (in addition to the runtime's complement).
    pub fn push_unmap(&mut self, start: u64, len: u64) -> &mut Self {
        self.unmaps.push(Range { start, len });
        self
    }

    /// A range already in place (e.g. inherited pages at their target
    /// address, or code the target keeps): never unmapped.
    pub fn push_keep(&mut self, start: u64, len: u64) -> &mut Self {
        self.keeps.push(Range { start, len });
        self
    }

    /// `mremap` `len` bytes from `from` to `to` (kept until moved).
    pub fn push_move(&mut self, from: u64, to: u64, len: u64) -> &mut Self {
        self.moves.push(abi::Move {
            from,
            to,
            len,
            state: abi::MOVE_PENDING,
        });
        self
    }

    /// An anonymous mapping (`flags`: MAP_PRIVATE or MAP_SHARED plus extras; MAP_FIXED is added).
    pub fn push_map_anon(&mut self, start: u64, len: u64, prot: i32, flags: i32) -> &mut Self {
        self.maps.push(abi::Map {
            start,
            len,
            offset: 0,
            prot: prot as u32,
            flags: (flags | libc::MAP_ANONYMOUS) as u32,
            fd: -1,
            close_fd: 0,
        });
        self
    }

    /// A file mapping of an fd opened beforehand; with `close_fd` the blob
    /// closes it once mapped (the target never saw that fd).
    pub fn push_map_file(
        &mut self,
        start: u64,
        len: u64,
        prot: i32,
        flags: i32,
        file: MapFd,
    ) -> &mut Self {
        self.maps.push(abi::Map {
            start,
            len,
            offset: file.offset,
            prot: prot as u32,
            flags: flags as u32,
            fd: file.fd,
            close_fd: file.close as u32,
        });
        self
    }

    pub fn push_mprotect(&mut self, start: u64, len: u64, prot: i32) -> &mut Self {
        self.protects.push(abi::Protect {
            start,
            len,
            prot: prot as u32,
            _pad: 0,
        });
        self
    }

    pub fn push_madvise(&mut self, start: u64, len: u64, advice: i32) -> &mut Self {
        self.advises.push(abi::Advise {
            start,
            len,
            advice: advice as u32,
            _pad: 0,
        });
        self
    }

    /// `PR_SET_MM_MAP` fields; `auxv` pairs are copied into the block; the
    /// `auxv`/`auxv_size` fields of `mm` are filled in, `exe_fd` is used as given
    /// (`u32::MAX` keeps the exe).
    pub fn set_mm(&mut self, mm: PrctlMmMap, auxv: &[[u64; 2]]) -> &mut Self {
        self.mm = Some((mm, auxv.to_vec()));
        self
    }

    /// Move the runtime's `[vvar]`, `[vvar_vclock]` and `[vdso]` so that
    /// `[vdso]` starts at `to` (offsets between them kept). Without it they stay.
    pub fn set_vdso(&mut self, to: u64) -> &mut Self {
        self.vdso_to = Some(to);
        self
    }

    pub fn push_thread(&mut self, t: ThreadSpec) -> &mut Self {
        self.threads.push(t);
        self
    }

    pub fn set_creds(&mut self, c: CredsSpec) -> &mut Self {
        self.creds = Some(c);
        self
    }

    /// Classic BPF programs (8-byte `struct sock_filter` entries), installed
    /// in order after creds; `no_new_privs` is set before them when asked.
    /// Without it, and when the restored effective set lacks CAP_SYS_ADMIN
    /// (which the kernel then requires), they go in just before capset,
    /// while the runtime's capabilities still hold.
    pub fn set_seccomp(&mut self, no_new_privs: bool, filters: Vec<Vec<u8>>) -> &mut Self {
        self.no_new_privs = no_new_privs;
        self.filters = filters;
        self
    }

    /// A u32 futex word in memory shared by every restored process (kept
    /// mapped): each thread adds one and waits until it reaches `count`.
    pub fn set_barrier(&mut self, addr: u64, count: u32) -> &mut Self {
        self.barrier = Some((addr, count));
        self.keeps.push(Range {
            start: addr & !(PAGE - 1),
            len: PAGE,
        });
        self
    }

    /// Once past the barrier, clear the parent-death signal the runtime armed
    /// (so a restore that dies before the release takes the tree with it).
    pub fn clear_pdeathsig_after_barrier(&mut self, yes: bool) -> &mut Self {
        self.clear_pdeathsig = yes;
        self
    }

    /// Where the blob reports progress and failure (kept mapped).
    pub fn set_status(&mut self, addr: u64) -> &mut Self {
        self.status = Some(addr);
        self.keeps.push(Range {
            start: addr & !(PAGE - 1),
            len: PAGE,
        });
        self
    }

    /// Ranges the last thread past the barrier unmaps (status, barrier pages).
    pub fn push_post_barrier_unmap(&mut self, start: u64, len: u64) -> &mut Self {
        self.post_barrier_unmaps.push(Range { start, len });
        self
    }

    /// A file range the blob faults in (`MADV_POPULATE_READ`, best effort)
    /// once every mapping is in place; merged with the previous range when
    /// adjacent, to keep the table short.
    pub fn push_populate(&mut self, start: u64, len: u64) -> &mut Self {
        if len == 0 {
            return self;
        }
        match self.populates.last_mut() {
            Some(last) if last.start + last.len == start => last.len += len,
            _ => self.populates.push(Range { start, len }),
        }
        self
    }

    /// A POSIX timer the blob creates with its id (after the threads) and
    /// arms once past the barrier.
    pub fn push_posix_timer(&mut self, t: abi::PosixTimer) -> &mut Self {
        self.posix_timers.push(t);
        self
    }

    /// A file range with no page of the original's, dropped after the
    /// populates (their fault-around maps cached neighbours too).
    pub fn push_unpopulate(&mut self, start: u64, len: u64) -> &mut Self {
        if len == 0 {
            return self;
        }
        match self.unpopulates.last_mut() {
            Some(last) if last.start + last.len == start => last.len += len,
            _ => self.unpopulates.push(Range { start, len }),
        }
        self
    }

    /// Every range the target layout will use.
    fn target_ranges(&self, vdso_moves: &[abi::Move]) -> Vec<Range> {
        let mut v: Vec<Range> = self
            .maps
            .iter()
            .map(|m| Range {
                start: m.start,
                len: m.len,
            })
            .collect();
        v.extend(self.moves.iter().chain(vdso_moves).map(|m| Range {
            start: m.to,
            len: m.len,
        }));
        v.extend(self.keeps.iter().copied());
        v
    }
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, BlobError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || BlobError::ParseMaps {
            line: line.to_string(),
        };
        let mut it = line.split_whitespace();
        let range = it.next().ok_or_else(bad)?;
        let perms = it.next().ok_or_else(bad)?.to_string();
        let offset = u64::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let _dev = it.next().ok_or_else(bad)?;
        let _inode = it.next().ok_or_else(bad)?;
        let path = it.collect::<Vec<_>>().join(" ");
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
        let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
        out.push(MapsEntry {
            start,
            end,
            perms,
            offset,
            path,
        });
    }
    Ok(out)
}

fn read_self_maps() -> Result<Vec<MapsEntry>, BlobError> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(BlobError::ReadMaps)?;
    parse_maps(&text)
}

fn overlaps(a: &Range, b: &Range) -> bool {
    a.start < b.start.saturating_add(b.len) && b.start < a.start.saturating_add(a.len)
}

/// The highest page-aligned `size`-byte hole in `[low, high)` overlapping no `busy` range.
pub fn find_hole(busy: &[Range], size: u64, low: u64, high: u64) -> Option<u64> {
    let mut b: Vec<Range> = busy.iter().filter(|r| r.len > 0).copied().collect();
    b.sort_by_key(|r| r.start);
    let mut gaps = Vec::new();
    let mut cur = low;
    for r in &b {
        if r.start > cur {
            gaps.push((cur, r.start.min(high)));
        }
        cur = cur.max(page_up(r.start.saturating_add(r.len)));
        if cur >= high {
            break;
        }
    }
    if cur < high {
        gaps.push((cur, high));
    }
    gaps.iter().rev().find_map(|&(s, e)| {
        let a = e.checked_sub(size)? & !(PAGE - 1);
        (a >= s).then_some(a)
    })
}

/// `[low, high)` minus `keeps`, as sorted ranges.
pub fn complement(keeps: &[Range], low: u64, high: u64) -> Vec<Range> {
    let mut k: Vec<Range> = keeps.iter().filter(|r| r.len > 0).copied().collect();
    k.sort_by_key(|r| r.start);
    let mut out = Vec::new();
    let mut cur = low;
    for r in k {
        let start = r.start & !(PAGE - 1);
        let end = r.start.saturating_add(r.len).div_ceil(PAGE) * PAGE;
        if start > cur {
            out.push(Range {
                start: cur,
                len: start.min(high) - cur,
            });
        }
        cur = cur.max(end);
        if cur >= high {
            break;
        }
    }
    if cur < high {
        out.push(Range {
            start: cur,
            len: high - cur,
        });
    }
    out
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn page_up(v: u64) -> u64 {
    v.div_ceil(PAGE) * PAGE
}

fn check_aligned(what: &'static str, addr: u64, len: u64) -> Result<(), BlobError> {
    if addr & (PAGE - 1) != 0 || len & (PAGE - 1) != 0 {
        return Err(BlobError::Unaligned { what, addr, len });
    }
    Ok(())
}

/// Byte image of a plain-data ABI struct.
fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: every ABI type is #[repr(C)] with explicit padding fields, so
    // all size_of::<T>() bytes are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// The argument block under construction, at a known absolute address.
struct BlockBuf {
    addr: u64,
    buf: Vec<u8>,
}

impl BlockBuf {
    fn align(&mut self, a: usize) {
        let n = self.buf.len().div_ceil(a) * a;
        self.buf.resize(n, 0);
    }

    fn push_bytes(&mut self, b: &[u8], align: usize) -> u64 {
        self.align(align);
        let off = self.buf.len() as u64;
        self.buf.extend_from_slice(b);
        off
    }

    fn table<T: Copy>(&mut self, items: &[T]) -> abi::Table {
        self.align(8);
        let off = self.buf.len() as u64;
        for it in items {
            self.buf.extend_from_slice(bytes_of(it));
        }
        abi::Table {
            offset: off,
            count: items.len() as u64,
        }
    }
}

/// The sizes of the parts of the blob's region.
#[derive(Debug, Clone, Copy)]
struct RegionLayout {
    blob: u64,
    block: u64,
    stacks: u64,
    scratch: u64,
}

impl RegionLayout {
    fn total(&self) -> u64 {
        self.blob + self.block + self.stacks + self.scratch
    }
}

/// A blob mapped and an argument block written, ready to jump.
#[derive(Debug)]
pub struct Prepared {
    pub base: u64,
    pub size: u64,
    /// Bytes of blob code at `base` (R-X); after it, block and stacks (RW-)
    /// up to `base + kept_len`; the scratch hole after that is unmapped by the blob.
    pub code_len: u64,
    pub kept_len: u64,
    block_addr: u64,
    stack_top: u64,
}

impl Prepared {
    /// The range the blob, its block and stacks occupy (it stays mapped after the restore).
    pub fn blob_range(&self) -> Range {
        Range {
            start: self.base,
            len: self.size,
        }
    }

    /// Jump into the blob. Never returns: the process becomes the target or
    /// exits with `EXIT_BASE + step`.
    pub fn jump(self) -> ! {
        // SAFETY: `base` holds the relocated blob (entry at offset 0, R-X),
        // `block_addr` a complete argument block, `stack_top` the top of a
        // stack inside the same region; the blob unmaps the runtime itself
        // and never returns here.
        unsafe {
            std::arch::asm!(
                "mov rsp, {sp}",
                "xor ebp, ebp",
                "jmp {entry}",
                sp = in(reg) self.stack_top,
                entry = in(reg) self.base,
                in("rdi") self.block_addr,
                options(noreturn),
            )
        }
    }
}

/// Map the blob, build the argument block, and jump. Returns only on an
/// error found before anything of the runtime was touched.
pub fn load_and_jump(
    args: &BlobArgs,
    placement: Placement,
) -> Result<std::convert::Infallible, BlobError> {
    let p = prepare(args, placement)?;
    p.jump()
}

fn vdso_moves(
    runtime: &[MapsEntry],
    to: Option<u64>,
) -> Result<(Vec<abi::Move>, Vec<Range>), BlobError> {
    let special: Vec<&MapsEntry> = runtime
        .iter()
        .filter(|e| e.path.starts_with("[vdso]") || e.path.starts_with("[vvar"))
        .collect();
    let ranges = special
        .iter()
        .map(|e| Range {
            start: e.start,
            len: e.end - e.start,
        })
        .collect();
    let Some(to) = to else {
        return Ok((Vec::new(), ranges));
    };
    let vdso = special
        .iter()
        .find(|e| e.path == "[vdso]")
        .ok_or_else(|| BlobError::Vdso("the runtime has no [vdso]".into()))?;
    let moves = special
        .iter()
        .map(|e| {
            let dest = (to as i128 + e.start as i128 - vdso.start as i128) as u64;
            abi::Move {
                from: e.start,
                to: dest,
                len: e.end - e.start,
                state: abi::MOVE_PENDING,
            }
        })
        .collect();
    Ok((moves, ranges))
}

/// Everything before the jump: may fail, touches nothing of the runtime
/// but the new mapping it creates (and, last, the rseq registration).
pub fn prepare(args: &BlobArgs, placement: Placement) -> Result<Prepared, BlobError> {
    if args.threads.is_empty() {
        return Err(BlobError::NoThread);
    }
    for m in &args.moves {
        check_aligned("move source", m.from, m.len)?;
        check_aligned("move destination", m.to, m.len)?;
    }
    for m in &args.maps {
        check_aligned("mapping", m.start, page_up(m.len))?;
    }
    let runtime = read_self_maps()?;
    let (vdso_moves, vdso_ranges) = vdso_moves(&runtime, args.vdso_to)?;

    // Frames: 448 bytes + fpstate (+4 for MAGIC2), each 64-aligned.
    let mut frames_size = 0u64;
    for t in &args.threads {
        let fp = match &t.fpu {
            FpuState::Init => 0,
            FpuState::Fxsave(_) => 512,
            FpuState::Xsave(v) => v.len() as u64 + 4,
        };
        frames_size += FRAME_SIZE + fp.div_ceil(64) * 64 + 64;
    }
    let tables_size: u64 = 4096
        + 64 * (args.unmaps.len() + args.keeps.len() + 2 * args.moves.len() + 16) as u64
        + 48 * args.maps.len() as u64
        + 24 * (args.protects.len() + args.advises.len() + args.post_barrier_unmaps.len()) as u64
        + 16 * (args.populates.len() + args.unpopulates.len()) as u64
        + 64 * args.posix_timers.len() as u64
        + 112 * args.threads.len() as u64
        + args
            .threads
            .iter()
            .map(|t| (abi::SIGINFO_SIZE * t.pending.len()) as u64 + 8)
            .sum::<u64>()
        + args
            .filters
            .iter()
            .map(|f| f.len() as u64 + 32)
            .sum::<u64>()
        + args.creds.as_ref().map_or(0, |c| 4 * c.groups.len() as u64)
        + args.mm.as_ref().map_or(0, |(_, a)| 16 * a.len() as u64)
        + 2 * 4096; // complement ranges of the runtime
    let max_move = args
        .moves
        .iter()
        .chain(&vdso_moves)
        .map(|m| m.len)
        .max()
        .unwrap_or(0);
    let layout = RegionLayout {
        blob: page_up(BLOB_MEM_SIZE),
        block: page_up(tables_size + frames_size + 64 * (runtime.len() as u64 + 8)),
        stacks: MAIN_STACK + THREAD_STACK * (args.threads.len() as u64 - 1),
        scratch: page_up(max_move),
    };
    let size = layout.total();

    let mut busy: Vec<Range> = runtime
        .iter()
        .map(|e| Range {
            start: e.start,
            len: e.end - e.start,
        })
        .collect();
    let target = args.target_ranges(&vdso_moves);
    let base = match placement {
        Placement::Auto => {
            busy.extend(target.iter().copied());
            find_hole(&busy, size, 0x10000, abi::USER_HIGH).ok_or(BlobError::NoHole { size })?
        }
        Placement::At(addr) => {
            let want = Range {
                start: addr,
                len: size,
            };
            for (what, set) in [("runtime mapping", &busy), ("target range", &target)] {
                if let Some(r) = set.iter().find(|r| overlaps(r, &want)) {
                    return Err(BlobError::PlacementOverlaps {
                        addr,
                        size,
                        what,
                        start: r.start,
                        end: r.start + r.len,
                    });
                }
            }
            addr
        }
    };

    // Map the region (all RW first), copy and relocate the blob.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
    // range was checked free of runtime and target mappings.
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || p as u64 != base {
        return Err(BlobError::Map {
            addr: base,
            size,
            errno: errno(),
        });
    }
    let mut region = Region {
        base,
        size,
        armed: true,
    };
    // SAFETY: the region is ours, RW, and at least BLOB_MEM_SIZE >= BLOB.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(BLOB.as_ptr(), base as *mut u8, BLOB.len()) };
    for &(off, addend) in BLOB_RELATIVE_RELOCS {
        // SAFETY: build.rs checked every relocation lies in the blob's memory image.
        unsafe { ((base + off) as *mut u64).write_unaligned(base + addend) };
    }
    // The blob keeps no writable data of its own (its state is the block).
    // SAFETY: changes protection of our own blob pages only.
    if unsafe {
        libc::mprotect(
            base as *mut libc::c_void,
            layout.blob as usize,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    } != 0
    {
        return Err(BlobError::Protect {
            addr: base,
            errno: errno(),
        });
    }
    let block_addr = base + layout.blob;
    let stacks_base = block_addr + layout.block;
    let scratch = Range {
        start: stacks_base + layout.stacks,
        len: layout.scratch,
    };
    let kept_region = Range {
        start: base,
        len: size - layout.scratch,
    };

    // Keep: the region, explicit keeps, move sources, vdso/vvar (moved or not).
    let mut keeps = args.keeps.clone();
    keeps.push(kept_region);
    keeps.extend(args.moves.iter().map(|m| Range {
        start: m.from,
        len: m.len,
    }));
    keeps.extend(vdso_ranges.iter().copied());
    let mut unmaps = args.unmaps.clone();
    if args.unmap_runtime {
        unmaps.extend(complement(&keeps, abi::USER_LOW, abi::USER_HIGH));
    } else if scratch.len > 0 {
        unmaps.push(scratch);
    }

    let block = build_block(
        args,
        block_addr,
        &unmaps,
        &vdso_moves,
        scratch,
        base,
        size,
        stacks_base,
    )?;
    if block.len() as u64 > layout.block {
        return Err(BlobError::Thread {
            thread: 0,
            reason: format!("argument block overflow: {} bytes", block.len()),
        });
    }
    // SAFETY: the block area is ours and large enough (checked above).
    unsafe { std::ptr::copy_nonoverlapping(block.as_ptr(), block_addr as *mut u8, block.len()) };

    if args.drop_rseq {
        drop_runtime_rseq()?;
    }
    region.armed = false;
    Ok(Prepared {
        base,
        size,
        code_len: layout.blob,
        kept_len: size - layout.scratch,
        block_addr,
        stack_top: stacks_base + MAIN_STACK,
    })
}

/// Unmaps the region again when `prepare` fails after mapping it.
struct Region {
    base: u64,
    size: u64,
    armed: bool,
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: unmaps only the region `prepare` mapped.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
        }
    }
}

/// glibc registers an rseq area in each thread's TLS; once the blob unmaps
/// the TLS the kernel would fault writing there. Unregister it (the blob
/// registers the target's own per thread).
fn drop_runtime_rseq() -> Result<(), BlobError> {
    const RSEQ_SIG: u32 = 0x5305_3053;
    // glibc (>= 2.35) exports where it registered: linked directly, not
    // looked up with dlsym, which finds nothing in a static binary (the
    // container restore helper is one).
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: plain data glibc sets once at startup, before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return Ok(());
    }
    let mut fs: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to `fs`.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64) };
    let ptr = (fs as i64 + off as i64) as u64;
    let mut last = 0;
    // glibc registers 32 bytes even when it advertises fewer.
    for len in [size, 32] {
        // SAFETY: unregistering reads nothing from user memory beyond the check.
        let r = unsafe { libc::syscall(libc::SYS_rseq, ptr, len, 1, RSEQ_SIG) };
        if r == 0 {
            return Ok(());
        }
        last = errno();
    }
    Err(BlobError::Rseq { ptr, errno: last })
}

#[allow(clippy::too_many_arguments)]
fn build_block(
    args: &BlobArgs,
    block_addr: u64,
    unmaps: &[Range],
    vdso_moves: &[abi::Move],
    scratch: Range,
    base: u64,
    size: u64,
    stacks_base: u64,
) -> Result<Vec<u8>, BlobError> {
    let mut b = BlockBuf {
        addr: block_addr,
        buf: vec![0; size_of::<abi::ArgHeader>()],
    };
    let mut h = abi::ArgHeader {
        magic: abi::ARGS_MAGIC,
        version: abi::ARGS_VERSION,
        header_size: size_of::<abi::ArgHeader>() as u32,
        blob: Range {
            start: base,
            len: size,
        },
        status: args.status.unwrap_or(0),
        scratch,
        ..Default::default()
    };
    h.unmaps = b.table(unmaps);
    let mut moves = args.moves.clone();
    moves.extend_from_slice(vdso_moves);
    // By source: the blob then finds the moves a destination would cover
    // by binary search (it checks the order itself; any order is correct).
    moves.sort_by_key(|m| m.from);
    h.moves = b.table(&moves);
    h.maps = b.table(&args.maps);
    h.protects = b.table(&args.protects);
    h.advises = b.table(&args.advises);
    if let Some((mm, auxv)) = &args.mm {
        let flat: Vec<u64> = auxv.iter().flat_map(|p| p.iter().copied()).collect();
        let off = b.table(&flat).offset;
        h.mm = PrctlMmMap {
            auxv: if flat.is_empty() { 0 } else { b.addr + off },
            auxv_size: (flat.len() * 8) as u32,
            ..*mm
        };
        h.mm_valid = 1;
    }
    if let Some(c) = &args.creds {
        h.creds = abi::Creds {
            valid: 1,
            securebits: c.securebits,
            uids: c.uids,
            gids: c.gids,
            groups: b.table(&c.groups),
            cap_effective: c.cap_effective,
            cap_permitted: c.cap_permitted,
            cap_inheritable: c.cap_inheritable,
            cap_bounding: c.cap_bounding,
            cap_ambient: c.cap_ambient,
            no_new_privs: 0,
            _pad: 0,
        };
    }
    h.creds.no_new_privs = args.no_new_privs as u32;
    let mut filters = Vec::new();
    for (i, f) in args.filters.iter().enumerate() {
        if f.len() % 8 != 0 || f.len() / 8 > u16::MAX as usize {
            return Err(BlobError::Filter {
                index: i,
                len: f.len(),
            });
        }
        let off = b.push_bytes(f, 8);
        filters.push(abi::Filter {
            offset: off,
            count: f.len() as u64 / 8,
        });
    }
    h.filters = b.table(&filters);
    if let Some((addr, count)) = args.barrier {
        h.barrier = abi::Barrier {
            addr,
            count,
            clear_pdeathsig: u32::from(args.clear_pdeathsig),
        };
    }
    h.post_barrier_unmaps = b.table(&args.post_barrier_unmaps);
    h.populates = b.table(&args.populates);
    h.unpopulates = b.table(&args.unpopulates);
    h.posix_timers = b.table(&args.posix_timers);

    // Frames, then the thread table that points at them.
    let mut threads = Vec::new();
    for (i, t) in args.threads.iter().enumerate() {
        if t.set_tid.len() > 4 {
            return Err(BlobError::Thread {
                thread: i,
                reason: "more than 4 set_tid levels".into(),
            });
        }
        let frame_off = b.push_bytes(&[0u8; FRAME_SIZE as usize], 64);
        let frame_addr = b.addr + frame_off;
        let fpstate = match &t.fpu {
            FpuState::Init => 0,
            FpuState::Fxsave(fx) => {
                let mut fx = **fx;
                // No MAGIC1: the kernel restores it as a legacy FXSAVE frame.
                fx[abi::FPX_SW_BYTES_OFFSET..].fill(0);
                b.addr + b.push_bytes(&fx, 64)
            }
            FpuState::Xsave(x) => {
                b.addr
                    + b.push_bytes(
                        &xsave_for_frame(x)
                            .map_err(|reason| BlobError::Thread { thread: i, reason })?,
                        64,
                    )
            }
        };
        let frame = sigframe(t, fpstate);
        b.buf[frame_off as usize..(frame_off as usize + size_of::<abi::RtSigframe>())]
            .copy_from_slice(bytes_of(&frame));
        let mut set_tid = [0i32; 4];
        set_tid[..t.set_tid.len()].copy_from_slice(&t.set_tid);
        let pending = pending_table(&mut b, i, &t.pending)?;
        let (rseq_ptr, rseq_len, rseq_sig) = t
            .rseq
            .map_or((0, 0, 0), |r| (r.abi_pointer, r.abi_size, r.signature));
        threads.push(abi::Thread {
            frame: frame_addr,
            stack_top: if i == 0 {
                0
            } else {
                stacks_base + MAIN_STACK + THREAD_STACK * i as u64
            },
            set_tid,
            set_tid_len: t.set_tid.len() as u32,
            _pad: 0,
            fs_base: t.regs.fs_base,
            gs_base: t.regs.gs_base,
            clear_child_tid: t.clear_child_tid,
            rseq_ptr,
            rseq_len,
            rseq_sig,
            pending,
        });
    }
    h.threads = b.table(&threads);
    h.total_size = b.buf.len() as u64;
    b.buf[..size_of::<abi::ArgHeader>()].copy_from_slice(bytes_of(&h));
    Ok(b.buf)
}

/// Thread `thread`'s pending siginfos as a table of the block. Refuses a
/// signal the kernel would not queue (outside 1..=64, SIGKILL, SIGSTOP)
/// here rather than as a blob failure after the runtime is gone.
fn pending_table(
    b: &mut BlockBuf,
    thread: usize,
    pending: &[[u8; abi::SIGINFO_SIZE]],
) -> Result<abi::Table, BlobError> {
    let infos: Vec<abi::Siginfo> = pending
        .iter()
        .map(|bytes| abi::Siginfo { bytes: *bytes })
        .collect();
    for (k, info) in infos.iter().enumerate() {
        let signo = info.signo();
        if !(1..=64).contains(&signo) || signo == libc::SIGKILL || signo == libc::SIGSTOP {
            return Err(BlobError::Thread {
                thread,
                reason: format!(
                    "pending siginfo #{k} names signal {signo}, which cannot be queued"
                ),
            });
        }
    }
    Ok(b.table(&infos))
}

/// An XSAVE area as `rt_sigreturn` wants it: `sw_reserved` with MAGIC1 and
/// sizes, MAGIC2 right after `xstate_size` bytes.
fn xsave_for_frame(x: &[u8]) -> Result<Vec<u8>, String> {
    const SW: usize = abi::FPX_SW_BYTES_OFFSET;
    if x.len() < 576 {
        return Err(format!(
            "xsave area of {} bytes is shorter than legacy area + header",
            x.len()
        ));
    }
    let rd32 = |o: usize| u32::from_le_bytes([x[o], x[o + 1], x[o + 2], x[o + 3]]);
    let mut v = x.to_vec();
    let size = if rd32(SW) == abi::FP_XSTATE_MAGIC1 {
        (rd32(SW + 16) as usize).min(x.len())
    } else {
        let mut bv = [0u8; 8];
        bv.copy_from_slice(&x[512..520]);
        v[SW..SW + 4].copy_from_slice(&abi::FP_XSTATE_MAGIC1.to_le_bytes());
        v[SW + 4..SW + 8].copy_from_slice(&(x.len() as u32 + 4).to_le_bytes());
        v[SW + 8..SW + 16].copy_from_slice(&bv);
        v[SW + 16..SW + 20].copy_from_slice(&(x.len() as u32).to_le_bytes());
        x.len()
    };
    v.truncate(size);
    v.extend_from_slice(&abi::FP_XSTATE_MAGIC2.to_le_bytes());
    Ok(v)
}

fn sigframe(t: &ThreadSpec, fpstate: u64) -> abi::RtSigframe {
    let r = &t.regs;
    let mut flags = abi::UC_SIGCONTEXT_SS | abi::UC_STRICT_RESTORE_SS;
    if matches!(t.fpu, FpuState::Xsave(_)) {
        flags |= abi::UC_FP_XSTATE;
    }
    let a = &t.altstack;
    let uc_stack = if a.sp == 0 && a.size == 0 {
        abi::StackT {
            ss_sp: 0,
            ss_flags: SS_DISABLE,
            _pad: 0,
            ss_size: 0,
        }
    } else {
        abi::StackT {
            ss_sp: a.sp,
            ss_flags: a.flags,
            _pad: 0,
            ss_size: a.size,
        }
    };
    abi::RtSigframe {
        pretcode: 0,
        uc: abi::UContext {
            uc_flags: flags,
            uc_link: 0,
            uc_stack,
            uc_mcontext: abi::SigContext {
                r8: r.r8,
                r9: r.r9,
                r10: r.r10,
                r11: r.r11,
                r12: r.r12,
                r13: r.r13,
                r14: r.r14,
                r15: r.r15,
                rdi: r.rdi,
                rsi: r.rsi,
                rbp: r.rbp,
                rbx: r.rbx,
                rdx: r.rdx,
                rax: r.rax,
                rcx: r.rcx,
                rsp: r.rsp,
                rip: r.rip,
                eflags: r.eflags,
                cs: if r.cs == 0 { 0x33 } else { r.cs as u16 },
                gs: 0,
                fs: 0,
                ss: if r.ss == 0 { 0x2b } else { r.ss as u16 },
                fpstate,
                ..Default::default()
            },
            uc_sigmask: t.sigmask,
        },
        info: [0; 128],
    }
}
