//! `cowsnap dump` runs the engine in a child process of its own. A tracer
//! that dies while a syscall is injected in a tracee leaves that tracee
//! running on the injected registers, so the process a user (or a shim) may
//! kill must not be the tracer. The engine child gets SIGTERM when its
//! parent dies (PR_SET_PDEATHSIG) and then stops at its next safe point:
//! it puts back the registers of the task it works on, detaches every task,
//! thaws the cgroup and removes the partial image, exactly as on Ctrl-C.
//!
//! A thread of the engine also traces the supervisor's main thread (never
//! stopping it on its own: it only passes signals on and keeps group
//! stops). A traced process that dies stays a zombie that only its tracer
//! sees, and the kernel hands it to its real parent when the tracer lets
//! go: here when the engine exits, after its cleanup. So once the `cowsnap
//! dump` a user ran has been reaped, even after SIGKILL, the tree runs
//! untraced and no partial image is left. (If the engine itself is
//! SIGKILLed, the kernel detaches the tree at once and the watchdog removes
//! the partial image and thaws the cgroup shortly after.)

use std::io::{Read, Write};
use std::time::Duration;

use crate::engine_error::{EngineError, ErrorKind};
use crate::sys::clone::{self, Forked};
use crate::sys::interrupt::{interrupted, InterruptGuard};
use crate::sys::ptrace;

use super::{dump, DumpError, DumpOptions, DumpSummary};

/// Runs [`dump`] in a child process and returns its result; SIGINT/SIGTERM
/// to this process are passed on to the engine, which then cleans up.
pub fn dump_supervised(options: &DumpOptions) -> Result<DumpSummary, DumpError> {
    let (reader, writer) = std::io::pipe().map_err(DumpError::Supervisor)?;
    let parent = std::process::id() as i32;
    let engine = match clone::clone3(&[], false)
        .map_err(|e| DumpError::Supervisor(std::io::Error::other(e)))?
    {
        Forked::Child => {
            drop(reader);
            engine(options, parent, writer)
        }
        Forked::Parent(pid) => pid,
    };
    drop(writer);
    let _guard = InterruptGuard::install().map_err(DumpError::Supervisor)?;
    // Read the engine's answer on another thread so this one can pass
    // interrupts on while waiting.
    let answer = std::thread::spawn(move || {
        let mut reader = reader;
        let mut text = String::new();
        reader.read_to_string(&mut text).map(|_| text)
    });
    let mut forwarded = false;
    let status = loop {
        if interrupted() && !forwarded {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(engine),
                nix::sys::signal::Signal::SIGTERM,
            );
            forwarded = true;
        }
        match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(engine),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(status) => break status,
            Err(e) => return Err(DumpError::Supervisor(std::io::Error::from(e))),
        }
    };
    let text = answer
        .join()
        .map_err(|_| DumpError::Supervisor(std::io::Error::other("reader thread panicked")))?
        .map_err(DumpError::Supervisor)?;
    match serde_json::from_str::<Result<DumpSummary, EngineError>>(&text) {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err(error)) => Err(DumpError::Engine(error)),
        Err(_) => Err(DumpError::Engine(EngineError::new(
            ErrorKind::Internal,
            format!(
                "dump of pid {}: the dump engine (cowsnap's child, pid {engine}) ended without an answer: {status:?}",
                options.pid
            ),
        ))),
    }
}

/// The engine child: dumps, writes its result as JSON to `answer`, exits.
fn engine(options: &DumpOptions, parent: i32, mut answer: std::io::PipeWriter) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if nix::unistd::getppid().as_raw() != parent {
        clone::exit_now(1); // the parent died before PDEATHSIG was armed
    }
    hold_supervisor(parent);
    let result = dump(options).map_err(|e| EngineError::of(&e));
    let code = i32::from(result.is_err());
    if let Ok(text) = serde_json::to_string(&result) {
        let _ = answer.write_all(text.as_bytes());
    }
    clone::exit_now(code)
}

/// Traces `supervisor` from a thread of this engine that lives as long as
/// the engine does (see the module doc), and returns once the hold is in
/// place. Best effort: a supervisor that cannot be traced (already traced,
/// Yama's ptrace_scope 3) is not held, and its reap may then come before
/// the engine's cleanup.
fn hold_supervisor(supervisor: i32) {
    let (held, hold_started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let seized = ptrace::seize_plain(supervisor).is_ok();
        let _ = held.send(());
        // Not seized, no longer ours, or waitid failed: nothing left to do,
        // but leaving the thread would end the hold (a tracer thread's
        // exit detaches its tracees).
        if seized {
            while let Ok(Some(status)) = ptrace::wait_stop_never_reap(supervisor) {
                pass_on(supervisor, status);
            }
        }
        loop {
            std::thread::park();
        }
    });
    let _ = hold_started.recv_timeout(Duration::from_secs(5));
}

/// Lets the held supervisor go on from a ptrace stop as if untraced: a
/// signal is delivered, a group stop (SIGSTOP, SIGTSTP, ...) is kept.
fn pass_on(supervisor: i32, status: i32) {
    let (sig, event) = (status & 0xff, status >> 8);
    let stop_signal = [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig);
    // ESRCH: killed meanwhile; the next wait blocks until the engine exits.
    let _ = match event {
        // A SIGCONT sent after the stop signal already cancelled it for an
        // untraced process (SIGCONT discards pending stop signals); a
        // traced one would stop after it and stay stopped.
        0 if stop_signal && sigcont_pending(supervisor) => ptrace::cont(supervisor, 0),
        0 => ptrace::cont(supervisor, sig),
        libc::PTRACE_EVENT_STOP if stop_signal => ptrace::listen(supervisor),
        _ => ptrace::cont(supervisor, 0),
    };
}

/// Whether SIGCONT is pending for the main thread of `pid` (its own queue
/// or its process's), from `/proc/PID/task/PID/status`.
fn sigcont_pending(pid: i32) -> bool {
    let path = format!("/proc/{pid}/task/{pid}/status");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & (1 << (libc::SIGCONT - 1)) != 0)
}
