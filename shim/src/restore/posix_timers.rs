//! POSIX timers: each is handed to the restorer blob, which creates it
//! with its id once every thread exists (a SIGEV_THREAD_ID target must)
//! and arms it once past the barrier, so its time runs from the release.
//!
//! The downtime rule ([`PosixTimer`]): a timer on CLOCK_REALTIME or
//! CLOCK_TAI is armed with TIMER_ABSTIME at its recorded expiry (if that
//! passed meanwhile it fires at once, and a periodic one reports the
//! intervals missed since as the overrun of that first signal, as the
//! kernel counts them); one on CLOCK_MONOTONIC or CLOCK_BOOTTIME is armed
//! relative with the time it had left. A timer whose signal was pending at
//! dump gets that signal back as a queued siginfo (`signals`, the blob's
//! per-thread queues), delivered once after the release; the timer itself
//! goes on from its recorded time left (the kernel already counted the
//! next expiry). The overrun count is not restorable: `timer_getoverrun`
//! reads 0 until the restored timer's first signal.

use crate::image::types::{PosixTimer, ProcessImage, ThreadImage};
use crate::image::Image;

use super::blob::abi;
use super::blob::BlobArgs;
use super::exec::RestoreError;

const TIMER_ABSTIME: i32 = 1;

/// Refuses an image with timers on a kernel that cannot give them their
/// ids back, before anything is created.
pub fn refuse_without_kernel_support(image: &Image) -> Result<(), RestoreError> {
    let Some(p) = image.processes.iter().find(|p| !p.posix_timers.is_empty()) else {
        return Ok(());
    };
    match crate::sys::restore_sys::timer_create_restore_ids() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err(RestoreError::NotSupported(format!(
                "pid {} has POSIX timer(s) {}, and this kernel cannot create a timer with a \
                 given id (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+)",
                p.pid,
                p.posix_timers
                    .iter()
                    .map(|t| t.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        Err(e) => Err(RestoreError::NotSupported(format!(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS): {e}"
        ))),
    }
}

/// The blob's entry for timer `t`; `own_tid` gives a thread's tid in the
/// restored process's own pid namespace.
pub fn blob_entry(
    pid: i32,
    t: &PosixTimer,
    threads: &[ThreadImage],
    own_tid: impl Fn(&ThreadImage) -> i32,
) -> Result<abi::PosixTimer, String> {
    let notify_tid = match t.thread {
        Some(tid) => threads
            .iter()
            .find(|th| th.tid == tid)
            .map(&own_tid)
            .ok_or_else(|| format!("pid {pid} POSIX timer {}: no thread {tid}", t.id))?,
        None => 0,
    };
    let (settime_flags, value) = match t.expires {
        Some(at) => (TIMER_ABSTIME, at),
        None => (0, t.value),
    };
    let ts = |(sec, nsec): (i64, i64)| abi::Timespec { sec, nsec };
    Ok(abi::PosixTimer {
        id: t.id,
        clockid: t.clockid,
        notify: t.notify,
        signo: t.signo,
        sigev_value: t.sigev_value,
        notify_tid,
        settime_flags,
        interval: ts(t.interval),
        value: ts(value),
    })
}

/// Hands every timer of `image` to the blob.
pub fn push(
    image: &ProcessImage,
    own_tid: impl Fn(&ThreadImage) -> i32,
    args: &mut BlobArgs,
) -> Result<(), String> {
    for t in &image.posix_timers {
        args.push_posix_timer(blob_entry(image.pid, t, &image.threads, &own_tid)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::types::{SIGEV_SIGNAL, SIGEV_THREAD_ID};

    fn thread(tid: i32, nstid: Vec<i32>) -> ThreadImage {
        ThreadImage {
            tid,
            nstid,
            regs: Default::default(),
            xsave: String::new(),
            sigmask: 0,
            pending: vec![],
            sigaltstack: Default::default(),
            clear_child_tid: 0,
            rseq: None,
            comm: String::new(),
        }
    }

    fn timer(id: i32) -> PosixTimer {
        PosixTimer {
            id,
            clockid: libc::CLOCK_MONOTONIC,
            notify: SIGEV_THREAD_ID,
            signo: 40,
            sigev_value: 9,
            thread: Some(501),
            value: (1, 2),
            interval: (3, 4),
            expires: None,
            overrun: 5,
        }
    }

    #[test]
    fn relative_timer_targets_the_thread_in_its_own_namespace() {
        let threads = [thread(500, vec![500, 1]), thread(501, vec![501, 2])];
        let e = blob_entry(500, &timer(7), &threads, |t| *t.nstid.last().unwrap()).expect("entry");
        assert_eq!(
            (e.id, e.notify, e.notify_tid, e.signo),
            (7, SIGEV_THREAD_ID, 2, 40)
        );
        assert_eq!(e.settime_flags, 0);
        assert_eq!(
            (e.value, e.interval),
            (
                abi::Timespec { sec: 1, nsec: 2 },
                abi::Timespec { sec: 3, nsec: 4 }
            )
        );
    }

    #[test]
    fn absolute_timer_is_armed_at_its_expiry() {
        let mut t = timer(1);
        t.clockid = libc::CLOCK_REALTIME;
        t.notify = SIGEV_SIGNAL;
        t.thread = None;
        t.expires = Some((1_900_000_000, 6));
        let e = blob_entry(500, &t, &[], |t| t.tid).expect("entry");
        assert_eq!((e.settime_flags, e.notify_tid), (TIMER_ABSTIME, 0));
        assert_eq!(
            e.value,
            abi::Timespec {
                sec: 1_900_000_000,
                nsec: 6
            }
        );
    }

    #[test]
    fn a_target_that_is_no_thread_is_an_error() {
        let err = blob_entry(500, &timer(3), &[thread(500, vec![500])], |t| t.tid)
            .expect_err("no thread 501");
        assert_eq!(err, "pid 500 POSIX timer 3: no thread 501");
    }
}
