//! Test helpers that need raw syscalls (fork, mmap, mremap, mprotect, raw
//! memory writes), kept here so that `unsafe` stays in `sys/`. Test builds only.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

/// A forked child that ran a closure and then sleeps in `pause()` until killed.
/// Dropping it SIGKILLs and reaps it.
pub struct TestChild {
    pub pid: i32,
    /// What the closure returned (e.g. the pid of a grandchild).
    pub value: i64,
    reap: bool,
}

impl TestChild {
    /// Forks; the child runs `f`, reports its result, then pauses forever.
    /// The child dies with its parent (PR_SET_PDEATHSIG).
    pub fn fork(f: impl FnOnce() -> i64) -> TestChild {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only runs `f` (test code written for it), writes to a
        // pipe and pauses; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl/close/write/pause with valid arguments in the child.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::close(fds[0]);
            }
            let v = f().to_ne_bytes();
            // SAFETY: writes 8 bytes from a local array to our pipe.
            unsafe {
                libc::write(fds[1], v.as_ptr() as *const libc::c_void, 8);
                libc::close(fds[1]);
                loop {
                    libc::pause();
                }
            }
        }
        // SAFETY: both fds were created above and are owned here only.
        let (rd, _wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(_wr);
        let mut buf = [0u8; 8];
        std::fs::File::from(rd)
            .read_exact(&mut buf)
            .expect("child reports ready");
        // The child closes its end of the pipe after writing: wait for that,
        // so a test that lists the child's fds never sees one vanish.
        let write_end = format!("/proc/{pid}/fd/{}", fds[1]);
        while std::path::Path::new(&write_end).exists() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        TestChild {
            pid,
            value: i64::from_ne_bytes(buf),
            reap: true,
        }
    }

    /// Kill-on-drop for a process that is not our child (a grandchild).
    pub fn adopt(pid: i32) -> TestChild {
        TestChild {
            pid,
            value: 0,
            reap: false,
        }
    }

    /// Forgets the child without killing it (in a forked child that pauses forever).
    pub fn leak(self) -> i32 {
        let pid = self.pid;
        std::mem::forget(self);
        pid
    }
}

impl Drop for TestChild {
    fn drop(&mut self) {
        // SAFETY: signalling and reaping a pid this test created.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            if self.reap {
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Maps `len` bytes of anonymous memory (never unmapped: tests are short-lived).
pub fn map_anon(len: usize, shared: bool) -> usize {
    let flags = libc::MAP_ANONYMOUS
        | if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as usize
}

/// Writes `data` at `addr` in this process.
pub fn poke(addr: usize, data: &[u8]) {
    // SAFETY: callers pass addresses of writable mappings they made with map_anon.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Moves `len` bytes at `from` to exactly `to` (MREMAP_FIXED).
pub fn mremap_fixed(from: usize, len: usize, to: usize) {
    // SAFETY: both ranges are mappings the test made; the old range is gone afterwards.
    let p = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    assert_eq!(
        p as usize,
        to,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
}

pub fn mprotect(addr: usize, len: usize, prot: i32) {
    // SAFETY: changes protection of a mapping the test made.
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
}

/// Reads one byte at `addr` (faults the page in).
pub fn touch(addr: usize) -> u8 {
    // SAFETY: callers pass addresses of readable mappings they made with map_anon.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}
