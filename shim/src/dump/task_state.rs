//! Per-process state that only ptrace (or the task itself) can report:
//! registers, xsave, rseq, signal masks and pending signals, and, by
//! syscalls executed in the task, sigactions, sigaltstack, tid address,
//! itimers, brk and securebits. Leaves the task's memory exactly as found.
//!
//! Order of work for one process (all on the seizing thread):
//! 1. Injection round: one shared anonymous scratch page is mapped through
//!    the leader; the leader runs the process-wide queries (rt_sigaction for
//!    1..=64 except SIGKILL/SIGSTOP, which are recorded as default; getitimer
//!    ×3; brk(0); prctl(PR_GET_SECUREBITS); timer_gettime and
//!    timer_getoverrun of every POSIX timer); every thread runs sigaltstack
//!    and prctl(PR_GET_TID_ADDRESS) into the page; the page is unmapped and
//!    every thread's registers are put back (see `sys::inject`). If a signal
//!    had to be delivered to some thread meanwhile, its state changed, so the
//!    whole round is repeated.
//! 2. ptrace reads: registers (exactly as at the stop), xsave, blocked mask,
//!    thread and shared pending siginfos, rseq, seccomp filters; /proc for
//!    comm and NSpid. They come after the injections because the first
//!    resume of a thread puts back the saved mask of an interrupted
//!    ppoll/pselect/sigsuspend: the mask read afterwards is the task's real
//!    one (the restarted syscall installs its temporary mask again).

use std::path::PathBuf;

use crate::image::types::{Itimers, ProcessSignals, Rseq, SigAction, SigAltStack, ThreadImage};
use crate::sys::inject::{self, InjectError, Injector, Scratch};
use crate::sys::ptrace::{self, PtraceError, SigQueue};

use super::seize::{SeizeError, SeizedProcess, SeizedTree};

/// Rounds of injection before giving up on a task that keeps receiving signals.
const MAX_ROUNDS: u32 = 8;
const SCRATCH_LEN: u64 = 4096;
/// Size of the kernel's `struct sigaction` on x86_64 (handler, flags, restorer, mask).
const KSIGACTION_SIZE: usize = 32;
const SIGSET_SIZE: u64 = 8;

#[derive(Debug, Clone)]
pub struct TaskState {
    pub threads: Vec<ThreadImage>,
    pub signals: ProcessSignals,
    pub itimers: Itimers,
    /// brk(0) in the task.
    pub brk: u64,
    pub securebits: u32,
    /// PTRACE_SECCOMP_GET_FILTER programs as hex, in index order, which the
    /// kernel defines as install order: index 0 is the *oldest* filter.
    pub seccomp_filters: Vec<String>,
    /// Per POSIX timer asked for, in that order: what `timer_gettime` and
    /// `timer_getoverrun` said in the task.
    pub posix_timers: Vec<TimerReading>,
}

/// A POSIX timer as the task's own `timer_gettime` / `timer_getoverrun` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerReading {
    pub id: i32,
    /// Time left, (seconds, nanoseconds); (0, 0): disarmed.
    pub value: (i64, i64),
    pub interval: (i64, i64),
    pub overrun: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskStateError {
    #[error(transparent)]
    Seize(#[from] SeizeError),
    #[error("pid {pid} is not part of the seized tree")]
    NotSeized { pid: i32 },
    #[error("pid {pid} tid {tid}: {source}")]
    Inject {
        pid: i32,
        tid: i32,
        #[source]
        source: InjectError,
    },
    #[error("pid {pid} tid {tid}: injected {call} returned {ret}")]
    Syscall {
        pid: i32,
        tid: i32,
        call: String,
        ret: i64,
    },
    #[error("pid {pid}: {source}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("{path}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: signals kept arriving during {MAX_ROUNDS} collection rounds")]
    Unsettled { pid: i32 },
}

/// What the injected syscalls reported.
struct Injected {
    actions: Vec<SigAction>,
    itimers: Itimers,
    brk: u64,
    securebits: u32,
    timers: Vec<TimerReading>,
    /// Per thread, in `tids` order: (sigaltstack, clear_child_tid).
    threads: Vec<(SigAltStack, u64)>,
}

/// Runs syscalls through one injector, turning failures into errors that
/// name the process and thread.
struct Calls<'a> {
    pid: i32,
    inj: &'a mut Injector,
    scratch: Scratch,
}

impl Calls<'_> {
    fn inject_err(&self, source: InjectError) -> TaskStateError {
        TaskStateError::Inject {
            pid: self.pid,
            tid: self.inj.tid(),
            source,
        }
    }

    /// Runs `nr`; any negative (errno) result is an error naming `call`.
    fn call(
        &mut self,
        call: impl Fn() -> String,
        nr: i64,
        args: &[u64],
    ) -> Result<i64, TaskStateError> {
        let ret = self.inj.syscall(nr, args).map_err(|e| self.inject_err(e))?;
        if ret < 0 {
            return Err(TaskStateError::Syscall {
                pid: self.pid,
                tid: self.inj.tid(),
                call: call(),
                ret,
            });
        }
        Ok(ret)
    }

    fn read(&self, len: usize) -> Result<Vec<u8>, TaskStateError> {
        let mut buf = vec![0u8; len];
        self.scratch
            .read(0, &mut buf)
            .map_err(|e| self.inject_err(e))?;
        Ok(buf)
    }

    fn thread_state(&mut self) -> Result<(SigAltStack, u64), TaskStateError> {
        let addr = self.scratch.addr;
        self.call(
            || "sigaltstack(NULL, &old)".into(),
            libc::SYS_sigaltstack,
            &[0, addr],
        )?;
        let b = self.read(24)?;
        let altstack = SigAltStack {
            sp: word(&b, 0),
            flags: i32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            size: word(&b, 16),
        };
        self.call(
            || "prctl(PR_GET_TID_ADDRESS)".into(),
            libc::SYS_prctl,
            &[libc::PR_GET_TID_ADDRESS as u64, addr],
        )?;
        let tid_address = word(&self.read(8)?, 0);
        Ok((altstack, tid_address))
    }

    fn process_state(&mut self) -> Result<(Vec<SigAction>, Itimers, u64, u32), TaskStateError> {
        let addr = self.scratch.addr;
        let mut actions = Vec::with_capacity(64);
        for sig in 1..=64u64 {
            if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                // Their action cannot be changed: always the default.
                actions.push(SigAction {
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                });
                continue;
            }
            self.call(
                || format!("rt_sigaction({sig}, NULL, &old, 8)"),
                libc::SYS_rt_sigaction,
                &[sig, 0, addr, SIGSET_SIZE],
            )?;
            let b = self.read(KSIGACTION_SIZE)?;
            actions.push(SigAction {
                handler: word(&b, 0),
                flags: word(&b, 8),
                restorer: word(&b, 16),
                mask: word(&b, 24),
            });
        }
        let mut timers = [[0u64; 2]; 3];
        for (which, slot) in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF]
            .into_iter()
            .zip(timers.iter_mut())
        {
            self.call(
                || format!("getitimer({which})"),
                libc::SYS_getitimer,
                &[which as u64, addr],
            )?;
            let b = self.read(32)?;
            // struct itimerval: it_interval {sec, usec}, it_value {sec, usec}.
            let us = |off: usize| word(&b, off) * 1_000_000 + word(&b, off + 8);
            *slot = [us(0), us(16)];
        }
        let itimers = Itimers {
            real: timers[0],
            virt: timers[1],
            prof: timers[2],
        };
        let brk = self.call(|| "brk(0)".into(), libc::SYS_brk, &[0])? as u64;
        let securebits = self.call(
            || "prctl(PR_GET_SECUREBITS)".into(),
            libc::SYS_prctl,
            &[libc::PR_GET_SECUREBITS as u64],
        )? as u32;
        Ok((actions, itimers, brk, securebits))
    }

    /// `timer_gettime` (a `struct itimerspec`: interval, then value) and
    /// `timer_getoverrun` of each timer id.
    fn posix_timers(&mut self, ids: &[i32]) -> Result<Vec<TimerReading>, TaskStateError> {
        let addr = self.scratch.addr;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            self.call(
                || format!("timer_gettime({id})"),
                libc::SYS_timer_gettime,
                &[id as u64, addr],
            )?;
            let b = self.read(32)?;
            let ts = |off: usize| (word(&b, off) as i64, word(&b, off + 8) as i64);
            let overrun = self.call(
                || format!("timer_getoverrun({id})"),
                libc::SYS_timer_getoverrun,
                &[id as u64],
            )? as i32;
            out.push(TimerReading {
                id,
                value: ts(16),
                interval: ts(0),
                overrun,
            });
        }
        Ok(out)
    }
}

fn word(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(w)
}

/// One injection round; returns what was learnt and how many signals had
/// to be delivered meanwhile (non-zero: the answers may be stale).
fn inject_round(
    pid: i32,
    tids: &[i32],
    timer_ids: &[i32],
    syscall_ip: u64,
) -> Result<(Injected, u32), TaskStateError> {
    let err = |tid: i32| move |source: InjectError| TaskStateError::Inject { pid, tid, source };
    let mut leader = Injector::new(pid, pid, syscall_ip).map_err(err(pid))?;
    let scratch = leader.map_scratch(SCRATCH_LEN).map_err(err(pid))?;
    let mut delivered = 0;
    let body = (|| -> Result<Injected, TaskStateError> {
        let mut calls = Calls {
            pid,
            inj: &mut leader,
            scratch,
        };
        let (actions, itimers, brk, securebits) = calls.process_state()?;
        let timers = calls.posix_timers(timer_ids)?;
        let mut threads = Vec::with_capacity(tids.len());
        for &tid in tids {
            if tid == pid {
                threads.push(calls.thread_state()?);
                continue;
            }
            let mut inj = Injector::new(pid, tid, syscall_ip).map_err(err(tid))?;
            let state = Calls {
                pid,
                inj: &mut inj,
                scratch,
            }
            .thread_state();
            delivered += inj.signals_delivered();
            // Registers back before looking at the result: the task comes first.
            inj.finish().map_err(err(tid))?;
            threads.push(state?);
        }
        Ok(Injected {
            actions,
            itimers,
            brk,
            securebits,
            timers,
            threads,
        })
    })();
    // Always unmap and restore, whatever happened above.
    let unmapped = leader.unmap_scratch(scratch).map_err(err(pid));
    delivered += leader.signals_delivered();
    let finished = leader.finish().map_err(err(pid));
    let injected = body?;
    unmapped?;
    finished?;
    Ok((injected, delivered))
}

fn read_task_file(pid: i32, tid: i32, file: &str) -> Result<String, TaskStateError> {
    let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/{file}"));
    std::fs::read_to_string(&path).map_err(|source| TaskStateError::Proc { path, source })
}

/// NSpid of a thread (outermost namespace first).
fn nstid(pid: i32, tid: i32) -> Result<Vec<i32>, TaskStateError> {
    let status = read_task_file(pid, tid, "status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![tid]))
}

fn thread_image(
    pid: i32,
    tid: i32,
    altstack: SigAltStack,
    clear_child_tid: u64,
) -> Result<ThreadImage, TaskStateError> {
    let pt = |source| TaskStateError::Ptrace { pid, source };
    let regs = ptrace::get_regs(tid).map_err(pt)?;
    let xsave = ptrace::get_xstate(tid).map_err(pt)?;
    let sigmask = ptrace::get_sigmask(tid).map_err(pt)?;
    let pending = ptrace::peek_siginfo(tid, SigQueue::Thread)
        .map_err(pt)?
        .iter()
        .map(hex::encode)
        .collect();
    let rseq = ptrace::get_rseq_configuration(tid)
        .map_err(pt)?
        .map(|r| Rseq {
            abi_pointer: r.abi_pointer,
            abi_size: r.abi_size,
            signature: r.signature,
            flags: r.flags,
        });
    Ok(ThreadImage {
        tid,
        nstid: nstid(pid, tid)?,
        regs,
        xsave: hex::encode(xsave),
        sigmask,
        pending,
        sigaltstack: altstack,
        clear_child_tid,
        rseq,
        comm: read_task_file(pid, tid, "comm")?
            .trim_end_matches('\n')
            .to_string(),
    })
}

/// Collects the state of process `pid`, which must be seized in `tree`,
/// reading the POSIX timers `timer_ids` (from `/proc/PID/timers`).
pub fn collect(
    tree: &SeizedTree,
    pid: i32,
    timer_ids: &[i32],
) -> Result<TaskState, TaskStateError> {
    tree.check_thread()?;
    let process: &SeizedProcess = tree.process(pid).ok_or(TaskStateError::NotSeized { pid })?;
    let syscall_ip =
        inject::find_syscall_instruction(pid).map_err(|source| TaskStateError::Inject {
            pid,
            tid: pid,
            source,
        })?;
    let mut injected = None;
    for _ in 0..MAX_ROUNDS {
        let (got, delivered) = inject_round(pid, &process.tids, timer_ids, syscall_ip)?;
        if delivered == 0 {
            injected = Some(got);
            break;
        }
    }
    let injected = injected.ok_or(TaskStateError::Unsettled { pid })?;

    let mut threads = Vec::with_capacity(process.tids.len());
    for (&tid, &(altstack, tid_address)) in process.tids.iter().zip(&injected.threads) {
        threads.push(thread_image(pid, tid, altstack, tid_address)?);
    }
    let pt = |source| TaskStateError::Ptrace { pid, source };
    let shared_pending = ptrace::peek_siginfo(pid, SigQueue::Shared)
        .map_err(pt)?
        .iter()
        .map(hex::encode)
        .collect();
    let mut seccomp_filters = Vec::new();
    while let Some(prog) =
        ptrace::seccomp_get_filter(pid, seccomp_filters.len() as u64).map_err(pt)?
    {
        seccomp_filters.push(hex::encode(prog));
    }
    Ok(TaskState {
        threads,
        signals: ProcessSignals {
            actions: injected.actions,
            shared_pending,
        },
        itimers: injected.itimers,
        brk: injected.brk,
        securebits: injected.securebits,
        seccomp_filters,
        posix_timers: injected.timers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ptrace::test_children::{
        maps, rich, rich_body, seccomp_body, seccomp_bytes, seccomp_programs, tracer_pid,
        wait_state, Child, RICH_ALTSTACK_SIZE, RICH_FIELDS, RICH_RT_SIG, RICH_RT_VALUE,
    };

    const ERESTARTSYS: u64 = (-512i64) as u64;
    const ERESTART_RESTARTBLOCK: u64 = (-516i64) as u64;
    /// x86_64 RSEQ_SIG as glibc registers it.
    const GLIBC_RSEQ_SIG: u32 = 0x5305_3053;

    fn bit(sig: i32) -> u64 {
        1u64 << (sig - 1)
    }

    fn siginfo_field(hexed: &str, offset: usize) -> u64 {
        let b = hex::decode(hexed).expect("hex");
        assert_eq!(b.len(), 128);
        let mut w = [0u8; 8];
        w[..4].copy_from_slice(&b[offset..offset + 4]);
        u64::from_ne_bytes(w)
    }

    #[test]
    fn collected_state_equals_what_the_child_set_and_the_child_runs_on() {
        let child = Child::spawn(rich_body);
        assert_eq!(child.recv(1), b"T");
        let r = child.recv_u64s(RICH_FIELDS);
        assert_eq!(child.recv_skipping(b"S"), b'r');
        wait_state(child.pid, 'S');
        let thread_tid = r[rich::THREAD_TID] as i32;
        let maps_before = maps(child.pid);

        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let regs_at_stop: Vec<_> = [child.pid, thread_tid]
            .iter()
            .map(|&t| ptrace::get_regs(t).expect("regs"))
            .collect();
        let state = collect(&tree, child.pid, &[]).expect("collect");
        // Nothing of the scratch page is left while still seized.
        assert_eq!(maps(child.pid), maps_before);

        // Threads: leader first, registers exactly as at the stop.
        assert_eq!(state.threads.len(), 2);
        let (main, second) = (&state.threads[0], &state.threads[1]);
        assert_eq!((main.tid, second.tid), (child.pid, thread_tid));
        assert_eq!(main.regs, regs_at_stop[0]);
        assert_eq!(second.regs, regs_at_stop[1]);
        // The main thread sits in read() (restarted after the dump).
        assert_eq!(main.regs.orig_rax, libc::SYS_read as u64);
        assert_eq!(main.regs.rax, ERESTARTSYS);
        if second.regs.orig_rax == libc::SYS_clock_nanosleep as u64 {
            assert_eq!(second.regs.rax, ERESTART_RESTARTBLOCK);
        }
        assert_eq!(
            (main.nstid.clone(), second.nstid.clone()),
            (vec![child.pid], vec![thread_tid])
        );
        assert_eq!(
            (main.comm.as_str(), second.comm.as_str()),
            ("rich-main", "rich-thread")
        );
        assert!(hex::decode(&main.xsave).expect("hex").len() >= 576);

        // Masks and pending signals.
        assert_eq!(main.sigmask, r[rich::MAIN_MASK]);
        assert_eq!(main.sigmask, bit(libc::SIGUSR2) | bit(RICH_RT_SIG));
        assert_eq!(second.sigmask, r[rich::THREAD_MASK]);
        assert_eq!(second.sigmask, main.sigmask | bit(libc::SIGWINCH));
        assert_eq!(main.pending.len(), 1);
        assert_eq!(siginfo_field(&main.pending[0], 0), libc::SIGUSR2 as u64);
        assert!(second.pending.is_empty());
        assert_eq!(state.signals.shared_pending.len(), 1);
        let shared = &state.signals.shared_pending[0];
        assert_eq!(siginfo_field(shared, 0), RICH_RT_SIG as u64);
        assert_eq!(siginfo_field(shared, 8) as i32, libc::SI_QUEUE);
        assert_eq!(siginfo_field(shared, 24), RICH_RT_VALUE);

        // sigaltstack and tid addresses, per thread.
        assert_eq!(
            main.sigaltstack,
            SigAltStack {
                sp: r[rich::ALTSTACK_SP],
                flags: 0,
                size: RICH_ALTSTACK_SIZE
            }
        );
        assert_eq!(second.sigaltstack.flags, libc::SS_DISABLE);
        assert_eq!(main.clear_child_tid, r[rich::MAIN_TID_ADDR]);
        assert_eq!(second.clear_child_tid, r[rich::THREAD_TID_ADDR]);
        assert_ne!(main.clear_child_tid, second.clear_child_tid);
        for t in [main, second] {
            if let Some(rseq) = t.rseq {
                assert_eq!(rseq.signature, GLIBC_RSEQ_SIG);
                assert!(rseq.abi_size >= 20);
            }
        }

        // Sigactions.
        let actions = &state.signals.actions;
        assert_eq!(actions.len(), 64);
        let usr1 = actions[libc::SIGUSR1 as usize - 1];
        assert_eq!(usr1.handler, r[rich::HANDLER]);
        assert_eq!(usr1.restorer, r[rich::RESTORER]);
        assert_eq!(usr1.mask, bit(libc::SIGWINCH));
        let want = (libc::SA_RESTART | libc::SA_ONSTACK) as u64;
        assert_eq!(usr1.flags & want, want);
        assert_eq!(actions[libc::SIGTERM as usize - 1].handler, 1, "SIG_IGN");
        assert_eq!(actions[libc::SIGKILL as usize - 1].handler, 0);
        assert_eq!(actions[libc::SIGCHLD as usize - 1].handler, 0);

        // Process-wide values.
        assert_eq!(state.itimers.real[0], 1_000_000_000);
        assert!(state.itimers.real[1] > 0 && state.itimers.real[1] <= 500_000_000);
        assert_eq!(state.itimers.virt[0], 3_250_000);
        // CPU-time timers are kept in ticks: the kernel may round up by one (≤ 10 ms).
        assert!(
            state.itimers.virt[1] > 0 && state.itimers.virt[1] <= 7_010_000,
            "{:?}",
            state.itimers
        );
        assert_eq!(state.itimers.prof, [0, 0]);
        assert_eq!(state.brk, r[rich::BRK]);
        assert_eq!(state.securebits as u64, r[rich::SECUREBITS]);
        assert!(state.seccomp_filters.is_empty());

        tree.detach().expect("detach");
        assert_eq!(tracer_pid(child.pid), 0);
        assert_eq!(tracer_pid(thread_tid), 0);
        assert_eq!(maps(child.pid), maps_before);
        // The sleeping thread's nanosleep completed normally...
        assert_eq!(child.recv(1), b"S");
        // ...the read() restarted and returns the byte sent now...
        child.send(b"a");
        assert_eq!(child.recv_skipping(b"S"), b'R');
        assert_eq!(child.recv(2), [1, b'a']);
        // ...and the handler still works.
        ptrace::tgkill(child.pid, child.pid, libc::SIGUSR1).expect("tgkill");
        assert_eq!(child.recv_skipping(b"S"), b'H');
    }

    #[test]
    fn seccomp_filters_are_read_and_do_not_block_injection() {
        let child = Child::spawn(seccomp_body);
        assert_eq!(
            child.recv(2),
            [b'F', 1],
            "child's own getitimer must be denied"
        );
        assert_eq!(child.recv(1), b"r");
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        // getitimer is denied to the task, yet the injected one works.
        let state = collect(&tree, child.pid, &[]).expect("collect");
        let [allow, deny] = seccomp_programs();
        assert_eq!(
            state.seccomp_filters,
            vec![
                hex::encode(seccomp_bytes(&allow)),
                hex::encode(seccomp_bytes(&deny))
            ]
        );
        assert_eq!(state.itimers.real, [0, 0]);
        tree.detach().expect("detach");
        child.send(b"b");
        assert_eq!(child.recv(3), [b'R', 1, b'b']);
    }

    #[test]
    fn group_stopped_process_is_collected_and_stays_stopped() {
        let child = Child::spawn(crate::sys::ptrace::test_children::echo_body);
        assert_eq!(child.recv(1), b"r");
        // Asleep in read() first, so the stop interrupts that read.
        wait_state(child.pid, 'S');
        ptrace::kill(child.pid, libc::SIGSTOP).expect("SIGSTOP");
        wait_state(child.pid, 'T');
        let maps_before = maps(child.pid);
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let state = collect(&tree, child.pid, &[]).expect("collect");
        assert_eq!(state.threads.len(), 1);
        assert_eq!(state.threads[0].regs.orig_rax, libc::SYS_read as u64);
        tree.detach().expect("detach");
        wait_state(child.pid, 'T');
        assert_eq!(maps(child.pid), maps_before);
        ptrace::kill(child.pid, libc::SIGCONT).expect("SIGCONT");
        child.send(b"g");
        assert_eq!(child.recv(3), [b'R', 1, b'g']);
    }

    #[test]
    fn collecting_a_pid_outside_the_tree_fails() {
        let child = Child::spawn(crate::sys::ptrace::test_children::echo_body);
        assert_eq!(child.recv(1), b"r");
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let me = std::process::id() as i32;
        let err = collect(&tree, me, &[]).expect_err("must fail");
        assert_eq!(
            err.to_string(),
            format!("pid {me} is not part of the seized tree")
        );
        tree.detach().expect("detach");
    }
}
