//! Raw syscalls the restore runtime needs to rebuild process-level state
//! (fd tables, signal dispositions and queues, interval timers, rlimits,
//! comm, root/cwd), each wrapped once with an `io::Error` on failure.
//!
//! Everything here acts on the calling process only; nothing reaches into
//! another process. Raw fd numbers are used on purpose: the restore runtime
//! places fds at exact numbers (`dup3`) and closes ranges it does not own
//! as `OwnedFd`s, so these wrappers never take ownership of an fd.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(crate) fn cvt_long(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

// ---------------------------------------------------------------------------
// File descriptors

/// `open(path, flags, 0)`; the caller owns the returned fd number.
pub fn open_raw(path: &Path, flags: i32) -> io::Result<RawFd> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::open(c.as_ptr(), flags, 0) })
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a new fd >= `min` on the same open file description.
pub fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}

/// `dup3(old, new, cloexec ? O_CLOEXEC : 0)`: `new` refers to `old`'s file
/// description; whatever `new` referred to before is closed atomically.
pub fn dup_to(old: RawFd, new: RawFd, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 with integer arguments only.
    cvt(unsafe { libc::dup3(old, new, flags) }).map(|_| ())
}

/// `eventfd(0, flags)`.
pub fn eventfd(flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: integer arguments; the returned fd is ours.
    let fd = cvt(unsafe { libc::eventfd(0, flags) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `signalfd(-1, mask, flags)` (mask: bit n-1 for signal n).
pub fn signalfd(mask: u64, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: all-zero is a valid sigset_t; its first word holds signals 1..=64.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset_t is at least 8 bytes on Linux; writing its first u64.
    unsafe { (&mut set as *mut libc::sigset_t).cast::<u64>().write(mask) };
    // SAFETY: set is a valid sigset_t for the call; the returned fd is ours.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, flags) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `timerfd_create(clock, flags)`.
pub fn timerfd_create(clock: i32, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: integer arguments; the returned fd is ours.
    let fd = cvt(unsafe { libc::timerfd_create(clock, flags) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `timerfd_settime(fd, flags, {interval, value})`, times as (sec, nsec).
pub fn timerfd_settime(
    fd: RawFd,
    flags: i32,
    value: (i64, i64),
    interval: (i64, i64),
) -> io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: interval.0,
            tv_nsec: interval.1,
        },
        it_value: libc::timespec {
            tv_sec: value.0,
            tv_nsec: value.1,
        },
    };
    // SAFETY: spec is a valid itimerspec; the old value is not asked for.
    cvt(unsafe { libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()) }).map(|_| ())
}

/// Unread expirations of our own timerfd `fd` (its fdinfo `ticks:`).
pub fn timerfd_ticks(fd: RawFd) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("ticks:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no ticks: line in the timerfd's fdinfo"))
}

/// `ioctl(fd, TFD_IOC_SET_TICKS, &ticks)`: the expirations a read returns next.
pub fn timerfd_set_ticks(fd: RawFd, ticks: u64) -> io::Result<()> {
    // _IOW('T', 0, u64)
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: the ioctl reads one u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks as *const u64) }).map(|_| ())
}

/// `inotify_init1(flags)`.
pub fn inotify_init(flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: integer argument; the returned fd is ours.
    let fd = cvt(unsafe { libc::inotify_init1(flags) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `inotify_add_watch(fd, path, mask)`: the watch descriptor.
pub fn inotify_add_watch(fd: RawFd, path: &str, mask: u32) -> io::Result<i32> {
    let c = c_path(Path::new(path))?;
    // SAFETY: c is a valid NUL-terminated path for the call.
    cvt(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) })
}

/// `inotify_rm_watch(fd, wd)`.
pub fn inotify_rm_watch(fd: RawFd, wd: i32) -> io::Result<()> {
    // SAFETY: integer arguments.
    cvt(unsafe { libc::inotify_rm_watch(fd, wd) }).map(|_| ())
}

/// Reads a non-blocking fd until it has nothing more (what it held is dropped).
pub fn drain(fd: RawFd) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
    }
}

/// `close(fd)`.
pub fn close_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: closing an fd number; callers only close numbers they placed themselves.
    cvt(unsafe { libc::close(fd) }).map(|_| ())
}

/// `close_range(first, last, 0)`: closes every open fd in `first..=last`.
pub fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range with integer arguments; the caller decides which numbers die.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    })
    .map(|_| ())
}

/// `lseek(fd, pos, SEEK_SET)`.
pub fn seek_to(fd: RawFd, pos: u64) -> io::Result<()> {
    let pos = libc::off_t::try_from(pos)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek with integer arguments only.
    let rc = unsafe { libc::lseek(fd, pos, libc::SEEK_SET) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fcntl(fd, F_GETFL)`.
pub fn get_status_flags(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// `fcntl(fd, F_SETFL, flags)` (the kernel only changes O_APPEND, O_ASYNC,
/// O_DIRECT, O_NOATIME and O_NONBLOCK).
pub fn set_status_flags(fd: RawFd, flags: i32) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(|_| ())
}

/// `fcntl(fd, F_GETFD) & FD_CLOEXEC`.
pub fn is_cloexec(fd: RawFd) -> io::Result<bool> {
    // SAFETY: fcntl with integer arguments only.
    let rc = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    Ok(rc & libc::FD_CLOEXEC != 0)
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe_pair() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the two-element array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// `fcntl(fd, F_GETPIPE_SZ)`: the pipe's capacity in bytes.
pub fn get_pipe_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fcntl with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }).map(|n| n as u64)
}

/// `fcntl(fd, F_SETPIPE_SZ, bytes)`; returns the capacity the kernel chose (>= bytes).
pub fn set_pipe_size(fd: RawFd, bytes: u64) -> io::Result<u64> {
    let bytes = libc::c_int::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pipe size too large"))?;
    // SAFETY: fcntl with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes) }).map(|n| n as u64)
}

/// Writes all of `data` to `fd` (retrying short writes and EINTR).
pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is a valid readable buffer of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from `fd` (retrying short reads and EINTR).
pub fn read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr() as *mut libc::c_void, rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"));
        }
        done += n as usize;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Signals

/// `struct sigaction` as the x86_64 kernel's `rt_sigaction` reads it (not
/// glibc's layout): handler, flags, restorer, then an 8-byte mask.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// Size of the kernel's sigset_t on x86_64, the last argument of rt_sigaction/rt_sigprocmask.
const KERNEL_SIGSET_SIZE: usize = 8;

/// Raw `rt_sigaction(sig, new, &old, 8)`: installs `new` (if any) exactly as
/// given, with no libc wrapper adding SA_RESTORER, and returns the previous action.
pub fn rt_sigaction(sig: i32, new: Option<&KernelSigaction>) -> io::Result<KernelSigaction> {
    let mut old = KernelSigaction::default();
    let new_ptr = new.map_or(std::ptr::null(), |a| a as *const KernelSigaction);
    // SAFETY: `new_ptr` is null or points to a live repr(C) struct of the
    // kernel's layout; `old` is writable storage of the same layout.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig as libc::c_long,
            new_ptr,
            &mut old as *mut KernelSigaction,
            KERNEL_SIGSET_SIZE,
        )
    })?;
    Ok(old)
}

/// Raw `rt_sigprocmask(how, &set, &old, 8)` on the calling thread; returns the old mask.
fn rt_sigprocmask(how: libc::c_int, set: Option<u64>) -> io::Result<u64> {
    let mut old: u64 = 0;
    let set_storage = set.unwrap_or(0);
    let set_ptr = if set.is_some() {
        &set_storage as *const u64
    } else {
        std::ptr::null()
    };
    // SAFETY: `set_ptr` is null or points to 8 readable bytes; `old` is 8 writable bytes.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how as libc::c_long,
            set_ptr,
            &mut old as *mut u64,
            KERNEL_SIGSET_SIZE,
        )
    })?;
    Ok(old)
}

/// Blocks every signal (the kernel silently keeps SIGKILL and SIGSTOP
/// unblocked) in the calling thread; returns the previous mask.
pub fn block_all_signals() -> io::Result<u64> {
    rt_sigprocmask(libc::SIG_SETMASK, Some(u64::MAX))
}

/// Sets the calling thread's blocked mask; returns the previous one.
pub fn set_signal_mask(mask: u64) -> io::Result<u64> {
    rt_sigprocmask(libc::SIG_SETMASK, Some(mask))
}

/// Raw `rt_sigpending`: signals pending for the calling thread or its process, as a bit mask
/// (bit `n - 1` is signal `n`).
pub fn sigpending() -> io::Result<u64> {
    let mut set: u64 = 0;
    // SAFETY: `set` is 8 writable bytes, the size passed.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_rt_sigpending,
            &mut set as *mut u64,
            KERNEL_SIGSET_SIZE,
        )
    })?;
    Ok(set)
}

/// Size of a siginfo the kernel copies in `rt_sigqueueinfo`.
pub const SIGINFO_SIZE: usize = 128;

/// Raw `rt_sigqueueinfo(getpid(), sig, info)`: queues `info` on this
/// process's shared queue. The kernel accepts any `si_code` (also the
/// kernel's own, >= 0) when the target is the caller's own process.
pub fn sigqueue_self(sig: i32, info: &[u8; SIGINFO_SIZE]) -> io::Result<()> {
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() };
    // SAFETY: `info` is 128 readable bytes, the size of the kernel's siginfo.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_rt_sigqueueinfo,
            pid as libc::c_long,
            sig as libc::c_long,
            info.as_ptr(),
        )
    })
    .map(|_| ())
}

/// Raw `rt_tgsigqueueinfo(getpid(), gettid(), sig, info)`: queues `info` on
/// the calling thread's private queue.
pub fn sigqueue_self_thread(sig: i32, info: &[u8; SIGINFO_SIZE]) -> io::Result<()> {
    // SAFETY: getpid and gettid have no arguments and cannot fail.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    // SAFETY: `info` is 128 readable bytes, the size of the kernel's siginfo.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            pid as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
            info.as_ptr(),
        )
    })
    .map(|_| ())
}

/// Raw `rt_sigtimedwait` with a zero timeout: takes one pending signal in
/// `mask` off the queues and returns its siginfo, or `None` when none is pending.
pub fn take_pending(mask: u64) -> io::Result<Option<[u8; SIGINFO_SIZE]>> {
    let mut info = [0u8; SIGINFO_SIZE];
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `mask` is 8 readable bytes, `info` 128 writable bytes and `zero`
    // a valid timespec, all live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigtimedwait,
            &mask as *const u64,
            info.as_mut_ptr(),
            &zero as *const libc::timespec,
            KERNEL_SIGSET_SIZE,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(info))
}

/// Which of the three interval timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Itimer {
    Real,
    Virtual,
    Prof,
}

impl Itimer {
    fn which(self) -> libc::c_int {
        match self {
            Itimer::Real => libc::ITIMER_REAL,
            Itimer::Virtual => libc::ITIMER_VIRTUAL,
            Itimer::Prof => libc::ITIMER_PROF,
        }
    }
}

fn timeval_from_us(us: u64) -> io::Result<libc::timeval> {
    let tv_sec = libc::time_t::try_from(us / 1_000_000)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "timer value too large"))?;
    Ok(libc::timeval {
        tv_sec,
        tv_usec: (us % 1_000_000) as libc::suseconds_t,
    })
}

fn us_from_timeval(tv: &libc::timeval) -> u64 {
    (tv.tv_sec as u64) * 1_000_000 + tv.tv_usec as u64
}

/// `setitimer(which, {interval, value})` with both in microseconds.
pub fn set_itimer(which: Itimer, interval_us: u64, value_us: u64) -> io::Result<()> {
    let new = libc::itimerval {
        it_interval: timeval_from_us(interval_us)?,
        it_value: timeval_from_us(value_us)?,
    };
    // SAFETY: `new` is a valid itimerval; no old value requested.
    cvt(unsafe { libc::setitimer(which.which(), &new, std::ptr::null_mut()) }).map(|_| ())
}

/// Whether this kernel lets `timer_create` take the id from its argument
/// (`prctl(PR_TIMER_CREATE_RESTORE_IDS)`, Linux 6.17+): asks for the mode
/// (`PR_TIMER_CREATE_RESTORE_IDS_GET`); an older kernel says EINVAL.
pub fn timer_create_restore_ids() -> io::Result<()> {
    const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
    const PR_TIMER_CREATE_RESTORE_IDS_GET: libc::c_ulong = 2;
    // SAFETY: a query of a flag of the calling process; no pointer.
    cvt(unsafe {
        libc::prctl(
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_GET,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(|_| ())
}

/// `getitimer(which)` as (interval, value) in microseconds.
pub fn get_itimer(which: Itimer) -> io::Result<[u64; 2]> {
    let mut cur = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    // SAFETY: `cur` is writable storage for one itimerval.
    cvt(unsafe { libc::getitimer(which.which(), &mut cur) })?;
    Ok([
        us_from_timeval(&cur.it_interval),
        us_from_timeval(&cur.it_value),
    ])
}

// ---------------------------------------------------------------------------
// Process attributes

/// `umask(mask)`; returns the previous mask.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and takes an integer.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// `prlimit(0, resource, {soft, hard}, NULL)` on the calling process
/// (`u64::MAX` is RLIM_INFINITY on 64-bit).
pub fn set_rlimit(resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let new = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `new` is a valid rlimit64 and the old-value pointer is null.
    cvt(unsafe {
        libc::prlimit64(
            0,
            resource as libc::__rlimit_resource_t,
            &new,
            std::ptr::null_mut(),
        )
    })
    .map(|_| ())
}

/// `prlimit(0, resource, NULL, &old)` on the calling process: (soft, hard).
pub fn get_rlimit_self(resource: u32) -> io::Result<(u64, u64)> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is writable storage for one rlimit64; no new value.
    cvt(unsafe {
        libc::prlimit64(
            0,
            resource as libc::__rlimit_resource_t,
            std::ptr::null(),
            &mut old,
        )
    })?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// `prctl(PR_SET_NAME, name)` of the calling thread (the kernel keeps 15 bytes).
pub fn set_thread_name(name: &str) -> io::Result<()> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string; the kernel copies at most 16 bytes.
    cvt(unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) }).map(|_| ())
}

/// `prctl(PR_GET_NAME)` of the calling thread.
pub fn thread_name() -> io::Result<String> {
    let mut buf = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, the size of `buf`.
    cvt(unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            buf.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// `chdir(path)`.
pub fn chdir(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::chdir(c.as_ptr()) }).map(|_| ())
}

/// `chroot(path)` (the cwd is left where it is).
pub fn chroot(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::chroot(c.as_ptr()) }).map(|_| ())
}

// ---------------------------------------------------------------------------
// Test support

/// Forks; the child runs `f` with the number of a report fd (>= 900, so it
/// stays clear of fds a test places), sends back what `f` returned, and
/// exits with `_exit`. Returns the child's report or its error (also a
/// panic message, or an exit without a report).
#[cfg(test)]
pub fn in_child(f: impl FnOnce(RawFd) -> Result<Vec<u8>, String>) -> Result<Vec<u8>, String> {
    let (rd, wr) = pipe_pair().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the child runs only `f` (test code) and `_exit`s; it never
    // returns into the test harness.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: prctl with integer arguments in the child.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let _ = close_fd(rd);
        let report = match dup_at_least(wr, 900) {
            Ok(fd) => {
                let _ = close_fd(wr);
                fd
            }
            Err(_) => wr,
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(report)))
            .unwrap_or_else(|p| {
                Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into()))
            });
        let (tag, body) = match result {
            Ok(b) => (0u8, b),
            Err(s) => (1u8, s.into_bytes()),
        };
        let mut msg = vec![tag];
        msg.extend_from_slice(&(body.len() as u64).to_le_bytes());
        msg.extend_from_slice(&body);
        let code = if write_all(report, &msg).is_ok() {
            0
        } else {
            3
        };
        // SAFETY: _exit never returns and skips the harness's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let _ = close_fd(wr);
    let mut head = [0u8; 9];
    let got = read_exact(rd, &mut head).and_then(|_| {
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0; 8])) as usize;
        let mut body = vec![0u8; len];
        read_exact(rd, &mut body).map(|_| body)
    });
    let _ = close_fd(rd);
    let mut status = 0;
    // SAFETY: reaping the child forked above; `status` is writable.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match got {
        Ok(body) if head[0] == 0 => Ok(body),
        Ok(body) => Err(String::from_utf8_lossy(&body).into_owned()),
        Err(e) => Err(format!(
            "child sent no report ({e}), wait status {status:#x}"
        )),
    }
}
