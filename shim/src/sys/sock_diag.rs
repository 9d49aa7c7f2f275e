//! NETLINK_SOCK_DIAG: the kernel's own description of the sockets of a
//! network namespace (unix and TCP/UDP over IPv4/IPv6), keyed by socket inode
//! so the dumper can match them to the `socket:[INODE]` fds of the tree.
//!
//! This module owns the netlink socket (opened in the caller's namespace or,
//! on a short-lived helper thread, in another process's), the dump requests,
//! and the parsing of the replies. Parsing is done by pure functions over byte
//! slices: a malformed reply is an error, never a panic.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000); // !(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;

// linux/unix_diag.h
const UNIX_DIAG_REQ_LEN: usize = 24;
const UNIX_DIAG_MSG_LEN: usize = 16;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

// linux/inet_diag.h
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SHUTDOWN: u16 = 8;

/// Largest datagram the kernel builds for a netlink dump (it caps its dump
/// skbs at 32 KiB); a longer one is reported as truncated, not misread.
const RECV_BUF_LEN: usize = 32 * 1024;

/// Which network namespace a [`SockDiag`] looks at, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netns {
    /// The caller's own.
    Own,
    /// That of this pid (/proc/PID/ns/net).
    OfPid(i32),
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Netns::Own => write!(f, "own network namespace"),
            Netns::OfPid(pid) => write!(f, "network namespace of pid {pid}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("{netns}: creating a NETLINK_SOCK_DIAG socket: {source}")]
    Socket {
        netns: Netns,
        #[source]
        source: io::Error,
    },
    #[error("/proc/{pid}/ns/net: open: {source}")]
    OpenNetns {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("entering the network namespace of pid {pid}: setns: {source}")]
    Setns {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("network namespace of pid {pid}: starting the helper thread: {source}")]
    HelperThread {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("network namespace of pid {pid}: the helper thread panicked")]
    HelperPanicked { pid: i32 },
    #[error("{netns}: sock_diag {request} dump: {op}: {source}")]
    Io {
        netns: Netns,
        request: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{netns}: sock_diag {request} dump: the kernel answered: {source}")]
    Kernel {
        netns: Netns,
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{netns}: sock_diag {request} dump: a {len}-byte reply does not fit the {cap}-byte buffer"
    )]
    Truncated {
        netns: Netns,
        request: &'static str,
        len: usize,
        cap: usize,
    },
    #[error("{netns}: sock_diag {request} dump: malformed reply: {what}")]
    Malformed {
        netns: Netns,
        request: &'static str,
        what: String,
    },
    #[error("{netns}: sock_diag {request} dump: interrupted by socket table changes (NLM_F_DUMP_INTR), retry")]
    Interrupted { netns: Netns, request: &'static str },
    #[error("sock_diag: family {family} with protocol {protocol} is not supported (AF_INET or AF_INET6 with IPPROTO_TCP or IPPROTO_UDP)")]
    Unsupported { family: i32, protocol: i32 },
}

/// One unix socket as `unix_diag` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixDiag {
    pub inode: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: u8,
    /// TCP_LISTEN (10), TCP_ESTABLISHED (1), TCP_CLOSE (7) ... as the kernel reports for unix sockets.
    pub state: u8,
    /// The bound name's sun_path bytes; None when unbound. Abstract names
    /// start with a 0 byte and are kept byte for byte; for a name in the
    /// filesystem the terminating NUL the kernel stores is dropped, so the
    /// bytes are the path as given to bind().
    pub name: Option<Vec<u8>>,
    /// (inode, device) of the socket file in the filesystem, for a name bound in the filesystem.
    pub vfs: Option<(u64, u32)>,
    /// Inode of the peer socket; None when not connected. Some(0) is a peer
    /// without a socket file yet (a connection not yet accepted).
    pub peer: Option<u64>,
    /// UNIX_DIAG_RQLEN: for a listener, (pending connections, backlog);
    /// otherwise (bytes queued to read, for SOCK_DGRAM the length of the
    /// first datagram; bytes of memory queued to write) as the kernel reports.
    pub rqlen: Option<(u32, u32)>,
    /// For each connection waiting in a listener's accept queue
    /// (UNIX_DIAG_ICONS), the inode of the socket that connected.
    pub icons: Vec<u64>,
    /// UNIX_DIAG_SHUTDOWN bits, 0 if absent.
    pub shutdown: u8,
}

/// One TCP or UDP socket as `inet_diag` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetDiag {
    pub inode: u64,
    pub family: i32,
    pub protocol: i32,
    /// TCP state (TCP_LISTEN = 10, TCP_ESTABLISHED = 1, ...); for UDP 7 (unconnected) or 1 (connected).
    pub state: u8,
    /// IPv6 addresses stay V6 (v4-mapped included), with flowinfo and scope id 0.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// idiag_rqueue / idiag_wqueue (for a TCP listener: accept queue length / max backlog).
    pub rqueue: u32,
    pub wqueue: u32,
    pub uid: u32,
    /// Bound device index (idiag_if), 0 if none.
    pub ifindex: u32,
    /// INET_DIAG_SHUTDOWN bits, 0 if absent.
    pub shutdown: u8,
}

/// One netlink socket of family NETLINK_SOCK_DIAG, created in the network
/// namespace of a process. A socket runs one dump at a time, so it is `Send`
/// but not `Sync`.
pub struct SockDiag {
    fd: OwnedFd,
    netns: Netns,
    seq: Cell<u32>,
}

/// socket(AF_NETLINK, SOCK_RAW, NETLINK_SOCK_DIAG) in the calling thread's network namespace.
fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integer arguments only.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl SockDiag {
    /// In the caller's own network namespace.
    pub fn open() -> Result<SockDiag, SockDiagError> {
        let netns = Netns::Own;
        let fd = netlink_socket().map_err(|source| SockDiagError::Socket { netns, source })?;
        Ok(SockDiag::from_fd(fd, netns))
    }

    /// In the network namespace of `pid` (/proc/PID/ns/net): opened on a
    /// short-lived helper thread that setns()es into it, so the calling
    /// thread's namespace never changes (the caller is a ptrace tracer; its
    /// own thread must stay as it is). The socket keeps the namespace it was
    /// created in after the helper thread ends.
    pub fn open_in_netns_of(pid: i32) -> Result<SockDiag, SockDiagError> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|source| SockDiagError::OpenNetns { pid, source })?;
        let helper = std::thread::Builder::new()
            .name(format!("sock-diag-netns-{pid}"))
            .spawn(move || -> Result<OwnedFd, SockDiagError> {
                // SAFETY: setns on an open namespace fd; it changes the
                // namespace of this helper thread only, which ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let source = io::Error::last_os_error();
                    return Err(SockDiagError::Setns { pid, source });
                }
                netlink_socket().map_err(|source| SockDiagError::Socket {
                    netns: Netns::OfPid(pid),
                    source,
                })
            })
            .map_err(|source| SockDiagError::HelperThread { pid, source })?;
        let fd = helper
            .join()
            .map_err(|_| SockDiagError::HelperPanicked { pid })??;
        Ok(SockDiag::from_fd(fd, Netns::OfPid(pid)))
    }

    fn from_fd(fd: OwnedFd, netns: Netns) -> SockDiag {
        SockDiag {
            fd,
            netns,
            seq: Cell::new(0),
        }
    }

    /// Which namespace this socket describes.
    pub fn netns(&self) -> Netns {
        self.netns
    }

    /// Every unix socket of that namespace, by inode (SOCK_DIAG_BY_FAMILY,
    /// AF_UNIX, all states, with name, VFS inode, peer, pending connections,
    /// queue lengths).
    pub fn unix_sockets(&self) -> Result<BTreeMap<u64, UnixDiag>, SockDiagError> {
        let seq = self.next_seq();
        let found = self.dump("unix", &unix_request(seq), seq, parse_unix)?;
        Ok(by_inode(found, |u| u.inode))
    }

    /// Every socket of `family` (libc::AF_INET or AF_INET6) and `protocol`
    /// (libc::IPPROTO_TCP or IPPROTO_UDP) in that namespace, all states, by
    /// inode (inet_diag_req_v2). Sockets without an inode (TIME_WAIT,
    /// SYN_RECV request sockets, connections not yet accepted) are left out:
    /// no fd can refer to them.
    pub fn inet_sockets(
        &self,
        family: i32,
        protocol: i32,
    ) -> Result<BTreeMap<u64, InetDiag>, SockDiagError> {
        let request = match (family, protocol) {
            (libc::AF_INET, libc::IPPROTO_TCP) => "AF_INET TCP",
            (libc::AF_INET, libc::IPPROTO_UDP) => "AF_INET UDP",
            (libc::AF_INET6, libc::IPPROTO_TCP) => "AF_INET6 TCP",
            (libc::AF_INET6, libc::IPPROTO_UDP) => "AF_INET6 UDP",
            _ => return Err(SockDiagError::Unsupported { family, protocol }),
        };
        // Both are small positive constants (matched above).
        let (family8, protocol8) = (family as u8, protocol as u8);
        let seq = self.next_seq();
        let found = self.dump(
            request,
            &inet_request(seq, family8, protocol8),
            seq,
            |payload| parse_inet(payload, protocol),
        )?;
        Ok(by_inode(found, |i| i.inode))
    }

    fn next_seq(&self) -> u32 {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        seq
    }

    /// Sends `req` and reads the dump `seq` to its end, parsing each reply with `parse`.
    fn dump<T>(
        &self,
        request: &'static str,
        req: &[u8],
        seq: u32,
        parse: impl Fn(&[u8]) -> Result<T, Malformed>,
    ) -> Result<Vec<T>, SockDiagError> {
        let netns = self.netns;
        let io_err = |op: &'static str, source: io::Error| SockDiagError::Io {
            netns,
            request,
            op,
            source,
        };
        loop {
            // An unconnected netlink socket sends to the kernel (port 0).
            // SAFETY: send reads req.len() bytes from a live slice.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    req.as_ptr().cast::<libc::c_void>(),
                    req.len(),
                    0,
                )
            };
            if n >= 0 {
                if n as usize != req.len() {
                    let e = io::Error::new(io::ErrorKind::WriteZero, format!("sent {n} bytes"));
                    return Err(io_err("send", e));
                }
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("send", e));
            }
        }
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let mut dump = Dump::new(seq, parse);
        while !dump.done {
            // MSG_TRUNC: netlink returns the datagram's full length, so a
            // datagram longer than the buffer is noticed.
            // SAFETY: recv writes at most buf.len() bytes into the buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("recv", e));
            }
            let len = n as usize;
            if len > buf.len() {
                return Err(SockDiagError::Truncated {
                    netns,
                    request,
                    len,
                    cap: buf.len(),
                });
            }
            if len == 0 {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "empty datagram");
                return Err(io_err("recv", e));
            }
            let datagram = buf.get(..len).unwrap_or_default();
            dump.feed(datagram)
                .map_err(|f| f.into_error(netns, request))?;
        }
        dump.finish().map_err(|f| f.into_error(netns, request))
    }
}

/// Sockets keyed by inode; inode 0 (no socket file) is left out.
fn by_inode<T>(found: Vec<T>, inode: impl Fn(&T) -> u64) -> BTreeMap<u64, T> {
    found
        .into_iter()
        .filter(|t| inode(t) != 0)
        .map(|t| (inode(&t), t))
        .collect()
}

/// What is wrong with a reply, found by the pure parsers below.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Malformed(String);

/// Why a dump failed, before it is named with its request and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    Malformed(String),
    /// NLMSG_ERROR or a negative NLMSG_DONE status: a positive errno.
    Errno(i32),
    Interrupted,
}

impl Fault {
    fn into_error(self, netns: Netns, request: &'static str) -> SockDiagError {
        match self {
            Fault::Malformed(what) => SockDiagError::Malformed {
                netns,
                request,
                what,
            },
            Fault::Errno(errno) => SockDiagError::Kernel {
                netns,
                request,
                source: io::Error::from_raw_os_error(errno),
            },
            Fault::Interrupted => SockDiagError::Interrupted { netns, request },
        }
    }
}

impl From<Malformed> for Fault {
    fn from(m: Malformed) -> Fault {
        Fault::Malformed(m.0)
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn array<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn u16_ne(b: &[u8], off: usize) -> Option<u16> {
    array(b, off).map(u16::from_ne_bytes)
}

fn u32_ne(b: &[u8], off: usize) -> Option<u32> {
    array(b, off).map(u32::from_ne_bytes)
}

fn u16_be(b: &[u8], off: usize) -> Option<u16> {
    array(b, off).map(u16::from_be_bytes)
}

/// A netlink message: header fields and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NlMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into its netlink messages (each NLMSG_ALIGNed).
fn split_messages(mut b: &[u8]) -> Result<Vec<NlMsg<'_>>, Malformed> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32_ne(b, 0)
            .filter(|_| b.len() >= NLMSG_HDRLEN)
            .ok_or_else(|| {
                Malformed(format!(
                    "{} bytes left, shorter than a netlink header",
                    b.len()
                ))
            })? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(Malformed(format!(
                "netlink message length {len} with {} bytes left",
                b.len()
            )));
        }
        let (Some(ty), Some(flags), Some(seq), Some(payload)) = (
            u16_ne(b, 4),
            u16_ne(b, 6),
            u32_ne(b, 8),
            b.get(NLMSG_HDRLEN..len),
        ) else {
            return Err(Malformed("netlink header out of bounds".into()));
        };
        out.push(NlMsg {
            ty,
            flags,
            seq,
            payload,
        });
        b = b.get(align4(len).min(b.len())..).unwrap_or_default();
    }
    Ok(out)
}

/// Splits an attribute area into (type, payload) pairs, each NLA_ALIGNed;
/// the NLA_F_NESTED / NLA_F_NET_BYTEORDER bits are masked off the type.
fn split_attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (Some(len), Some(ty)) = (u16_ne(b, 0), u16_ne(b, 2)) else {
            return Err(Malformed(format!(
                "{} bytes left, shorter than an attribute header",
                b.len()
            )));
        };
        let len = usize::from(len);
        let payload = b
            .get(NLA_HDRLEN..len)
            .filter(|_| len >= NLA_HDRLEN)
            .ok_or_else(|| {
                Malformed(format!(
                    "attribute {ty} of length {len} with {} bytes left",
                    b.len()
                ))
            })?;
        out.push((ty & NLA_TYPE_MASK, payload));
        b = b.get(align4(len).min(b.len())..).unwrap_or_default();
    }
    Ok(out)
}

/// nlmsghdr for a SOCK_DIAG_BY_FAMILY dump request carrying `body`.
fn request(seq: u32, body: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + body.len()) as u32;
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    req.extend_from_slice(body);
    req
}

/// struct unix_diag_req: AF_UNIX, every state, everything the dumper needs.
fn unix_request(seq: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(UNIX_DIAG_REQ_LEN);
    body.push(libc::AF_UNIX as u8); // sdiag_family
    body.push(0); // sdiag_protocol
    body.extend_from_slice(&0u16.to_ne_bytes()); // pad
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    body.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino: any
    let show =
        UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;
    body.extend_from_slice(&show.to_ne_bytes());
    body.extend_from_slice(&[0u8; 8]); // udiag_cookie: unused in dumps
    request(seq, &body)
}

/// struct inet_diag_req_v2: `family`/`protocol`, every state, any address.
fn inet_request(seq: u32, family: u8, protocol: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(INET_DIAG_REQ_V2_LEN);
    body.push(family); // sdiag_family
    body.push(protocol); // sdiag_protocol
    body.push(0); // idiag_ext: INET_DIAG_SHUTDOWN comes unasked
    body.push(0); // pad
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    body.resize(INET_DIAG_REQ_V2_LEN, 0); // struct inet_diag_sockid: any
    request(seq, &body)
}

/// Reading one dump: datagrams are fed in as they arrive until `done`.
/// Messages of other sequence numbers (left from an abandoned dump) are
/// skipped; a reply that does not parse, or an interrupted dump, is
/// remembered and the dump is still read to its end, so the socket is
/// ready for the next request.
struct Dump<T, P> {
    seq: u32,
    parse: P,
    items: Vec<T>,
    fault: Option<Fault>,
    done: bool,
}

impl<T, P: Fn(&[u8]) -> Result<T, Malformed>> Dump<T, P> {
    fn new(seq: u32, parse: P) -> Self {
        Dump {
            seq,
            parse,
            items: Vec::new(),
            fault: None,
            done: false,
        }
    }

    fn note(&mut self, fault: Fault) {
        self.fault.get_or_insert(fault);
    }

    /// Takes one datagram; Err when it cannot even be split into messages
    /// (the dump's end can then no longer be found).
    fn feed(&mut self, datagram: &[u8]) -> Result<(), Fault> {
        for msg in split_messages(datagram)? {
            if msg.seq != self.seq || self.done {
                continue;
            }
            if msg.flags & NLM_F_DUMP_INTR != 0 {
                self.note(Fault::Interrupted);
            }
            match msg.ty {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    self.done = true;
                    // The dump's status, when the kernel includes it.
                    if let Some(status) = array(msg.payload, 0).map(i32::from_ne_bytes) {
                        if status < 0 {
                            self.note(Fault::Errno(status.saturating_neg()));
                        }
                    }
                }
                NLMSG_ERROR => {
                    self.done = true;
                    match array(msg.payload, 0).map(i32::from_ne_bytes) {
                        Some(err) if err < 0 => self.note(Fault::Errno(err.saturating_neg())),
                        Some(_) => self.note(Fault::Malformed(
                            "an acknowledgement instead of a dump".into(),
                        )),
                        None => self.note(Fault::Malformed(format!(
                            "NLMSG_ERROR with a {}-byte payload",
                            msg.payload.len()
                        ))),
                    }
                }
                NLMSG_OVERRUN => {
                    self.done = true;
                    self.note(Fault::Malformed("NLMSG_OVERRUN".into()));
                }
                SOCK_DIAG_BY_FAMILY => match (self.parse)(msg.payload) {
                    Ok(item) => self.items.push(item),
                    Err(m) => self.note(m.into()),
                },
                other => self.note(Fault::Malformed(format!("message type {other}"))),
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<T>, Fault> {
        match self.fault {
            Some(fault) => Err(fault),
            None if !self.done => Err(Fault::Malformed("the dump did not end".into())),
            None => Ok(self.items),
        }
    }
}

/// struct unix_diag_msg and its attributes.
fn parse_unix(p: &[u8]) -> Result<UnixDiag, Malformed> {
    let (Some(&family), Some(&sock_type), Some(&state), Some(ino), Some(attrs)) = (
        p.first(),
        p.get(1),
        p.get(2),
        u32_ne(p, 4),
        p.get(UNIX_DIAG_MSG_LEN..),
    ) else {
        return Err(Malformed(format!(
            "unix_diag_msg of {} bytes, want {UNIX_DIAG_MSG_LEN}",
            p.len()
        )));
    };
    if i32::from(family) != libc::AF_UNIX {
        return Err(Malformed(format!("unix reply of family {family}")));
    }
    let short = |what: &str, len: usize| {
        Malformed(format!(
            "unix socket {ino}: {what} attribute of {len} bytes"
        ))
    };
    let mut d = UnixDiag {
        inode: u64::from(ino),
        sock_type,
        state,
        name: None,
        vfs: None,
        peer: None,
        rqlen: None,
        icons: Vec::new(),
        shutdown: 0,
    };
    for (ty, a) in split_attrs(attrs)? {
        match ty {
            UNIX_DIAG_NAME => {
                let mut name = a.to_vec();
                if name.first().is_some_and(|&c| c != 0) && name.last() == Some(&0) {
                    name.pop();
                }
                d.name = Some(name);
            }
            UNIX_DIAG_VFS => {
                let (Some(vino), Some(dev)) = (u32_ne(a, 0), u32_ne(a, 4)) else {
                    return Err(short("UNIX_DIAG_VFS", a.len()));
                };
                d.vfs = Some((u64::from(vino), dev));
            }
            UNIX_DIAG_PEER => {
                let peer = u32_ne(a, 0).ok_or_else(|| short("UNIX_DIAG_PEER", a.len()))?;
                d.peer = Some(u64::from(peer));
            }
            UNIX_DIAG_ICONS => {
                if a.len() % 4 != 0 {
                    return Err(short("UNIX_DIAG_ICONS", a.len()));
                }
                d.icons = a
                    .chunks_exact(4)
                    .filter_map(|c| u32_ne(c, 0))
                    .map(u64::from)
                    .collect();
            }
            UNIX_DIAG_RQLEN => {
                let (Some(r), Some(w)) = (u32_ne(a, 0), u32_ne(a, 4)) else {
                    return Err(short("UNIX_DIAG_RQLEN", a.len()));
                };
                d.rqlen = Some((r, w));
            }
            UNIX_DIAG_SHUTDOWN => {
                d.shutdown = *a
                    .first()
                    .ok_or_else(|| short("UNIX_DIAG_SHUTDOWN", a.len()))?;
            }
            _ => {}
        }
    }
    Ok(d)
}

/// struct inet_diag_msg and its attributes, for a dump of `protocol`.
fn parse_inet(p: &[u8], protocol: i32) -> Result<InetDiag, Malformed> {
    if p.len() < INET_DIAG_MSG_LEN {
        return Err(Malformed(format!(
            "inet_diag_msg of {} bytes, want {INET_DIAG_MSG_LEN}",
            p.len()
        )));
    }
    let field = |off: usize| u32_ne(p, off).ok_or_else(|| Malformed("inet_diag_msg".into()));
    let (Some(&family), Some(&state), Some(sport), Some(dport)) =
        (p.first(), p.get(1), u16_be(p, 4), u16_be(p, 6))
    else {
        return Err(Malformed("inet_diag_msg".into()));
    };
    let family = i32::from(family);
    let (local, remote) = match family {
        libc::AF_INET => {
            let (Some(src), Some(dst)) = (array::<4>(p, 8), array::<4>(p, 24)) else {
                return Err(Malformed("inet_diag_sockid".into()));
            };
            (
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(src), sport)),
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(dst), dport)),
            )
        }
        libc::AF_INET6 => {
            let (Some(src), Some(dst)) = (array::<16>(p, 8), array::<16>(p, 24)) else {
                return Err(Malformed("inet_diag_sockid".into()));
            };
            (
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(src), sport, 0, 0)),
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(dst), dport, 0, 0)),
            )
        }
        other => return Err(Malformed(format!("inet reply of family {other}"))),
    };
    let inode = field(68)?;
    let mut d = InetDiag {
        inode: u64::from(inode),
        family,
        protocol,
        state,
        local,
        remote,
        rqueue: field(56)?,
        wqueue: field(60)?,
        uid: field(64)?,
        ifindex: field(40)?,
        shutdown: 0,
    };
    for (ty, a) in split_attrs(p.get(INET_DIAG_MSG_LEN..).unwrap_or_default())? {
        if ty == INET_DIAG_SHUTDOWN {
            d.shutdown = *a.first().ok_or_else(|| {
                Malformed(format!(
                    "socket {inode}: empty INET_DIAG_SHUTDOWN attribute"
                ))
            })?;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::{AsFd, RawFd};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    // ---- fixtures built by hand ----

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align4(a.len()), 0);
        a
    }

    fn unix_msg(ty: u8, state: u8, ino: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![libc::AF_UNIX as u8, ty, state, 0];
        m.extend_from_slice(&ino.to_ne_bytes());
        m.extend_from_slice(&[0xff; 8]);
        for a in attrs {
            m.extend_from_slice(a);
        }
        m
    }

    fn pair(a: u32, b: u32) -> Vec<u8> {
        [a.to_ne_bytes(), b.to_ne_bytes()].concat()
    }

    #[test]
    fn unix_msg_with_every_attribute() {
        let icons = [pair(11, 12), 13u32.to_ne_bytes().to_vec()].concat();
        let m = unix_msg(
            libc::SOCK_STREAM as u8,
            10,
            77,
            &[
                attr(UNIX_DIAG_NAME, b"/tmp/s\0"),
                attr(UNIX_DIAG_VFS, &pair(500, 0x801)),
                attr(UNIX_DIAG_PEER, &0u32.to_ne_bytes()),
                attr(UNIX_DIAG_ICONS, &icons),
                attr(UNIX_DIAG_RQLEN, &pair(3, 128)),
                attr(UNIX_DIAG_SHUTDOWN, &[2]),
                attr(99 | 0x8000, b"ignored, nested"),
            ],
        );
        let d = parse_unix(&m).expect("parse");
        assert_eq!(
            d,
            UnixDiag {
                inode: 77,
                sock_type: libc::SOCK_STREAM as u8,
                state: 10,
                name: Some(b"/tmp/s".to_vec()),
                vfs: Some((500, 0x801)),
                peer: Some(0),
                rqlen: Some((3, 128)),
                icons: vec![11, 12, 13],
                shutdown: 2,
            }
        );
    }

    #[test]
    fn unix_abstract_name_kept_byte_for_byte() {
        let m = unix_msg(2, 7, 5, &[attr(UNIX_DIAG_NAME, b"\0x\0")]);
        let d = parse_unix(&m).expect("parse");
        assert_eq!(d.name.as_deref(), Some(&b"\0x\0"[..]));
        assert_eq!((d.vfs, d.peer, d.rqlen, d.shutdown), (None, None, None, 0));
        assert!(d.icons.is_empty());
    }

    #[test]
    fn unix_malformed_is_an_error() {
        // Header too short.
        assert!(parse_unix(&[1, 1, 1, 0, 5, 0, 0]).is_err());
        // Wrong family.
        let mut m = unix_msg(1, 1, 5, &[]);
        m[0] = 2;
        assert!(parse_unix(&m).is_err());
        // Attribute longer than what is left.
        let mut m = unix_msg(1, 1, 5, &[attr(UNIX_DIAG_PEER, &9u32.to_ne_bytes())]);
        m.truncate(m.len() - 1);
        assert!(parse_unix(&m).is_err());
        // Attribute length below its header.
        let mut m = unix_msg(1, 1, 5, &[]);
        m.extend_from_slice(&[2, 0, 2, 0]);
        assert!(parse_unix(&m).is_err());
        // Trailing bytes shorter than an attribute header.
        let mut m = unix_msg(1, 1, 5, &[]);
        m.extend_from_slice(&[8, 0]);
        assert!(parse_unix(&m).is_err());
        // Short fixed-size attributes.
        for ty in [UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN] {
            let m = unix_msg(1, 1, 5, &[attr(ty, &[1, 2, 3])]);
            assert!(parse_unix(&m).is_err(), "short attribute {ty}");
        }
        let m = unix_msg(1, 1, 5, &[attr(UNIX_DIAG_ICONS, &[1, 2, 3, 4, 5])]);
        assert!(parse_unix(&m).is_err());
        let m = unix_msg(1, 1, 5, &[attr(UNIX_DIAG_SHUTDOWN, &[])]);
        assert!(parse_unix(&m).is_err());
    }

    #[test]
    fn attrs_alignment_and_unpadded_last() {
        // A 5-byte attribute padded to 8, then a 4-byte one; the last
        // attribute's padding may be missing.
        let mut b = attr(UNIX_DIAG_SHUTDOWN, &[1]);
        assert_eq!(b.len(), 8);
        b.extend_from_slice(&attr(UNIX_DIAG_PEER, &7u32.to_ne_bytes()));
        b.extend_from_slice(&[5, 0, UNIX_DIAG_SHUTDOWN as u8, 0, 3]);
        let a = split_attrs(&b).expect("split");
        assert_eq!(
            a,
            vec![
                (UNIX_DIAG_SHUTDOWN, &[1u8][..]),
                (UNIX_DIAG_PEER, &7u32.to_ne_bytes()[..]),
                (UNIX_DIAG_SHUTDOWN, &[3u8][..]),
            ]
        );
        assert_eq!(split_attrs(&[]).expect("empty"), vec![]);
    }

    fn inet_msg(family: u8, state: u8, src: &[u8], sport: u16, dst: &[u8], dport: u16) -> Vec<u8> {
        let mut m = vec![family, state, 0, 0];
        m.extend_from_slice(&sport.to_be_bytes());
        m.extend_from_slice(&dport.to_be_bytes());
        let mut a = [0u8; 16];
        a[..src.len()].copy_from_slice(src);
        m.extend_from_slice(&a);
        let mut a = [0u8; 16];
        a[..dst.len()].copy_from_slice(dst);
        m.extend_from_slice(&a);
        m.extend_from_slice(&3u32.to_ne_bytes()); // idiag_if
        m.extend_from_slice(&[0xee; 8]); // cookie
        for v in [0u32, 1, 128, 1000, 4321] {
            // expires, rqueue, wqueue, uid, inode
            m.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(m.len(), INET_DIAG_MSG_LEN);
        m
    }

    #[test]
    fn inet_v4_and_v6() {
        let mut m = inet_msg(
            libc::AF_INET as u8,
            10,
            &[127, 0, 0, 1],
            8080,
            &[0, 0, 0, 0],
            0,
        );
        m.extend_from_slice(&attr(INET_DIAG_SHUTDOWN, &[3]));
        let d = parse_inet(&m, libc::IPPROTO_TCP).expect("parse v4");
        assert_eq!(
            d,
            InetDiag {
                inode: 4321,
                family: libc::AF_INET,
                protocol: libc::IPPROTO_TCP,
                state: 10,
                local: "127.0.0.1:8080".parse().expect("addr"),
                remote: "0.0.0.0:0".parse().expect("addr"),
                rqueue: 1,
                wqueue: 128,
                uid: 1000,
                ifindex: 3,
                shutdown: 3,
            }
        );
        let mapped: Ipv6Addr = "::ffff:10.1.2.3".parse().expect("addr");
        let m = inet_msg(
            libc::AF_INET6 as u8,
            1,
            &Ipv6Addr::LOCALHOST.octets(),
            1,
            &mapped.octets(),
            65535,
        );
        let d = parse_inet(&m, libc::IPPROTO_UDP).expect("parse v6");
        assert_eq!(d.local, "[::1]:1".parse::<SocketAddr>().expect("addr"));
        assert_eq!(
            d.remote,
            "[::ffff:10.1.2.3]:65535"
                .parse::<SocketAddr>()
                .expect("addr")
        );
        assert_eq!((d.protocol, d.state, d.shutdown), (libc::IPPROTO_UDP, 1, 0));
    }

    #[test]
    fn inet_malformed_is_an_error() {
        let m = inet_msg(libc::AF_INET as u8, 1, &[1, 2, 3, 4], 1, &[4, 3, 2, 1], 2);
        assert!(parse_inet(&m[..INET_DIAG_MSG_LEN - 1], libc::IPPROTO_TCP).is_err());
        let mut bad = m.clone();
        bad[0] = libc::AF_UNIX as u8;
        assert!(parse_inet(&bad, libc::IPPROTO_TCP).is_err());
        let mut bad = m.clone();
        bad.extend_from_slice(&attr(INET_DIAG_SHUTDOWN, &[]));
        assert!(parse_inet(&bad, libc::IPPROTO_TCP).is_err());
        let mut bad = m;
        bad.extend_from_slice(&[200, 0, 1, 0]);
        assert!(parse_inet(&bad, libc::IPPROTO_TCP).is_err());
    }

    #[test]
    fn requests_have_kernel_layout() {
        let r = unix_request(9);
        assert_eq!(r.len(), NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN);
        assert_eq!(u32_ne(&r, 0), Some(r.len() as u32));
        assert_eq!(u16_ne(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u16_ne(&r, 6), Some(0x301));
        assert_eq!(u32_ne(&r, 8), Some(9));
        assert_eq!(r[16], libc::AF_UNIX as u8);
        assert_eq!(u32_ne(&r, 20), Some(u32::MAX));
        assert_eq!(u32_ne(&r, 28), Some(0x1f));
        let r = inet_request(3, libc::AF_INET6 as u8, libc::IPPROTO_UDP as u8);
        assert_eq!(r.len(), NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN);
        assert_eq!(u32_ne(&r, 0), Some(r.len() as u32));
        assert_eq!(
            &r[16..20],
            &[libc::AF_INET6 as u8, libc::IPPROTO_UDP as u8, 0, 0]
        );
        assert_eq!(u32_ne(&r, 20), Some(u32::MAX));
        assert!(r[24..].iter().all(|&b| b == 0));
    }

    fn parse_ok(p: &[u8]) -> Result<u8, Malformed> {
        p.first().copied().ok_or_else(|| Malformed("empty".into()))
    }

    #[test]
    fn multipart_dump() {
        let mut d1 = nlmsg(SOCK_DIAG_BY_FAMILY, 2, 7, &[1]);
        d1.extend_from_slice(&nlmsg(SOCK_DIAG_BY_FAMILY, 2, 6, &[66])); // stale
        d1.extend_from_slice(&nlmsg(NLMSG_NOOP, 0, 7, &[]));
        d1.extend_from_slice(&nlmsg(SOCK_DIAG_BY_FAMILY, 2, 7, &[2]));
        let d2 = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 2, 7, &[3]),
            nlmsg(NLMSG_DONE, 2, 7, &0i32.to_ne_bytes()),
        ]
        .concat();
        let mut dump = Dump::new(7, parse_ok);
        dump.feed(&d1).expect("feed 1");
        assert!(!dump.done);
        dump.feed(&d2).expect("feed 2");
        assert!(dump.done);
        assert_eq!(dump.finish(), Ok(vec![1, 2, 3]));
    }

    #[test]
    fn dump_errors() {
        // NLMSG_ERROR with an errno.
        let mut err = (-libc::EPERM).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        let mut dump = Dump::new(1, parse_ok);
        dump.feed(&nlmsg(NLMSG_ERROR, 0, 1, &err)).expect("feed");
        assert_eq!(dump.finish(), Err(Fault::Errno(libc::EPERM)));
        // NLMSG_DONE with a negative status.
        let mut dump = Dump::new(1, parse_ok);
        let done = nlmsg(NLMSG_DONE, 2, 1, &(-libc::ENOBUFS).to_ne_bytes());
        dump.feed(&done).expect("feed");
        assert_eq!(dump.finish(), Err(Fault::Errno(libc::ENOBUFS)));
        // A reply that does not parse: the dump is read to its end, then fails.
        let mut dump = Dump::new(1, parse_ok);
        let msgs = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 2, 1, &[]),
            nlmsg(SOCK_DIAG_BY_FAMILY, 2, 1, &[4]),
        ]
        .concat();
        dump.feed(&msgs).expect("feed");
        assert!(!dump.done);
        dump.feed(&nlmsg(NLMSG_DONE, 2, 1, &[])).expect("feed");
        assert!(dump.done);
        assert_eq!(dump.finish(), Err(Fault::Malformed("empty".into())));
        // Interrupted.
        let mut dump = Dump::new(1, parse_ok);
        let msgs = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 2 | NLM_F_DUMP_INTR, 1, &[4]),
            nlmsg(NLMSG_DONE, 2, 1, &[]),
        ]
        .concat();
        dump.feed(&msgs).expect("feed");
        assert_eq!(dump.finish(), Err(Fault::Interrupted));
        // Unframeable datagrams.
        let mut dump = Dump::new(1, parse_ok);
        let mut m = nlmsg(SOCK_DIAG_BY_FAMILY, 2, 1, &[4]);
        m.truncate(m.len() - 4);
        assert!(dump.feed(&m).is_err());
        assert!(dump.feed(&m[..10]).is_err());
        let mut short_len = nlmsg(SOCK_DIAG_BY_FAMILY, 2, 1, &[4]);
        short_len[0] = 8;
        assert!(dump.feed(&short_len).is_err());
        // A dump that never ended.
        assert!(Dump::new(1, parse_ok).finish().is_err());
    }

    // ---- against the kernel ----

    fn inode(fd: impl AsFd) -> u64 {
        nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
            .expect("fstat")
            .st_ino
    }

    /// listen() again on a listening socket: the kernel only updates the backlog.
    fn set_backlog(fd: RawFd, backlog: i32) {
        // SAFETY: listen takes integer arguments only.
        assert_eq!(unsafe { libc::listen(fd, backlog) }, 0);
    }

    fn unix_pair(ty: i32) -> (OwnedFd, OwnedFd) {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two fds into the array.
        let rc = unsafe {
            libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned here only.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn random_suffix() -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .subsec_nanos();
        format!("{}-{t:x}", std::process::id())
    }

    #[test]
    fn unix_socketpairs() {
        let diag = SockDiag::open().expect("open");
        for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
            let (a, b) = unix_pair(ty);
            let (ia, ib) = (inode(&a), inode(&b));
            let mut wa = std::fs::File::from(a);
            wa.write_all(b"hello").expect("write");
            let all = diag.unix_sockets().expect("unix dump");
            let (da, db) = (&all[&ia], &all[&ib]);
            assert_eq!(da.inode, ia);
            assert_eq!((da.sock_type, db.sock_type), (ty as u8, ty as u8));
            assert_eq!((da.peer, db.peer), (Some(ib), Some(ia)), "type {ty}");
            assert_eq!((da.name.as_ref(), da.vfs), (None, None));
            assert_eq!(db.rqlen.map(|r| r.0), Some(5), "type {ty}: {db:?}");
            if ty != libc::SOCK_DGRAM {
                assert_eq!(da.state, 1);
            }
            assert_eq!(da.shutdown, 0);
        }
    }

    #[test]
    fn unix_shutdown_bits() {
        let diag = SockDiag::open().expect("open");
        let (a, _b) = UnixStream::pair().expect("pair");
        a.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let all = diag.unix_sockets().expect("unix dump");
        assert_eq!(all[&inode(&a)].shutdown, 2); // SEND_SHUTDOWN
    }

    #[test]
    fn unix_listeners_with_pending_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("listen.sock");
        let fs_listener = UnixListener::bind(&path).expect("bind");
        set_backlog(fs_listener.as_raw_fd(), 9);
        let abstract_name = format!("cowsnap-sockdiag-{}", random_suffix());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .expect("abstract addr");
        let abs_listener = UnixListener::bind_addr(&addr).expect("bind abstract");
        let c1 = UnixStream::connect(&path).expect("connect");
        let c2 = UnixStream::connect_addr(&addr).expect("connect abstract");
        let diag = SockDiag::open().expect("open");
        let all = diag.unix_sockets().expect("unix dump");

        let l = &all[&inode(&fs_listener)];
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(l.name.as_deref(), Some(path.as_os_str().as_bytes()));
        assert_eq!(l.state, 10);
        assert_eq!(l.sock_type, libc::SOCK_STREAM as u8);
        let meta = std::fs::symlink_metadata(&path).expect("stat socket file");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(l.vfs.map(|v| v.0), Some(meta.ino()));
        assert_eq!(l.icons.len(), 1, "{l:?}");
        assert_eq!(l.rqlen, Some((1, 9)));
        assert_eq!(l.peer, None);
        let client = &all[&inode(&c1)];
        assert!(client.peer.is_some(), "{client:?}");
        assert_eq!(client.state, 1);
        // The accept queue names the connecting socket.
        assert_eq!(l.icons, vec![client.inode]);

        let l = &all[&inode(&abs_listener)];
        let mut want = vec![0u8];
        want.extend_from_slice(abstract_name.as_bytes());
        assert_eq!(l.name.as_deref(), Some(&want[..]));
        assert_eq!((l.state, l.vfs), (10, None));
        assert_eq!(l.icons, vec![inode(&c2)]);
        assert_eq!(l.rqlen.map(|r| r.0), Some(1));

        // Accepted: the queue is empty, the peers name each other.
        let (s1, _) = fs_listener.accept().expect("accept");
        let all = diag.unix_sockets().expect("unix dump");
        assert!(all[&inode(&fs_listener)].icons.is_empty());
        assert_eq!(all[&inode(&c1)].peer, Some(inode(&s1)));
        assert_eq!(all[&inode(&s1)].peer, Some(inode(&c1)));
    }

    #[test]
    fn unix_bound_dgram() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dgram.sock");
        let s = UnixDatagram::bind(&path).expect("bind");
        let diag = SockDiag::open().expect("open");
        let d = &diag.unix_sockets().expect("unix dump")[&inode(&s)];
        assert_eq!((d.sock_type, d.state), (libc::SOCK_DGRAM as u8, 7));
        assert!(d.vfs.is_some());
        assert_eq!(d.peer, None);
    }

    fn tcp_listener_case(bind: &str, family: i32) {
        let listener = TcpListener::bind(bind).expect("bind");
        set_backlog(listener.as_raw_fd(), 7);
        let laddr = listener.local_addr().expect("local_addr");
        let pending = TcpStream::connect(laddr).expect("connect");
        let diag = SockDiag::open().expect("open");
        let all = diag
            .inet_sockets(family, libc::IPPROTO_TCP)
            .expect("tcp dump");
        let l = &all[&inode(&listener)];
        assert_eq!(
            (l.family, l.protocol, l.state),
            (family, libc::IPPROTO_TCP, 10)
        );
        assert_eq!(l.local, laddr);
        assert_eq!((l.rqueue, l.wqueue), (1, 7));
        // SAFETY: getuid cannot fail.
        assert_eq!(l.uid, unsafe { libc::getuid() });
        assert_eq!(l.ifindex, 0);
        let c = &all[&inode(&pending)];
        assert_eq!(c.state, 1);
        assert_eq!(c.local, pending.local_addr().expect("local"));
        assert_eq!(c.remote, laddr);

        let (mut server, _) = listener.accept().expect("accept");
        let mut client = pending;
        client.write_all(b"abc").expect("write");
        let mut got = [0u8; 3];
        server.read_exact(&mut got).expect("read");
        server.shutdown(std::net::Shutdown::Read).expect("shutdown");
        let all = diag
            .inet_sockets(family, libc::IPPROTO_TCP)
            .expect("tcp dump");
        let s = &all[&inode(&server)];
        assert_eq!(s.state, 1);
        assert_eq!(s.local, server.local_addr().expect("local"));
        assert_eq!(s.remote, server.peer_addr().expect("peer"));
        assert_eq!(s.remote, client.local_addr().expect("client local"));
        assert_eq!(s.shutdown, 1); // RCV_SHUTDOWN, the state stays ESTABLISHED
        assert_eq!(all[&inode(&listener)].rqueue, 0);
        // The other family's dump does not have it.
        let other = if family == libc::AF_INET {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        let all = diag
            .inet_sockets(other, libc::IPPROTO_TCP)
            .expect("tcp dump");
        assert!(!all.contains_key(&inode(&listener)));
    }

    #[test]
    fn tcp_v4() {
        tcp_listener_case("127.0.0.1:0", libc::AF_INET);
    }

    #[test]
    fn tcp_v6() {
        tcp_listener_case("[::1]:0", libc::AF_INET6);
    }

    #[test]
    fn udp_bound_and_connected() {
        let diag = SockDiag::open().expect("open");
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.connect(a.local_addr().expect("addr")).expect("connect");
        b.send(b"12345").expect("send");
        let all = diag
            .inet_sockets(libc::AF_INET, libc::IPPROTO_UDP)
            .expect("udp dump");
        let da = &all[&inode(&a)];
        assert_eq!((da.state, da.protocol), (7, libc::IPPROTO_UDP));
        assert_eq!(da.local, a.local_addr().expect("addr"));
        assert_eq!(da.remote, "0.0.0.0:0".parse::<SocketAddr>().expect("addr"));
        assert!(da.rqueue > 0, "{da:?}");
        let db = &all[&inode(&b)];
        assert_eq!(db.state, 1);
        assert_eq!(db.remote, a.local_addr().expect("addr"));

        let v6 = UdpSocket::bind("[::1]:0").expect("bind v6");
        let all = diag
            .inet_sockets(libc::AF_INET6, libc::IPPROTO_UDP)
            .expect("udp6 dump");
        let d = &all[&inode(&v6)];
        assert_eq!((d.family, d.state), (libc::AF_INET6, 7));
        assert_eq!(d.local, v6.local_addr().expect("addr"));
    }

    #[test]
    fn unsupported_family() {
        let diag = SockDiag::open().expect("open");
        let e = diag.inet_sockets(libc::AF_UNIX, libc::IPPROTO_TCP);
        assert!(matches!(e, Err(SockDiagError::Unsupported { .. })));
        let e = diag.inet_sockets(libc::AF_INET, libc::IPPROTO_SCTP);
        assert!(matches!(e, Err(SockDiagError::Unsupported { .. })));
    }

    #[test]
    fn own_netns_by_pid() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let diag = SockDiag::open_in_netns_of(std::process::id() as i32).expect("open");
        let all = diag
            .inet_sockets(libc::AF_INET, libc::IPPROTO_TCP)
            .expect("tcp dump");
        assert!(all.contains_key(&inode(&l)));
        // Repeated dumps on one socket.
        let (a, _b) = UnixStream::pair().expect("pair");
        for _ in 0..3 {
            assert!(diag
                .unix_sockets()
                .expect("unix dump")
                .contains_key(&inode(&a)));
        }
    }

    /// In a fresh network namespace: a TCP listener on 0.0.0.0 (loopback is
    /// down there) and a unix socketpair; returns the listener's inode.
    fn child_in_new_netns() -> i64 {
        // SAFETY: raw syscalls on fds this child creates; no allocation.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return -1;
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if fd < 0
                || libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len) != 0
                || libc::listen(fd, 3) != 0
            {
                return -2;
            }
            let mut pair = [0i32; 2];
            if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) != 0 {
                return -3;
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return -4;
            }
            st.st_ino as i64
        }
    }

    #[test]
    fn other_netns() {
        let child = crate::sys::testing::TestChild::fork(child_in_new_netns);
        assert!(child.value > 0, "child setup failed: {}", child.value);
        let child_listener = child.value as u64;
        let mine = TcpListener::bind("0.0.0.0:0").expect("bind");
        let (my_unix, _peer) = UnixStream::pair().expect("pair");

        let theirs = SockDiag::open_in_netns_of(child.pid).expect("open in child netns");
        assert_eq!(theirs.netns(), Netns::OfPid(child.pid));
        let tcp = theirs
            .inet_sockets(libc::AF_INET, libc::IPPROTO_TCP)
            .expect("tcp dump");
        assert_eq!(
            tcp.keys().copied().collect::<Vec<_>>(),
            vec![child_listener]
        );
        assert_eq!(tcp[&child_listener].state, 10);
        let unix = theirs.unix_sockets().expect("unix dump");
        assert_eq!(unix.len(), 2, "{unix:?}");
        assert!(!unix.contains_key(&inode(&my_unix)));

        let own = SockDiag::open().expect("open");
        let tcp = own
            .inet_sockets(libc::AF_INET, libc::IPPROTO_TCP)
            .expect("tcp dump");
        assert!(tcp.contains_key(&inode(&mine)));
        assert!(!tcp.contains_key(&child_listener));
        // This thread's namespace did not change.
        let me = std::fs::read_link("/proc/thread-self/ns/net").expect("readlink");
        let init = std::fs::read_link("/proc/self/ns/net").expect("readlink");
        assert_eq!(me, init);
    }

    #[test]
    fn missing_pid_is_named() {
        let pid = 0x7fff_fff0;
        let e = SockDiag::open_in_netns_of(pid).err().expect("no such pid");
        assert!(
            matches!(e, SockDiagError::OpenNetns { pid: p, .. } if p == pid),
            "{e:?}"
        );
        assert!(e.to_string().contains(&pid.to_string()), "{e}");
    }
}
