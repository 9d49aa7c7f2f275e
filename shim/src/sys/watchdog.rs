//! A forked guard process that cleans up after a dumper that died (SIGKILL,
//! crash): it holds the read end of a pipe; EOF without a "done" byte means
//! the dumper is gone, so it thaws the cgroup it froze and removes the
//! image's partial files. The child runs only raw, allocation-free syscalls
//! (the dumper may be multi-threaded when it forks) and closes every other
//! fd, so it never holds the caller's stdout/stderr open.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Bytes the dumper sends.
pub const MSG_FROZEN: u8 = b'F';
pub const MSG_THAWED: u8 = b'T';
pub const MSG_COMMITTED: u8 = b'C';
pub const MSG_DONE: u8 = b'D';

/// What to undo if the dumper dies; built before forking.
#[derive(Debug, Clone)]
pub struct WatchdogPlan {
    /// Freezer control file and the bytes that thaw it.
    pub thaw: Option<(CString, Vec<u8>)>,
    /// Directory whose files are removed.
    pub work_dir: Option<CString>,
    /// Also remove the directory itself (it was created by the dumper).
    pub remove_dir: bool,
}

#[derive(Debug)]
pub struct Watchdog {
    pid: i32,
    tx: Option<OwnedFd>,
}

impl Watchdog {
    pub fn spawn(plan: &WatchdogPlan) -> std::io::Result<Watchdog> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh fds from pipe2, owned only here.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only calls async-signal-safe syscalls on memory
        // prepared before the fork (`plan`, stack buffers) and ends in _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see child_main.
            unsafe { child_main(rx.as_raw_fd(), plan) };
        }
        drop(rx);
        Ok(Watchdog { pid, tx: Some(tx) })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn send(&self, msg: u8) -> std::io::Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        // SAFETY: writes one byte from a local to a pipe fd we own.
        let n = unsafe { libc::write(tx.as_raw_fd(), &msg as *const u8 as *const libc::c_void, 1) };
        if n == 1 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Tells the watchdog everything is settled and reaps it.
    pub fn finish(mut self) {
        let _ = self.send(MSG_DONE);
        self.tx = None;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }

    /// Closes the pipe without "done" (what the dumper's death looks like) and reaps.
    pub fn abandon(mut self) {
        self.tx = None;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.tx.take().is_some() {
            // Dropped without finish() (e.g. unwinding from a panic): the
            // watchdog sees EOF without "done" and cleans up; reap it.
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
        }
    }
}

/// Body of the watchdog child. Never returns.
///
/// # Safety
/// Must only be called in a freshly forked child; uses raw syscalls only.
unsafe fn child_main(rx: i32, plan: &WatchdogPlan) -> ! {
    // Own session: a Ctrl-C to the dumper's process group must not kill us.
    libc::setsid();
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGPIPE,
        libc::SIGQUIT,
    ] {
        libc::signal(sig, libc::SIG_IGN);
    }
    // Close everything but the pipe: stdout/stderr of the caller included.
    if rx > 0 {
        libc::syscall(libc::SYS_close_range, 0u32, (rx - 1) as u32, 0u32);
    }
    libc::syscall(libc::SYS_close_range, (rx + 1) as u32, u32::MAX, 0u32);
    let mut frozen = false;
    let mut committed = false;
    loop {
        let mut b = 0u8;
        let n = libc::read(rx, &mut b as *mut u8 as *mut libc::c_void, 1);
        if n == 1 {
            match b {
                MSG_FROZEN => frozen = true,
                MSG_THAWED => frozen = false,
                MSG_COMMITTED => committed = true,
                MSG_DONE => libc::_exit(0),
                _ => {}
            }
            continue;
        }
        if n < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        break;
    }
    // The dumper died without saying "done".
    if frozen {
        if let Some((file, value)) = &plan.thaw {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, value.as_ptr() as *const libc::c_void, value.len());
                libc::close(fd);
            }
        }
    }
    if !committed {
        if let Some(dir) = &plan.work_dir {
            remove_files(dir);
            if plan.remove_dir {
                libc::rmdir(dir.as_ptr());
            }
        }
    }
    libc::_exit(0)
}

/// Unlinks every non-directory entry of `dir` (the image directory is flat).
///
/// # Safety
/// Raw syscalls on a stack buffer only.
unsafe fn remove_files(dir: &CString) {
    let dfd = libc::open(
        dir.as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if dfd < 0 {
        return;
    }
    // Unlinking while iterating can skip entries: repeat until a pass removes nothing.
    loop {
        let mut removed = 0;
        libc::lseek(dfd, 0, libc::SEEK_SET);
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dfd, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name...
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                let name = buf.as_ptr().add(off + 19) as *const libc::c_char;
                let dot = *name == b'.' as libc::c_char
                    && (*name.add(1) == 0
                        || (*name.add(1) == b'.' as libc::c_char && *name.add(2) == 0));
                if !dot && libc::unlinkat(dfd, name, 0) == 0 {
                    removed += 1;
                }
                off += reclen;
            }
        }
        if removed == 0 {
            break;
        }
    }
    libc::close(dfd);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn plan_for(dir: &std::path::Path, thaw_file: &std::path::Path) -> WatchdogPlan {
        WatchdogPlan {
            thaw: Some((
                CString::new(thaw_file.as_os_str().as_bytes()).expect("cstr"),
                b"THAWED".to_vec(),
            )),
            work_dir: Some(CString::new(dir.as_os_str().as_bytes()).expect("cstr")),
            remove_dir: true,
        }
    }

    #[test]
    fn dumper_death_thaws_and_removes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let work = tmp.path().join("img.partial");
        std::fs::create_dir(&work).expect("mkdir");
        for i in 0..50 {
            std::fs::write(work.join(format!("f{i}")), b"x").expect("write");
        }
        let thaw = tmp.path().join("freezer.state");
        std::fs::write(&thaw, b"FROZEN").expect("write");
        let w = Watchdog::spawn(&plan_for(&work, &thaw)).expect("spawn");
        w.send(MSG_FROZEN).expect("send");
        w.abandon();
        assert!(!work.exists(), "partial dir removed");
        assert_eq!(std::fs::read(&thaw).expect("read"), b"THAWED");
    }

    #[test]
    fn done_leaves_everything() {
        let tmp = tempfile::tempdir().expect("tmp");
        let work = tmp.path().join("img");
        std::fs::create_dir(&work).expect("mkdir");
        std::fs::write(work.join("manifest.json"), b"{}").expect("write");
        let thaw = tmp.path().join("freezer.state");
        std::fs::write(&thaw, b"FROZEN").expect("write");
        let w = Watchdog::spawn(&plan_for(&work, &thaw)).expect("spawn");
        w.send(MSG_FROZEN).expect("send");
        w.send(MSG_THAWED).expect("send");
        w.send(MSG_COMMITTED).expect("send");
        w.abandon();
        assert!(work.join("manifest.json").exists());
        assert_eq!(std::fs::read(&thaw).expect("read"), b"FROZEN");
        let w = Watchdog::spawn(&plan_for(&work, &thaw)).expect("spawn");
        w.finish();
        assert!(work.join("manifest.json").exists());
    }
}
