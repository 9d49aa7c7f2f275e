//! `cowsnap dump` runs the engine in a child process of its own. A tracer
//! that dies while a syscall is injected in a tracee leaves that tracee
//! running on the injected registers, so the process a user (or a shim) may
//! kill must not be the tracer. The engine child gets SIGTERM when its
//! parent dies (PR_SET_PDEATHSIG) and then stops at its next safe point:
//! it puts back the registers of the task it works on, detaches every task,
//! thaws the cgroup and removes the partial image, exactly as on Ctrl-C.

use std::io::{Read, Write};
use std::time::Duration;

use crate::sys::clone::{self, Forked};
use crate::sys::interrupt::{interrupted, InterruptGuard};

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
    match serde_json::from_str::<Result<DumpSummary, String>>(&text) {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err(message)) => Err(DumpError::Engine(message)),
        Err(_) => Err(DumpError::Engine(format!(
            "dump of pid {}: the dump engine (cowsnap's child, pid {engine}) ended without an answer: {status:?}",
            options.pid
        ))),
    }
}

/// The engine child: dumps, writes its result as JSON to `answer`, exits.
fn engine(options: &DumpOptions, parent: i32, mut answer: std::io::PipeWriter) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if nix::unistd::getppid().as_raw() != parent {
        clone::exit_now(1); // the parent died before PDEATHSIG was armed
    }
    let result = dump(options).map_err(|e| e.to_string());
    let code = i32::from(result.is_err());
    if let Ok(text) = serde_json::to_string(&result) {
        let _ = answer.write_all(text.as_bytes());
    }
    clone::exit_now(code)
}
