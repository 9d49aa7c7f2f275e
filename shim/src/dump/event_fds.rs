//! Event fds of a dumped tree: eventfds (each once, by the kernel's
//! `eventfd-id`), signalfds, timerfds and inotify instances (numbered by
//! kcmp, see [`super::epoll::number_by_file`]), with their state from the
//! first holder's fdinfo. Reads only.

use std::collections::BTreeMap;

use crate::image::sockets::{
    EventfdImage, InotifyImage, InotifyWatch, SignalfdImage, TimerfdImage,
};
use crate::image::types::{Fd, FdKind};
use crate::sys::procfs::{
    read_eventfd_fdinfo, read_signalfd_fdinfo, read_timerfd_fdinfo, ProcfsError,
};

use super::epoll::{number_by_file, EpollError};

/// Every eventfd `tables` hold, in id order.
pub fn collect(tables: &[(i32, Vec<Fd>)]) -> Result<Vec<EventfdImage>, ProcfsError> {
    let mut first: BTreeMap<u64, (i32, &Fd)> = BTreeMap::new();
    for (pid, fds) in tables {
        for fd in fds {
            if let FdKind::Eventfd { id } = fd.kind {
                first.entry(id).or_insert((*pid, fd));
            }
        }
    }
    first
        .into_iter()
        .map(|(id, (pid, fd))| {
            let info = read_eventfd_fdinfo(pid, fd.fd)?;
            Ok(EventfdImage {
                id,
                count: info.count,
                semaphore: info.semaphore,
                flags: fd.flags,
            })
        })
        .collect()
}

fn flags_of(tables: &[(i32, Vec<Fd>)], pid: i32, fd: i32) -> u32 {
    tables
        .iter()
        .find(|(p, _)| *p == pid)
        .and_then(|(_, fds)| fds.iter().find(|f| f.fd == fd))
        .map_or(0, |f| f.flags)
}

/// Numbers the signalfds of `tables` and describes each.
pub fn collect_signalfds(tables: &mut [(i32, Vec<Fd>)]) -> Result<Vec<SignalfdImage>, EpollError> {
    let first = number_by_file(
        tables,
        |k| matches!(k, FdKind::Signalfd { .. }),
        |id| FdKind::Signalfd { id },
    )?;
    first
        .into_iter()
        .map(|(id, (pid, fd))| {
            Ok(SignalfdImage {
                id,
                mask: read_signalfd_fdinfo(pid, fd)?,
                flags: flags_of(tables, pid, fd),
            })
        })
        .collect()
}

/// Numbers the inotify instances of `tables` and describes each: every
/// watch with its path, found from its file handle on its file system
/// (mounted as the holder sees it), as a path inside the holder's root. A
/// watch whose file cannot be found goes to `refusals`.
pub fn collect_inotifies(
    tables: &mut [(i32, Vec<Fd>)],
    refusals: &mut Vec<String>,
) -> Result<Vec<InotifyImage>, EpollError> {
    let first = number_by_file(
        tables,
        |k| matches!(k, FdKind::Inotify { .. }),
        |id| FdKind::Inotify { id },
    )?;
    let mut out = Vec::new();
    for (id, (pid, fd)) in first {
        let mut entries = crate::sys::procfs::read_inotify_fdinfo(pid, fd)?;
        entries.sort_by_key(|e| e.wd);
        let mut watches = Vec::new();
        for e in entries {
            match watch_path(pid, &e) {
                Ok(path) => watches.push(InotifyWatch {
                    wd: e.wd,
                    path,
                    mask: e.mask,
                }),
                Err(why) => refusals.push(format!(
                    "pid {pid} fd {fd} is inotify watching inode {} (wd {}): {why}",
                    e.ino, e.wd
                )),
            }
        }
        out.push(InotifyImage {
            id,
            flags: flags_of(tables, pid, fd),
            watches,
        });
    }
    Ok(out)
}

/// The path inside `pid`'s root of the file inotify watch `e` names.
fn watch_path(pid: i32, e: &crate::sys::procfs::InotifyEntry) -> Result<String, String> {
    let (major, minor) = (e.sdev >> 20, e.sdev & 0xfffff);
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map_err(|err| format!("reading its mountinfo: {err}"))?;
    let want = format!("{major}:{minor}");
    let root = format!("/proc/{pid}/root");
    let root_seen = std::fs::read_link(&root).map_err(|err| format!("reading its root: {err}"))?;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[2] != want {
            continue;
        }
        let mount = format!("{root}{}", f[4]);
        if let Ok(path) =
            crate::sys::fhandle::path_of(std::path::Path::new(&mount), e.handle_type, &e.handle)
        {
            // As the dumper sees it; inside the tree's root for restore.
            let inside = match path.strip_prefix(&root_seen) {
                Ok(rest) if root_seen != std::path::Path::new("/") => {
                    format!("/{}", rest.display())
                }
                _ => path.display().to_string(),
            };
            return Ok(inside);
        }
    }
    Err(format!(
        "no mount of device {want} leads to its file (deleted?)"
    ))
}

const TFD_TIMER_ABSTIME: i32 = 1;

/// Numbers the timerfds of `tables` and describes each; an absolute (or
/// CLOCK_REALTIME) timer gets its expiry, read against its clock now (the
/// tree is stopped, so the time left does not run on meanwhile).
pub fn collect_timerfds(tables: &mut [(i32, Vec<Fd>)]) -> Result<Vec<TimerfdImage>, EpollError> {
    let first = number_by_file(
        tables,
        |k| matches!(k, FdKind::Timerfd { .. }),
        |id| FdKind::Timerfd { id },
    )?;
    first
        .into_iter()
        .map(|(id, (pid, fd))| {
            let mut info = read_timerfd_fdinfo(pid, fd)?;
            // A periodic timer that expired and was not read since shows no
            // time left (the kernel moves it on only when read): its next
            // expiry is within one interval; take a whole one.
            if info.value == (0, 0) && info.interval != (0, 0) {
                info.value = info.interval;
            }
            let armed = info.value != (0, 0);
            let absolute =
                info.settime_flags & TFD_TIMER_ABSTIME != 0 || info.clockid == libc::CLOCK_REALTIME;
            let expires = (armed && absolute)
                .then(|| crate::sys::process::clock_now(info.clockid))
                .flatten()
                .map(|now| add_timespec(now, info.value));
            Ok(TimerfdImage {
                id,
                clockid: info.clockid,
                ticks: info.ticks,
                settime_flags: info.settime_flags,
                value: info.value,
                interval: info.interval,
                expires,
                flags: flags_of(tables, pid, fd),
            })
        })
        .collect()
}

fn add_timespec(a: (i64, i64), b: (i64, i64)) -> (i64, i64) {
    let ns = a.1 + b.1;
    (a.0 + b.0 + ns / 1_000_000_000, ns % 1_000_000_000)
}
