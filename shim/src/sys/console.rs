//! The terminal side of runc's `--console-socket` protocol: receiving the
//! pty master runc sends over a unix socket (one fd in an `SCM_RIGHTS`
//! message), and setting the window size of that master.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console socket: recvmsg: {0}")]
    Recv(#[source] std::io::Error),
    #[error("console socket: the message carried no file descriptor")]
    NoFd,
    #[error("console fd {fd}: TIOCSWINSZ {width}x{height}: {source}")]
    Resize {
        fd: i32,
        width: u16,
        height: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Receive one file descriptor sent with `SCM_RIGHTS` on `stream` (runc
/// sends the pty master this way, with the terminal's name as data).
pub fn recv_fd(stream: &UnixStream) -> Result<OwnedFd, ConsoleError> {
    let mut data = [0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one cmsghdr carrying one int, u64-aligned.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at iov/data/control, all alive and sized as declared
    // for the duration of the call; MSG_CMSG_CLOEXEC makes the fd close-on-exec.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(ConsoleError::Recv(std::io::Error::last_os_error()));
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within
    // msg_control/msg_controllen as the kernel set them.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    let mut received: Option<OwnedFd> = None;
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points into `control` (see above).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: an SCM_RIGHTS payload is an array of ints; read the first
            // unaligned (the buffer is aligned, but say so explicitly).
            let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()) };
            // SAFETY: the kernel installed this fd in our table for us; nobody
            // else owns it. Only the first is kept (runc sends exactly one).
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if received.is_none() {
                received = Some(owned);
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    received.ok_or(ConsoleError::NoFd)
}

/// Set the window size of the terminal behind `fd` (TIOCSWINSZ); the
/// foreground process group gets SIGWINCH from the kernel.
pub fn set_window_size(fd: BorrowedFd<'_>, width: u16, height: u16) -> Result<(), ConsoleError> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(ConsoleError::Resize {
            fd: fd.as_raw_fd(),
            width,
            height,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn passes_an_fd_over_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        let raw = writer.as_raw_fd();
        let mut data = *b"pty";
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: test-only SCM_RIGHTS send of one valid fd; buffers live.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), raw);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), 3);
        }
        drop(writer);
        let got = recv_fd(&b).unwrap();
        let mut f = std::fs::File::from(got);
        f.write_all(b"hello").unwrap();
        drop(f);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut reader, &mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn message_without_fd_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        assert!(matches!(recv_fd(&b), Err(ConsoleError::NoFd)));
    }

    #[test]
    fn resize_of_a_non_tty_fails_with_the_fd() {
        let (r, _w) = std::io::pipe().unwrap();
        let fd = OwnedFd::from(r);
        let e = set_window_size(std::os::fd::AsFd::as_fd(&fd), 80, 24).unwrap_err();
        assert!(e.to_string().contains("TIOCSWINSZ 80x24"), "{e}");
    }
}
