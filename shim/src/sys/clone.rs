//! `clone3` with `set_tid`: create a process with a chosen pid, optionally in
//! a new pid namespace. The caller must be single-threaded at the call (the
//! child is a copy of the calling thread only).

use std::io;

/// `struct clone_args` of `<linux/sched.h>` (size ver 2, with set_tid and cgroup).
#[repr(C)]
#[derive(Default)]
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
    cgroup: u64,
}

/// Which side of a fork we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent: the child's pid as the parent sees it.
    Parent(i32),
    Child,
}

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("clone3 with pid {pid:?}: pid is taken")]
    PidTaken { pid: Vec<i32> },
    #[error("clone3 with pid {pid:?} (new pid namespace: {new_ns}): {source}")]
    Failed {
        pid: Vec<i32>,
        new_ns: bool,
        #[source]
        source: io::Error,
    },
}

/// Forks with `set_tid` (innermost namespace first; empty: any pid) and
/// SIGCHLD as exit signal; with `new_pid_ns` the child is the init of a new
/// pid namespace (then `set_tid[0]` must be 1).
pub fn clone3(set_tid: &[i32], new_pid_ns: bool) -> Result<Forked, CloneError> {
    clone3_flags(
        set_tid,
        if new_pid_ns {
            libc::CLONE_NEWPID as u64
        } else {
            0
        },
    )
}

/// [`clone3`] with `CLONE_PARENT`: the child is a sibling of the caller
/// (its parent is the caller's parent), with a copy of the caller's
/// address space. The caller must not be a pid namespace's init.
pub fn clone3_sibling(set_tid: &[i32]) -> Result<Forked, CloneError> {
    clone3_flags(set_tid, libc::CLONE_PARENT as u64)
}

fn clone3_flags(set_tid: &[i32], flags: u64) -> Result<Forked, CloneError> {
    let new_pid_ns = flags & libc::CLONE_NEWPID as u64 != 0;
    let mut args = CloneArgs {
        flags,
        // With CLONE_PARENT the kernel takes the caller's exit signal
        // (SIGCHLD, as every process here has) and refuses another.
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        ..CloneArgs::default()
    };
    if !set_tid.is_empty() {
        args.set_tid = set_tid.as_ptr() as u64;
        args.set_tid_size = set_tid.len() as u64;
    }
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a copy
    // of the address space and continues from here with return value 0;
    // `args` and `set_tid` outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        0 => Ok(Forked::Child),
        pid if pid > 0 => Ok(Forked::Parent(pid as i32)),
        _ => {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EEXIST) {
                Err(CloneError::PidTaken {
                    pid: set_tid.to_vec(),
                })
            } else {
                Err(CloneError::Failed {
                    pid: set_tid.to_vec(),
                    new_ns: new_pid_ns,
                    source,
                })
            }
        }
    }
}

/// This process's pid in the outermost pid namespace visible through /proc
/// (the first `NSpid:` entry of /proc/self/status).
pub fn outer_pid() -> io::Result<i32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/self/status: no NSpid line",
            )
        })
}

/// Exits immediately without running destructors or atexit handlers (a
/// forked copy of the runtime must not flush the parent's buffers twice).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}
