//! Signal state of a restored process that the runtime sets before jumping
//! into the blob: dispositions (`rt_sigaction`), pending signals
//! (`rt_sigqueueinfo` / `rt_tgsigqueueinfo` to itself) and interval timers.
//!
//! Every function acts on the calling process, which must be the restored
//! process itself, single-threaded, with every signal blocked (the blob's
//! `rt_sigreturn` installs each thread's real mask). Blocking matters twice:
//! handlers point into the target layout that does not exist yet, and a
//! queued signal must stay queued until the target code runs.
//!
//! Not restored here: pending signals of threads other than the leader (the
//! blob clones those threads and each queues its own, see
//! [`other_thread_pending`]), sigaltstack and masks (blob).

use crate::image::types::ProcessImage;
use crate::sys::restore_sys::{self, Itimer, KernelSigaction, SIGINFO_SIZE};

/// Highest signal number on x86_64 (SIGRTMAX).
pub const NSIG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("pid {pid}: image has {found} sigactions, expected {NSIG}")]
    ActionCount { pid: i32, found: usize },
    #[error("pid {pid}: rt_sigaction of signal {signal}: {source}")]
    Sigaction {
        pid: i32,
        signal: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} tid {tid}: pending siginfo #{index} is not {SIGINFO_SIZE} bytes of hex: {detail}")]
    BadSiginfo {
        pid: i32,
        tid: i32,
        index: usize,
        detail: String,
    },
    #[error("pid {pid} tid {tid}: pending siginfo #{index} names signal {signal}, not 1..=64")]
    BadSignal {
        pid: i32,
        tid: i32,
        index: usize,
        signal: i32,
    },
    #[error("not supported: pid {pid} tid {tid}: pending signal {signal} (SIGKILL/SIGSTOP cannot be re-queued)")]
    UnqueueableSignal { pid: i32, tid: i32, signal: i32 },
    #[error("pid {pid}: queueing pending signal {signal} ({queue}): {source}")]
    Queue {
        pid: i32,
        signal: i32,
        queue: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid}: setitimer {which:?} (interval {interval_us} us, value {value_us} us): {source}"
    )]
    Itimer {
        pid: i32,
        which: Itimer,
        interval_us: u64,
        value_us: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the image's disposition of every signal 1..=64 but SIGKILL and
/// SIGSTOP, exactly as dumped (handler, flags, restorer, mask), with the raw
/// syscall: no libc wrapper adds SA_RESTORER, and signals 32/33 (reserved by
/// glibc for itself) are restored too.
pub fn restore_sigactions(pid: i32, image: &ProcessImage) -> Result<(), SignalError> {
    let actions = &image.signals.actions;
    if actions.len() != NSIG {
        return Err(SignalError::ActionCount {
            pid,
            found: actions.len(),
        });
    }
    for (i, a) in actions.iter().enumerate() {
        let signal = i as i32 + 1;
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let act = KernelSigaction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        restore_sys::rt_sigaction(signal, Some(&act)).map_err(|source| SignalError::Sigaction {
            pid,
            signal,
            source,
        })?;
    }
    Ok(())
}

/// One decoded pending siginfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSignal {
    pub signal: i32,
    pub info: [u8; SIGINFO_SIZE],
}

/// Decodes a queue of 128-byte siginfo hex strings (of thread `tid`, for errors).
pub fn decode_queue(
    pid: i32,
    tid: i32,
    queue: &[String],
) -> Result<Vec<PendingSignal>, SignalError> {
    queue
        .iter()
        .enumerate()
        .map(|(index, hex_info)| {
            let bytes = hex::decode(hex_info).map_err(|e| SignalError::BadSiginfo {
                pid,
                tid,
                index,
                detail: e.to_string(),
            })?;
            let info: [u8; SIGINFO_SIZE] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| SignalError::BadSiginfo {
                        pid,
                        tid,
                        index,
                        detail: format!("{} bytes", bytes.len()),
                    })?;
            // si_signo is the first int of a siginfo.
            let signal = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
            if !(1..=NSIG as i32).contains(&signal) {
                return Err(SignalError::BadSignal {
                    pid,
                    tid,
                    index,
                    signal,
                });
            }
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                return Err(SignalError::UnqueueableSignal { pid, tid, signal });
            }
            Ok(PendingSignal { signal, info })
        })
        .collect()
}

/// Thread-directed pending signals of every thread but the leader, by tid,
/// for the blob to queue once it cloned the threads (threads with none are
/// left out). Only the thread itself may queue a siginfo with `si_code >= 0`
/// or `SI_TKILL` onto itself, and these threads exist only in the blob.
pub fn other_thread_pending(
    pid: i32,
    image: &ProcessImage,
) -> Result<Vec<(i32, Vec<PendingSignal>)>, SignalError> {
    let mut out = Vec::new();
    for t in image.threads.iter().skip(1) {
        let queue = decode_queue(pid, t.tid, &t.pending)?;
        if !queue.is_empty() {
            out.push((t.tid, queue));
        }
    }
    Ok(out)
}

/// Re-queues the process-wide pending signals (oldest first, siginfo as
/// dumped) with `rt_sigqueueinfo` to itself, and the leader thread's own
/// pending signals with `rt_tgsigqueueinfo` to itself. The kernel lets a
/// process queue any `si_code` (also SI_USER/SI_KERNEL ones) to itself,
/// which it refuses for another process. Must run in the restored
/// process's only thread, with every signal blocked; pending signals of
/// other threads are the blob's (see [`other_thread_pending`]).
///
/// Call it after [`restore_sigactions`]: installing SIG_IGN discards that
/// signal's pending instances, even blocked ones (a blocked signal pending
/// under SIG_IGN is a legal dumped state). Queueing SIGCONT discards pending
/// stop signals and vice versa (the kernel's generation rules), so an image
/// pending both loses one.
pub fn queue_pending(pid: i32, image: &ProcessImage) -> Result<(), SignalError> {
    let shared = decode_queue(pid, pid, &image.signals.shared_pending)?;
    let leader = match image.threads.first() {
        Some(t) => decode_queue(pid, t.tid, &t.pending)?,
        None => Vec::new(),
    };
    for s in &shared {
        restore_sys::sigqueue_self(s.signal, &s.info).map_err(|source| SignalError::Queue {
            pid,
            signal: s.signal,
            queue: "process-wide",
            source,
        })?;
    }
    for s in &leader {
        restore_sys::sigqueue_self_thread(s.signal, &s.info).map_err(|source| {
            SignalError::Queue {
                pid,
                signal: s.signal,
                queue: "leader thread",
                source,
            }
        })?;
    }
    Ok(())
}

/// Arms ITIMER_REAL, ITIMER_VIRTUAL and ITIMER_PROF with the image's
/// (interval, remaining value) in microseconds; a zero value leaves a timer
/// disarmed. Timers are per process and not inherited by fork, so each
/// restored process sets its own, as late as possible: the remaining time
/// counts from this call (REAL) or from the runtime's CPU time (VIRTUAL, PROF),
/// and the kernel adds one tick to a CPU timer's value.
pub fn set_itimers(pid: i32, image: &ProcessImage) -> Result<(), SignalError> {
    let t = &image.itimers;
    for (which, [interval_us, value_us]) in [
        (Itimer::Real, t.real),
        (Itimer::Virtual, t.virt),
        (Itimer::Prof, t.prof),
    ] {
        restore_sys::set_itimer(which, interval_us, value_us).map_err(|source| {
            SignalError::Itimer {
                pid,
                which,
                interval_us,
                value_us,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "signals_tests.rs"]
mod tests;
