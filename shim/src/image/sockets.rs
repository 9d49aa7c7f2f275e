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
//!   fifos[]     FifoImage: path, dev/inode and buffered data of a named FIFO
//!   signalfds[] SignalfdImage: id, signal mask, flags
//!   timerfds[]  TimerfdImage: id, clock, ticks, time left or expiry, interval
//!   inotifies[] InotifyImage: id, watches (wd, path, mask)
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
    #[serde(default)]
    pub fifos: Vec<FifoImage>,
    #[serde(default)]
    pub signalfds: Vec<SignalfdImage>,
    #[serde(default)]
    pub timerfds: Vec<TimerfdImage>,
    #[serde(default)]
    pub inotifies: Vec<InotifyImage>,
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
    /// A TCP connection its peer has closed (CLOSE_WAIT): what is queued
    /// can still be read, then end of file. Restored as a connection over
    /// loopback whose other end closes at once after sending `queue` (hex),
    /// so the addresses getsockname/getpeername report differ.
    CloseWait {
        remote: SocketAddr,
        queue: String,
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

/// A named FIFO the tree holds: where it is and what it buffers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FifoImage {
    pub path: String,
    pub dev: u64,
    pub inode: u64,
    /// Hex of the buffered bytes (read without consuming them).
    pub data: String,
    /// F_GETPIPE_SZ.
    pub capacity: u64,
}

/// A signalfd: the signals it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalfdImage {
    pub id: u32,
    /// Bit n-1 for signal n.
    pub mask: u64,
    /// File status flags (O_NONBLOCK).
    pub flags: u32,
}

/// A timerfd. The rule for time spent while the tree was down: a timer
/// with TFD_TIMER_ABSTIME, or on CLOCK_REALTIME, keeps its absolute
/// expiry (`expires`), and expirations that came due meanwhile are counted
/// as the kernel counts them for a timer set in the past (one, plus every
/// whole interval since); a relative timer on another clock resumes with
/// the time it had left (`value`): downtime does not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerfdImage {
    pub id: u32,
    pub clockid: i32,
    /// Expirations not read yet.
    pub ticks: u64,
    /// TFD_TIMER_ABSTIME (1) | TFD_TIMER_CANCEL_ON_SET (2) of the last settime.
    pub settime_flags: i32,
    /// Time left at dump, (seconds, nanoseconds); (0, 0): disarmed.
    pub value: (i64, i64),
    pub interval: (i64, i64),
    /// For an absolute (or CLOCK_REALTIME) timer: its expiry on `clockid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<(i64, i64)>,
    /// File status flags (O_NONBLOCK).
    pub flags: u32,
}

/// An inotify instance: its watches, each with the watch descriptor the
/// program knows it by. Events queued at dump are not kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyImage {
    pub id: u32,
    /// File status flags (O_NONBLOCK).
    pub flags: u32,
    /// In watch descriptor order.
    pub watches: Vec<InotifyWatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    /// The watched file or directory, inside the tree's root.
    pub path: String,
    /// Events and flags as inotify_add_watch takes them.
    pub mask: u32,
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
    Signalfd {
        id: u32,
    },
    Timerfd {
        id: u32,
    },
    Inotify {
        id: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::reader::check_sockets;
    use crate::image::testutil;
    use crate::image::types::{Fd, FdKind, PipeImage, ProcessImage};
    use crate::image::{Image, ImageError};

    fn unix(inode: u64, sock_type: i32, state: UnixState, queue: &[&str]) -> SocketImage {
        SocketImage {
            inode,
            sock_type,
            flags: libc::O_RDWR as u32,
            options: SocketOptions::default(),
            kind: SocketKind::Unix {
                name: None,
                state,
                queue: queue.iter().map(|q| q.to_string()).collect(),
                shutdown: 0,
            },
        }
    }

    fn holder(fds: &[FdKind]) -> ProcessImage {
        let mut p = testutil::process(10);
        p.fds = fds
            .iter()
            .enumerate()
            .map(|(i, kind)| Fd {
                fd: 3 + i as i32,
                flags: libc::O_RDWR as u32,
                kind: kind.clone(),
            })
            .collect();
        p
    }

    /// A pair, a listener, an eventfd and an epoll watching one end of the
    /// pair and a pipe: what a valid sockets.json holds.
    fn valid() -> (SocketsImage, Vec<ProcessImage>, Vec<PipeImage>) {
        let stream = libc::SOCK_STREAM;
        let image = SocketsImage {
            sockets: vec![
                unix(1, stream, UnixState::Connected { peer: 2 }, &["6869"]),
                unix(2, stream, UnixState::Connected { peer: 1 }, &[]),
                unix(3, stream, UnixState::Listening { backlog: 5 }, &[]),
            ],
            epolls: vec![EpollImage {
                id: 0,
                targets: vec![
                    EpollTarget {
                        tfd: 3,
                        events: libc::EPOLLIN as u32,
                        data: 7,
                        object: EpollObject::Socket { inode: 1 },
                    },
                    EpollTarget {
                        tfd: 9,
                        events: libc::EPOLLIN as u32,
                        data: 8,
                        object: EpollObject::Pipe {
                            inode: 77,
                            write_end: false,
                        },
                    },
                ],
            }],
            eventfds: vec![EventfdImage {
                id: 5,
                count: 2,
                semaphore: false,
                flags: 0,
            }],
            fifos: vec![],
            signalfds: vec![],
            timerfds: vec![],
            inotifies: vec![],
            connection_lock: None,
        };
        let procs = vec![holder(&[
            FdKind::Socket { inode: 1 },
            FdKind::Socket { inode: 2 },
            FdKind::Epoll { id: 0 },
            FdKind::Eventfd { id: 5 },
        ])];
        (image, procs, testutil::pipes())
    }

    fn refused(image: &SocketsImage, procs: &[ProcessImage], pipes: &[PipeImage]) -> String {
        check_sockets(image, procs, pipes)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn a_valid_description_passes_and_round_trips() {
        let (image, procs, pipes) = valid();
        check_sockets(&image, &procs, &pipes).expect("valid");
        let text = serde_json::to_string(&image).expect("json");
        assert_eq!(
            serde_json::from_str::<SocketsImage>(&text).expect("parse"),
            image
        );
    }

    #[test]
    fn every_inconsistency_is_refused_by_name() {
        let (base, procs, pipes) = valid();

        let mut twice = base.clone();
        twice.sockets.push(twice.sockets[2].clone());
        assert!(refused(&twice, &procs, &pipes).contains("socket 3: described twice"));

        let mut raw = base.clone();
        raw.sockets[2].sock_type = libc::SOCK_RAW;
        assert!(refused(&raw, &procs, &pipes).contains("socket 3: socket type 3"));

        let mut not_hex = base.clone();
        not_hex.sockets[0] = unix(
            1,
            libc::SOCK_STREAM,
            UnixState::Connected { peer: 2 },
            &["zz"],
        );
        assert!(refused(&not_hex, &procs, &pipes).contains("socket 1: queued message is not hex"));

        let mut lonely = base.clone();
        lonely.sockets.remove(1);
        let only_one = [holder(&[FdKind::Socket { inode: 1 }])];
        assert!(refused(&lonely, &only_one, &pipes).contains("socket 1: peer 2 is not described"));

        let mut one_way = base.clone();
        one_way.sockets[1] = unix(2, libc::SOCK_STREAM, UnixState::Open, &[]);
        assert!(refused(&one_way, &procs, &pipes).contains("peer 2 is not connected back"));

        let mut ghost = base.clone();
        ghost.epolls[0].targets[0].object = EpollObject::Socket { inode: 99 };
        assert!(refused(&ghost, &procs, &pipes).contains("epoll 0: registration of fd 3"));

        let mut no_pipe = base.clone();
        no_pipe.epolls[0].targets[1].object = EpollObject::Pipe {
            inode: 78,
            write_end: true,
        };
        assert!(refused(&no_pipe, &procs, &pipes).contains("epoll 0: registration of fd 9"));

        let missing = [holder(&[FdKind::Socket { inode: 42 }])];
        let text = refused(&base, &missing, &pipes);
        assert!(text.contains("pid 10 fd 3 is socket 42"), "{text}");
        let missing = [holder(&[FdKind::Eventfd { id: 6 }])];
        assert!(refused(&base, &missing, &pipes).contains("pid 10 fd 3 is eventfd 6"));
        let missing = [holder(&[FdKind::Epoll { id: 1 }])];
        assert!(refused(&base, &missing, &pipes).contains("pid 10 fd 3 is epoll 1"));
    }

    #[test]
    fn an_image_without_sockets_json_opens_with_none() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = testutil::build(tmp.path());
        assert!(
            dir.join(SOCKETS_FILE).exists(),
            "the writer always writes it"
        );
        std::fs::remove_file(dir.join(SOCKETS_FILE)).expect("rm");
        testutil::edit_manifest(&dir, |m| {
            m["format_version"]["minor"] = serde_json::json!(0);
            let files = m["files"].as_array_mut().expect("files");
            files.retain(|f| f["name"] != SOCKETS_FILE);
        });
        let image = Image::open(&dir).expect("a format 1.0 image still opens");
        assert_eq!(image.sockets, SocketsImage::default());
    }

    #[test]
    fn a_listed_but_broken_sockets_json_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = testutil::build(tmp.path());
        testutil::rewrite(&dir, SOCKETS_FILE, b"{\"sockets\": 3}");
        assert!(matches!(
            Image::open(&dir),
            Err(ImageError::Json { file, .. }) if file == SOCKETS_FILE
        ));
    }
}
