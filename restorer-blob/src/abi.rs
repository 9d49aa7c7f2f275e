//! The argument block shared by the shim's loader and the restorer blob.
//!
//! This file is compiled twice: into the `#![no_std]` blob and, through a
//! `#[path]` module, into the shim library, so there is exactly one
//! definition. It may use only `core`.
//!
//! Layout of the block the loader writes (all offsets are from the start of
//! the [`ArgHeader`], all addresses absolute):
//!
//! ```text
//! +--------------------------+ 0
//! | ArgHeader                |  magic, version, sizes, tables, mm, creds
//! +--------------------------+ header_size
//! | table entries and data   |  Range / Move / Map / Protect / Advise /
//! |                          |  Thread / u32 groups / sock_filter / auxv /
//! |                          |  populate Ranges / PosixTimer /
//! |                          |  Siginfo (pending signals per thread)
//! +--------------------------+ (64-byte aligned)
//! | rt_sigframe + xsave      |  one per thread, each 64-byte aligned
//! +--------------------------+ total_size
//! ```
//!
//! A [`Table`] is `(offset, count)` of an array of one entry type. The blob
//! refuses a block whose magic, version or header size differs from its own.

/// `"cowsnapB"` little endian.
pub const ARGS_MAGIC: u64 = u64::from_le_bytes(*b"cowsnapB");
/// Bumped on every incompatible change of any struct in this file.
pub const ARGS_VERSION: u32 = 6;

/// The blob exits with `EXIT_BASE + step` when a step fails.
pub const EXIT_BASE: i32 = 64;

/// Lowest and highest addresses the loader's "unmap everything else" covers.
pub const USER_LOW: u64 = 0x1000;
pub const USER_HIGH: u64 = 0x7fff_ffff_f000;

/// `(offset from the header, entry count)` of one array in the block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub offset: u64,
    pub count: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

/// One `mremap(from, len, len, MAYMOVE|FIXED, to)`. The blob orders the moves
/// itself (a move runs only when its destination overlaps no pending source)
/// and records progress in `state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Move {
    pub from: u64,
    pub to: u64,
    pub len: u64,
    /// Written by the blob: 0 pending, 1 parked in the scratch hole, 2 done.
    pub state: u64,
}

pub const MOVE_PENDING: u64 = 0;
pub const MOVE_PARKED: u64 = 1;
pub const MOVE_DONE: u64 = 2;

/// One `mmap(start, len, prot, flags | MAP_FIXED, fd, offset)`; `fd < 0` is an
/// anonymous mapping. A file fd is opened by the loader before the jump and,
/// with `close_fd != 0`, closed by the blob once mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Map {
    pub start: u64,
    pub len: u64,
    pub offset: u64,
    pub prot: u32,
    pub flags: u32,
    pub fd: i32,
    pub close_fd: u32,
}

/// `mprotect(start, len, prot)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protect {
    pub start: u64,
    pub len: u64,
    pub prot: u32,
    pub _pad: u32,
}

/// `madvise(start, len, advice)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Advise {
    pub start: u64,
    pub len: u64,
    pub advice: u32,
    pub _pad: u32,
}

/// `struct prctl_mm_map` of `<linux/prctl.h>`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Absolute address of the auxv pairs (inside the block), 0 for none.
    pub auxv: u64,
    /// Bytes of auxv.
    pub auxv_size: u32,
    /// `u32::MAX` keeps the current exe file.
    pub exe_fd: u32,
}

/// One thread of the restored process. Thread 0 is the thread that runs the
/// blob (the process's main thread); the others are cloned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thread {
    /// Absolute address of the prepared `rt_sigframe` (its `pretcode` slot).
    pub frame: u64,
    /// Top of the small stack the cloned thread runs the blob on (unused for thread 0).
    pub stack_top: u64,
    /// `clone3` `set_tid`, innermost pid namespace first; `set_tid_len == 0` lets the kernel choose.
    pub set_tid: [i32; 4],
    pub set_tid_len: u32,
    pub _pad: u32,
    /// Not restored by `rt_sigreturn`, so set with `arch_prctl` first.
    pub fs_base: u64,
    pub gs_base: u64,
    /// `set_tid_address`; 0 leaves it unset.
    pub clear_child_tid: u64,
    /// rseq area to register for this thread, 0 for none.
    pub rseq_ptr: u64,
    pub rseq_len: u32,
    pub rseq_sig: u32,
    /// [`Siginfo`]s this thread queues to itself (`rt_tgsigqueueinfo`),
    /// oldest first, while every signal is still blocked: the kernel lets
    /// only the target thread itself queue a siginfo with `si_code >= 0` or
    /// `SI_TKILL`, so nobody else can put them back.
    pub pending: Table,
}

/// Bytes of a kernel `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

/// One pending signal as the kernel reported it (`PTRACE_PEEKSIGINFO`);
/// `si_signo` is its first `i32`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Siginfo {
    pub bytes: [u8; SIGINFO_SIZE],
}

impl Siginfo {
    pub fn signo(&self) -> i32 {
        i32::from_ne_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
}

/// A `struct timespec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// One POSIX timer: created by thread 0 with its own id once every thread
/// exists (`PR_TIMER_CREATE_RESTORE_IDS`, so `timer_create` takes the id
/// from its `timerid` argument), armed by thread 0 once past the barrier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clockid: i32,
    /// `sigev_notify`: SIGEV_SIGNAL (0), SIGEV_NONE (1), SIGEV_THREAD_ID (4).
    pub notify: i32,
    pub signo: i32,
    pub sigev_value: u64,
    /// SIGEV_THREAD_ID: the target thread's tid in this process's own pid namespace.
    pub notify_tid: i32,
    /// `timer_settime` flags (TIMER_ABSTIME = 1: `value` is an expiry).
    pub settime_flags: i32,
    /// `struct itimerspec`: interval, then value; a zero value leaves it disarmed.
    pub interval: Timespec,
    pub value: Timespec,
}

pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
pub const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
pub const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
pub const PR_TIMER_CREATE_RESTORE_IDS_GET: u64 = 2;

/// Creds of the process, applied by every thread (Linux creds are per thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Creds {
    /// 0: leave creds as they are.
    pub valid: u32,
    pub securebits: u32,
    /// real, effective, saved, fs.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    /// Array of u32 group ids.
    pub groups: Table,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: u32,
    pub _pad: u32,
}

/// One classic BPF seccomp program: `count` `struct sock_filter` (8 bytes each) at `offset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub offset: u64,
    pub count: u64,
}

/// A futex barrier in memory shared by all restored processes: every thread
/// adds one to the u32 at `addr` and waits until it reaches `count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Barrier {
    /// 0: no barrier.
    pub addr: u64,
    pub count: u32,
    /// Nonzero: once past the barrier, thread 0 clears the process's
    /// parent-death signal, which the runtime armed so that the tree dies
    /// with the restore if the restore dies before releasing it.
    pub clear_pdeathsig: u32,
}

/// The status the blob reports, at `ArgHeader::status` (typically a
/// `MAP_SHARED` page created before fork so a parent can read it after the
/// child died).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub state: u32,
    /// Step being run (or that failed), one of the `STEP_*` constants.
    pub step: u32,
    /// Positive errno of the failed syscall.
    pub errno: u32,
    /// Thread index that failed.
    pub thread: u32,
    /// Entry index in the step's table.
    pub index: u64,
    /// Address the failed entry concerns (0 if none).
    pub addr: u64,
}

pub const STATE_UNSET: u32 = 0;
pub const STATE_RUNNING: u32 = 1;
pub const STATE_DONE: u32 = 2;
pub const STATE_FAILED: u32 = 3;

pub const STEP_CHECK_ARGS: u32 = 1;
pub const STEP_BLOCK_SIGNALS: u32 = 2;
pub const STEP_RSEQ_UNREGISTER: u32 = 3;
pub const STEP_UNMAP: u32 = 4;
pub const STEP_MOVE: u32 = 5;
pub const STEP_MOVE_ORDER: u32 = 6;
pub const STEP_MAP: u32 = 7;
pub const STEP_CLOSE: u32 = 8;
pub const STEP_MPROTECT: u32 = 9;
pub const STEP_MADVISE: u32 = 10;
pub const STEP_MM_MAP: u32 = 11;
pub const STEP_CLONE: u32 = 12;
pub const STEP_SET_FS: u32 = 13;
pub const STEP_SET_GS: u32 = 14;
pub const STEP_TID_ADDRESS: u32 = 15;
pub const STEP_RSEQ: u32 = 16;
pub const STEP_SETGROUPS: u32 = 17;
pub const STEP_SECUREBITS: u32 = 18;
pub const STEP_SETRESGID: u32 = 19;
pub const STEP_SETRESUID: u32 = 20;
pub const STEP_SETFSID: u32 = 21;
pub const STEP_CAPBSET: u32 = 22;
pub const STEP_CAPSET: u32 = 23;
pub const STEP_AMBIENT: u32 = 24;
pub const STEP_NO_NEW_PRIVS: u32 = 25;
pub const STEP_SECCOMP: u32 = 26;
pub const STEP_BARRIER: u32 = 27;
pub const STEP_POST_UNMAP: u32 = 28;
pub const STEP_SIGRETURN: u32 = 29;
pub const STEP_SIGQUEUE: u32 = 30;
/// Best effort: a failure is ignored, the step only shows where the blob is.
pub const STEP_POPULATE: u32 = 31;
/// `index` is the timer's entry, `addr` its id.
pub const STEP_TIMER_CREATE: u32 = 32;
pub const STEP_TIMER_SETTIME: u32 = 33;
/// The highest step number.
pub const STEP_LAST: u32 = STEP_TIMER_SETTIME;

/// Human name of a step, for "restorer failed at step X: errno Y".
pub fn step_name(step: u32) -> &'static str {
    match step {
        STEP_CHECK_ARGS => "check-args",
        STEP_BLOCK_SIGNALS => "block-signals",
        STEP_RSEQ_UNREGISTER => "rseq-unregister",
        STEP_UNMAP => "unmap",
        STEP_MOVE => "mremap",
        STEP_MOVE_ORDER => "move-order",
        STEP_MAP => "mmap",
        STEP_CLOSE => "close",
        STEP_MPROTECT => "mprotect",
        STEP_MADVISE => "madvise",
        STEP_MM_MAP => "prctl-mm-map",
        STEP_CLONE => "clone3",
        STEP_SET_FS => "arch-prctl-set-fs",
        STEP_SET_GS => "arch-prctl-set-gs",
        STEP_TID_ADDRESS => "set-tid-address",
        STEP_RSEQ => "rseq",
        STEP_SETGROUPS => "setgroups",
        STEP_SECUREBITS => "securebits",
        STEP_SETRESGID => "setresgid",
        STEP_SETRESUID => "setresuid",
        STEP_SETFSID => "setfsuid-setfsgid",
        STEP_CAPBSET => "capbset-drop",
        STEP_CAPSET => "capset",
        STEP_AMBIENT => "cap-ambient",
        STEP_NO_NEW_PRIVS => "no-new-privs",
        STEP_SECCOMP => "seccomp",
        STEP_BARRIER => "barrier",
        STEP_POST_UNMAP => "post-barrier-unmap",
        STEP_SIGRETURN => "rt_sigreturn",
        STEP_SIGQUEUE => "rt_tgsigqueueinfo",
        STEP_POPULATE => "madvise-populate-read",
        STEP_TIMER_CREATE => "timer_create",
        STEP_TIMER_SETTIME => "timer_settime",
        _ => "unknown",
    }
}

/// The fixed head of the argument block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgHeader {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<ArgHeader>()` as the loader saw it.
    pub header_size: u32,
    /// Bytes of the whole block (header, tables, frames).
    pub total_size: u64,
    /// Where the blob and this block live (informational: never unmapped by the blob).
    pub blob: Range,
    /// Absolute address of a [`Status`], 0 for none.
    pub status: u64,
    /// Hole used to park a move whose destination is still a pending
    /// source (a cycle, or a move overlapping itself); as large as the largest move.
    pub scratch: Range,
    /// The runtime's rseq registration of the calling thread, dropped
    /// before its memory goes (ptr 0: none).
    pub rseq_unregister_ptr: u64,
    pub rseq_unregister_len: u32,
    pub rseq_unregister_sig: u32,
    /// [`Range`]s to unmap first (everything of the runtime that stays not).
    pub unmaps: Table,
    /// [`Move`]s, vdso/vvar included.
    pub moves: Table,
    /// [`Map`]s created after the moves.
    pub maps: Table,
    /// [`Protect`]s applied after the maps.
    pub protects: Table,
    /// [`Advise`]s applied after the protections.
    pub advises: Table,
    /// Nonzero: call `PR_SET_MM_MAP` with `mm`.
    pub mm_valid: u32,
    pub _pad0: u32,
    pub mm: PrctlMmMap,
    /// [`Thread`]s; entry 0 is the calling thread.
    pub threads: Table,
    pub creds: Creds,
    /// [`Filter`]s installed in order by every thread.
    pub filters: Table,
    pub barrier: Barrier,
    /// [`Range`]s unmapped by the last thread of this process past the barrier
    /// (e.g. the shared barrier and status pages).
    pub post_barrier_unmaps: Table,
    /// [`Range`]s of file mappings to fault in (`MADV_POPULATE_READ`) once
    /// every mapping is in place: the file pages the original had mapped.
    /// Best effort: an error is ignored.
    pub populates: Table,
    /// [`Range`]s of file mappings the original had no page of, dropped
    /// (`MADV_DONTNEED`) after the populates: faulting a page in also maps
    /// its cached neighbours ("fault-around"), which the original may not
    /// have had. Only ranges without anonymous (written) pages.
    pub unpopulates: Table,
    /// [`PosixTimer`]s of the process.
    pub posix_timers: Table,
    /// Written by the blob: threads of this process past the barrier.
    pub threads_passed: u32,
    pub _pad1: u32,
}

/// `struct sigcontext` (x86_64) of `<asm/sigcontext.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SigContext {
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rsp: u64,
    pub rip: u64,
    pub eflags: u64,
    pub cs: u16,
    pub gs: u16,
    pub fs: u16,
    pub ss: u16,
    pub err: u64,
    pub trapno: u64,
    pub oldmask: u64,
    pub cr2: u64,
    /// Address of the 64-byte aligned FXSAVE/XSAVE area, 0 for an initial FPU.
    pub fpstate: u64,
    pub reserved1: [u64; 8],
}

/// `stack_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackT {
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub _pad: u32,
    pub ss_size: u64,
}

/// The kernel's `struct ucontext` (x86_64) with its 64-bit `sigset_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UContext {
    pub uc_flags: u64,
    pub uc_link: u64,
    pub uc_stack: StackT,
    pub uc_mcontext: SigContext,
    pub uc_sigmask: u64,
}

/// `struct rt_sigframe` (x86_64): `rt_sigreturn` finds it at `rsp - 8`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtSigframe {
    pub pretcode: u64,
    pub uc: UContext,
    pub info: [u8; 128],
}

pub const UC_FP_XSTATE: u64 = 0x1;
pub const UC_SIGCONTEXT_SS: u64 = 0x2;
pub const UC_STRICT_RESTORE_SS: u64 = 0x4;
pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` in the FXSAVE area.
pub const FPX_SW_BYTES_OFFSET: usize = 464;

// The kernel ABI sizes this block relies on.
const _: () = assert!(core::mem::size_of::<SigContext>() == 256);
const _: () = assert!(core::mem::size_of::<UContext>() == 304);
const _: () = assert!(core::mem::size_of::<RtSigframe>() == 440);
const _: () = assert!(core::mem::size_of::<PrctlMmMap>() == 104);
const _: () = assert!(core::mem::size_of::<Siginfo>() == SIGINFO_SIZE);
const _: () = assert!(core::mem::size_of::<Thread>() == 96);
const _: () = assert!(core::mem::size_of::<PosixTimer>() == 64);
