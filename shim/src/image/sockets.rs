//! `sockets.json` (format 1.1): every socket and epoll instance the tree
//! holds, each once, by inode. Fds refer to them with [`FdKind::Socket`] and
//! [`FdKind::Epoll`]; restore creates each object once, in the tree's root
//! before it forks, so every holder gets the same socket (one listening
//! socket for a master and all its workers, as the original had).
//!
//! ```text
//! sockets.json
//!   sockets[]   SocketImage: inode, type, file status flags, options, and
//!               per family what it is bound/connected to and what it queues
//!   eventfds[]  EventfdImage: id, counter, EFD_SEMAPHORE, flags
//!   epolls[]    EpollImage: id and every registration (target fd number,
//!               events, data, and which object of this file it watches)
//!   connection_lock   name of the nftables table that drops the packets of
//!               the tree's established TCP connections until restore ends
//! ```
//!
//! [`FdKind::Socket`]: super::types::FdKind::Socket
//! [`FdKind::Epoll`]: super::types::FdKind::Epoll

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub const SOCKETS_FILE: &str = "sockets.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketsImage {
    pub sockets: Vec<SocketImage>,
    pub epolls: Vec<EpollImage>,
    #[serde(default)]
    pub eventfds: Vec<EventfdImage>,
    /// Set when dump left an nftables table (family inet) in place that
    /// blocks the established connections' packets: restore removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_lock: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketImage {
    pub inode: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: i32,
    /// File status flags of the socket's file (O_NONBLOCK matters).
    pub flags: u32,
    pub options: SocketOptions,
    pub kind: SocketKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum SocketKind {
    /// AF_INET or AF_INET6, TCP or UDP.
    Inet {
        v6: bool,
        protocol: InetProtocol,
        /// getsockname; None when never bound.
        local: Option<SocketAddr>,
        state: InetState,
    },
    /// AF_UNIX.
    Unix {
        name: Option<UnixName>,
        state: UnixState,
        /// Messages queued to be read from this socket, oldest first, hex
        /// (a stream socket's bytes as one message).
        queue: Vec<String>,
        /// Shutdown bits (1 = no more reads, 2 = no more writes).
        shutdown: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InetProtocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InetState {
    /// Created, maybe bound (`local`), neither listening nor connected.
    Open,
    Listening {
        backlog: u32,
    },
    /// A connected UDP socket.
    UdpConnected {
        remote: SocketAddr,
    },
    /// An established TCP connection, restored with TCP_REPAIR.
    Established {
        connection: Box<crate::sys::tcp_repair::TcpConnection>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnixName {
    /// Bound in the filesystem: the socket file's path (as bound, made
    /// absolute with the binder's cwd), mode and owner.
    Path {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        /// The socket file was gone (unlinked after bind) at dump.
        unlinked: bool,
    },
    /// An abstract name, hex of the bytes after the leading 0.
    Abstract { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UnixState {
    /// Neither listening nor connected.
    Open,
    Listening {
        backlog: u32,
    },
    /// Connected to `peer`, another socket of this image; the two are
    /// recreated together (socketpair, or connect to its name).
    Connected {
        peer: u64,
    },
    /// A stream or seqpacket socket whose peer has closed: what is queued
    /// can still be read, then end of file.
    PeerClosed,
}

/// Options that change a socket's behaviour, read with getsockopt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub broadcast: bool,
    pub passcred: bool,
    /// Set only when the value differs from a fresh socket's (an explicit
    /// SO_RCVBUF/SO_SNDBUF turns autotuning off): the value getsockopt
    /// reports, which setsockopt halves back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcvbuf: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sndbuf: Option<i32>,
    /// SO_LINGER seconds when l_onoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcvlowat: Option<i32>,
    /// SO_BINDTODEVICE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_device: Option<String>,
    /// IP_FREEBIND / IPV6_FREEBIND.
    pub freebind: bool,
    /// IPV6_V6ONLY (v6 sockets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpOptions>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpOptions {
    pub nodelay: bool,
    pub cork: bool,
    /// TCP_DEFER_ACCEPT seconds (0: off).
    pub defer_accept: i32,
    pub keepidle: i32,
    pub keepintvl: i32,
    pub keepcnt: i32,
    /// TCP_USER_TIMEOUT ms (0: default).
    pub user_timeout: i32,
    /// TCP_FASTOPEN queue length of a listener (0: off).
    pub fastopen: i32,
}

/// An eventfd: its counter and mode; fds name it by the kernel's `eventfd-id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventfdImage {
    pub id: u64,
    pub count: u64,
    pub semaphore: bool,
    /// File status flags of its file (O_NONBLOCK).
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollImage {
    /// The `id` of [`FdKind::Epoll`](super::types::FdKind::Epoll).
    pub id: u32,
    pub targets: Vec<EpollTarget>,
}

/// One registration (`epoll_ctl(EPOLL_CTL_ADD, tfd, {events, data})`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    /// The fd number the registration was made with (its key, with the file).
    pub tfd: i32,
    /// Event mask including EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP.
    pub events: u32,
    pub data: u64,
    pub object: EpollObject,
}

/// The file an epoll registration watches, as an object of this image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EpollObject {
    Socket {
        inode: u64,
    },
    /// One end of a pipe of `pipes.json`.
    Pipe {
        inode: u64,
        write_end: bool,
    },
    Eventfd {
        id: u64,
    },
}
