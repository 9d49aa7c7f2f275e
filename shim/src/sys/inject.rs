//! Running a syscall inside a ptrace-stopped task, and a scratch mapping in
//! the task for the syscalls' in/out buffers.
//!
//! How one injected syscall runs (all on the seizing thread):
//!
//! 1. The task's registers were saved when the [`Injector`] was created, at
//!    its ptrace stop (normally the PTRACE_EVENT_STOP of PTRACE_INTERRUPT).
//! 2. Registers are set to `rax = nr`, args in `rdi, rsi, rdx, r10, r8, r9`,
//!    `orig_rax = -1` and `rip` = the address of an existing `syscall`
//!    instruction (`0f 05`) found by *reading* an executable mapping, the
//!    vDSO first. Nothing is ever written into the task's code, so no file
//!    page of the task becomes an anonymous COW copy.
//!    `orig_rax = -1` matters: when the task leaves its stop, the kernel's
//!    syscall-restart logic looks at `orig_rax`/`rax`; with -1 it leaves the
//!    injected registers alone.
//! 3. PTRACE_SYSCALL twice: syscall-entry stop, syscall-exit stop; `rax` is
//!    the result. Not PTRACE_SINGLESTEP: its trap is a *forced* SIGTRAP,
//!    which would reset a blocked or ignored SIGTRAP handler to SIG_DFL.
//!    Syscall stops queue no signal.
//! 4. [`Injector::finish`] puts the saved registers back while the task sits
//!    in the syscall-exit stop, then PTRACE_INTERRUPT + PTRACE_CONT: the task
//!    runs no user code, traps in `get_signal()` into a new
//!    PTRACE_EVENT_STOP, and so is in the same kind of stop as before, with
//!    the same registers. When it is finally resumed, the kernel applies the
//!    syscall-restart fix-up to *those* registers (`rax = -ERESTARTSYS` etc.,
//!    `orig_rax` = the interrupted syscall): the interrupted syscall restarts
//!    exactly as if nothing had happened. Tested with read() and nanosleep()
//!    (`-ERESTART_RESTARTBLOCK`).
//!
//! Signals: nothing is blocked during injection (PTRACE_SETSIGMASK would
//! drop a pending "restore the saved mask" of ppoll/pselect/sigsuspend). If a
//! signal is dequeued before the injected syscall runs (signal-delivery
//! stop), the original registers are put back and the signal is delivered as
//! it would have been without us (PTRACE_INTERRUPT, then PTRACE_CONT with the
//! signal): the task enters its handler and stops at once; the new registers
//! become the saved ones and the syscall is retried. [`Injector::signals_delivered`]
//! counts this so a caller can re-read state the delivery changed.
//!
//! Side effects on the task that remain: when the task first leaves its stop
//! the kernel puts back a saved sigmask of ppoll/pselect/sigsuspend (the
//! restarted syscall sets its temporary mask again), so PTRACE_GETSIGMASK
//! afterwards shows the task's real mask; and a stale rseq_cs pointer in the
//! task's rseq area may be cleared, as any return to user mode would.
//!
//! The task's seccomp filter also applies to injected syscalls; seize with
//! PTRACE_O_SUSPEND_SECCOMP for tasks that have one.

use nix::errno::Errno;

use super::ptrace::{self, PtraceError, WaitStatus};
use crate::image::types::UserRegs;

/// How many signals may be delivered while one syscall is being injected
/// before we give up (a task flooded with signals).
const MAX_SIGNALS_PER_SYSCALL: u32 = 64;
/// How much of a non-vDSO executable mapping is searched for `0f 05`.
const SEARCH_LIMIT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error("/proc/{pid}/maps: {source}")]
    Maps {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: no `syscall` instruction found in any readable executable mapping")]
    NoSyscallInstruction { pid: i32 },
    #[error("tid {tid}: {what} during injected syscall {nr} ({status:?})")]
    UnexpectedStop {
        tid: i32,
        nr: i64,
        what: &'static str,
        status: WaitStatus,
    },
    #[error(
        "tid {tid}: stopped at rip {rip:#x} during injected syscall {nr}, expected {expected:#x}"
    )]
    WrongIp {
        tid: i32,
        nr: i64,
        rip: u64,
        expected: u64,
    },
    #[error("tid {tid}: more than {MAX_SIGNALS_PER_SYSCALL} signals arrived during injected syscall {nr}")]
    SignalStorm { tid: i32, nr: i64 },
    #[error("tid {tid}: injected {name} failed: {errno}")]
    Syscall {
        tid: i32,
        name: &'static str,
        errno: Errno,
    },
    #[error("pid {pid}: scratch access at offset {offset} + {len} beyond its {size} bytes")]
    ScratchBounds {
        pid: i32,
        offset: u64,
        len: usize,
        size: u64,
    },
}

/// Finds the address of a `syscall` instruction (`0f 05`) in `pid`, reading
/// (never writing) the vDSO first, then other readable executable mappings.
pub fn find_syscall_instruction(pid: i32) -> Result<u64, InjectError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| InjectError::Maps { pid, source })?;
    let mut candidates: Vec<(u64, u64, bool)> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let perms = perms.as_bytes();
        if perms.len() < 3 || perms[0] != b'r' || perms[2] != b'x' {
            continue;
        }
        let is_vdso = line.ends_with("[vdso]");
        candidates.push((start, end, is_vdso));
    }
    // vDSO first: small and always has syscall fallbacks.
    candidates.sort_by_key(|&(start, _, vdso)| (!vdso, start));
    const CHUNK: u64 = 64 * 1024;
    for (start, end, _) in candidates {
        let end = end.min(start.saturating_add(SEARCH_LIMIT));
        let mut at = start;
        while at < end {
            // One byte of overlap so a pair across chunks is found.
            let len = (end - at).min(CHUNK + 1) as usize;
            let mut buf = vec![0u8; len];
            if ptrace::read_memory(pid, at, &mut buf).is_err() {
                break;
            }
            if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(at + i as u64);
            }
            at += CHUNK;
        }
    }
    Err(InjectError::NoSyscallInstruction { pid })
}

/// Runs syscalls inside one stopped thread. Dropping it puts the thread's
/// registers back (best effort; call [`Injector::finish`] to see errors).
pub struct Injector {
    pid: i32,
    tid: i32,
    syscall_ip: u64,
    /// The task's own registers at its stop.
    saved: UserRegs,
    /// Whether the task's registers currently differ from `saved`
    /// (it sits in a syscall stop of an injected syscall).
    injected: bool,
    signals_delivered: u32,
    finished: bool,
}

/// A mapping made in the task by [`Injector::map_scratch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scratch {
    pub pid: i32,
    pub addr: u64,
    pub len: u64,
}

impl Scratch {
    fn check(&self, offset: u64, len: usize) -> Result<u64, InjectError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(InjectError::ScratchBounds {
                pid: self.pid,
                offset,
                len,
                size: self.len,
            }),
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        let addr = self.check(offset, buf.len())?;
        Ok(ptrace::read_memory(self.pid, addr, buf)?)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), InjectError> {
        let addr = self.check(offset, data.len())?;
        Ok(ptrace::write_memory(self.pid, addr, data)?)
    }

    pub fn read_u64(&self, offset: u64) -> Result<u64, InjectError> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

impl Injector {
    /// Prepares injection into thread `tid` of process `pid`, which must be in
    /// a ptrace stop of the calling thread, using the `syscall` instruction at
    /// `syscall_ip` (see [`find_syscall_instruction`]).
    pub fn new(pid: i32, tid: i32, syscall_ip: u64) -> Result<Injector, InjectError> {
        let saved = ptrace::get_regs(tid)?;
        Ok(Injector {
            pid,
            tid,
            syscall_ip,
            saved,
            injected: false,
            signals_delivered: 0,
            finished: false,
        })
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The thread's own registers at its stop (updated if a signal had to be
    /// delivered, see the module doc).
    pub fn saved_regs(&self) -> &UserRegs {
        &self.saved
    }

    /// How many signals were delivered to the thread while injecting.
    pub fn signals_delivered(&self) -> u32 {
        self.signals_delivered
    }

    fn unexpected(&self, nr: i64, what: &'static str, status: WaitStatus) -> InjectError {
        InjectError::UnexpectedStop {
            tid: self.tid,
            nr,
            what,
            status,
        }
    }

    /// Runs syscall `nr` with up to six arguments in the thread and returns
    /// the raw result (`-errno` on failure).
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64, InjectError> {
        let mut a = [0u64; 6];
        a[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        for _ in 0..=MAX_SIGNALS_PER_SYSCALL {
            let mut regs = self.saved;
            regs.rax = nr as u64;
            regs.rdi = a[0];
            regs.rsi = a[1];
            regs.rdx = a[2];
            regs.r10 = a[3];
            regs.r8 = a[4];
            regs.r9 = a[5];
            regs.orig_rax = u64::MAX;
            regs.rip = self.syscall_ip;
            ptrace::set_regs(self.tid, &regs)?;
            self.injected = true;
            ptrace::resume_to_syscall(self.tid, 0)?;
            match ptrace::wait(self.tid)? {
                WaitStatus::SyscallStop => {}
                WaitStatus::Signal(sig) => {
                    // The syscall has not run: rip must still point at it.
                    let rip = ptrace::get_regs(self.tid)?.rip;
                    if rip != self.syscall_ip {
                        return Err(InjectError::WrongIp {
                            tid: self.tid,
                            nr,
                            rip,
                            expected: self.syscall_ip,
                        });
                    }
                    self.deliver_and_restop(nr, sig)?;
                    continue;
                }
                // A trap that was still pending (a second PTRACE_INTERRUPT, a
                // group-stop): nothing ran yet, so simply go again.
                WaitStatus::EventStop { .. } => {
                    let rip = ptrace::get_regs(self.tid)?.rip;
                    if rip != self.syscall_ip {
                        return Err(InjectError::WrongIp {
                            tid: self.tid,
                            nr,
                            rip,
                            expected: self.syscall_ip,
                        });
                    }
                    continue;
                }
                other => return Err(self.unexpected(nr, "no syscall-entry stop", other)),
            }
            ptrace::resume_to_syscall(self.tid, 0)?;
            return match ptrace::wait(self.tid)? {
                WaitStatus::SyscallStop => {
                    let after = ptrace::get_regs(self.tid)?;
                    if after.rip != self.syscall_ip + 2 {
                        return Err(InjectError::WrongIp {
                            tid: self.tid,
                            nr,
                            rip: after.rip,
                            expected: self.syscall_ip + 2,
                        });
                    }
                    Ok(after.rax as i64)
                }
                other => Err(self.unexpected(nr, "no syscall-exit stop", other)),
            };
        }
        Err(InjectError::SignalStorm { tid: self.tid, nr })
    }

    /// In a signal-delivery stop with injected registers: put the task's own
    /// registers back, deliver the signal as the kernel would have, and stop
    /// again right after (in the handler, or wherever the default action
    /// leaves the task).
    fn deliver_and_restop(&mut self, nr: i64, sig: i32) -> Result<(), InjectError> {
        ptrace::set_regs(self.tid, &self.saved)?;
        self.injected = false;
        ptrace::interrupt(self.tid)?;
        let mut pass = sig;
        for _ in 0..=MAX_SIGNALS_PER_SYSCALL {
            ptrace::cont(self.tid, pass)?;
            match ptrace::wait(self.tid)? {
                WaitStatus::EventStop { .. } => {
                    self.saved = ptrace::get_regs(self.tid)?;
                    self.signals_delivered += 1;
                    return Ok(());
                }
                // Another signal dequeued before the trap: deliver it too.
                WaitStatus::Signal(next) => pass = next,
                other => return Err(self.unexpected(nr, "while delivering a signal", other)),
            }
        }
        Err(InjectError::SignalStorm { tid: self.tid, nr })
    }

    fn checked(&mut self, name: &'static str, nr: i64, args: &[u64]) -> Result<u64, InjectError> {
        let ret = self.syscall(nr, args)?;
        if (-4095..0).contains(&ret) {
            return Err(InjectError::Syscall {
                tid: self.tid,
                name,
                errno: Errno::from_raw(-ret as i32),
            });
        }
        Ok(ret as u64)
    }

    /// Maps `len` bytes (rounded up to pages by the kernel) of shared
    /// anonymous read-write memory in the task. Shared, so the kernel can
    /// never merge it into a neighbouring private VMA: unmapping it leaves
    /// the layout exactly as it was.
    pub fn map_scratch(&mut self, len: u64) -> Result<Scratch, InjectError> {
        let addr = self.checked(
            "mmap",
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64,
                u64::MAX, // fd -1
                0,
            ],
        )?;
        Ok(Scratch {
            pid: self.pid,
            addr,
            len,
        })
    }

    /// Unmaps a scratch mapping made by [`Injector::map_scratch`].
    pub fn unmap_scratch(&mut self, scratch: Scratch) -> Result<(), InjectError> {
        self.checked("munmap", libc::SYS_munmap, &[scratch.addr, scratch.len])
            .map(drop)
    }

    /// Puts the thread's registers back and leaves it in a PTRACE_EVENT_STOP,
    /// ready to be detached (see the module doc).
    pub fn finish(mut self) -> Result<(), InjectError> {
        self.finished = true;
        self.restore()
    }

    fn restore(&mut self) -> Result<(), InjectError> {
        if !self.injected {
            return Ok(());
        }
        ptrace::set_regs(self.tid, &self.saved)?;
        self.injected = false;
        ptrace::interrupt(self.tid)?;
        ptrace::cont(self.tid, 0)?;
        match ptrace::wait(self.tid)? {
            WaitStatus::EventStop { .. } => Ok(()),
            other => Err(self.unexpected(-1, "no stop after restoring registers", other)),
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: an error here means the task died or was detached.
            let _ = self.restore();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ptrace::test_children::{
        echo_body, maps, nanosleep_body, tracer_pid, wait_state, Child,
    };
    use super::super::ptrace::{SeizeOptions, WaitStatus};
    use super::*;

    fn stop(tid: i32) {
        ptrace::seize(tid, SeizeOptions::default()).expect("seize");
        ptrace::interrupt(tid).expect("interrupt");
        assert_eq!(
            ptrace::wait(tid).expect("wait"),
            WaitStatus::EventStop { sig: libc::SIGTRAP }
        );
    }

    #[test]
    fn syscall_instruction_is_found_without_writing() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        let ip = find_syscall_instruction(child.pid).expect("find");
        let mut b = [0u8; 2];
        ptrace::read_memory(child.pid, ip, &mut b).expect("read");
        assert_eq!(b, [0x0f, 0x05]);
    }

    #[test]
    fn injected_syscalls_run_in_the_task_and_the_read_restarts() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        wait_state(child.pid, 'S');
        let maps_before = maps(child.pid);
        stop(child.pid);
        let before = ptrace::get_regs(child.pid).expect("regs");
        let ip = find_syscall_instruction(child.pid).expect("find");
        let mut inj = Injector::new(child.pid, child.pid, ip).expect("injector");
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid as i64
        );
        assert_eq!(
            inj.syscall(libc::SYS_gettid, &[]).expect("gettid"),
            child.pid as i64
        );
        // The parent's pid, as the child sees it: ours.
        assert_eq!(
            inj.syscall(libc::SYS_getppid, &[]).expect("getppid"),
            std::process::id() as i64
        );
        // A failing syscall returns -errno.
        assert_eq!(
            inj.syscall(libc::SYS_close, &[9999]).expect("close"),
            -(libc::EBADF as i64)
        );

        let scratch = inj.map_scratch(4096).expect("mmap");
        assert!(maps(child.pid).contains(&format!("{:x}-", scratch.addr)));
        scratch.write(16, b"cowsnap").expect("write");
        let mut back = [0u8; 7];
        scratch.read(16, &mut back).expect("read");
        assert_eq!(&back, b"cowsnap");
        assert!(scratch.write(4090, b"too long").is_err());
        // uname() in the task writes into the scratch page.
        assert_eq!(
            inj.syscall(libc::SYS_uname, &[scratch.addr])
                .expect("uname"),
            0
        );
        let mut sysname = [0u8; 5];
        scratch.read(0, &mut sysname).expect("read");
        assert_eq!(&sysname, b"Linux");
        inj.unmap_scratch(scratch).expect("munmap");
        inj.finish().expect("finish");

        assert_eq!(ptrace::get_regs(child.pid).expect("regs"), before);
        assert_eq!(maps(child.pid), maps_before);
        ptrace::detach(child.pid, 0).expect("detach");
        assert_eq!(tracer_pid(child.pid), 0);
        // The interrupted read() restarted and still returns the next byte.
        child.send(b"k");
        assert_eq!(child.recv(3), [b'R', 1, b'k']);
    }

    #[test]
    fn nanosleep_restarts_after_injection() {
        let child = Child::spawn(nanosleep_body);
        assert_eq!(child.recv(1), b"r");
        let mut restart_blocks_seen = 0;
        for _ in 0..20 {
            stop(child.pid);
            let regs = ptrace::get_regs(child.pid).expect("regs");
            if regs.rax == (-516i64) as u64 {
                restart_blocks_seen += 1; // -ERESTART_RESTARTBLOCK
            }
            let ip = find_syscall_instruction(child.pid).expect("find");
            let mut inj = Injector::new(child.pid, child.pid, ip).expect("injector");
            for _ in 0..5 {
                assert_eq!(
                    inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
                    child.pid as i64
                );
            }
            inj.finish().expect("finish");
            ptrace::detach(child.pid, 0).expect("detach");
            // The next report must be a completed sleep, never an EINTR.
            assert_eq!(child.recv_skipping(b""), b'S');
        }
        assert!(
            restart_blocks_seen > 0,
            "never caught the child inside nanosleep"
        );
    }

    #[test]
    fn blocked_sigtrap_and_its_handler_survive_injection() {
        fn body(io: &super::super::ptrace::test_children::Io) -> i32 {
            // SAFETY (test child): raw libc calls with valid arguments.
            unsafe {
                libc::signal(libc::SIGTRAP, libc::SIG_IGN);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTRAP);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            echo_body(io)
        }
        let child = Child::spawn(body);
        assert_eq!(child.recv(1), b"r");
        stop(child.pid);
        let ip = find_syscall_instruction(child.pid).expect("find");
        let mut inj = Injector::new(child.pid, child.pid, ip).expect("injector");
        inj.syscall(libc::SYS_getpid, &[]).expect("getpid");
        inj.finish().expect("finish");
        let trap_bit = 1u64 << (libc::SIGTRAP - 1);
        assert_eq!(
            ptrace::get_sigmask(child.pid).expect("mask") & trap_bit,
            trap_bit
        );
        ptrace::detach(child.pid, 0).expect("detach");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.pid)).expect("status");
        let ign = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("SigIgn");
        assert_eq!(ign & trap_bit, trap_bit, "SIGTRAP no longer ignored");
        child.send(b"m");
        assert_eq!(child.recv(3), [b'R', 1, b'm']);
    }

    #[test]
    fn a_signal_arriving_during_injection_is_delivered_not_lost() {
        let child = Child::spawn(super::super::ptrace::test_children::rich_body);
        // b'T' + fields; the rich child handles SIGUSR1 by reporting b'H'.
        assert_eq!(child.recv(1), b"T");
        child.recv_u64s(super::super::ptrace::test_children::RICH_FIELDS);
        assert_eq!(child.recv_skipping(b"S"), b'r');
        wait_state(child.pid, 'S');
        stop(child.pid);
        // Pending and unblocked: dequeued as soon as the task leaves the stop.
        ptrace::tgkill(child.pid, child.pid, libc::SIGUSR1).expect("tgkill");
        let ip = find_syscall_instruction(child.pid).expect("find");
        let mut inj = Injector::new(child.pid, child.pid, ip).expect("injector");
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid as i64
        );
        assert_eq!(inj.signals_delivered(), 1);
        inj.finish().expect("finish");
        ptrace::detach(child.pid, 0).expect("detach");
        // The handler ran once, and the read() (SA_RESTART) still works.
        assert_eq!(child.recv_skipping(b"S"), b'H');
        child.send(b"n");
        assert_eq!(child.recv_skipping(b"S"), b'R');
        assert_eq!(child.recv(2), [1, b'n']);
    }
}
