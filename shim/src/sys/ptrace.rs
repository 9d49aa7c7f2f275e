//! Typed wrappers over `ptrace(2)` and `waitpid(2)` for seized tracees, and
//! `process_vm_readv`/`process_vm_writev` for small reads and writes of a
//! tracee's memory.
//!
//! This module owns every raw `ptrace` call cowsnap makes. It keeps no state:
//! which tasks are seized, and from which thread, is `dump::seize`'s business.
//! ptrace binds a tracee to the tracer *thread*, so every call here for a
//! given tid must come from the OS thread that seized it (the kernel answers
//! ESRCH otherwise).
//!
//! Every error names the tid and the request that failed.

use std::ffi::c_void;

use nix::errno::Errno;

use crate::image::types::UserRegs;

/// `NT_X86_XSTATE` (linux/elf.h); not exported by the libc crate.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_SECCOMP_GET_FILTER` (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// Size of a `siginfo_t` as the kernel copies it out.
pub const SIGINFO_SIZE: usize = 128;
/// First guess for the XSAVE area; the kernel reports the real length.
const XSTATE_GUESS: usize = 16 * 1024;
/// Upper bound when the first guess was too small (AMX tiles need ~11 KiB today).
const XSTATE_MAX: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    #[error("{request} on tid {tid}: {errno}")]
    Request {
        tid: i32,
        request: &'static str,
        errno: Errno,
    },
    #[error("waitpid(tid {tid}, __WALL): {errno}")]
    Wait { tid: i32, errno: Errno },
    #[error("{request} on tid {tid}: kernel returned {got} bytes, expected {expected}")]
    ShortRegset {
        tid: i32,
        request: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("PTRACE_GETREGSET NT_X86_XSTATE on tid {tid}: xsave area larger than {max} bytes")]
    XstateTooLarge { tid: i32, max: usize },
    #[error("{op} of {len} bytes at {addr:#x} in pid {pid}: {errno}")]
    Memory {
        pid: i32,
        op: &'static str,
        addr: u64,
        len: usize,
        errno: Errno,
    },
    #[error("{op} of {len} bytes at {addr:#x} in pid {pid}: only {done} bytes transferred")]
    ShortMemory {
        pid: i32,
        op: &'static str,
        addr: u64,
        len: usize,
        done: usize,
    },
}

impl PtraceError {
    /// The errno of a failed request or wait, if that is what failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            PtraceError::Request { errno, .. }
            | PtraceError::Wait { errno, .. }
            | PtraceError::Memory { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn request_err(tid: i32, request: &'static str) -> impl FnOnce(Errno) -> PtraceError {
    move |errno| PtraceError::Request {
        tid,
        request,
        errno,
    }
}

/// One raw ptrace call whose -1 return always means failure.
fn raw(
    request: libc::c_uint,
    name: &'static str,
    tid: i32,
    addr: usize,
    data: usize,
) -> Result<libc::c_long, PtraceError> {
    // SAFETY: every request passed here either ignores addr/data or receives
    // pointers the caller built from live, correctly sized Rust buffers; the
    // kernel validates the tid.
    let ret = unsafe { libc::ptrace(request, tid, addr as *mut c_void, data as *mut c_void) };
    if ret == -1 {
        Err(request_err(tid, name)(Errno::last()))
    } else {
        Ok(ret)
    }
}

/// Options cowsnap seizes with. No PTRACE_O_TRACECLONE: new tasks are found by
/// re-scanning /proc, so a task created while we seize is never auto-attached
/// in a state we did not choose. No PTRACE_O_EXITKILL: if the dumper dies,
/// the kernel detaches and the tree simply runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeizeOptions {
    /// PTRACE_O_SUSPEND_SECCOMP: lets injected syscalls bypass the tracee's
    /// seccomp filter (needs CAP_SYS_ADMIN; only asked for tasks that have one).
    pub suspend_seccomp: bool,
}

/// PTRACE_SEIZE with no option at all: for a task that is only held, never
/// stopped or inspected (see `dump::supervise`).
pub fn seize_plain(tid: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_SEIZE, "PTRACE_SEIZE", tid, 0, 0).map(drop)
}

/// PTRACE_SEIZE with PTRACE_O_TRACESYSGOOD (and PTRACE_O_SUSPEND_SECCOMP if asked).
/// The task keeps running until [`interrupt`].
pub fn seize(tid: i32, options: SeizeOptions) -> Result<(), PtraceError> {
    let mut opts = libc::PTRACE_O_TRACESYSGOOD;
    if options.suspend_seccomp {
        opts |= libc::PTRACE_O_SUSPEND_SECCOMP;
    }
    raw(libc::PTRACE_SEIZE, "PTRACE_SEIZE", tid, 0, opts as usize).map(drop)
}

/// PTRACE_LISTEN: leaves a task in its group-stop (SIGSTOP, SIGTSTP, ...)
/// while letting its tracer hear of the SIGCONT that ends it.
pub fn listen(tid: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_LISTEN, "PTRACE_LISTEN", tid, 0, 0).map(drop)
}

/// Blocks until tracee `tid` is in a ptrace stop and returns its stop
/// status (`sig | event << 8`), through `waitid(WSTOPPED)` without
/// WEXITED: a dead tracee is never reaped here, so its zombie stays
/// invisible to its real parent for as long as we trace it. `None` once
/// `tid` is no longer ours to wait for (ECHILD).
pub fn wait_stop_never_reap(tid: i32) -> Result<Option<i32>, PtraceError> {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out-pointer for the duration of the call.
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                tid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::__WALL,
            )
        };
        if ret == -1 {
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::ECHILD => return Ok(None),
                errno => return Err(PtraceError::Wait { tid, errno }),
            }
        }
        // SAFETY: waitid reported a stop of `tid`: a SIGCHLD siginfo whose
        // si_status is the stop's exit code.
        return Ok(Some(unsafe { info.si_status() }));
    }
}

/// PTRACE_INTERRUPT: the seized task enters a PTRACE_EVENT_STOP as soon as it
/// can; collect it with [`wait`].
pub fn interrupt(tid: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_INTERRUPT, "PTRACE_INTERRUPT", tid, 0, 0).map(drop)
}

/// Resumes a stopped tracee, delivering `sig` (0 = none).
pub fn cont(tid: i32, sig: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_CONT, "PTRACE_CONT", tid, 0, sig as usize).map(drop)
}

/// PTRACE_SYSCALL: resumes until the next syscall-entry or syscall-exit stop,
/// delivering `sig` (0 = none). Unlike single-stepping, these stops queue no
/// SIGTRAP, so a task that blocks or ignores SIGTRAP keeps its disposition.
pub fn resume_to_syscall(tid: i32, sig: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_SYSCALL, "PTRACE_SYSCALL", tid, 0, sig as usize).map(drop)
}

/// Executes one instruction, delivering `sig` (0 = none). The kernel reports
/// the step with a *forced* SIGTRAP, which resets a blocked or ignored SIGTRAP
/// disposition to SIG_DFL: syscall injection uses [`resume_to_syscall`] instead.
pub fn singlestep(tid: i32, sig: i32) -> Result<(), PtraceError> {
    raw(
        libc::PTRACE_SINGLESTEP,
        "PTRACE_SINGLESTEP",
        tid,
        0,
        sig as usize,
    )
    .map(drop)
}

/// Detaches from a stopped tracee, delivering `sig` (0 = none). The task
/// resumes; a task that was group-stopped before the seize stays stopped.
pub fn detach(tid: i32, sig: i32) -> Result<(), PtraceError> {
    raw(libc::PTRACE_DETACH, "PTRACE_DETACH", tid, 0, sig as usize).map(drop)
}

/// What `waitpid(tid, __WALL)` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// The task exited with this code.
    Exited(i32),
    /// The task was killed by this signal.
    Signaled(i32),
    /// PTRACE_EVENT_STOP: `sig` is SIGTRAP for a PTRACE_INTERRUPT trap, or the
    /// stopping signal (SIGSTOP, SIGTSTP, ...) for a group-stop.
    EventStop { sig: i32 },
    /// Any other PTRACE_EVENT_* stop (none is enabled by [`seize`]).
    Event { sig: i32, event: i32 },
    /// Syscall-enter/exit stop (SIGTRAP|0x80 with PTRACE_O_TRACESYSGOOD).
    SyscallStop,
    /// Signal-delivery-stop: the task dequeued `sig` and waits for the tracer
    /// to say whether (and which) signal to deliver.
    Signal(i32),
}

impl WaitStatus {
    /// Decodes a raw `waitpid` status.
    pub fn from_raw(status: i32) -> WaitStatus {
        if libc::WIFEXITED(status) {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            if event == libc::PTRACE_EVENT_STOP {
                WaitStatus::EventStop { sig }
            } else if event != 0 {
                WaitStatus::Event { sig, event }
            } else if sig == libc::SIGTRAP | 0x80 {
                WaitStatus::SyscallStop
            } else {
                WaitStatus::Signal(sig)
            }
        }
    }
}

/// `waitpid(tid, __WALL)`: blocks until `tid` changes state (a ptrace stop or
/// its death). EINTR is retried.
pub fn wait(tid: i32) -> Result<WaitStatus, PtraceError> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let ret = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if ret == -1 {
            let errno = Errno::last();
            if errno == Errno::EINTR {
                continue;
            }
            return Err(PtraceError::Wait { tid, errno });
        }
        return Ok(WaitStatus::from_raw(status));
    }
}

/// Whether `tid` has exited, without blocking and without reaping it
/// (`waitid` with WNOHANG | WNOWAIT): for a tracee that is also our own
/// child, whose exit status belongs to whoever in our process waits for it
/// as its parent.
pub fn try_exited_nowait(tid: i32) -> Result<bool, PtraceError> {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-buffer for waitid; with
        // WNOHANG and nothing to report the kernel leaves si_pid at 0.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out-pointer for the duration of the call.
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                tid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG | libc::__WALL,
            )
        };
        if ret == -1 {
            let errno = Errno::last();
            if errno == Errno::EINTR {
                continue;
            }
            return Err(PtraceError::Wait { tid, errno });
        }
        // SAFETY: waitid filled `info` (or left it zeroed); si_pid is
        // valid for the SIGCHLD siginfo waitid reports.
        return Ok(unsafe { info.si_pid() } != 0);
    }
}

/// Like [`wait`] but returns `None` at once if `tid` has not changed state.
pub fn try_wait(tid: i32) -> Result<Option<WaitStatus>, PtraceError> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out-pointer for the duration of the call.
    let ret = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
    match ret {
        -1 => Err(PtraceError::Wait {
            tid,
            errno: Errno::last(),
        }),
        0 => Ok(None),
        _ => Ok(Some(WaitStatus::from_raw(status))),
    }
}

/// PTRACE_GETREGSET into `buf`; returns the length the kernel filled in.
fn get_regset(
    tid: i32,
    note: libc::c_int,
    name: &'static str,
    buf: &mut [u8],
) -> Result<usize, PtraceError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    raw(
        libc::PTRACE_GETREGSET,
        name,
        tid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )?;
    Ok(iov.iov_len)
}

fn set_regset(
    tid: i32,
    note: libc::c_int,
    name: &'static str,
    buf: &[u8],
) -> Result<(), PtraceError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut c_void,
        iov_len: buf.len(),
    };
    // The kernel only reads through iov_base for SETREGSET.
    raw(
        libc::PTRACE_SETREGSET,
        name,
        tid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )
    .map(drop)
}

const USER_REGS_WORDS: usize = 27;

fn regs_from_words(w: &[u64; USER_REGS_WORDS]) -> UserRegs {
    // Order of `struct user_regs_struct` (arch/x86/include/asm/user_64.h).
    UserRegs {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    }
}

fn regs_to_words(r: &UserRegs) -> [u64; USER_REGS_WORDS] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

fn words_to_bytes(words: &[u64; USER_REGS_WORDS]) -> [u8; USER_REGS_WORDS * 8] {
    let mut out = [0u8; USER_REGS_WORDS * 8];
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// PTRACE_GETREGSET NT_PRSTATUS: the general registers.
pub fn get_regs(tid: i32) -> Result<UserRegs, PtraceError> {
    const NAME: &str = "PTRACE_GETREGSET NT_PRSTATUS";
    let mut buf = [0u8; USER_REGS_WORDS * 8];
    let got = get_regset(tid, libc::NT_PRSTATUS, NAME, &mut buf)?;
    if got != buf.len() {
        return Err(PtraceError::ShortRegset {
            tid,
            request: NAME,
            got,
            expected: buf.len(),
        });
    }
    let mut words = [0u64; USER_REGS_WORDS];
    for (w, chunk) in words.iter_mut().zip(buf.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    Ok(regs_from_words(&words))
}

/// PTRACE_SETREGSET NT_PRSTATUS.
pub fn set_regs(tid: i32, regs: &UserRegs) -> Result<(), PtraceError> {
    let bytes = words_to_bytes(&regs_to_words(regs));
    set_regset(
        tid,
        libc::NT_PRSTATUS,
        "PTRACE_SETREGSET NT_PRSTATUS",
        &bytes,
    )
}

/// PTRACE_GETREGSET NT_X86_XSTATE: the XSAVE area, as long as the kernel
/// says this task's is.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>, PtraceError> {
    const NAME: &str = "PTRACE_GETREGSET NT_X86_XSTATE";
    let mut size = XSTATE_GUESS;
    loop {
        let mut buf = vec![0u8; size];
        let got = get_regset(tid, NT_X86_XSTATE, NAME, &mut buf)?;
        // A completely filled buffer may mean truncation: ask again, bigger.
        if got < size {
            buf.truncate(got);
            return Ok(buf);
        }
        if size >= XSTATE_MAX {
            return Err(PtraceError::XstateTooLarge {
                tid,
                max: XSTATE_MAX,
            });
        }
        size *= 4;
    }
}

/// PTRACE_SETREGSET NT_X86_XSTATE.
pub fn set_xstate(tid: i32, xstate: &[u8]) -> Result<(), PtraceError> {
    set_regset(tid, NT_X86_XSTATE, "PTRACE_SETREGSET NT_X86_XSTATE", xstate)
}

/// PTRACE_GETSIGMASK: the blocked mask, bit `n-1` for signal `n`.
pub fn get_sigmask(tid: i32) -> Result<u64, PtraceError> {
    let mut mask: u64 = 0;
    raw(
        libc::PTRACE_GETSIGMASK,
        "PTRACE_GETSIGMASK",
        tid,
        std::mem::size_of::<u64>(),
        &mut mask as *mut u64 as usize,
    )?;
    Ok(mask)
}

/// PTRACE_SETSIGMASK. Beware: it also drops a pending "restore the saved mask"
/// of ppoll/pselect/sigsuspend (TIF_RESTORE_SIGMASK); syscall injection does
/// not use it for that reason.
pub fn set_sigmask(tid: i32, mask: u64) -> Result<(), PtraceError> {
    let mut mask = mask;
    raw(
        libc::PTRACE_SETSIGMASK,
        "PTRACE_SETSIGMASK",
        tid,
        std::mem::size_of::<u64>(),
        &mut mask as *mut u64 as usize,
    )
    .map(drop)
}

/// PTRACE_GETSIGINFO: the siginfo of the signal of a signal-delivery-stop
/// (or the SIGTRAP of an event stop).
pub fn get_siginfo(tid: i32) -> Result<[u8; SIGINFO_SIZE], PtraceError> {
    let mut buf = [0u8; SIGINFO_SIZE];
    raw(
        libc::PTRACE_GETSIGINFO,
        "PTRACE_GETSIGINFO",
        tid,
        0,
        buf.as_mut_ptr() as usize,
    )?;
    Ok(buf)
}

/// Which queue [`peek_siginfo`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigQueue {
    /// The thread's private queue.
    Thread,
    /// The process-wide queue (PTRACE_PEEKSIGINFO_SHARED).
    Shared,
}

/// PTRACE_PEEKSIGINFO: every queued siginfo of one queue, oldest first,
/// without dequeuing anything.
pub fn peek_siginfo(tid: i32, queue: SigQueue) -> Result<Vec<[u8; SIGINFO_SIZE]>, PtraceError> {
    const BATCH: usize = 32;
    let flags = match queue {
        SigQueue::Thread => 0,
        SigQueue::Shared => libc::PTRACE_PEEKSIGINFO_SHARED,
    };
    let mut out = Vec::new();
    loop {
        let mut args = libc::ptrace_peeksiginfo_args {
            off: out.len() as u64,
            flags,
            nr: BATCH as i32,
        };
        let mut buf = vec![0u8; BATCH * SIGINFO_SIZE];
        let n = raw(
            libc::PTRACE_PEEKSIGINFO,
            "PTRACE_PEEKSIGINFO",
            tid,
            &mut args as *mut libc::ptrace_peeksiginfo_args as usize,
            buf.as_mut_ptr() as usize,
        )? as usize;
        if n == 0 {
            return Ok(out);
        }
        for chunk in buf.chunks_exact(SIGINFO_SIZE).take(n.min(BATCH)) {
            let mut one = [0u8; SIGINFO_SIZE];
            one.copy_from_slice(chunk);
            out.push(one);
        }
    }
}

/// PTRACE_GET_RSEQ_CONFIGURATION, field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfiguration {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
}

/// PTRACE_GET_RSEQ_CONFIGURATION; `None` if the thread registered no rseq area.
pub fn get_rseq_configuration(tid: i32) -> Result<Option<RseqConfiguration>, PtraceError> {
    let mut conf = libc::ptrace_rseq_configuration {
        rseq_abi_pointer: 0,
        rseq_abi_size: 0,
        signature: 0,
        flags: 0,
        pad: 0,
    };
    raw(
        libc::PTRACE_GET_RSEQ_CONFIGURATION,
        "PTRACE_GET_RSEQ_CONFIGURATION",
        tid,
        std::mem::size_of::<libc::ptrace_rseq_configuration>(),
        &mut conf as *mut libc::ptrace_rseq_configuration as usize,
    )?;
    if conf.rseq_abi_pointer == 0 {
        return Ok(None);
    }
    Ok(Some(RseqConfiguration {
        abi_pointer: conf.rseq_abi_pointer,
        abi_size: conf.rseq_abi_size,
        signature: conf.signature,
        flags: conf.flags,
    }))
}

/// PTRACE_SECCOMP_GET_FILTER for filter `index` (0 = the oldest, first installed;
/// the kernel counts from the bottom of the filter chain):
/// the classic BPF program as raw `struct sock_filter` bytes. `Ok(None)` when
/// there is no filter at that index (ENOENT) or the task is not in filter
/// mode at all (EINVAL).
pub fn seccomp_get_filter(tid: i32, index: u64) -> Result<Option<Vec<u8>>, PtraceError> {
    const NAME: &str = "PTRACE_SECCOMP_GET_FILTER";
    const SOCK_FILTER_SIZE: usize = 8;
    let count = match raw(PTRACE_SECCOMP_GET_FILTER, NAME, tid, index as usize, 0) {
        Ok(n) => n as usize,
        Err(PtraceError::Request {
            errno: Errno::ENOENT | Errno::EINVAL,
            ..
        }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; count * SOCK_FILTER_SIZE];
    let again = raw(
        PTRACE_SECCOMP_GET_FILTER,
        NAME,
        tid,
        index as usize,
        buf.as_mut_ptr() as usize,
    )? as usize;
    // Filters are immutable once installed, so the count cannot change.
    if again != count {
        return Err(PtraceError::ShortRegset {
            tid,
            request: NAME,
            got: again * SOCK_FILTER_SIZE,
            expected: count * SOCK_FILTER_SIZE,
        });
    }
    Ok(Some(buf))
}

/// PTRACE_PEEKDATA: one word of the tracee's memory.
pub fn peek_data(tid: i32, addr: u64) -> Result<u64, PtraceError> {
    // PEEKDATA returns the word itself, so -1 is ambiguous: clear errno first.
    Errno::clear();
    // SAFETY: PTRACE_PEEKDATA reads the tracee, not our memory; data is unused.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_PEEKDATA,
            tid,
            addr as *mut c_void,
            std::ptr::null_mut::<c_void>(),
        )
    };
    if ret == -1 {
        let errno = Errno::last();
        if errno as i32 != 0 {
            return Err(request_err(tid, "PTRACE_PEEKDATA")(errno));
        }
    }
    Ok(ret as u64)
}

/// PTRACE_POKEDATA: writes one word (works on read-only mappings too; a
/// private file page written this way becomes an anonymous COW copy).
pub fn poke_data(tid: i32, addr: u64, word: u64) -> Result<(), PtraceError> {
    raw(
        libc::PTRACE_POKEDATA,
        "PTRACE_POKEDATA",
        tid,
        addr as usize,
        word as usize,
    )
    .map(drop)
}

/// `process_vm_readv`: fills `buf` from `addr` in `pid`, all or error.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), PtraceError> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` covers exactly `buf`, which we borrow mutably; the
    // remote iovec is only interpreted in the other process.
    let ret = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    check_memory(pid, "process_vm_readv", addr, buf.len(), ret)
}

/// `process_vm_writev`: writes `data` at `addr` in `pid`, all or error.
/// Needs a writable mapping there (it does not force like POKEDATA).
pub fn write_memory(pid: i32, addr: u64, data: &[u8]) -> Result<(), PtraceError> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: `local` covers exactly `data`, which the kernel only reads.
    let ret = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    check_memory(pid, "process_vm_writev", addr, data.len(), ret)
}

fn check_memory(
    pid: i32,
    op: &'static str,
    addr: u64,
    len: usize,
    ret: isize,
) -> Result<(), PtraceError> {
    if ret < 0 {
        return Err(PtraceError::Memory {
            pid,
            op,
            addr,
            len,
            errno: Errno::last(),
        });
    }
    if ret as usize != len {
        return Err(PtraceError::ShortMemory {
            pid,
            op,
            addr,
            len,
            done: ret as usize,
        });
    }
    Ok(())
}

/// `gettid()` of the calling thread.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// `tgkill(tgid, tid, sig)`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `kill(pid, sig)`.
pub fn kill(pid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::kill(pid, sig) };
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

#[cfg(test)]
#[path = "ptrace_test_children.rs"]
pub(crate) mod test_children;

#[cfg(test)]
mod tests {
    use super::test_children::{echo_body, tracer_pid, Child};
    use super::*;

    const ERESTARTSYS: i64 = 512;

    fn seize_and_stop(tid: i32) {
        seize(tid, SeizeOptions::default()).expect("seize");
        interrupt(tid).expect("interrupt");
        assert_eq!(
            wait(tid).expect("wait"),
            WaitStatus::EventStop { sig: libc::SIGTRAP }
        );
    }

    #[test]
    fn stop_in_read_then_detach_restarts_the_read() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        // The child is (or is about to be) blocked in read(); wait until it sleeps.
        super::test_children::wait_state(child.pid, 'S');
        seize_and_stop(child.pid);
        assert_eq!(tracer_pid(child.pid), gettid());

        let regs = get_regs(child.pid).expect("regs");
        assert_eq!(regs.orig_rax, libc::SYS_read as u64);
        assert_eq!(regs.rax, (-ERESTARTSYS) as u64);
        let xstate = get_xstate(child.pid).expect("xstate");
        // Legacy area (512) + XSAVE header (64) at least, and not our guess.
        assert!(
            xstate.len() >= 576 && xstate.len() < XSTATE_GUESS,
            "{}",
            xstate.len()
        );
        assert_eq!(get_sigmask(child.pid).expect("mask"), 0);
        assert!(peek_siginfo(child.pid, SigQueue::Thread)
            .expect("peek")
            .is_empty());
        assert!(peek_siginfo(child.pid, SigQueue::Shared)
            .expect("peek")
            .is_empty());
        assert_eq!(seccomp_get_filter(child.pid, 0).expect("seccomp"), None);
        get_rseq_configuration(child.pid).expect("rseq");

        // Setting the same registers back is a no-op for the task.
        set_regs(child.pid, &regs).expect("set regs");
        assert_eq!(get_regs(child.pid).expect("regs"), regs);
        set_xstate(child.pid, &xstate).expect("set xstate");

        detach(child.pid, 0).expect("detach");
        assert_eq!(tracer_pid(child.pid), 0);
        child.send(b"x");
        assert_eq!(child.recv(3), [b'R', 1, b'x']);
    }

    #[test]
    fn peek_poke_and_vm_read_write_round_trip() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        seize_and_stop(child.pid);
        let rsp = get_regs(child.pid).expect("regs").rsp;
        // Well below the red zone, inside the mapped main stack.
        let addr = (rsp - 1024) & !7;
        let orig = peek_data(child.pid, addr).expect("peek");
        poke_data(child.pid, addr, 0xdead_beef_0bad_f00d).expect("poke");
        assert_eq!(
            peek_data(child.pid, addr).expect("peek"),
            0xdead_beef_0bad_f00d
        );
        let mut buf = [0u8; 8];
        read_memory(child.pid, addr, &mut buf).expect("vm read");
        assert_eq!(u64::from_ne_bytes(buf), 0xdead_beef_0bad_f00d);
        write_memory(child.pid, addr, &orig.to_ne_bytes()).expect("vm write");
        assert_eq!(peek_data(child.pid, addr).expect("peek"), orig);
        // Unmapped address: the error names the pid and the address.
        let err = read_memory(child.pid, 8, &mut buf).expect_err("address 8 is unmapped");
        assert!(
            err.to_string().contains(&format!("pid {}", child.pid)),
            "{err}"
        );
        let err = peek_data(child.pid, 8).expect_err("address 8 is unmapped");
        assert!(err.to_string().contains("PTRACE_PEEKDATA"), "{err}");
        detach(child.pid, 0).expect("detach");
        child.send(b"y");
        assert_eq!(child.recv(3), [b'R', 1, b'y']);
    }

    #[test]
    fn signal_delivery_stop_is_reported_with_its_siginfo() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        seize(child.pid, SeizeOptions::default()).expect("seize");
        tgkill(child.pid, child.pid, libc::SIGWINCH).expect("tgkill");
        assert_eq!(
            wait(child.pid).expect("wait"),
            WaitStatus::Signal(libc::SIGWINCH)
        );
        let info = get_siginfo(child.pid).expect("siginfo");
        assert_eq!(
            i32::from_ne_bytes(info[..4].try_into().expect("4 bytes")),
            libc::SIGWINCH
        );
        // Deliver it (default action: ignore), then stop again.
        interrupt(child.pid).expect("interrupt");
        cont(child.pid, libc::SIGWINCH).expect("cont");
        assert_eq!(
            wait(child.pid).expect("wait"),
            WaitStatus::EventStop { sig: libc::SIGTRAP }
        );
        detach(child.pid, 0).expect("detach");
        child.send(b"z");
        assert_eq!(child.recv(3), [b'R', 1, b'z']);
    }

    #[test]
    fn errors_name_the_tid_and_request() {
        let err = interrupt(i32::MAX - 7).expect_err("no such task");
        let text = err.to_string();
        assert!(text.contains("PTRACE_INTERRUPT"), "{text}");
        assert!(text.contains(&format!("tid {}", i32::MAX - 7)), "{text}");
        assert_eq!(err.errno(), Some(Errno::ESRCH));
    }
}
