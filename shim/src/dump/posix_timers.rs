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
            // The kernel shows a CPU-time clock in its own encoding
            // (negative: CLOCK_PROCESS_CPUTIME_ID is -6).
            let clock = if t.clockid < 0 {
                format!("a CPU-time clock ({})", t.clockid)
            } else {
                format!("clock {}", t.clockid)
            };
            refusals.push(format!(
                "pid {pid} has POSIX timer {} on {clock}: not supported (timers on \
                 CLOCK_REALTIME, MONOTONIC, BOOTTIME and TAI are)",
                t.id
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
/// task (matched by id; a timer without a reading is left out, which the
/// caller never lets happen: it reads every id /proc listed). A timer on CLOCK_REALTIME or CLOCK_TAI gets its absolute expiry,
/// read against its clock now (the tree is stopped, so the time left does
/// not run on meanwhile).
pub fn records(timers: &[ProcPosixTimer], readings: &[TimerReading]) -> Vec<PosixTimer> {
    let mut out: Vec<PosixTimer> = timers
        .iter()
        .filter_map(|t| Some((t, readings.iter().find(|r| r.id == t.id)?)))
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

    /// A child with a SIGEV_NONE periodic timer (10 s, then every 2 s) and
    /// a disarmed SIGEV_SIGNAL one on CLOCK_REALTIME, then blocked in read().
    fn timers_body(io: &crate::sys::ptrace::test_children::Io) -> i32 {
        // SAFETY (test child): raw libc calls with valid arguments.
        unsafe {
            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_NONE;
            let mut first: libc::timer_t = std::ptr::null_mut();
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut first);
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 2,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: 10,
                    tv_nsec: 0,
                },
            };
            libc::timer_settime(first, 0, &spec, std::ptr::null_mut());
            ev.sigev_notify = libc::SIGEV_SIGNAL;
            ev.sigev_signo = libc::SIGUSR2;
            let mut second: libc::timer_t = std::ptr::null_mut();
            libc::timer_create(libc::CLOCK_REALTIME, &mut ev, &mut second);
        }
        crate::sys::ptrace::test_children::echo_body(io)
    }

    #[test]
    fn time_left_interval_and_overrun_are_read_in_the_task() {
        use crate::dump::seize::SeizedTree;
        use crate::sys::ptrace::test_children::Child;
        let child = Child::spawn(timers_body);
        assert_eq!(child.recv(1), b"r");
        let proc = crate::sys::procfs::read_posix_timers(child.pid).expect("timers");
        let mut ids: Vec<i32> = proc.iter().map(|t| t.id).collect();
        ids.sort();
        assert_eq!(ids, [0, 1]);
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let state = crate::dump::task_state::collect(&tree, child.pid, &ids).expect("collect");
        tree.detach().expect("detach");
        let got = records(&proc, &state.posix_timers);
        assert_eq!(got.len(), 2);
        let (periodic, disarmed) = (&got[0], &got[1]);
        assert_eq!(
            (periodic.notify, periodic.clockid),
            (SIGEV_NONE, libc::CLOCK_MONOTONIC)
        );
        assert_eq!(periodic.interval, (2, 0));
        assert!(
            periodic.value.0 >= 8 && periodic.value.0 < 10,
            "time left {:?}",
            periodic.value
        );
        assert_eq!(periodic.overrun, 0);
        assert_eq!(
            (disarmed.notify, disarmed.signo, disarmed.clockid),
            (SIGEV_SIGNAL, libc::SIGUSR2, libc::CLOCK_REALTIME)
        );
        assert_eq!((disarmed.value, disarmed.interval), ((0, 0), (0, 0)));
        assert!(disarmed.expires.is_none(), "disarmed: no expiry");
        // The injections left the child working: its read() restarted.
        child.send(b"t");
        assert_eq!(child.recv(3), [b'R', 1, b't']);
    }

    #[test]
    fn cpu_clocks_and_sigev_thread_are_refused() {
        let mut refusals = Vec::new();
        refuse_unsupported(
            9,
            &[
                proc_timer(0, -6, TimerNotify::Signal, false),
                proc_timer(1, libc::CLOCK_MONOTONIC, TimerNotify::Thread, false),
                proc_timer(2, libc::CLOCK_MONOTONIC, TimerNotify::Signal, false),
            ],
            &mut refusals,
        );
        assert_eq!(refusals.len(), 2, "{refusals:?}");
        assert!(refusals[0].contains("pid 9 has POSIX timer 0 on a CPU-time clock (-6)"));
        assert!(refusals[1].contains("POSIX timer 1 with SIGEV_THREAD"));
    }
}
