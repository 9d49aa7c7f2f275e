//! Reading what another process's pipe holds without consuming it: open a
//! new reader on the same pipe through /proc/PID/fd/N, `tee()` its buffers
//! into a pipe of our own and drain that. The original pipe keeps every byte.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Buffered bytes and capacity (F_GETPIPE_SZ) of the pipe behind `fd_path`
/// (a /proc/PID/fd/N link of either end).
pub fn peek_pipe(fd_path: &Path) -> Result<(Vec<u8>, u64), PipeError> {
    let io = |op: &'static str| {
        let path = fd_path.to_path_buf();
        move |source: std::io::Error| PipeError::Io { path, op, source }
    };
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(fd_path)
        .map_err(io("open"))?;
    // SAFETY: fcntl on an fd we own, no pointers.
    let capacity = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if capacity < 0 {
        return Err(io("F_GETPIPE_SZ")(std::io::Error::last_os_error()));
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io("pipe2")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Our pipe must have at least as many slots as the source, or tee stops early.
    // SAFETY: fcntl on an fd we own, no pointers.
    if unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, capacity) } < 0 {
        return Err(io("F_SETPIPE_SZ")(std::io::Error::last_os_error()));
    }
    // SAFETY: tee between two pipe fds we own; no user memory involved.
    let n = unsafe {
        libc::tee(
            src.as_raw_fd(),
            wr.as_raw_fd(),
            capacity as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // EAGAIN: the pipe is empty.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(io("tee")(e));
        }
    }
    drop(wr);
    let mut data = Vec::new();
    File::from(rd).read_to_end(&mut data).map_err(io("read"))?;
    Ok((data, capacity as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn peek_leaves_data_in_place() {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds owned by this test.
        let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let mut wr = wr;
        wr.write_all(b"hello").expect("write");
        let path = PathBuf::from(format!("/proc/self/fd/{}", fds[1]));
        let (data, cap) = peek_pipe(&path).expect("peek");
        assert_eq!(data, b"hello");
        assert!(cap >= 4096);
        drop(wr);
        let mut rest = Vec::new();
        let mut rd = rd;
        rd.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"hello");
    }

    #[test]
    fn peek_empty_pipe() {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds owned by this test.
        let _keep = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", fds[0]));
        let (data, _) = peek_pipe(&path).expect("peek");
        assert!(data.is_empty());
    }
}
