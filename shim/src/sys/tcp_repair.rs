//! Established TCP connections, dumped and recreated with Linux's repair mode
//! (`TCP_REPAIR`), IPv4 and IPv6.
//!
//! This module owns the repair-mode protocol on one socket: reading a live
//! connection's sequence numbers, queues, negotiated options and window
//! ([`dump`]), and building a new socket that continues it ([`restore`]).
//! It never decides when a connection may be touched: the caller freezes the
//! owning tree and locks the connection's packets (`sys::netfilter`) first,
//! so nothing arrives while the state is read and the peer gets no RST while
//! no socket exists. It must never let a dumped socket leave repair mode by
//! accident: a socket closed in repair mode vanishes silently (no FIN, no
//! RST), which is what a dump that kills its tree needs; [`leave_repair`]
//! (or [`leave_repair_as_dumped`]) is the one way back.
//!
//! Repair mode needs CAP_NET_ADMIN in the socket's network namespace and an
//! ESTABLISHED socket; other states (half-closed, listening, connecting) are
//! refused, not guessed at.
//!
//! Send queue semantics. The kernel keeps one send queue: bytes sent but not
//! yet acknowledged, followed by bytes never sent. [`dump`] reads it whole and
//! records how many trailing bytes were never sent (SIOCOUTQNSD). [`restore`]
//! writes the already-sent part in repair mode, where the kernel queues it
//! as sent-and-unacknowledged without transmitting (the peer may have it, so
//! an ACK for it must be accepted; it is retransmitted on the retransmission
//! timer if not). The never-sent part is written with an ordinary send()
//! after repair mode is off, so the kernel treats it as new data and sends it
//! when the peer's window allows, under the restored TCP_NODELAY/TCP_CORK.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// linux/tcp.h: `TCP_REPAIR` values.
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
/// linux/tcp.h: `TCP_REPAIR_QUEUE` values.
const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// TCP option kinds accepted by `TCP_REPAIR_OPTIONS` (RFC 793/7323/2018).
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// linux/tcp.h: `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// include/net/tcp_states.h.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
/// linux/sockios.h: SIOCINQ is FIONREAD, SIOCOUTQ is TIOCOUTQ (per arch).
const SIOCINQ: libc::Ioctl = libc::FIONREAD;
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
const SIOCOUTQNSD: libc::Ioctl = libc::SIOCOUTQNSD as libc::Ioctl;
/// Enough of `struct tcp_info` for every field read here, and more.
const TCP_INFO_LEN: usize = 256;
/// How often a dump re-reads a queue that changed while it was read.
const DUMP_TRIES: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpConnection {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP_QUEUE_SEQ of the send queue and receive queue (repair mode): the
    /// sequence number after the last byte queued (write_seq) and after the
    /// last byte received (rcv_nxt).
    pub send_seq: u32,
    pub recv_seq: u32,
    /// Whole send queue (sent-but-unacked followed by not-yet-sent bytes),
    /// read with MSG_PEEK under TCP_SEND_QUEUE.
    #[serde(with = "hex_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of send_queue were never sent (SIOCOUTQNSD).
    pub unsent: u32,
    /// Received but not yet read by the application.
    #[serde(with = "hex_bytes")]
    pub recv_queue: Vec<u8>,
    /// TCP_MAXSEG.
    pub mss: u32,
    /// From TCP_INFO tcpi_snd_wscale/tcpi_rcv_wscale.
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// From TCP_INFO tcpi_options.
    pub sack: bool,
    pub timestamps: bool,
    pub wscale_ok: bool,
    /// TCP_TIMESTAMP (opaque: the kernel's clock plus this socket's offset).
    pub timestamp: u32,
    /// TCP_REPAIR_WINDOW.
    pub window: RepairWindow,
    pub nodelay: bool,
    pub cork: bool,
    /// SO_REUSEADDR as it was before repair mode (which overrides it while
    /// on and clears it when turned off); put back when repair mode ends.
    #[serde(default)]
    pub reuseaddr: bool,
}

/// `struct tcp_repair_window` from linux/tcp.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(C)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt` from linux/tcp.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct RepairOpt {
    opt_code: u32,
    opt_val: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TcpRepairError {
    /// The socket's own addresses could not be read (not a connected socket?).
    #[error("tcp socket fd {fd}: {op}: {source}")]
    Addresses {
        fd: RawFd,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("tcp {local} -> {remote}: {op}: {source}")]
    Os {
        local: SocketAddr,
        remote: SocketAddr,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "tcp {local} -> {remote}: {op}: repair mode needs CAP_NET_ADMIN in the socket's \
         network namespace (and an ESTABLISHED socket): {source}"
    )]
    NotPermitted {
        local: SocketAddr,
        remote: SocketAddr,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "tcp {local} -> {remote}: TCP state {state} is not ESTABLISHED; only established \
         connections can be dumped"
    )]
    NotEstablished {
        local: SocketAddr,
        remote: SocketAddr,
        state: u8,
    },
    #[error("tcp {local} -> {remote}: {what}")]
    Inconsistent {
        local: SocketAddr,
        remote: SocketAddr,
        what: String,
    },
}

/// A socket and the connection it carries, for error messages.
struct Sock<'a> {
    fd: BorrowedFd<'a>,
    local: SocketAddr,
    remote: SocketAddr,
}

impl Sock<'_> {
    fn os(&self, op: &'static str) -> impl FnOnce(io::Error) -> TcpRepairError {
        let (local, remote) = (self.local, self.remote);
        move |source| TcpRepairError::Os {
            local,
            remote,
            op,
            source,
        }
    }

    fn inconsistent(&self, what: String) -> TcpRepairError {
        TcpRepairError::Inconsistent {
            local: self.local,
            remote: self.remote,
            what,
        }
    }

    fn set<T: Copy>(&self, level: libc::c_int, opt: libc::c_int, val: &T) -> io::Result<()> {
        // SAFETY: `val` points at a live, initialised T of the given size for
        // the duration of the call; the kernel only reads it.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                (val as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn set_int(&self, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
        self.set(level, opt, &val)
    }

    /// getsockopt into `buf`; returns the length the kernel reported.
    fn get_bytes(&self, level: libc::c_int, opt: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is writable for `len` bytes and the kernel writes at
        // most `len` bytes and updates `len`, which lives across the call.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(len as usize)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn get_int(&self, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
        let mut buf = [0u8; std::mem::size_of::<libc::c_int>()];
        self.get_bytes(level, opt, &mut buf)?;
        Ok(libc::c_int::from_ne_bytes(buf))
    }

    /// An ioctl that stores one int (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD).
    fn ioctl_int(&self, req: libc::Ioctl) -> io::Result<libc::c_int> {
        let mut val: libc::c_int = 0;
        // SAFETY: these requests write one int through the pointer, which
        // points at `val`, alive across the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, &mut val as *mut libc::c_int) };
        if rc == 0 {
            Ok(val)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn repair(&self, val: libc::c_int, op: &'static str) -> Result<(), TcpRepairError> {
        self.set_int(libc::SOL_TCP, libc::TCP_REPAIR, val)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EPERM) {
                    TcpRepairError::NotPermitted {
                        local: self.local,
                        remote: self.remote,
                        op,
                        source,
                    }
                } else {
                    self.os(op)(source)
                }
            })
    }

    /// Repair mode off (with a window probe), then SO_REUSEADDR as it was.
    fn leave_repair(&self, reuseaddr: bool) -> Result<(), TcpRepairError> {
        self.repair(TCP_REPAIR_OFF, "setsockopt(TCP_REPAIR, off)")?;
        if reuseaddr {
            self.set_int(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
                .map_err(self.os("setsockopt(SO_REUSEADDR)"))?;
        }
        Ok(())
    }

    fn queue(&self, q: libc::c_int) -> Result<(), TcpRepairError> {
        self.set_int(libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, q)
            .map_err(self.os("setsockopt(TCP_REPAIR_QUEUE)"))
    }

    fn tcp_info(&self) -> Result<[u8; TCP_INFO_LEN], TcpRepairError> {
        let mut info = [0u8; TCP_INFO_LEN];
        let n = self
            .get_bytes(libc::SOL_TCP, libc::TCP_INFO, &mut info)
            .map_err(self.os("getsockopt(TCP_INFO)"))?;
        if n < 8 {
            return Err(self.inconsistent(format!("TCP_INFO is {n} bytes")));
        }
        Ok(info)
    }

    /// MSG_PEEK of the selected repair queue into a buffer of `cap` bytes.
    fn peek(&self, cap: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; cap];
        // SAFETY: buf is writable for cap bytes; recv writes at most that.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                cap,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn send_some(&self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: data is readable for its length; send only reads it.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes all of `data` without ever blocking (a repair-mode queue is not
    /// drained by anything, so waiting for room would wait forever). If the
    /// buffer `buf_opt` (SO_SNDBUF or SO_RCVBUF) is too small for it, raises
    /// it once with the matching *FORCE option (CAP_NET_ADMIN, which repair
    /// mode needed anyway); that pins the buffer's size (no autotuning), so it
    /// happens only when the queue would not fit otherwise.
    fn write_all(
        &self,
        data: &[u8],
        buf_opt: libc::c_int,
        op: &'static str,
    ) -> Result<(), TcpRepairError> {
        let force = if buf_opt == libc::SO_SNDBUF {
            libc::SO_SNDBUFFORCE
        } else {
            libc::SO_RCVBUFFORCE
        };
        let mut off = 0;
        let mut raised = false;
        while off < data.len() {
            match self.send_some(&data[off..]) {
                Ok(0) => return Err(self.inconsistent(format!("{op}: wrote 0 bytes"))),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if !raised && matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) =>
                {
                    raised = true;
                    let cur = self
                        .get_int(libc::SOL_SOCKET, buf_opt)
                        .map_err(self.os("getsockopt(SO_SNDBUF/SO_RCVBUF)"))?;
                    // The kernel doubles the value for bookkeeping overhead;
                    // twice the remaining bytes on top leaves room for it.
                    let want = (cur as u64 + 2 * (data.len() - off) as u64)
                        .min(libc::c_int::MAX as u64) as libc::c_int;
                    self.set_int(libc::SOL_SOCKET, force, want)
                        .map_err(self.os("setsockopt(SO_SNDBUFFORCE/SO_RCVBUFFORCE)"))?;
                }
                Err(e) => return Err(self.os(op)(e)),
            }
        }
        Ok(())
    }
}

/// Puts the socket `fd` (an established TCP socket; may be a copy of another
/// process's fd obtained with pidfd_getfd, which is the same socket) into
/// repair mode and reads its state. The socket is LEFT in repair mode, so
/// that when its owner is killed the close sends nothing (no FIN, no RST) to
/// the peer. If the dump fails after entering repair mode, the socket is
/// taken out of it again before the error is returned.
///
/// The caller must keep the connection's packets away (connection lock)
/// while this runs, or the queues may move under it; a queue that visibly
/// changes while read is read again a few times before giving up.
pub fn dump(fd: BorrowedFd<'_>) -> Result<TcpConnection, TcpRepairError> {
    let (local, remote) = addresses(fd)?;
    let sock = Sock { fd, local, remote };
    let state = sock.tcp_info()?[0];
    if state != TCP_ESTABLISHED {
        return Err(TcpRepairError::NotEstablished {
            local,
            remote,
            state,
        });
    }
    let reuseaddr = sock
        .get_int(libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(sock.os("getsockopt(SO_REUSEADDR)"))?
        != 0;
    sock.repair(TCP_REPAIR_ON, "setsockopt(TCP_REPAIR, on)")?;
    let res = dump_in_repair(&sock, reuseaddr);
    if res.is_err() {
        // Best effort: the dump has failed already; a socket left in repair
        // mode would stall its connection. The error being returned matters more.
        let _ = sock.leave_repair(reuseaddr);
    }
    res
}

fn dump_in_repair(sock: &Sock<'_>, reuseaddr: bool) -> Result<TcpConnection, TcpRepairError> {
    let (recv_seq, recv_queue) = dump_recv_queue(sock)?;
    let (send_seq, send_queue, unsent) = dump_send_queue(sock)?;
    sock.queue(TCP_NO_QUEUE)?;

    let mss = sock
        .get_int(libc::SOL_TCP, libc::TCP_MAXSEG)
        .map_err(sock.os("getsockopt(TCP_MAXSEG)"))? as u32;
    let info = sock.tcp_info()?;
    let options = info[5];
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;` the first bit-field
    // takes the low bits on little-endian ABIs and the high bits on big-endian.
    let (snd_wscale, rcv_wscale) = if cfg!(target_endian = "little") {
        (info[6] & 0xf, info[6] >> 4)
    } else {
        (info[6] >> 4, info[6] & 0xf)
    };
    let timestamp = sock
        .get_int(libc::SOL_TCP, libc::TCP_TIMESTAMP)
        .map_err(sock.os("getsockopt(TCP_TIMESTAMP)"))? as u32;
    let mut wbuf = [0u8; std::mem::size_of::<RepairWindow>()];
    let n = sock
        .get_bytes(libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &mut wbuf)
        .map_err(sock.os("getsockopt(TCP_REPAIR_WINDOW)"))?;
    if n != wbuf.len() {
        return Err(sock.inconsistent(format!("TCP_REPAIR_WINDOW is {n} bytes")));
    }
    let word = |i: usize| u32::from_ne_bytes([wbuf[i], wbuf[i + 1], wbuf[i + 2], wbuf[i + 3]]);
    let window = RepairWindow {
        snd_wl1: word(0),
        snd_wnd: word(4),
        max_window: word(8),
        rcv_wnd: word(12),
        rcv_wup: word(16),
    };
    let nodelay = sock
        .get_int(libc::SOL_TCP, libc::TCP_NODELAY)
        .map_err(sock.os("getsockopt(TCP_NODELAY)"))?
        != 0;
    let cork = sock
        .get_int(libc::SOL_TCP, libc::TCP_CORK)
        .map_err(sock.os("getsockopt(TCP_CORK)"))?
        != 0;
    Ok(TcpConnection {
        local: sock.local,
        remote: sock.remote,
        send_seq,
        recv_seq,
        send_queue,
        unsent,
        recv_queue,
        mss,
        snd_wscale,
        rcv_wscale,
        sack: options & TCPI_OPT_SACK != 0,
        timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
        wscale_ok: options & TCPI_OPT_WSCALE != 0,
        timestamp,
        window,
        nodelay,
        cork,
        reuseaddr,
    })
}

/// rcv_nxt and the bytes from copied_seq (the application's read position)
/// up to it.
fn dump_recv_queue(sock: &Sock<'_>) -> Result<(u32, Vec<u8>), TcpRepairError> {
    sock.queue(TCP_RECV_QUEUE)?;
    let read = || -> Result<(u32, usize), TcpRepairError> {
        let seq = sock
            .get_int(libc::SOL_TCP, libc::TCP_QUEUE_SEQ)
            .map_err(sock.os("getsockopt(TCP_QUEUE_SEQ, recv)"))? as u32;
        let inq = sock.ioctl_int(SIOCINQ).map_err(sock.os("ioctl(SIOCINQ)"))?;
        Ok((seq, inq.max(0) as usize))
    };
    for _ in 0..DUMP_TRIES {
        let before = read()?;
        let data = if before.1 == 0 {
            Vec::new()
        } else {
            sock.peek(before.1)
                .map_err(sock.os("recv(MSG_PEEK, TCP_RECV_QUEUE)"))?
        };
        if read()? == before && data.len() == before.1 {
            return Ok((before.0, data));
        }
    }
    Err(sock.inconsistent(format!(
        "receive queue kept changing while read ({DUMP_TRIES} tries); is the connection locked?"
    )))
}

/// write_seq, the bytes from snd_una up to it, and how many of them at the
/// end were never sent.
fn dump_send_queue(sock: &Sock<'_>) -> Result<(u32, Vec<u8>, u32), TcpRepairError> {
    sock.queue(TCP_SEND_QUEUE)?;
    let read = || -> Result<(u32, usize, usize), TcpRepairError> {
        let seq = sock
            .get_int(libc::SOL_TCP, libc::TCP_QUEUE_SEQ)
            .map_err(sock.os("getsockopt(TCP_QUEUE_SEQ, send)"))? as u32;
        let outq = sock
            .ioctl_int(SIOCOUTQ)
            .map_err(sock.os("ioctl(SIOCOUTQ)"))?;
        let unsent = sock
            .ioctl_int(SIOCOUTQNSD)
            .map_err(sock.os("ioctl(SIOCOUTQNSD)"))?;
        Ok((seq, outq.max(0) as usize, unsent.max(0) as usize))
    };
    for _ in 0..DUMP_TRIES {
        let before = read()?;
        let (_, outq, unsent) = before;
        if unsent > outq {
            return Err(sock.inconsistent(format!(
                "send queue: {unsent} bytes unsent of {outq} queued"
            )));
        }
        let data = if outq == 0 {
            Vec::new()
        } else {
            peek_send_queue(sock, outq)?
        };
        if read()? == before {
            return Ok((before.0, data, unsent as u32));
        }
    }
    Err(sock.inconsistent(format!(
        "send queue kept changing while read ({DUMP_TRIES} tries); is the connection locked?"
    )))
}

/// The last `outq` bytes of the send queue. The kernel copies whole buffers
/// and fails with EFAULT if they do not fit; the head buffer may still hold
/// bytes before snd_una (a partly acknowledged single segment is not
/// trimmed), so peek with room to spare and keep the tail.
fn peek_send_queue(sock: &Sock<'_>, outq: usize) -> Result<Vec<u8>, TcpRepairError> {
    let mut slack = 64 * 1024;
    loop {
        match sock.peek(outq + slack) {
            Ok(mut data) => {
                if data.len() < outq {
                    return Err(sock.inconsistent(format!(
                        "send queue: peeked {} bytes, SIOCOUTQ says {outq}",
                        data.len()
                    )));
                }
                data.drain(..data.len() - outq);
                return Ok(data);
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) && slack < 64 << 20 => slack *= 4,
            Err(e) => return Err(sock.os("recv(MSG_PEEK, TCP_SEND_QUEUE)")(e)),
        }
    }
}

/// Takes a socket out of repair mode again (the dump's tree keeps running:
/// dump without --exit, or a failed dump). The kernel sends the peer a
/// window probe, which makes it re-announce its window. The kernel also
/// clears SO_REUSEADDR when repair mode ends; [`leave_repair_as_dumped`]
/// puts it back.
pub fn leave_repair(fd: BorrowedFd<'_>) -> Result<(), TcpRepairError> {
    let (local, remote) = addresses(fd)?;
    Sock { fd, local, remote }.repair(TCP_REPAIR_OFF, "setsockopt(TCP_REPAIR, off)")
}

/// [`leave_repair`] for a socket whose dump is `conn`: also restores the
/// SO_REUSEADDR the socket had before [`dump`] (an accepted socket inherits
/// its listener's, and without it a new listener on that port could not be
/// bound while the connection lives).
pub fn leave_repair_as_dumped(
    fd: BorrowedFd<'_>,
    conn: &TcpConnection,
) -> Result<(), TcpRepairError> {
    let (local, remote) = addresses(fd)?;
    Sock { fd, local, remote }.leave_repair(conn.reuseaddr)
}

/// Creates a new socket that continues `conn` and returns it (blocking
/// unless `flags` has SOCK_NONBLOCK; close-on-exec). `flags` are extra
/// socket() type flags.
///
/// The local address must be bindable here: the old socket closed (in repair
/// mode, so it left no TIME_WAIT) or in another network namespace. Repair
/// mode lets the new socket share its port with a listener. On failure the
/// half-built socket is closed in repair mode, so the peer sees nothing.
///
/// A queue that does not fit the new socket's default buffer raises that
/// buffer with SO_SNDBUFFORCE/SO_RCVBUFFORCE, which pins its size (the
/// kernel stops autotuning it).
pub fn restore(conn: &TcpConnection, flags: i32) -> Result<OwnedFd, TcpRepairError> {
    let os = |op: &'static str| {
        let (local, remote) = (conn.local, conn.remote);
        move |source| TcpRepairError::Os {
            local,
            remote,
            op,
            source,
        }
    };
    let family = match (conn.local, conn.remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6,
        _ => {
            return Err(TcpRepairError::Inconsistent {
                local: conn.local,
                remote: conn.remote,
                what: "local and remote are of different address families".into(),
            })
        }
    };
    let unsent = conn.unsent as usize;
    if unsent > conn.send_queue.len() {
        return Err(TcpRepairError::Inconsistent {
            local: conn.local,
            remote: conn.remote,
            what: format!(
                "{unsent} bytes unsent of a {}-byte send queue",
                conn.send_queue.len()
            ),
        });
    }
    // SAFETY: socket() takes integers only; the fd it returns is owned below.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            libc::IPPROTO_TCP,
        )
    };
    if raw < 0 {
        return Err(os("socket")(io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh fd that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    let sock = Sock {
        fd: owned.as_fd(),
        local: conn.local,
        remote: conn.remote,
    };

    // SO_REUSEADDR before repair mode: setting it afterwards would replace
    // the forced reuse that repair mode grants (and that binding next to a
    // listener on the same port needs).
    sock.set_int(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
        .map_err(os("setsockopt(SO_REUSEADDR)"))?;
    sock.repair(TCP_REPAIR_ON, "setsockopt(TCP_REPAIR, on)")?;

    // Sequence numbers at the start of each queue; writing the queues below
    // advances them to recv_seq and send_seq.
    let (sent, unsent_bytes) = conn.send_queue.split_at(conn.send_queue.len() - unsent);
    let recv_start = conn.recv_seq.wrapping_sub(conn.recv_queue.len() as u32);
    let send_start = conn.send_seq.wrapping_sub(conn.send_queue.len() as u32);
    sock.queue(TCP_RECV_QUEUE)?;
    sock.set_int(
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        recv_start as libc::c_int,
    )
    .map_err(os("setsockopt(TCP_QUEUE_SEQ, recv)"))?;
    sock.queue(TCP_SEND_QUEUE)?;
    sock.set_int(
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        send_start as libc::c_int,
    )
    .map_err(os("setsockopt(TCP_QUEUE_SEQ, send)"))?;

    let (addr, len) = sockaddr_of(&conn.local);
    // SAFETY: addr is a sockaddr of `len` bytes for this family, alive across the call.
    if unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(os("bind")(io::Error::last_os_error()));
    }
    let (addr, len) = sockaddr_of(&conn.remote);
    // SAFETY: as for bind. In repair mode connect sends no SYN: the socket
    // becomes ESTABLISHED at once with the sequence numbers set above.
    if unsafe { libc::connect(raw, (&addr as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(os("connect")(io::Error::last_os_error()));
    }

    let mut opts = Vec::with_capacity(4);
    if conn.mss != 0 {
        opts.push(RepairOpt {
            opt_code: TCPOPT_MAXSEG,
            opt_val: conn.mss,
        });
    }
    if conn.wscale_ok {
        opts.push(RepairOpt {
            opt_code: TCPOPT_WINDOW,
            opt_val: u32::from(conn.snd_wscale) | (u32::from(conn.rcv_wscale) << 16),
        });
    }
    if conn.sack {
        opts.push(RepairOpt {
            opt_code: TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if conn.timestamps {
        opts.push(RepairOpt {
            opt_code: TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    if !opts.is_empty() {
        // SAFETY: opts is an array of repr(C) tcp_repair_opt, readable for
        // its byte length, which is what the kernel is told.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_TCP,
                libc::TCP_REPAIR_OPTIONS,
                opts.as_ptr().cast(),
                std::mem::size_of_val(opts.as_slice()) as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(os("setsockopt(TCP_REPAIR_OPTIONS)")(
                io::Error::last_os_error(),
            ));
        }
    }
    sock.set_int(
        libc::SOL_TCP,
        libc::TCP_TIMESTAMP,
        conn.timestamp as libc::c_int,
    )
    .map_err(os("setsockopt(TCP_TIMESTAMP)"))?;

    sock.queue(TCP_RECV_QUEUE)?;
    sock.write_all(&conn.recv_queue, libc::SO_RCVBUF, "send(TCP_RECV_QUEUE)")?;
    sock.queue(TCP_SEND_QUEUE)?;
    sock.write_all(sent, libc::SO_SNDBUF, "send(TCP_SEND_QUEUE)")?;
    sock.queue(TCP_NO_QUEUE)?;

    // After the receive queue: the kernel checks rcv_wup and snd_wl1 against rcv_nxt.
    sock.set(libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &conn.window)
        .map_err(os("setsockopt(TCP_REPAIR_WINDOW)"))?;
    sock.set_int(libc::SOL_TCP, libc::TCP_NODELAY, conn.nodelay.into())
        .map_err(os("setsockopt(TCP_NODELAY)"))?;
    sock.set_int(libc::SOL_TCP, libc::TCP_CORK, conn.cork.into())
        .map_err(os("setsockopt(TCP_CORK)"))?;
    // Off with a window probe: the peer answers with its current window.
    sock.leave_repair(conn.reuseaddr)?;

    // Never sent before: ordinary new data from here on.
    if let Err(e) = sock.write_all(unsent_bytes, libc::SO_SNDBUF, "send(unsent data)") {
        // Back into repair mode so that dropping the socket closes it
        // silently; the error being returned matters more than this one.
        let _ = sock.repair(TCP_REPAIR_ON, "setsockopt(TCP_REPAIR, on)");
        return Err(e);
    }
    Ok(owned)
}

/// getsockname and getpeername of `fd`.
fn addresses(fd: BorrowedFd<'_>) -> Result<(SocketAddr, SocketAddr), TcpRepairError> {
    let get = |op: &'static str,
               f: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int| {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: ss is writable for len bytes; the kernel writes at most
        // that much and updates len.
        if unsafe {
            f(
                fd.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        } != 0
        {
            return Err(TcpRepairError::Addresses {
                fd: fd.as_raw_fd(),
                op,
                source: io::Error::last_os_error(),
            });
        }
        socket_addr_of(&ss).ok_or_else(|| TcpRepairError::Addresses {
            fd: fd.as_raw_fd(),
            op,
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("address family {} is not IPv4 or IPv6", ss.ss_family),
            ),
        })
    };
    Ok((
        get("getsockname", libc::getsockname)?,
        get("getpeername", libc::getpeername)?,
    ))
}

fn socket_addr_of(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in;
            // sockaddr_storage is large and aligned enough for it.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a
            // sockaddr_in, and all-zero is a valid one.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// `tcpi_state` of a TCP socket (TCP_ESTABLISHED, TCP_CLOSE, ...).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    let mut info = [0u8; TCP_INFO_LEN];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info is writable for len bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[0])
}

/// Byte queues as hex strings in the JSON image.
mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netfilter::tests::unique_name;
    use crate::sys::netfilter::ConnectionLock;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    const PATIENCE: Duration = Duration::from_secs(20);

    /// Deterministic bytes, different for every `tag`.
    fn pattern(tag: u32, n: usize) -> Vec<u8> {
        let mut x = tag.wrapping_mul(0x9e37_79b9) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn pair(ip: &str) -> (TcpListener, TcpStream, TcpStream) {
        let listener = TcpListener::bind((ip, 0)).expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        for s in [&client, &server] {
            s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        }
        (listener, client, server)
    }

    fn ioctl_of(s: &impl AsFd, req: libc::Ioctl) -> usize {
        let sock = Sock {
            fd: s.as_fd(),
            local: "0.0.0.0:0".parse().expect("addr"),
            remote: "0.0.0.0:0".parse().expect("addr"),
        };
        sock.ioctl_int(req).expect("ioctl") as usize
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Exactly `n` bytes, or the test fails (EOF, reset and timeout included).
    fn read_n(s: &mut TcpStream, n: usize, who: &str) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        if let Err(e) = s.read_exact(&mut buf) {
            panic!("{who}: reading {n} bytes: {e}");
        }
        buf
    }

    /// Nothing to read, and neither EOF nor an error pending.
    fn assert_quiet(s: &mut TcpStream, who: &str) {
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("{who}: expected nothing to read, got {other:?}"),
        }
        s.set_nonblocking(false).expect("blocking");
    }

    /// Writes up to `limit` bytes of `data` without blocking; how many went.
    fn write_nonblocking(s: &mut TcpStream, data: &[u8]) -> usize {
        s.set_nonblocking(true).expect("nonblocking");
        let mut off = 0;
        while off < data.len() {
            match s.write(&data[off..(off + 16384).min(data.len())]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        s.set_nonblocking(false).expect("blocking");
        off
    }

    /// A table of its own dropping TCP packets from `src` to `dst` at input
    /// only, deleted on drop.
    struct InputDrop(String);

    impl InputDrop {
        fn new(src: SocketAddr, dst: SocketAddr) -> InputDrop {
            let name = unique_name("in");
            let (proto, s, d) = match (src, dst) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    ("ip", s.ip().to_string(), d.ip().to_string())
                }
                _ => ("ip6", src.ip().to_string(), dst.ip().to_string()),
            };
            nft_script(&format!(
                "add table inet {name}\n\
                 add chain inet {name} input {{ type filter hook input priority -300; }}\n\
                 add rule inet {name} input {proto} saddr {s} {proto} daddr {d} \
                 tcp sport {} tcp dport {} drop\n",
                src.port(),
                dst.port()
            ));
            InputDrop(name)
        }
    }

    impl Drop for InputDrop {
        fn drop(&mut self) {
            nft_script(&format!("delete table inet {}\n", self.0));
        }
    }

    fn nft_script(script: &str) {
        let mut child = std::process::Command::new("/usr/sbin/nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("script");
        assert!(child.wait().expect("nft").success(), "nft: {script}");
    }

    /// The server end of a loopback connection is dumped under the lock,
    /// closed silently, restored, and the stream goes on in both directions
    /// with nothing lost or repeated.
    fn move_server_socket(ip: &str) {
        let (_listener, mut client, mut server) = pair(ip);

        // Round trip before, read in full on both sides.
        let a1 = pattern(1, 10_000);
        client.write_all(&a1).expect("write a1");
        assert_eq!(read_n(&mut server, a1.len(), "server"), a1);
        let b1 = pattern(2, 10_000);
        server.write_all(&b1).expect("write b1");
        assert_eq!(read_n(&mut client, b1.len(), "client"), b1);

        // Left unread in the server's receive queue.
        let a2 = pattern(3, 7_000);
        client.write_all(&a2).expect("write a2");
        wait_until("a2 in the server's receive queue", || {
            ioctl_of(&server, SIOCINQ) == a2.len()
        });
        // Everything acknowledged both ways, so the queues hold what the test says.
        wait_until("acks", || {
            ioctl_of(&server, SIOCOUTQ) == 0 && ioctl_of(&client, SIOCOUTQ) == 0
        });

        let local = server.local_addr().expect("addr");
        let remote = server.peer_addr().expect("addr");

        // The client's packets (its ACKs too) are dropped on their way in,
        // so what the server sends now reaches the client but stays
        // unacknowledged; past the client's window it is not sent at all.
        // (The connection lock drops a local sender's packets at output,
        // where TCP counts them as not sent, so it alone makes no
        // sent-but-unacked data.)
        let acks = InputDrop::new(remote, local);
        let b2 = pattern(4, 256 * 1024);
        let b2 = b2[..write_nonblocking(&mut server, &b2)].to_vec();
        // Dropped too; the client will retransmit them.
        let a3 = pattern(5, 3_000);
        client.write_all(&a3).expect("write a3");
        std::thread::sleep(Duration::from_millis(50));
        let lock = ConnectionLock::block(&unique_name("mv"), &[(local, remote)]).expect("lock");
        drop(acks);

        // The client holds some of it (unread) although its ACKs never came.
        let client_holds = ioctl_of(&client, SIOCINQ);
        let conn = dump(server.as_fd()).expect("dump");
        eprintln!(
            "queued {} unsent {} client holds {client_holds} window {:?} mss {} wscale {}/{}",
            conn.send_queue.len(),
            conn.unsent,
            conn.window,
            conn.mss,
            conn.snd_wscale,
            conn.rcv_wscale
        );
        assert!(client_holds > 0 && client_holds <= b2.len() - conn.unsent as usize);
        assert_eq!((conn.local, conn.remote), (local, remote));
        assert_eq!(conn.recv_queue, a2);
        assert_eq!(conn.send_queue, b2);
        assert!(
            conn.unsent > 0 && (conn.unsent as usize) < b2.len(),
            "both sent and unsent data: {} of {}",
            conn.unsent,
            b2.len()
        );
        assert!(conn.timestamps && conn.sack && conn.wscale_ok, "{conn:?}");
        assert!(conn.mss > 0);
        // What restore gets is what the image holds.
        let json = serde_json::to_string(&conn).expect("to json");
        let conn2: TcpConnection = serde_json::from_str(&json).expect("from json");
        assert_eq!(conn2, conn);

        drop(server); // in repair mode: no FIN, no RST
        let restored = restore(&conn2, 0).expect("restore");
        lock.release().expect("release");
        let mut server = TcpStream::from(restored);
        server.set_read_timeout(Some(PATIENCE)).expect("timeout");
        assert_eq!(server.local_addr().expect("addr"), local);
        assert_eq!(server.peer_addr().expect("addr"), remote);

        // The restored receive queue, then what the client retransmits.
        let got = read_n(&mut server, a2.len() + a3.len(), "restored server");
        assert_eq!(&got[..a2.len()], &a2[..]);
        assert_eq!(&got[a2.len()..], &a3[..]);
        // Exactly the bytes the old socket had queued, sent or not.
        assert_eq!(read_n(&mut client, b2.len(), "client"), b2);

        let (mut from_client, mut from_server) = (a3.len(), 0);
        for i in 0..5u32 {
            let q = pattern(100 + i, 1_000 + 777 * i as usize);
            client.write_all(&q).expect("client write");
            assert_eq!(read_n(&mut server, q.len(), "restored server"), q);
            let r: Vec<u8> = q.iter().rev().copied().collect();
            server.write_all(&r).expect("server write");
            assert_eq!(read_n(&mut client, r.len(), "client"), r);
            from_client += q.len();
            from_server += r.len();
        }

        // The restored socket's sequence numbers continue the original's.
        wait_until("acks", || ioctl_of(&server, SIOCOUTQ) == 0);
        let again = dump(server.as_fd()).expect("dump restored");
        assert_eq!(
            again.recv_seq,
            conn.recv_seq.wrapping_add(from_client as u32)
        );
        assert_eq!(
            again.send_seq,
            conn.send_seq.wrapping_add(from_server as u32)
        );
        assert!(again.recv_queue.is_empty() && again.send_queue.is_empty());
        assert_eq!(again.timestamps, conn.timestamps);
        assert_eq!(
            (again.snd_wscale, again.rcv_wscale),
            (conn.snd_wscale, conn.rcv_wscale)
        );
        // A dump without exit: the socket goes back to work.
        leave_repair_as_dumped(server.as_fd(), &again).expect("leave repair");
        client.write_all(b"ping").expect("ping");
        assert_eq!(read_n(&mut server, 4, "server"), b"ping");
        server.write_all(b"pong").expect("pong");
        assert_eq!(read_n(&mut client, 4, "client"), b"pong");

        assert_quiet(&mut client, "client");
        assert_quiet(&mut server, "server");
        assert_eq!(tcp_state(client.as_fd()).expect("state"), TCP_ESTABLISHED);
    }

    /// Queues far bigger than a new socket's default buffers (both peers
    /// wrote until their sockets would block, neither read).
    #[test]
    fn move_full_queues() {
        let (_listener, mut client, mut server) = pair("127.0.0.1");
        // A bulk transfer each way first: receive buffers grow (autotuning)
        // only while the application reads.
        let bulk = pattern(6, 16 << 20);
        for _ in 0..2 {
            let sender = {
                let (mut c, bulk) = (client.try_clone().expect("dup"), bulk.clone());
                std::thread::spawn(move || c.write_all(&bulk).expect("bulk write"))
            };
            assert!(read_n(&mut server, bulk.len(), "server") == bulk);
            sender.join().expect("sender");
            std::mem::swap(&mut client, &mut server);
        }
        let limit = 16 << 20;
        let up = pattern(7, limit);
        let down = pattern(8, limit);
        let mut up_n = 0;
        let mut down_n = 0;
        // A few rounds: the kernel grows buffers as they fill.
        for _ in 0..20 {
            up_n += write_nonblocking(&mut client, &up[up_n..]);
            down_n += write_nonblocking(&mut server, &down[down_n..]);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (local, remote) = (
            server.local_addr().expect("addr"),
            server.peer_addr().expect("addr"),
        );
        let lock = ConnectionLock::block(&unique_name("full"), &[(local, remote)]).expect("lock");
        let conn = dump(server.as_fd()).expect("dump");
        eprintln!(
            "full: up {up_n} down {down_n} recv queue {} send queue {} unsent {}",
            conn.recv_queue.len(),
            conn.send_queue.len(),
            conn.unsent
        );
        // Far bigger: four times what a new socket starts with (how much
        // autotuning grew them depends on how busy the machine is).
        let default_of = |sysctl: &str| -> usize {
            let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}")).expect(sysctl);
            v.split_whitespace()
                .nth(1)
                .and_then(|d| d.parse().ok())
                .expect(sysctl)
        };
        assert!(conn.recv_queue.len() > 4 * default_of("tcp_rmem"));
        assert!(conn.send_queue.len() > 4 * default_of("tcp_wmem"));
        drop(server);
        let mut server = TcpStream::from(restore(&conn, 0).expect("restore"));
        lock.release().expect("release");
        server.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let reader = std::thread::spawn(move || {
            let got = read_n(&mut client, down_n, "client");
            (client, got)
        });
        assert!(read_n(&mut server, up_n, "restored server") == up[..up_n]);
        let (mut client, got) = reader.join().expect("client thread");
        assert!(got == down[..down_n]);
        assert_quiet(&mut client, "client");
    }

    #[test]
    fn move_established_ipv4() {
        move_server_socket("127.0.0.1");
    }

    #[test]
    fn move_established_ipv6() {
        move_server_socket("::1");
    }

    /// With the lock, a peer talking to a connection whose socket is gone
    /// gets no reset; without it (control) it does.
    #[test]
    fn lock_prevents_reset() {
        let silent_close = |server: TcpStream| {
            dump(server.as_fd()).expect("dump");
            drop(server);
        };

        // Control first: closing in repair mode is silent by itself...
        let (_listener, mut client, server) = pair("127.0.0.1");
        silent_close(server);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(tcp_state(client.as_fd()).expect("state"), TCP_ESTABLISHED);
        assert_quiet(&mut client, "client after silent close");
        // ...but the next segment from the peer meets no socket: reset.
        client.write_all(b"anyone?").expect("write");
        wait_until("reset", || {
            tcp_state(client.as_fd()).expect("state") == TCP_CLOSE
        });
        let mut b = [0u8; 1];
        let err = client.read(&mut b).expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");

        // Locked: the peer just retransmits into the void.
        let (_listener, mut client, server) = pair("127.0.0.1");
        let tuple = (
            server.local_addr().expect("addr"),
            server.peer_addr().expect("addr"),
        );
        let lock = ConnectionLock::block(&unique_name("rst"), &[tuple]).expect("lock");
        silent_close(server);
        client.write_all(b"anyone?").expect("write");
        // Long enough for a few retransmissions (RTO starts at 200 ms).
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(tcp_state(client.as_fd()).expect("state"), TCP_ESTABLISHED);
        assert_quiet(&mut client, "client behind the lock");
        lock.release().expect("release");
    }

    #[test]
    fn refuses_what_it_cannot_repair() {
        // A listening socket is not an established connection.
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        assert!(matches!(
            dump(listener.as_fd()),
            Err(TcpRepairError::Addresses { .. })
        ));
        // Half closed: FIN_WAIT2 on one side, CLOSE_WAIT on the other.
        let (_l, client, server) = pair("127.0.0.1");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        wait_until("close wait", || {
            tcp_state(server.as_fd()).expect("state") != TCP_ESTABLISHED
        });
        let err = dump(server.as_fd()).expect_err("half closed");
        assert!(
            matches!(err, TcpRepairError::NotEstablished { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(" -> "), "{err}");
        // Mixed families in an image.
        let mut conn = TcpConnection {
            local: "127.0.0.1:1".parse().expect("addr"),
            remote: "[::1]:2".parse().expect("addr"),
            send_seq: 0,
            recv_seq: 0,
            send_queue: vec![],
            unsent: 0,
            recv_queue: vec![],
            mss: 0,
            snd_wscale: 0,
            rcv_wscale: 0,
            sack: false,
            timestamps: false,
            wscale_ok: false,
            timestamp: 0,
            window: RepairWindow {
                snd_wl1: 0,
                snd_wnd: 0,
                max_window: 0,
                rcv_wnd: 0,
                rcv_wup: 0,
            },
            nodelay: false,
            cork: false,
            reuseaddr: false,
        };
        assert!(matches!(
            restore(&conn, 0),
            Err(TcpRepairError::Inconsistent { .. })
        ));
        conn.remote = "127.0.0.1:2".parse().expect("addr");
        conn.unsent = 1;
        assert!(matches!(
            restore(&conn, 0),
            Err(TcpRepairError::Inconsistent { .. })
        ));
    }

    /// Repair mode clears SO_REUSEADDR on its way out; the dump's record of
    /// it brings it back, on the original and on the restored socket.
    #[test]
    fn reuseaddr_survives() {
        let reuse = |s: &TcpStream| {
            let sock = Sock {
                fd: s.as_fd(),
                local: "0.0.0.0:0".parse().expect("addr"),
                remote: "0.0.0.0:0".parse().expect("addr"),
            };
            sock.get_int(libc::SOL_SOCKET, libc::SO_REUSEADDR)
                .expect("SO_REUSEADDR")
                != 0
        };
        let set_reuse = |s: &TcpStream| {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads one int from `one`, alive across the call.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        };
        let (_l, mut client, server) = pair("127.0.0.1");
        assert!(
            reuse(&server),
            "inherited from std's listener, which sets it"
        );
        let conn = dump(server.as_fd()).expect("dump");
        assert!(conn.reuseaddr);
        leave_repair(server.as_fd()).expect("leave");
        assert!(!reuse(&server), "the kernel clears it");
        let conn = dump(server.as_fd()).expect("dump");
        assert!(!conn.reuseaddr);
        leave_repair(server.as_fd()).expect("leave");
        set_reuse(&server);
        let conn = dump(server.as_fd()).expect("dump");
        leave_repair_as_dumped(server.as_fd(), &conn).expect("leave");
        assert!(reuse(&server));

        let conn = dump(server.as_fd()).expect("dump");
        drop(server);
        let mut server = TcpStream::from(restore(&conn, libc::SOCK_NONBLOCK).expect("restore"));
        assert!(reuse(&server));
        // SOCK_NONBLOCK was applied.
        let mut b = [0u8; 1];
        assert_eq!(
            server.read(&mut b).expect_err("nothing yet").kind(),
            io::ErrorKind::WouldBlock
        );
        server.set_nonblocking(false).expect("blocking");
        server.set_read_timeout(Some(PATIENCE)).expect("timeout");
        client.write_all(b"hi").expect("write");
        assert_eq!(read_n(&mut server, 2, "server"), b"hi");
    }

    #[test]
    fn queues_are_hex_in_json() {
        let (_l, _client, server) = pair("127.0.0.1");
        let conn = dump(server.as_fd()).expect("dump");
        leave_repair(server.as_fd()).expect("leave");
        let mut v: serde_json::Value = serde_json::to_value(&conn).expect("json");
        assert_eq!(v["send_queue"], "");
        v["recv_queue"] = "00ff10".into();
        let back: TcpConnection = serde_json::from_value(v.clone()).expect("back");
        assert_eq!(back.recv_queue, vec![0, 0xff, 0x10]);
        v["recv_queue"] = "xyz".into();
        assert!(serde_json::from_value::<TcpConnection>(v).is_err());
    }
}
