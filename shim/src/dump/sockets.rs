//! Sockets of a dumped tree: each socket once (by inode), described by the
//! kernel (`sock_diag` for unix peers, names and accept queues) and by
//! getsockopt on a copy of the tracee's fd (`pidfd_getfd`: the same socket,
//! so nothing has to be injected into the tracee). Established TCP
//! connections are put in repair mode and their packets dropped by an
//! nftables table from here until restore ends ([`SocketsDump`]).
//!
//! Never changes what a socket holds: queued data is peeked; the only
//! change is repair mode on established connections, which [`SocketsDump`]
//! undoes on every path where the tree goes on running.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::image::sockets::{
    InetProtocol, InetState, SocketImage, SocketKind, SocketOptions, SocketsImage, TcpOptions,
    UnixName, UnixState,
};
use crate::image::types::{Fd, FdKind};
use crate::sys::netfilter::ConnectionLock;
use crate::sys::sock_diag::{SockDiag, UnixDiag};
use crate::sys::socket::{self as sock, Address};
use crate::sys::tcp_repair;

/// Most bytes read from one socket's receive queue.
const QUEUE_LIMIT: usize = 64 << 20;

/// TCP states as `tcp_info.tcpi_state` and sock_diag report them.
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("pid {pid} fd {fd}: {op}: {source}")]
    Sys {
        pid: i32,
        fd: i32,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sock_diag in the network namespace of pid {pid}: {source}")]
    Diag {
        pid: i32,
        #[source]
        source: crate::sys::sock_diag::SockDiagError,
    },
    #[error("blocking the established connections' packets: {0}")]
    Lock(#[from] crate::sys::netfilter::NetfilterError),
    #[error("pid {pid} fd {fd}: TCP repair of {local} -> {remote}: {source}")]
    Repair {
        pid: i32,
        fd: i32,
        local: SocketAddr,
        remote: SocketAddr,
        #[source]
        // Boxed: it is large, and so would be every Result that carries it.
        source: Box<tcp_repair::TcpRepairError>,
    },
}

/// What the caller chose for sockets that cannot be carried over as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketPolicy {
    /// Dump established TCP connections with TCP_REPAIR (CRIU's name).
    pub tcp_established: bool,
    /// Connections waiting in an accept queue and queued UDP datagrams are
    /// dropped (the peers see a reset) instead of refusing the dump.
    pub skip_in_flight: bool,
}

/// Sockets of the dump, and what it changed about them: established
/// connections in repair mode and the nftables table that drops their
/// packets. Dropped without [`SocketsDump::hand_over`] (a failed dump, or
/// a dump whose tree goes on running after [`SocketsDump::resume`]), it
/// takes every connection out of repair mode and removes the table.
pub struct SocketsDump {
    pub image: SocketsImage,
    repaired: Vec<OwnedFd>,
    lock: Option<ConnectionLock>,
}

impl SocketsDump {
    /// No sockets, nothing changed.
    pub fn none() -> SocketsDump {
        SocketsDump {
            image: SocketsImage::default(),
            repaired: Vec::new(),
            lock: None,
        }
    }

    /// The tree goes on running: connections leave repair mode, the
    /// packets flow again.
    pub fn resume(mut self) {
        self.undo();
    }

    /// The tree was killed with its sockets in repair mode (so they closed
    /// silently); the table stays until restore removes it.
    pub fn hand_over(mut self) {
        self.repaired.clear();
        if let Some(lock) = self.lock.take() {
            lock.keep();
        }
    }

    fn undo(&mut self) {
        for fd in self.repaired.drain(..) {
            if let Err(e) = tcp_repair::leave_repair(fd.as_fd()) {
                eprintln!("cowsnap: taking a connection out of repair mode: {e}");
            }
        }
        if let Some(lock) = self.lock.take() {
            if let Err(e) = lock.release() {
                eprintln!("cowsnap: {e}");
            }
        }
    }
}

impl Drop for SocketsDump {
    fn drop(&mut self) {
        self.undo();
    }
}

/// The first holder of each socket of the tree.
struct Holder {
    pid: i32,
    fd: i32,
    flags: u32,
}

/// Describes every socket the fd tables hold. Sockets that cannot be
/// restored are not errors but `refusals` (one line each, naming pid, fd
/// and why), so that the dump names all of them at once.
pub fn collect(
    root: i32,
    tables: &[(i32, Vec<Fd>)],
    policy: SocketPolicy,
    lock_name: &str,
    refusals: &mut Vec<String>,
) -> Result<SocketsDump, SocketError> {
    let mut holders: BTreeMap<u64, Holder> = BTreeMap::new();
    for (pid, fds) in tables {
        for fd in fds {
            if let FdKind::Socket { inode } = fd.kind {
                holders.entry(inode).or_insert(Holder {
                    pid: *pid,
                    fd: fd.fd,
                    flags: fd.flags,
                });
            }
        }
    }
    let mut out = SocketsDump::none();
    if holders.is_empty() {
        return Ok(out);
    }
    let root_netns = netns_of(root);
    for (pid, fds) in tables {
        if fds.iter().any(|f| matches!(f.kind, FdKind::Socket { .. }))
            && netns_of(*pid) != root_netns
        {
            refusals.push(format!(
                "pid {pid} holds sockets in another network namespace than the root {root}"
            ));
        }
    }
    let diag = SockDiag::open_in_netns_of(root)
        .map_err(|source| SocketError::Diag { pid: root, source })?;
    let unix = diag
        .unix_sockets()
        .map_err(|source| SocketError::Diag { pid: root, source })?;

    let mut established: Vec<(Holder, OwnedFd, SocketAddr, SocketAddr)> = Vec::new();
    for (&inode, h) in &holders {
        let copy = copy_fd(h.pid, h.fd)?;
        let fd = copy.as_fd();
        let sys = |op: &str| {
            let op = op.to_string();
            move |source| SocketError::Sys {
                pid: h.pid,
                fd: h.fd,
                op,
                source,
            }
        };
        let domain =
            sock::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(sys("SO_DOMAIN"))?;
        let sock_type =
            sock::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(sys("SO_TYPE"))?;
        let protocol =
            sock::get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(sys("SO_PROTOCOL"))?;
        let refuse = |refusals: &mut Vec<String>, why: String| {
            refusals.push(format!(
                "pid {} fd {} is socket:[{inode}]: {why}",
                h.pid, h.fd
            ));
        };
        let mut options =
            read_options(fd, domain, sock_type, protocol).map_err(sys("getsockopt"))?;
        let kind = match (domain, sock_type, protocol) {
            (libc::AF_UNIX, _, _) => {
                let Some(d) = unix.get(&inode) else {
                    refuse(refusals, "sock_diag does not know this unix socket".into());
                    continue;
                };
                match unix_kind(h, d, fd, &unix, &holders, &options, policy) {
                    Ok(kind) => kind,
                    Err(why) => {
                        refuse(refusals, why);
                        continue;
                    }
                }
            }
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
                let info: libc::tcp_info = sock::get_struct(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
                    .map_err(sys("TCP_INFO"))?;
                let local = inet_local(fd).map_err(sys("getsockname"))?;
                let state = match info.tcpi_state {
                    TCP_LISTEN => {
                        if info.tcpi_unacked > 0 && !policy.skip_in_flight {
                            refuse(
                                refusals,
                                format!(
                                    "{} connection(s) wait in the accept queue of TCP listener {} (--skip-in-flight resets them)",
                                    info.tcpi_unacked,
                                    show(local)
                                ),
                            );
                            continue;
                        }
                        InetState::Listening {
                            backlog: info.tcpi_sacked,
                        }
                    }
                    TCP_CLOSE => InetState::Open,
                    TCP_ESTABLISHED => {
                        let remote = match sock::peer_address(fd).map_err(sys("getpeername"))? {
                            Address::Inet(a) => a,
                            other => {
                                refuse(refusals, format!("TCP peer address {other:?}"));
                                continue;
                            }
                        };
                        let local = local.unwrap_or(remote);
                        if !policy.tcp_established {
                            refuse(
                                refusals,
                                format!(
                                    "established TCP connection {local} -> {remote} (dump with --tcp-established to carry it over)"
                                ),
                            );
                            continue;
                        }
                        // Buffers of a connection autotune: not recorded.
                        options.rcvbuf = None;
                        options.sndbuf = None;
                        established.push((
                            Holder {
                                pid: h.pid,
                                fd: h.fd,
                                flags: h.flags,
                            },
                            copy,
                            local,
                            remote,
                        ));
                        // Filled in once the lock is in place.
                        out.image.sockets.push(SocketImage {
                            inode,
                            sock_type,
                            flags: h.flags,
                            options,
                            kind: SocketKind::Inet {
                                v6: domain == libc::AF_INET6,
                                protocol: InetProtocol::Tcp,
                                local: Some(local),
                                state: InetState::Open,
                            },
                        });
                        continue;
                    }
                    other => {
                        refuse(
                            refusals,
                            format!(
                                "TCP socket {} in state {} ({}) cannot be restored",
                                show(local),
                                other,
                                tcp_state_name(other)
                            ),
                        );
                        continue;
                    }
                };
                SocketKind::Inet {
                    v6: domain == libc::AF_INET6,
                    protocol: InetProtocol::Tcp,
                    local,
                    state,
                }
            }
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
                let local = inet_local(fd).map_err(sys("getsockname"))?;
                let queued = sock::bytes_to_read(fd).map_err(sys("SIOCINQ"))?;
                if queued > 0 && !policy.skip_in_flight {
                    refuse(
                        refusals,
                        format!(
                            "UDP socket {} has datagrams queued (--skip-in-flight drops them)",
                            show(local)
                        ),
                    );
                    continue;
                }
                let state = match sock::peer_address(fd) {
                    Ok(Address::Inet(remote)) => InetState::UdpConnected { remote },
                    _ => InetState::Open,
                };
                SocketKind::Inet {
                    v6: domain == libc::AF_INET6,
                    protocol: InetProtocol::Udp,
                    local,
                    state,
                }
            }
            _ => {
                refuse(
                    refusals,
                    format!(
                        "{} sockets cannot be restored",
                        family_name(domain, sock_type, protocol)
                    ),
                );
                continue;
            }
        };
        out.image.sockets.push(SocketImage {
            inode,
            sock_type,
            flags: h.flags,
            options,
            kind,
        });
    }
    if !refusals.is_empty() || established.is_empty() {
        return Ok(out);
    }
    // Established connections: packets dropped first, then repair mode (a
    // socket in repair mode sends nothing when its owner is killed).
    let pairs: Vec<(SocketAddr, SocketAddr)> = established.iter().map(|e| (e.2, e.3)).collect();
    out.lock = Some(ConnectionLock::block_in_netns_of(root, lock_name, &pairs)?);
    out.image.connection_lock = Some(lock_name.to_string());
    for (h, copy, local, remote) in established {
        let connection = tcp_repair::dump(copy.as_fd()).map_err(|source| SocketError::Repair {
            pid: h.pid,
            fd: h.fd,
            local,
            remote,
            source: Box::new(source),
        });
        // In repair mode from here, even if reading it failed.
        out.repaired.push(copy);
        let connection = connection?;
        let inode = inode_of(&out.repaired[out.repaired.len() - 1]);
        if let Some(s) = out
            .image
            .sockets
            .iter_mut()
            .find(|s| Some(s.inode) == inode)
        {
            if let SocketKind::Inet { state, .. } = &mut s.kind {
                *state = InetState::Established {
                    connection: Box::new(connection),
                };
            }
        }
    }
    Ok(out)
}

fn inode_of(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd))
        .ok()
        .map(|st| st.st_ino)
}

fn netns_of(pid: i32) -> Option<u64> {
    crate::sys::procfs::read_namespaces(pid)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == "net")
        .map(|(_, ino)| ino)
}

fn copy_fd(pid: i32, fd: i32) -> Result<OwnedFd, SocketError> {
    let err = |op: &str| {
        let op = op.to_string();
        move |source| SocketError::Sys {
            pid,
            fd,
            op,
            source,
        }
    };
    let pidfd = sock::pidfd_open(pid).map_err(err("pidfd_open"))?;
    sock::pidfd_getfd(pidfd.as_fd(), fd).map_err(err("pidfd_getfd"))
}

fn show(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "(unbound)".to_string(), |a| a.to_string())
}

fn inet_local(fd: BorrowedFd<'_>) -> std::io::Result<Option<SocketAddr>> {
    Ok(match sock::local_address(fd)? {
        Address::Inet(a) if a.port() != 0 || !a.ip().is_unspecified() => Some(a),
        _ => None,
    })
}

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        11 => "CLOSING",
        _ => "unknown",
    }
}

fn family_name(domain: i32, sock_type: i32, protocol: i32) -> String {
    let family = match domain {
        libc::AF_NETLINK => "netlink",
        libc::AF_PACKET => "packet",
        libc::AF_INET | libc::AF_INET6 if sock_type == libc::SOCK_RAW => "raw IP",
        libc::AF_INET => "IPv4",
        libc::AF_INET6 => "IPv6",
        libc::AF_VSOCK => "vsock",
        libc::AF_ALG => "AF_ALG",
        _ => "",
    };
    if family.is_empty() {
        format!("family {domain} (type {sock_type}, protocol {protocol})")
    } else {
        format!("{family} (type {sock_type}, protocol {protocol})")
    }
}

/// A fresh socket's SO_RCVBUF/SO_SNDBUF, to record only values set on purpose.
fn default_buffers(domain: i32, sock_type: i32, protocol: i32) -> Option<(i32, i32)> {
    let fresh = sock::socket(domain, sock_type, protocol).ok()?;
    let r = sock::get_int(fresh.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF).ok()?;
    let s = sock::get_int(fresh.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF).ok()?;
    Some((r, s))
}

fn read_options(
    fd: BorrowedFd<'_>,
    domain: i32,
    sock_type: i32,
    protocol: i32,
) -> std::io::Result<SocketOptions> {
    let flag = |level, name| sock::get_int(fd, level, name).map(|v| v != 0);
    let mut o = SocketOptions {
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT)?,
        keepalive: flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
        broadcast: flag(libc::SOL_SOCKET, libc::SO_BROADCAST)?,
        // Only unix (and netlink) sockets take SO_PASSCRED on current kernels.
        passcred: domain == libc::AF_UNIX && flag(libc::SOL_SOCKET, libc::SO_PASSCRED)?,
        linger: sock::get_linger(fd)?,
        ..SocketOptions::default()
    };
    let rcvbuf = sock::get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    let sndbuf = sock::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    if let Some((r, s)) = default_buffers(domain, sock_type, protocol) {
        o.rcvbuf = (rcvbuf != r).then_some(rcvbuf);
        o.sndbuf = (sndbuf != s).then_some(sndbuf);
    }
    let lowat = sock::get_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT)?;
    o.rcvlowat = (lowat != 1).then_some(lowat);
    if domain == libc::AF_INET || domain == libc::AF_INET6 {
        let dev = sock::get_bytes(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE)?;
        if !dev.is_empty() {
            o.bind_device = Some(String::from_utf8_lossy(&dev).into_owned());
        }
        o.freebind = if domain == libc::AF_INET6 {
            flag(libc::SOL_IPV6, libc::IPV6_FREEBIND)?
        } else {
            flag(libc::SOL_IP, libc::IP_FREEBIND)?
        };
        if domain == libc::AF_INET6 {
            o.v6only = Some(flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?);
        }
        if protocol == libc::IPPROTO_TCP {
            let int = |name| sock::get_int(fd, libc::IPPROTO_TCP, name);
            o.tcp = Some(TcpOptions {
                nodelay: int(libc::TCP_NODELAY)? != 0,
                cork: int(libc::TCP_CORK)? != 0,
                defer_accept: int(libc::TCP_DEFER_ACCEPT)?,
                keepidle: int(libc::TCP_KEEPIDLE)?,
                keepintvl: int(libc::TCP_KEEPINTVL)?,
                keepcnt: int(libc::TCP_KEEPCNT)?,
                user_timeout: int(libc::TCP_USER_TIMEOUT)?,
                fastopen: int(libc::TCP_FASTOPEN).unwrap_or(0),
            });
        }
    }
    Ok(o)
}

/// A unix socket's name, state and queue, or why it cannot be restored.
fn unix_kind(
    h: &Holder,
    d: &UnixDiag,
    fd: BorrowedFd<'_>,
    all: &BTreeMap<u64, UnixDiag>,
    holders: &BTreeMap<u64, Holder>,
    options: &SocketOptions,
    policy: SocketPolicy,
) -> Result<SocketKind, String> {
    let sock_type = i32::from(d.sock_type);
    let name = match &d.name {
        None => None,
        Some(n) if n.is_empty() => None,
        Some(n) => Some(unix_name(h.pid, n, d.vfs)?),
    };
    let state = if d.state == TCP_LISTEN {
        let pending = d.rqlen.map_or(0, |q| q.0) as usize;
        let pending = pending.max(d.icons.len());
        if pending > 0 && !policy.skip_in_flight {
            return Err(format!(
                "{pending} connection(s) wait in the accept queue of unix listener {} (--skip-in-flight resets them)",
                describe_name(&d.name)
            ));
        }
        UnixState::Listening {
            backlog: d.rqlen.map_or(128, |q| q.1),
        }
    } else if d.peer == Some(0) {
        // The kernel's answer for a connection its listener has not accepted yet.
        if !policy.skip_in_flight {
            return Err(
                "unix connection not yet accepted by its listener (--skip-in-flight resets it)"
                    .into(),
            );
        }
        UnixState::PeerClosed
    } else if let Some(peer) = d.peer {
        if !holders.contains_key(&peer) {
            let peer_name = all.get(&peer).map(|p| describe_name(&p.name));
            return Err(format!(
                "unix socket connected to a peer outside the tree ({}, socket:[{peer}])",
                peer_name.unwrap_or_else(|| "peer not found".into())
            ));
        }
        if sock_type == libc::SOCK_DGRAM {
            let back = all.get(&peer).and_then(|p| p.peer) == Some(d.inode);
            let peer_named = all
                .get(&peer)
                .is_some_and(|p| p.name.as_ref().is_some_and(|n| !n.is_empty()));
            if !back && !peer_named {
                return Err(format!(
                    "datagram socket connected one-way to unnamed socket:[{peer}]"
                ));
            }
        }
        UnixState::Connected { peer }
    } else if sock_type != libc::SOCK_DGRAM && d.state == TCP_ESTABLISHED {
        UnixState::PeerClosed
    } else {
        UnixState::Open
    };
    let queue = if matches!(state, UnixState::Listening { .. }) {
        Vec::new()
    } else {
        let peeked = sock::peek_queue(fd, QUEUE_LIMIT)
            .map_err(|e| format!("reading its receive queue: {e}"))?;
        if peeked.iter().any(|p| p.ancillary) {
            return Err("file descriptors or credentials (SCM_RIGHTS/SCM_CREDENTIALS) are queued in it; not supported".into());
        }
        if !peeked.is_empty() && options.passcred {
            return Err(
                "messages are queued with SO_PASSCRED set (their credentials cannot be restored)"
                    .into(),
            );
        }
        if !peeked.is_empty()
            && sock_type == libc::SOCK_DGRAM
            && name.is_none()
            && !matches!(state, UnixState::Connected { .. })
        {
            return Err("datagrams are queued in an unnamed, unconnected socket".into());
        }
        if sock_type == libc::SOCK_STREAM {
            let bytes: Vec<u8> = peeked.into_iter().flat_map(|p| p.data).collect();
            if bytes.is_empty() {
                Vec::new()
            } else {
                vec![hex::encode(bytes)]
            }
        } else {
            peeked.into_iter().map(|p| hex::encode(p.data)).collect()
        }
    };
    Ok(SocketKind::Unix {
        name,
        state,
        queue,
        shutdown: d.shutdown,
    })
}

fn describe_name(name: &Option<Vec<u8>>) -> String {
    match name {
        None => "unnamed".into(),
        Some(n) if n.is_empty() => "unnamed".into(),
        Some(n) if n[0] == 0 => format!("@{}", String::from_utf8_lossy(&n[1..])),
        Some(n) => String::from_utf8_lossy(n).into_owned(),
    }
}

/// The bound name of a unix socket held by `pid`: abstract, or a path made
/// absolute with the holder's cwd, with the socket file's mode and owner.
fn unix_name(pid: i32, raw: &[u8], vfs: Option<(u64, u32)>) -> Result<UnixName, String> {
    if raw[0] == 0 {
        return Ok(UnixName::Abstract {
            name: hex::encode(&raw[1..]),
        });
    }
    let text = std::str::from_utf8(raw).map_err(|_| format!("socket path {raw:?} is not UTF-8"))?;
    let path = if text.starts_with('/') {
        text.to_string()
    } else {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map_err(|e| {
            format!("reading the cwd of pid {pid} for relative socket path {text:?}: {e}")
        })?;
        cwd.join(text).to_string_lossy().into_owned()
    };
    use std::os::unix::fs::MetadataExt;
    let in_root = format!("/proc/{pid}/root{path}");
    let (mode, uid, gid, unlinked) = match std::fs::symlink_metadata(&in_root) {
        Ok(m) if vfs.is_none_or(|(ino, _)| ino == m.ino()) => {
            (m.mode() & 0o7777, m.uid(), m.gid(), false)
        }
        _ => (0o755, 0, 0, true),
    };
    Ok(UnixName::Path {
        path,
        mode,
        uid,
        gid,
        unlinked,
    })
}

/// The socket and epoll fds of every process, for the refusal check: the
/// set of socket inodes the tree holds.
pub fn socket_inodes(tables: &[(i32, Vec<Fd>)]) -> BTreeSet<u64> {
    tables
        .iter()
        .flat_map(|(_, fds)| fds.iter())
        .filter_map(|f| match f.kind {
            FdKind::Socket { inode } => Some(inode),
            _ => None,
        })
        .collect()
}
