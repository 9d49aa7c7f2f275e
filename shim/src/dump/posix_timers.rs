//! POSIX timers (`timer_create`) of a dumped process: their identity from
//! `/proc/PID/timers` (id, signal and `sigev_value`, notify kind and target,
//! clock), their time left, interval and overrun from `timer_gettime` /
//! `timer_getoverrun` injected into the task (`task_state`). Everything
//! restore checks about them (`image::reader::check_posix_timers`) is
//! checked here too, so no image restore would refuse is written.

use crate::image::reader::{posix_timer_clock_is_absolute, POSIX_TIMER_CLOCKS};
use crate::image::types::{PosixTimer, SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD_ID};
use crate::sys::procfs::{ProcPosixTimer, TimerNotify};

use super::task_state::TimerReading;

/// Lists every timer of `pid` restore cannot create again, naming its id
/// and why (a CPU-time clock, a notify kind the kernel should not show).
pub fn refuse_unsupported(pid: i32, timers: &[ProcPosixTimer], refusals: &mut Vec<String>) {
    for t in timers {
        if !POSIX_TIMER_CLOCKS.contains(&t.clockid) {
            refusals.push(format!(
                "pid {pid} has POSIX timer {} on clock {} (CPU-time and alarm clocks): not supported",
                t.id, t.clockid
            ));
        }
        if t.notify == TimerNotify::Thread {
            refusals.push(format!(
                "pid {pid} has POSIX timer {} with SIGEV_THREAD: not supported",
                t.id
            ));
        }
    }
}

/// The image's record of each timer: identity from /proc, times from the
/// task. A timer on CLOCK_REALTIME or CLOCK_TAI gets its absolute expiry,
/// read against its clock now (the tree is stopped, so the time left does
/// not run on meanwhile).
pub fn records(timers: &[ProcPosixTimer], readings: &[TimerReading]) -> Vec<PosixTimer> {
    let mut out: Vec<PosixTimer> = timers
        .iter()
        .zip(readings)
        .map(|(t, r)| {
            let notify = match (t.notify, t.thread_id) {
                (TimerNotify::None, _) => SIGEV_NONE,
                (_, true) => SIGEV_THREAD_ID,
                _ => SIGEV_SIGNAL,
            };
            let armed = r.value != (0, 0);
            let expires = (armed && posix_timer_clock_is_absolute(t.clockid))
                .then(|| crate::sys::process::clock_now(t.clockid))
                .flatten()
                .map(|now| add_timespec(now, r.value));
            PosixTimer {
                id: t.id,
                clockid: t.clockid,
                notify,
                signo: t.signo,
                sigev_value: t.sigev_value,
                thread: (notify == SIGEV_THREAD_ID).then_some(t.target),
                value: r.value,
                interval: r.interval,
                expires,
                overrun: r.overrun,
            }
        })
        .collect();
    out.sort_by_key(|t| t.id);
    out
}

fn add_timespec(a: (i64, i64), b: (i64, i64)) -> (i64, i64) {
    let ns = a.1 + b.1;
    (a.0 + b.0 + ns / 1_000_000_000, ns % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_timer(id: i32, clockid: i32, notify: TimerNotify, thread_id: bool) -> ProcPosixTimer {
        ProcPosixTimer {
            id,
            signo: 34,
            sigev_value: 0x10,
            notify,
            thread_id,
            target: 77,
            clockid,
        }
    }

    #[test]
    fn records_map_notify_kinds_and_absolute_clocks() {
        let timers = [
            proc_timer(5, libc::CLOCK_REALTIME, TimerNotify::Signal, false),
            proc_timer(1, libc::CLOCK_MONOTONIC, TimerNotify::Signal, true),
            proc_timer(2, libc::CLOCK_BOOTTIME, TimerNotify::None, false),
        ];
        let reading = |id| TimerReading {
            id,
            value: (1, 500),
            interval: (0, 100),
            overrun: 3,
        };
        let got = records(&timers, &[reading(5), reading(1), reading(2)]);
        assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 2, 5]);
        assert_eq!((got[0].notify, got[0].thread), (SIGEV_THREAD_ID, Some(77)));
        assert_eq!((got[1].notify, got[1].thread), (SIGEV_NONE, None));
        assert_eq!((got[2].notify, got[2].thread), (SIGEV_SIGNAL, None));
        assert!(got[0].expires.is_none() && got[1].expires.is_none());
        let now = crate::sys::process::clock_now(libc::CLOCK_REALTIME).expect("clock");
        let at = got[2].expires.expect("realtime expiry");
        assert!(at.0 >= now.0 && at.0 <= now.0 + 2, "{at:?} vs {now:?}");
        assert_eq!(got[2].overrun, 3);
    }

    #[test]
    fn cpu_clocks_and_sigev_thread_are_refused() {
        let mut refusals = Vec::new();
        refuse_unsupported(
            9,
            &[
                proc_timer(0, libc::CLOCK_PROCESS_CPUTIME_ID, TimerNotify::Signal, false),
                proc_timer(1, libc::CLOCK_MONOTONIC, TimerNotify::Thread, false),
                proc_timer(2, libc::CLOCK_MONOTONIC, TimerNotify::Signal, false),
            ],
            &mut refusals,
        );
        assert_eq!(refusals.len(), 2, "{refusals:?}");
        assert!(refusals[0].contains("pid 9 has POSIX timer 0 on clock 2"));
        assert!(refusals[1].contains("POSIX timer 1 with SIGEV_THREAD"));
    }
}
