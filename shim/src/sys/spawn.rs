//! Handing extra file descriptors to a child at fixed numbers (3, 4, ...),
//! as `runc create --preserve-fds N` expects them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make `fds` the child's fds 3, 4, ... (in order, without close-on-exec).
/// `cmd` keeps the fds open until it is dropped.
pub fn pass_fds_from_3(cmd: &mut Command, fds: Vec<OwnedFd>) {
    let raws: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let first_free = 3 + raws.len() as i32;
    let mut high = vec![-1i32; raws.len()];
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (fcntl, dup2, close) on fds that are open in the
    // child (the OwnedFds live in the closure, so in the parent's Command, until
    // after spawn). It allocates nothing: `high` is allocated beforehand.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            // First move every source above the target range so no dup2 below
            // can overwrite a source not yet copied.
            for (i, &raw) in raws.iter().enumerate() {
                let fd = libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, first_free);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = fd;
            }
            for (i, &fd) in high.iter().enumerate() {
                // dup2 to a different number clears close-on-exec on the target.
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_sees_the_fds_at_3_and_4() {
        let (mut r1, w1) = std::io::pipe().unwrap();
        let (mut r2, w2) = std::io::pipe().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg("echo one >&3; echo two >&4");
        // Swap the order: w2 becomes fd 3, w1 fd 4.
        pass_fds_from_3(&mut cmd, vec![OwnedFd::from(w2), OwnedFd::from(w1)]);
        let status = cmd.status().unwrap();
        drop(cmd);
        assert!(status.success());
        let mut a = String::new();
        let mut b = String::new();
        std::io::Read::read_to_string(&mut r2, &mut a).unwrap();
        std::io::Read::read_to_string(&mut r1, &mut b).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("one\n", "two\n"));
    }
}
