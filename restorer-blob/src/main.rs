//! cowsnap's restorer blob: the last code a restored process runs before it
//! becomes its checkpointed self.
//!
//! The shim maps these bytes (entry at offset 0) at an address free in both
//! the runtime's and the target's layout, writes an [`abi::ArgHeader`] block
//! after them and jumps to offset 0 with `rdi` = the block and `rsp` on a
//! stack inside the blob's own mapping. The blob then, in order:
//! checks the block, blocks all signals, drops the runtime's rseq, unmaps
//! every runtime range, runs the `mremap` moves (overlap-safe order),
//! creates the mappings, fixes protections and advice, sets the mm fields,
//! clones the other threads, creates the POSIX timers (disarmed; a
//! SIGEV_THREAD_ID target must exist first), and every thread then sets its
//! fs/gs base, tid address, rseq, queues its own pending signals (still all
//! blocked), takes its creds and seccomp filters (the image's, then a
//! container spec's profile; before capset drops CAP_SYS_ADMIN when the
//! process has no no_new_privs), waits on the shared
//! barrier and ends with `rt_sigreturn` into its prepared frame (which
//! restores its real mask); past the barrier, thread 0 arms the timers
//! first, so their time runs from the release of the tree.
//!
//! It owns nothing after that and must never touch memory outside the
//! block, its stacks and the ranges the block names. On a failed syscall it
//! writes [`abi::Status`] and exits the process with `EXIT_BASE + step`.
//! It has no mutable statics, so it needs no writable data of its own.

#![no_std]
#![no_main]

#[allow(dead_code)]
mod abi;
#[allow(dead_code)]
mod sys;

use abi::*;
use core::arch::{asm, global_asm};
use core::mem::size_of;
use core::sync::atomic::{AtomicU32, Ordering};
use sys::*;

// Offset 0 of the flat blob: keep the ABI alignment the Rust code expects.
global_asm!(
    ".pushsection .text.entry,\"ax\",@progbits",
    ".globl _start",
    "_start:",
    "and rsp, -16",
    "xor ebp, ebp",
    "call {main}",
    "ud2",
    ".popsection",
    main = sym blob_main,
);

const MAP_FIXED: u32 = 0x10;
const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
/// Linux 5.14+.
const MADV_POPULATE_READ: u64 = 22;
const MADV_DONTNEED: u64 = 4;
const SIG_SETMASK: u64 = 2;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_SECUREBITS: u64 = 28;
const PR_CAPBSET_DROP: u64 = 24;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_SET_PDEATHSIG: u64 = 1;
const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const CAP_SYS_ADMIN: u64 = 21;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const EINVAL: u32 = 22;
const EAGAIN: u32 = 11;
const EINTR: u32 = 4;
const EDEADLK: u32 = 35;
const EBADMSG: u32 = 74;
const CLONE_THREAD_FLAGS: u64 = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000;

/// `struct clone_args` up to `set_tid_size` (CLONE_ARGS_SIZE_VER1).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    _pad: [u16; 3],
    filter: u64,
}

/// The block, as the blob sees it. All reads go through this so bounds are
/// checked once in `check`.
struct Block {
    h: *mut ArgHeader,
}

impl Block {
    fn hdr(&self) -> &ArgHeader {
        // SAFETY: `h` is the block the loader built; only `threads_passed`
        // and `Move::state` are written, through raw pointers or atomics.
        unsafe { &*self.h }
    }

    fn base(&self) -> u64 {
        self.h as u64
    }

    /// Pointer to entry `i` of `t` (bounds checked by `check`).
    fn entry<T>(&self, t: Table, i: u64) -> *mut T {
        (self.base() + t.offset + i * size_of::<T>() as u64) as *mut T
    }

    fn get<T: Copy>(&self, t: Table, i: u64) -> T {
        // SAFETY: `check` proved `t` lies inside the block; entries are plain data.
        unsafe { self.entry::<T>(t, i).read() }
    }

    fn set_status(&self, state: u32, step: u32, errno: u32, thread: u32, index: u64, addr: u64) {
        let p = self.hdr().status as *mut Status;
        if p.is_null() {
            return;
        }
        let s = Status {
            state,
            step,
            errno,
            thread,
            index,
            addr,
        };
        // SAFETY: the loader points `status` at a writable Status it keeps
        // mapped (normally a shared page); volatile so the write is not elided
        // before exit.
        unsafe { p.write_volatile(s) };
    }

    fn step(&self, step: u32, thread: u32) {
        self.set_status(STATE_RUNNING, step, 0, thread, 0, 0);
    }

    fn fail(&self, step: u32, errno: u32, thread: u32, index: u64, addr: u64) -> ! {
        self.set_status(STATE_FAILED, step, errno, thread, index, addr);
        exit_group(EXIT_BASE + step as i32)
    }

    fn check_ok(&self, r: SysResult, step: u32, thread: u32, index: u64, addr: u64) -> u64 {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(step, e, thread, index, addr),
        }
    }
}

fn table_fits(h: &ArgHeader, t: Table, entry: usize) -> bool {
    let Some(bytes) = t.count.checked_mul(entry as u64) else {
        return false;
    };
    match t.offset.checked_add(bytes) {
        Some(end) => t.offset >= h.header_size as u64 && end <= h.total_size,
        None => false,
    }
}

extern "C" fn blob_main(h: *mut ArgHeader) -> ! {
    let b = Block { h };
    check(&b);
    // Runtime handlers point at code about to disappear; each thread gets its
    // own mask back from its frame.
    b.step(STEP_BLOCK_SIGNALS, 0);
    let all: u64 = !0;
    // SAFETY: `all` is a valid 8-byte sigset on our stack.
    let r = unsafe {
        syscall(
            SYS_RT_SIGPROCMASK,
            SIG_SETMASK,
            &all as *const u64 as u64,
            0,
            8,
        )
    };
    b.check_ok(r, STEP_BLOCK_SIGNALS, 0, 0, 0);

    let hd = *b.hdr();
    if hd.rseq_unregister_ptr != 0 {
        // The kernel would write into the runtime's TLS after it is unmapped
        // and kill us with SIGSEGV.
        b.step(STEP_RSEQ_UNREGISTER, 0);
        // SAFETY: unregistering touches no memory of ours.
        let r = unsafe {
            syscall(
                SYS_RSEQ,
                hd.rseq_unregister_ptr,
                hd.rseq_unregister_len as u64,
                RSEQ_FLAG_UNREGISTER,
                hd.rseq_unregister_sig as u64,
            )
        };
        b.check_ok(r, STEP_RSEQ_UNREGISTER, 0, 0, hd.rseq_unregister_ptr);
    }

    b.step(STEP_UNMAP, 0);
    for i in 0..hd.unmaps.count {
        let r: Range = b.get(hd.unmaps, i);
        // SAFETY: the loader excluded the blob, the block, the stacks and
        // every move source from the unmap ranges.
        let res = unsafe { syscall(SYS_MUNMAP, r.start, r.len, 0, 0) };
        b.check_ok(res, STEP_UNMAP, 0, i, r.start);
    }

    do_moves(&b);

    b.step(STEP_MAP, 0);
    for i in 0..hd.maps.count {
        let m: Map = b.get(hd.maps, i);
        // SAFETY: MAP_FIXED over ranges the plan owns; the blob is outside them.
        let res = unsafe {
            syscall6(
                SYS_MMAP,
                m.start,
                m.len,
                m.prot as u64,
                (m.flags | MAP_FIXED) as u64,
                m.fd as i64 as u64,
                m.offset,
            )
        };
        let got = b.check_ok(res, STEP_MAP, 0, i, m.start);
        if got != m.start {
            b.fail(STEP_MAP, EINVAL, 0, i, m.start);
        }
        if m.fd >= 0 && m.close_fd != 0 {
            // SAFETY: the fd was opened for this mapping only.
            let res = unsafe { syscall(SYS_CLOSE, m.fd as u64, 0, 0, 0) };
            b.check_ok(res, STEP_CLOSE, 0, i, m.start);
        }
    }

    b.step(STEP_MPROTECT, 0);
    for i in 0..hd.protects.count {
        let p: Protect = b.get(hd.protects, i);
        // SAFETY: changes protections of target ranges only.
        let res = unsafe { syscall(SYS_MPROTECT, p.start, p.len, p.prot as u64, 0) };
        b.check_ok(res, STEP_MPROTECT, 0, i, p.start);
    }

    b.step(STEP_MADVISE, 0);
    for i in 0..hd.advises.count {
        let a: Advise = b.get(hd.advises, i);
        // SAFETY: advice on target ranges only (a drop there is the plan's intent).
        let res = unsafe { syscall(SYS_MADVISE, a.start, a.len, a.advice as u64, 0) };
        b.check_ok(res, STEP_MADVISE, 0, i, a.start);
    }

    // Fault the original's file pages back in so memory use (PSS) matches.
    // Best effort: a file shorter than at dump time, or a PROT_NONE range,
    // fails here and the pages fault in on use instead, as without this.
    b.step(STEP_POPULATE, 0);
    for i in 0..hd.populates.count {
        let r: Range = b.get(hd.populates, i);
        // SAFETY: MADV_POPULATE_READ only faults pages in, read-only; it
        // changes no contents and no mapping.
        let _ = unsafe { syscall(SYS_MADVISE, r.start, r.len, MADV_POPULATE_READ, 0) };
    }
    for i in 0..hd.unpopulates.count {
        let r: Range = b.get(hd.unpopulates, i);
        // SAFETY: these file ranges hold no written (anonymous) page: a
        // dropped page faults back in from the file unchanged.
        let _ = unsafe { syscall(SYS_MADVISE, r.start, r.len, MADV_DONTNEED, 0) };
    }

    if hd.mm_valid != 0 {
        b.step(STEP_MM_MAP, 0);
        // SAFETY: `mm` is a prctl_mm_map inside the block; the kernel only reads it.
        let res = unsafe {
            syscall6(
                SYS_PRCTL,
                PR_SET_MM,
                PR_SET_MM_MAP,
                &(*b.h).mm as *const PrctlMmMap as u64,
                size_of::<PrctlMmMap>() as u64,
                0,
                0,
            )
        };
        b.check_ok(res, STEP_MM_MAP, 0, 0, hd.mm.start_brk);
        if hd.mm.exe_fd != u32::MAX {
            // SAFETY: the loader opened this fd only for PR_SET_MM_EXE_FILE;
            // the target never had it.
            let res = unsafe { syscall(SYS_CLOSE, hd.mm.exe_fd as u64, 0, 0, 0) };
            b.check_ok(res, STEP_CLOSE, 0, 0, hd.mm.start_brk);
        }
    }

    b.step(STEP_CLONE, 0);
    for i in 1..hd.threads.count {
        clone_thread(&b, i);
    }
    if hd.posix_timers.count != 0 {
        create_timers(&b);
    }
    thread_tail(&b, 0)
}

fn check(b: &Block) {
    let h = b.hdr();
    if h.magic != ARGS_MAGIC
        || h.version != ARGS_VERSION
        || h.header_size as usize != size_of::<ArgHeader>()
    {
        b.fail(STEP_CHECK_ARGS, EBADMSG, 0, 0, b.base());
    }
    let tables: [(Table, usize); 12] = [
        (h.unmaps, size_of::<Range>()),
        (h.moves, size_of::<Move>()),
        (h.maps, size_of::<Map>()),
        (h.protects, size_of::<Protect>()),
        (h.advises, size_of::<Advise>()),
        (h.threads, size_of::<Thread>()),
        (h.creds.groups, size_of::<u32>()),
        (h.filters, size_of::<Filter>()),
        (h.post_barrier_unmaps, size_of::<Range>()),
        (h.populates, size_of::<Range>()),
        (h.unpopulates, size_of::<Range>()),
        (h.posix_timers, size_of::<PosixTimer>()),
    ];
    for (i, (t, sz)) in tables.iter().enumerate() {
        if !table_fits(h, *t, *sz) {
            b.fail(STEP_CHECK_ARGS, EINVAL, 0, i as u64, t.offset);
        }
    }
    for i in 0..h.filters.count {
        let f: Filter = b.get(h.filters, i);
        if !table_fits(
            h,
            Table {
                offset: f.offset,
                count: f.count,
            },
            8,
        ) || f.count > u16::MAX as u64
        {
            b.fail(STEP_CHECK_ARGS, EINVAL, 0, 100 + i, f.offset);
        }
    }
    if h.threads.count == 0 {
        b.fail(STEP_CHECK_ARGS, EINVAL, 0, 0, 0);
    }
    for i in 0..h.threads.count {
        let t: Thread = b.get(h.threads, i);
        if !table_fits(h, t.pending, size_of::<Siginfo>()) {
            b.fail(STEP_CHECK_ARGS, EINVAL, i as u32, 200 + i, t.pending.offset);
        }
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Runs every move so that no destination ever covers a source still
/// waiting; a cycle (or a move onto itself) goes through the scratch hole.
fn do_moves(b: &Block) {
    let hd = *b.hdr();
    let n = hd.moves.count;
    b.step(STEP_MOVE, 0);
    let current = |m: &Move| {
        if m.state == MOVE_PARKED {
            hd.scratch.start
        } else {
            m.from
        }
    };
    // The loader sorts the moves by source; when the sources are also
    // disjoint (checked here, not trusted), the moves whose source lies in
    // a destination are found by binary search instead of a scan of every
    // move (a process of 20,000 VMAs has as many moves).
    // The move in the scratch hole, if any (u64::MAX: none).
    let parked = core::cell::Cell::new(u64::MAX);
    let sorted = (1..n).all(|k| {
        let (a, c): (Move, Move) = (b.get(hd.moves, k - 1), b.get(hd.moves, k));
        a.from.saturating_add(a.len) <= c.from
    });
    let blocked_by_pending = |i: u64, m: &Move| -> bool {
        if !sorted {
            return (0..n).any(|j| {
                let o: Move = b.get(hd.moves, j);
                j != i && o.state != MOVE_DONE && overlaps(m.to, m.len, current(&o), o.len)
            });
        }
        // First move whose source ends past the destination's start.
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let o: Move = b.get(hd.moves, mid);
            if o.from.saturating_add(o.len) <= m.to {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let end = m.to.saturating_add(m.len);
        let mut k = lo;
        while k < n {
            let o: Move = b.get(hd.moves, k);
            if o.from >= end {
                break;
            }
            if k != i && o.state == MOVE_PENDING {
                return true;
            }
            k += 1;
        }
        // The parked move's source is the scratch hole.
        let p = parked.get();
        p != u64::MAX && p != i && {
            let o: Move = b.get(hd.moves, p);
            overlaps(m.to, m.len, hd.scratch.start, o.len)
        }
    };
    loop {
        let mut pending = false;
        let mut progressed = false;
        for i in 0..n {
            let m: Move = b.get(hd.moves, i);
            if m.state == MOVE_DONE {
                continue;
            }
            pending = true;
            let src = current(&m);
            let blocked = blocked_by_pending(i, &m);
            if blocked {
                continue;
            }
            if src != m.to && overlaps(src, m.len, m.to, m.len) {
                // mremap refuses overlapping ranges: park first.
                if park(b, i, &m) {
                    parked.set(i);
                    progressed = true;
                }
                continue;
            }
            if src != m.to {
                mremap(b, i, src, m.len, m.to);
            }
            set_move_state(b, i, MOVE_DONE);
            if parked.get() == i {
                parked.set(u64::MAX);
            }
            progressed = true;
        }
        if !pending {
            return;
        }
        if !progressed {
            // Every pending destination covers another pending source: a cycle.
            let mut stuck_parked = false;
            for i in 0..n {
                let m: Move = b.get(hd.moves, i);
                if m.state == MOVE_PENDING && park(b, i, &m) {
                    parked.set(i);
                    stuck_parked = true;
                    break;
                }
            }
            if !stuck_parked {
                b.fail(STEP_MOVE_ORDER, EDEADLK, 0, 0, 0);
            }
        }
    }
}

/// Moves move `i` into the scratch hole if the hole is free and large enough.
fn park(b: &Block, i: u64, m: &Move) -> bool {
    let hd = *b.hdr();
    let busy = (0..hd.moves.count).any(|j| b.get::<Move>(hd.moves, j).state == MOVE_PARKED);
    if busy || m.state != MOVE_PENDING || hd.scratch.len < m.len {
        return false;
    }
    mremap(b, i, m.from, m.len, hd.scratch.start);
    set_move_state(b, i, MOVE_PARKED);
    true
}

fn set_move_state(b: &Block, i: u64, state: u64) {
    let p = b.entry::<Move>(b.hdr().moves, i);
    // SAFETY: `check` proved the moves table lies inside the writable block.
    unsafe { (*p).state = state };
}

fn mremap(b: &Block, i: u64, from: u64, len: u64, to: u64) {
    // SAFETY: moves ranges the plan owns; sources and destinations are
    // disjoint from the blob (the loader chose its hole that way).
    let res = unsafe {
        syscall6(
            SYS_MREMAP,
            from,
            len,
            len,
            MREMAP_MAYMOVE | MREMAP_FIXED,
            to,
            0,
        )
    };
    let got = b.check_ok(res, STEP_MOVE, 0, i, to);
    if got != to {
        b.fail(STEP_MOVE, EINVAL, 0, i, to);
    }
}

fn clone_thread(b: &Block, i: u64) {
    let t: Thread = b.get(b.hdr().threads, i);
    let n = (t.set_tid_len as usize).min(t.set_tid.len());
    let args = CloneArgs {
        flags: CLONE_THREAD_FLAGS,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: 0,
        // The kernel starts the child at stack + stack_size.
        stack: (t.stack_top & !15) - 4096,
        stack_size: 4096,
        tls: 0,
        set_tid: if n > 0 { t.set_tid.as_ptr() as u64 } else { 0 },
        set_tid_size: n as u64,
    };
    let ret: u64;
    // SAFETY: the child starts on its own stack (inside the block's mapping)
    // and never returns into this frame: it calls `thread_entry` with the
    // block and its index kept in r12/r13, which the syscall preserves.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "mov rsi, r13",
            "and rsp, -16",
            "call {entry}",
            "ud2",
            "2:",
            entry = sym thread_entry,
            inlateout("rax") SYS_CLONE3 => ret,
            in("rdi") &args as *const CloneArgs as u64,
            in("rsi") size_of::<CloneArgs>() as u64,
            in("r12") b.base(),
            in("r13") i,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    if ret > (-4096i64) as u64 {
        b.fail(
            STEP_CLONE,
            (ret as i64).unsigned_abs() as u32,
            i as u32,
            i,
            t.stack_top,
        );
    }
}

extern "C" fn thread_entry(h: *mut ArgHeader, i: u64) -> ! {
    thread_tail(&Block { h }, i)
}

/// Everything each thread does for itself, ending in `rt_sigreturn`.
fn thread_tail(b: &Block, i: u64) -> ! {
    let hd = *b.hdr();
    let t: Thread = b.get(hd.threads, i);
    let ti = i as u32;

    b.step(STEP_SET_FS, ti);
    // SAFETY: only sets this thread's fs base register.
    let r = unsafe { syscall(SYS_ARCH_PRCTL, ARCH_SET_FS, t.fs_base, 0, 0) };
    b.check_ok(r, STEP_SET_FS, ti, i, t.fs_base);
    // SAFETY: only sets this thread's gs base register.
    let r = unsafe { syscall(SYS_ARCH_PRCTL, ARCH_SET_GS, t.gs_base, 0, 0) };
    b.check_ok(r, STEP_SET_GS, ti, i, t.gs_base);

    b.step(STEP_TID_ADDRESS, ti);
    // SAFETY: the kernel writes there only when this thread exits.
    let _ = unsafe { syscall(SYS_SET_TID_ADDRESS, t.clear_child_tid, 0, 0, 0) };

    if t.rseq_ptr != 0 {
        b.step(STEP_RSEQ, ti);
        // SAFETY: the rseq area is target memory the plan mapped.
        let r = unsafe {
            syscall(
                SYS_RSEQ,
                t.rseq_ptr,
                t.rseq_len as u64,
                0,
                t.rseq_sig as u64,
            )
        };
        b.check_ok(r, STEP_RSEQ, ti, i, t.rseq_ptr);
    }

    if t.pending.count != 0 {
        queue_pending(b, &t, ti);
    }

    // Without no_new_privs the kernel installs a filter only for a task
    // with CAP_SYS_ADMIN, which the restored creds may not hold: then the
    // filters go in while the runtime's capabilities are still effective,
    // just before capset drops them (as runc does without
    // noNewPrivileges). They must then allow capset and prctl too.
    let filters_before_capset = hd.creds.valid != 0
        && hd.creds.no_new_privs == 0
        && hd.creds.cap_effective & (1 << CAP_SYS_ADMIN) == 0;
    if hd.creds.valid != 0 {
        restore_creds(b, &hd, ti, filters_before_capset);
    }

    if hd.creds.no_new_privs != 0 {
        b.step(STEP_NO_NEW_PRIVS, ti);
        // SAFETY: sets a task flag.
        let r = unsafe { syscall(SYS_PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0) };
        b.check_ok(r, STEP_NO_NEW_PRIVS, ti, 0, 0);
    }

    if !filters_before_capset {
        install_filters(b, &hd, ti);
    }

    if hd.barrier.addr != 0 {
        b.step(STEP_BARRIER, ti);
        barrier(b, hd.barrier, ti);
        if ti == 0 && hd.barrier.clear_pdeathsig != 0 {
            // SAFETY: clears a task attribute of this (main) thread only;
            // threads cloned here never had one.
            let r = unsafe { syscall(SYS_PRCTL, PR_SET_PDEATHSIG, 0, 0, 0) };
            b.check_ok(r, STEP_BARRIER, ti, 0, 0);
        }
    }
    if ti == 0 {
        arm_timers(b);
    }

    // The last thread of this process past the barrier reports success and
    // drops what only the blob needed (no sibling reads it any more).
    // SAFETY: `threads_passed` is a u32 inside the block, shared by the
    // threads of this process only through this atomic.
    let passed = unsafe { &*(core::ptr::addr_of_mut!((*b.h).threads_passed) as *const AtomicU32) };
    if passed.fetch_add(1, Ordering::AcqRel) as u64 + 1 == hd.threads.count {
        b.set_status(STATE_DONE, STEP_SIGRETURN, 0, ti, 0, 0);
        for k in 0..hd.post_barrier_unmaps.count {
            let r: Range = b.get(hd.post_barrier_unmaps, k);
            // SAFETY: ranges only the blob used (status/barrier pages).
            let _ = unsafe { syscall(SYS_MUNMAP, r.start, r.len, 0, 0) };
        }
    }

    // SAFETY: `frame` is a complete rt_sigframe the loader built; the
    // kernel reads it at rsp - 8 and replaces every register.
    unsafe {
        asm!(
            "mov rsp, {sp}",
            "syscall",
            "ud2",
            sp = in(reg) t.frame + 8,
            in("rax") SYS_RT_SIGRETURN,
            options(noreturn),
        );
    }
}

/// Queues thread `ti`'s pending siginfos onto itself, oldest first. Only
/// this thread may: the kernel refuses `rt_tgsigqueueinfo` of a siginfo
/// with `si_code >= 0` or `SI_TKILL` from any other task. Every signal is
/// blocked here (the mask of the thread that ran `blob_main`, inherited by
/// the clones), so none is delivered (or discarded as ignored) before
/// `rt_sigreturn` installs the thread's own mask; and it runs before creds
/// and seccomp, which could forbid it.
fn queue_pending(b: &Block, t: &Thread, ti: u32) {
    b.step(STEP_SIGQUEUE, ti);
    // SAFETY: getpid and gettid take nothing and cannot fail.
    let (tgid, tid) = unsafe {
        (
            syscall(SYS_GETPID, 0, 0, 0, 0).unwrap_or(0),
            syscall(SYS_GETTID, 0, 0, 0, 0).unwrap_or(0),
        )
    };
    for k in 0..t.pending.count {
        let info = b.entry::<Siginfo>(t.pending, k) as u64;
        let s: Siginfo = b.get(t.pending, k);
        // SAFETY: `info` is a 128-byte siginfo inside the block (checked);
        // the kernel only reads it.
        let r = unsafe { syscall(SYS_RT_TGSIGQUEUEINFO, tgid, tid, s.signo() as u64, info) };
        b.check_ok(r, STEP_SIGQUEUE, ti, k, s.signo() as u64);
    }
}

/// Installs the block's seccomp filters in order: the image's own, then
/// (in a container) the spec's profile; the kernel applies the most
/// restrictive result of all of them.
fn install_filters(b: &Block, hd: &ArgHeader, ti: u32) {
    for f in 0..hd.filters.count {
        b.step(STEP_SECCOMP, ti);
        let flt: Filter = b.get(hd.filters, f);
        let prog = SockFprog {
            len: flt.count as u16,
            _pad: [0; 3],
            filter: b.base() + flt.offset,
        };
        // SAFETY: the program lies inside the block (checked); the kernel copies it.
        let r = unsafe {
            syscall(
                SYS_SECCOMP,
                SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const SockFprog as u64,
                0,
            )
        };
        b.check_ok(r, STEP_SECCOMP, ti, f, 0);
    }
}

fn restore_creds(b: &Block, hd: &ArgHeader, ti: u32, filters_before_capset: bool) {
    let c = &hd.creds;
    b.step(STEP_SETGROUPS, ti);
    let groups = b.base() + c.groups.offset;
    // SAFETY: `groups` is an array of `count` u32 inside the block.
    let r = unsafe { syscall(SYS_SETGROUPS, c.groups.count, groups, 0, 0) };
    b.check_ok(r, STEP_SETGROUPS, ti, 0, 0);

    // Keep capabilities while the ids change; the real bits come after.
    b.step(STEP_SECUREBITS, ti);
    // SAFETY: prctl on this thread's creds.
    let r = unsafe { syscall(SYS_PRCTL, PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0) };
    b.check_ok(r, STEP_SECUREBITS, ti, 0, 0);

    b.step(STEP_SETRESGID, ti);
    // SAFETY: no pointers.
    let r = unsafe {
        syscall(
            SYS_SETRESGID,
            c.gids[0] as u64,
            c.gids[1] as u64,
            c.gids[2] as u64,
            0,
        )
    };
    b.check_ok(r, STEP_SETRESGID, ti, 0, 0);
    b.step(STEP_SETRESUID, ti);
    // SAFETY: no pointers.
    let r = unsafe {
        syscall(
            SYS_SETRESUID,
            c.uids[0] as u64,
            c.uids[1] as u64,
            c.uids[2] as u64,
            0,
        )
    };
    b.check_ok(r, STEP_SETRESUID, ti, 0, 0);
    // setfs[ug]id return the previous id, never an error.
    // SAFETY: no pointers.
    unsafe {
        let _ = syscall(SYS_SETFSGID, c.gids[3] as u64, 0, 0, 0);
        let _ = syscall(SYS_SETFSUID, c.uids[3] as u64, 0, 0, 0);
    }

    b.step(STEP_SECUREBITS, ti);
    // SAFETY: prctl on this thread's creds.
    let r = unsafe { syscall(SYS_PRCTL, PR_SET_SECUREBITS, c.securebits as u64, 0, 0) };
    b.check_ok(r, STEP_SECUREBITS, ti, 0, 0);

    // Needs CAP_SETPCAP, so before capset drops it.
    b.step(STEP_CAPBSET, ti);
    for cap in 0..64u64 {
        if c.cap_bounding & (1 << cap) == 0 {
            // SAFETY: no pointers.
            match unsafe { syscall(SYS_PRCTL, PR_CAPBSET_DROP, cap, 0, 0) } {
                Ok(_) | Err(EINVAL) => {}
                Err(e) => b.fail(STEP_CAPBSET, e, ti, cap, 0),
            }
        }
    }

    if filters_before_capset {
        install_filters(b, hd, ti);
    }

    b.step(STEP_CAPSET, ti);
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    let data = [
        CapData {
            effective: lo(c.cap_effective),
            permitted: lo(c.cap_permitted),
            inheritable: lo(c.cap_inheritable),
        },
        CapData {
            effective: hi(c.cap_effective),
            permitted: hi(c.cap_permitted),
            inheritable: hi(c.cap_inheritable),
        },
    ];
    // SAFETY: header and two data entries on our stack, read by the kernel.
    let r = unsafe {
        syscall(
            SYS_CAPSET,
            &hdr as *const CapHeader as u64,
            data.as_ptr() as u64,
            0,
            0,
        )
    };
    b.check_ok(r, STEP_CAPSET, ti, 0, 0);

    b.step(STEP_AMBIENT, ti);
    // SAFETY: no pointers.
    let r = unsafe { syscall(SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0) };
    b.check_ok(r, STEP_AMBIENT, ti, 0, 0);
    for cap in 0..64u64 {
        if c.cap_ambient & (1 << cap) != 0 {
            // SAFETY: no pointers.
            let r = unsafe { syscall(SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0) };
            b.check_ok(r, STEP_AMBIENT, ti, cap, 0);
        }
    }
}

/// `struct sigevent` of x86_64: sigval, signo, notify, then a union whose
/// first int is the SIGEV_THREAD_ID tid; 64 bytes in all.
#[repr(C)]
struct Sigevent {
    value: u64,
    signo: i32,
    notify: i32,
    tid: i32,
    _pad: [i32; 11],
}

/// Creates every POSIX timer with its id, disarmed. Restore-ids mode is
/// per process and switched off again at once: only these calls use it.
fn create_timers(b: &Block) {
    let hd = *b.hdr();
    b.step(STEP_TIMER_CREATE, 0);
    // SAFETY: sets a flag of this process's signal struct.
    let r = unsafe {
        syscall(
            SYS_PRCTL,
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_ON,
            0,
            0,
        )
    };
    b.check_ok(r, STEP_TIMER_CREATE, 0, u64::MAX, 0);
    for k in 0..hd.posix_timers.count {
        let t: PosixTimer = b.get(hd.posix_timers, k);
        let ev = Sigevent {
            value: t.sigev_value,
            signo: t.signo,
            notify: t.notify,
            tid: t.notify_tid,
            _pad: [0; 11],
        };
        let mut id: i32 = t.id;
        // SAFETY: `ev` and `id` live on this stack for the call; the
        // kernel reads both and writes the id back.
        let r = unsafe {
            syscall(
                SYS_TIMER_CREATE,
                t.clockid as u64,
                &ev as *const Sigevent as u64,
                &mut id as *mut i32 as u64,
                0,
            )
        };
        b.check_ok(r, STEP_TIMER_CREATE, 0, k, t.id as u64);
        if id != t.id {
            b.fail(STEP_TIMER_CREATE, EINVAL, 0, k, t.id as u64);
        }
    }
    // SAFETY: clears the flag set above.
    let r = unsafe {
        syscall(
            SYS_PRCTL,
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_OFF,
            0,
            0,
        )
    };
    b.check_ok(r, STEP_TIMER_CREATE, 0, u64::MAX, 0);
}

/// Arms every timer that was armed at dump (value and interval in the
/// block, `struct itimerspec` order).
fn arm_timers(b: &Block) {
    let hd = *b.hdr();
    for k in 0..hd.posix_timers.count {
        let t: PosixTimer = b.get(hd.posix_timers, k);
        if t.value == (Timespec { sec: 0, nsec: 0 }) {
            continue;
        }
        b.step(STEP_TIMER_SETTIME, 0);
        let spec = b.entry::<PosixTimer>(hd.posix_timers, k) as u64
            + core::mem::offset_of!(PosixTimer, interval) as u64;
        // SAFETY: `spec` is an itimerspec inside the block (interval then
        // value, adjacent in the checked entry); the kernel only reads it.
        let r = unsafe {
            syscall(
                SYS_TIMER_SETTIME,
                t.id as u64,
                t.settime_flags as u64,
                spec,
                0,
            )
        };
        b.check_ok(r, STEP_TIMER_SETTIME, 0, k, t.id as u64);
    }
}

fn barrier(b: &Block, bar: Barrier, ti: u32) {
    // SAFETY: the loader keeps the shared barrier word mapped (it is in no
    // unmap range) and aligned; every process touches it only atomically.
    let w = unsafe { &*(bar.addr as *const AtomicU32) };
    let now = w.fetch_add(1, Ordering::AcqRel) + 1;
    if now >= bar.count {
        // SAFETY: wakes waiters on a shared word (not FUTEX_PRIVATE).
        let r = unsafe { syscall(SYS_FUTEX, bar.addr, FUTEX_WAKE, i32::MAX as u64, 0) };
        b.check_ok(r, STEP_BARRIER, ti, 0, bar.addr);
        return;
    }
    loop {
        let cur = w.load(Ordering::Acquire);
        if cur >= bar.count {
            return;
        }
        // SAFETY: waits on a shared word while it still holds `cur`.
        match unsafe { syscall(SYS_FUTEX, bar.addr, FUTEX_WAIT, cur as u64, 0) } {
            Ok(_) | Err(EAGAIN) | Err(EINTR) => {}
            Err(e) => b.fail(STEP_BARRIER, e, ti, 0, bar.addr),
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit_group(EXIT_BASE + 63)
}

// The compiler may call these; no libc provides them here.

/// # Safety
/// `dst` and `src` valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller contract; rep movsb copies forwards.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack));
    }
    dst
}

/// # Safety
/// `dst` and `src` valid for `n` bytes; may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: forward copy is safe when dst is below src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: caller contract; copy backwards with the direction flag set and cleared again.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            inout("rcx") n => _,
            options(nostack),
        );
    }
    dst
}

/// # Safety
/// `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller contract.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8, options(nostack));
    }
    dst
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, caller contract.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// As for [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
