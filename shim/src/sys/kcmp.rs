//! `kcmp(2)`: whether two processes' fds are the same open file description.
//! The dumper uses it to find descriptions shared through fork or dup.

use std::io;
use std::os::fd::RawFd;

/// `KCMP_FILE` from linux/kcmp.h (not exported by the libc crate).
const KCMP_FILE: libc::c_int = 0;

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0`: fd `fd1` of `pid1` and fd
/// `fd2` of `pid2` refer to the same open file description. Needs ptrace
/// read access to both processes (the dumper has it: the tree is seized).
pub fn same_file(pid1: i32, fd1: RawFd, pid2: i32, fd2: RawFd) -> io::Result<bool> {
    // SAFETY: kcmp takes integer arguments only and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1 as libc::pid_t,
            pid2 as libc::pid_t,
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        // 1 and 2 order the two descriptions, 3 means "not equal, unordered".
        Ok(rc == 0)
    }
}

/// `KCMP_EPOLL_TFD` and its `struct kcmp_epoll_slot` from linux/kcmp.h.
const KCMP_EPOLL_TFD: libc::c_int = 7;

#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Whether fd `fd` of `pid` is the file that epoll fd `epfd` of `epoll_pid`
/// watches under registration number `tfd` (`kcmp(KCMP_EPOLL_TFD)`).
pub fn is_epoll_target(
    pid: i32,
    fd: RawFd,
    epoll_pid: i32,
    epfd: RawFd,
    tfd: RawFd,
) -> io::Result<bool> {
    let slot = KcmpEpollSlot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff: 0,
    };
    // SAFETY: the last argument points to a kcmp_epoll_slot that lives
    // across the call; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid as libc::pid_t,
            epoll_pid as libc::pid_t,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            &slot as *const KcmpEpollSlot as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn dup_is_same_reopen_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let a = std::fs::File::create(&path).expect("create");
        let b = a.try_clone().expect("dup");
        let c = std::fs::File::open(&path).expect("reopen");
        let me = std::process::id() as i32;
        assert!(same_file(me, a.as_raw_fd(), me, b.as_raw_fd()).expect("kcmp a b"));
        assert!(!same_file(me, a.as_raw_fd(), me, c.as_raw_fd()).expect("kcmp a c"));
        assert!(
            same_file(me, a.as_raw_fd(), me, -1).is_err(),
            "bad fd is an error"
        );
    }

    #[test]
    fn epoll_target_is_found_by_file() {
        let (r, w) = std::io::pipe().expect("pipe");
        // SAFETY: plain syscalls on fds this test owns.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 1,
        };
        // SAFETY: ev is valid for the call.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, r.as_raw_fd(), &mut ev) },
            0
        );
        let me = std::process::id() as i32;
        let tfd = r.as_raw_fd();
        assert!(is_epoll_target(me, r.as_raw_fd(), me, ep, tfd).expect("kcmp r"));
        assert!(!is_epoll_target(me, w.as_raw_fd(), me, ep, tfd).expect("kcmp w"));
        assert!(
            is_epoll_target(me, r.as_raw_fd(), me, ep, w.as_raw_fd()).is_err(),
            "no such registration"
        );
        // SAFETY: closing the epoll fd this test created.
        unsafe { libc::close(ep) };
    }
}
