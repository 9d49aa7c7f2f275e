//! Sockets and epoll instances of a restored tree, created once by the
//! tree's root before it forks (so every holder inherits the same socket,
//! as the master and workers of a preforking server shared one listening
//! socket), each moved to an fd >= fd_base for [`super::fds::install`] to
//! duplicate.
//!
//! Order: inet sockets (bound, listening, connected; established TCP
//! through TCP_REPAIR), then unix sockets (named ones bound and listening,
//! connected pairs as socketpairs, queued messages sent back into them),
//! then epoll instances, whose targets must exist: each registration is
//! made with the target's file at the fd number it was registered under
//! (the kernel keys a registration by file and number).
//!
//! Not restored: the credentials a socket's creator had (sockets belong to
//! the restoring root: SO_PEERCRED of a recreated pair names it), the
//! names of accepted unix connections (pairs come back unnamed), queued
//! fds (dump refuses them).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::image::sockets::{
    EpollImage, EpollObject, EventfdImage, FifoImage, InetProtocol, InetState, InotifyImage,
    SignalfdImage, SocketImage, SocketKind, SocketOptions, SocketsImage, TimerfdImage, UnixName,
    UnixState,
};
use crate::sys::restore_sys;
use crate::sys::socket::{self as sock, Address};
use crate::sys::tcp_repair;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {inode} ({what}): {op}: {source}")]
    Sys {
        inode: u64,
        what: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {inode}: cannot bind {address}: address already in use")]
    AddressInUse { inode: u64, address: String },
    #[error("socket {inode} ({what}): {source}")]
    Repair {
        inode: u64,
        what: String,
        #[source]
        source: Box<tcp_repair::TcpRepairError>,
    },
    #[error("socket {inode}: peer socket {peer} is not in the image")]
    PeerMissing { inode: u64, peer: u64 },
    #[error("socket {inode}: {detail}")]
    Image { inode: u64, detail: String },
    #[error("epoll {id}: registering fd {tfd} (events {events:#x}): {source}")]
    Epoll {
        id: u32,
        tfd: i32,
        events: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("eventfd {id}: {op}: {source}")]
    Eventfd {
        id: u64,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {op}: {source}")]
    Inotify {
        what: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("FIFO {path}: {op}: {source}")]
    Fifo {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} {id}: {op}: {source}")]
    EventFd {
        kind: &'static str,
        id: u32,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("epoll {id}: watched {object:?} was not created")]
    EpollTarget { id: u32, object: EpollObject },
}

/// Every socket and epoll instance of the image, at fds >= fd_base.
#[derive(Debug, Default)]
pub struct SocketSet {
    pub sockets: BTreeMap<u64, RawFd>,
    pub epolls: BTreeMap<u32, RawFd>,
    pub eventfds: BTreeMap<u64, RawFd>,
    pub signalfds: BTreeMap<u32, RawFd>,
    pub timerfds: BTreeMap<u32, RawFd>,
    pub inotifies: BTreeMap<u32, RawFd>,
    /// One read-write open of each named FIFO, holding its data until every
    /// process has opened its own fds on it (opens then never block).
    pub fifo_keepers: Vec<RawFd>,
    /// Registrations of signalfds, by epoll id: made by the epoll's first
    /// holder itself ([`SocketSet::register_signalfds`]), since a
    /// signalfd wakes the epoll sets registered from the process whose
    /// signals it reads (the registrant's signal handlers' wait queue).
    pub deferred: BTreeMap<u32, Vec<crate::image::sockets::EpollTarget>>,
}

impl SocketSet {
    /// In the calling (restored) process, whose fd `epfd` is epoll `id`:
    /// the signalfd registrations [`create`] left for it.
    pub fn register_signalfds(&self, id: u32, epfd: RawFd) -> Result<(), SocketError> {
        for t in self.deferred.get(&id).into_iter().flatten() {
            let EpollObject::Signalfd { id: sid } = t.object else {
                continue;
            };
            let file = self
                .signalfds
                .get(&sid)
                .copied()
                .ok_or(SocketError::EpollTarget {
                    id,
                    object: t.object,
                })?;
            // SAFETY: epfd is an open fd of this process for the call's duration.
            let ep = unsafe { BorrowedFd::borrow_raw(epfd) };
            sock::with_file_at(file, t.tfd, || sock::epoll_add(ep, t.tfd, t.events, t.data))
                .map_err(|source| SocketError::Epoll {
                    id,
                    tfd: t.tfd,
                    events: t.events,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.sockets
            .values()
            .chain(self.epolls.values())
            .chain(self.eventfds.values())
            .chain(self.signalfds.values())
            .chain(self.timerfds.values())
            .chain(self.inotifies.values())
            .chain(self.fifo_keepers.iter())
            .copied()
    }
}

/// Creates every object of `image`. `pipe_end(inode, write_end)` gives the
/// fd of a pipe end the caller created (for epoll registrations). On error
/// everything created so far is closed.
pub fn create(
    image: &SocketsImage,
    pipe_end: impl Fn(u64, bool) -> Option<RawFd>,
    fd_base: RawFd,
) -> Result<SocketSet, SocketError> {
    let mut made: BTreeMap<u64, OwnedFd> = BTreeMap::new();
    let by_inode: BTreeMap<u64, &SocketImage> =
        image.sockets.iter().map(|s| (s.inode, s)).collect();
    for s in &image.sockets {
        if made.contains_key(&s.inode) {
            continue;
        }
        match &s.kind {
            SocketKind::Inet {
                v6,
                protocol,
                local,
                state,
            } => {
                let fd = create_inet(s, *v6, *protocol, *local, state)?;
                made.insert(s.inode, fd);
            }
            SocketKind::Unix { .. } => create_unix(s, &by_inode, &mut made)?,
        }
    }
    // Connections to named sockets and queued datagrams, once every name is bound.
    for s in &image.sockets {
        if let SocketKind::Unix {
            state: UnixState::Connected { peer },
            ..
        } = &s.kind
        {
            if let Some(fd) = made.get(&s.inode) {
                connect_by_name(s, fd.as_fd(), *peer, &by_inode)?;
            }
        }
    }
    for s in &image.sockets {
        send_queue(s, &by_inode, &made)?;
    }
    for s in &image.sockets {
        if let (SocketKind::Unix { shutdown, .. }, Some(fd)) = (&s.kind, made.get(&s.inode)) {
            sock::shutdown_bits(fd.as_fd(), *shutdown).map_err(sys(s, "shutdown"))?;
        }
        if let Some(fd) = made.get(&s.inode) {
            let status = s.flags as i32 & libc::O_NONBLOCK;
            sock::set_status_flags(fd.as_fd(), status).map_err(sys(s, "F_SETFL"))?;
        }
    }
    let mut set = SocketSet::default();
    for (inode, fd) in &made {
        let high =
            restore_sys::dup_at_least(fd.as_raw_fd(), fd_base).map_err(|source| SocketError::Sys {
                inode: *inode,
                what: "moving above fd_base".into(),
                op: "F_DUPFD_CLOEXEC".into(),
                source,
            });
        match high {
            Ok(h) => {
                set.sockets.insert(*inode, h);
            }
            Err(e) => {
                close_set(&set);
                return Err(e);
            }
        }
    }
    drop(made);
    for e in &image.eventfds {
        match create_eventfd(e, fd_base) {
            Ok(fd) => {
                set.eventfds.insert(e.id, fd);
            }
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    for f in &image.fifos {
        match keep_fifo(f, fd_base) {
            Ok(fd) => set.fifo_keepers.push(fd),
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    for e in &image.signalfds {
        match create_signalfd(e, fd_base) {
            Ok(fd) => {
                set.signalfds.insert(e.id, fd);
            }
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    for e in &image.timerfds {
        match create_timerfd(e, fd_base) {
            Ok(fd) => {
                set.timerfds.insert(e.id, fd);
            }
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    for e in &image.inotifies {
        match create_inotify(e, fd_base) {
            Ok(fd) => {
                set.inotifies.insert(e.id, fd);
            }
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    for e in &image.epolls {
        let deferred: Vec<_> = e
            .targets
            .iter()
            .filter(|t| matches!(t.object, EpollObject::Signalfd { .. }))
            .cloned()
            .collect();
        if !deferred.is_empty() {
            set.deferred.insert(e.id, deferred);
        }
        match create_epoll(e, &set, &pipe_end, fd_base) {
            Ok(fd) => {
                set.epolls.insert(e.id, fd);
            }
            Err(err) => {
                close_set(&set);
                return Err(err);
            }
        }
    }
    Ok(set)
}

fn close_set(set: &SocketSet) {
    for fd in set.fds() {
        let _ = restore_sys::close_fd(fd);
    }
}

fn describe(s: &SocketImage) -> String {
    match &s.kind {
        SocketKind::Inet {
            protocol,
            local,
            state,
            ..
        } => {
            let p = match protocol {
                InetProtocol::Tcp => "tcp",
                InetProtocol::Udp => "udp",
            };
            let l = local.map_or_else(|| "unbound".to_string(), |a| a.to_string());
            match state {
                InetState::Listening { .. } => format!("{p} listener {l}"),
                InetState::Established { connection } => {
                    format!("{p} {} -> {}", connection.local, connection.remote)
                }
                InetState::UdpConnected { remote } => format!("{p} {l} -> {remote}"),
                InetState::CloseWait { remote, .. } => {
                    format!("{p} {l} -> {remote}, closed by the peer")
                }
                InetState::Open => format!("{p} {l}"),
            }
        }
        SocketKind::Unix { name, .. } => match name {
            Some(UnixName::Path { path, .. }) => format!("unix {path}"),
            Some(UnixName::Abstract { name }) => format!("unix @{name}"),
            None => "unix, unnamed".into(),
        },
    }
}

fn sys<'a>(s: &'a SocketImage, op: &'a str) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Sys {
        inode: s.inode,
        what: describe(s),
        op: op.to_string(),
        source,
    }
}

/// Options that must be in place before bind/listen, then the rest.
fn apply_options(fd: BorrowedFd<'_>, s: &SocketImage, v6: bool) -> Result<(), SocketError> {
    let o: &SocketOptions = &s.options;
    let set = |level, name, value: i32, op: &'static str| {
        sock::set_int(fd, level, name, value).map_err(sys(s, op))
    };
    let on = i32::from;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        on(o.reuseaddr),
        "SO_REUSEADDR",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        on(o.reuseport),
        "SO_REUSEPORT",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        on(o.keepalive),
        "SO_KEEPALIVE",
    )?;
    if o.broadcast {
        set(libc::SOL_SOCKET, libc::SO_BROADCAST, 1, "SO_BROADCAST")?;
    }
    if o.passcred {
        set(libc::SOL_SOCKET, libc::SO_PASSCRED, 1, "SO_PASSCRED")?;
    }
    // getsockopt reports twice what setsockopt was given.
    if let Some(v) = o.rcvbuf {
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, v / 2, "SO_RCVBUF")?;
    }
    if let Some(v) = o.sndbuf {
        set(libc::SOL_SOCKET, libc::SO_SNDBUF, v / 2, "SO_SNDBUF")?;
    }
    if let Some(v) = o.rcvlowat {
        set(libc::SOL_SOCKET, libc::SO_RCVLOWAT, v, "SO_RCVLOWAT")?;
    }
    if let Some(l) = o.linger {
        sock::set_linger(fd, l).map_err(sys(s, "SO_LINGER"))?;
    }
    if let Some(dev) = &o.bind_device {
        sock::set_bytes(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev.as_bytes())
            .map_err(sys(s, "SO_BINDTODEVICE"))?;
    }
    if o.freebind {
        if v6 {
            set(libc::SOL_IPV6, libc::IPV6_FREEBIND, 1, "IPV6_FREEBIND")?;
        } else {
            set(libc::SOL_IP, libc::IP_FREEBIND, 1, "IP_FREEBIND")?;
        }
    }
    if let (true, Some(only)) = (v6, o.v6only) {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            on(only),
            "IPV6_V6ONLY",
        )?;
    }
    if let Some(t) = &o.tcp {
        let tcp = |name, value, op| set(libc::IPPROTO_TCP, name, value, op);
        tcp(libc::TCP_NODELAY, on(t.nodelay), "TCP_NODELAY")?;
        if t.defer_accept > 0 {
            tcp(libc::TCP_DEFER_ACCEPT, t.defer_accept, "TCP_DEFER_ACCEPT")?;
        }
        if t.keepidle > 0 {
            tcp(libc::TCP_KEEPIDLE, t.keepidle, "TCP_KEEPIDLE")?;
        }
        if t.keepintvl > 0 {
            tcp(libc::TCP_KEEPINTVL, t.keepintvl, "TCP_KEEPINTVL")?;
        }
        if t.keepcnt > 0 {
            tcp(libc::TCP_KEEPCNT, t.keepcnt, "TCP_KEEPCNT")?;
        }
        if t.user_timeout > 0 {
            tcp(libc::TCP_USER_TIMEOUT, t.user_timeout, "TCP_USER_TIMEOUT")?;
        }
    }
    Ok(())
}

fn create_inet(
    s: &SocketImage,
    v6: bool,
    protocol: InetProtocol,
    local: Option<std::net::SocketAddr>,
    state: &InetState,
) -> Result<OwnedFd, SocketError> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let proto = match protocol {
        InetProtocol::Tcp => libc::IPPROTO_TCP,
        InetProtocol::Udp => libc::IPPROTO_UDP,
    };
    if let InetState::Established { connection } = state {
        let fd = tcp_repair::restore(connection, 0).map_err(|source| SocketError::Repair {
            inode: s.inode,
            what: describe(s),
            source: Box::new(source),
        })?;
        // Buffers stay as the connection negotiated (dump did not record them).
        apply_options(fd.as_fd(), s, v6)?;
        return Ok(fd);
    }
    if let InetState::CloseWait { queue, .. } = state {
        let fd = close_wait(s, v6, queue)?;
        apply_options(fd.as_fd(), s, v6)?;
        return Ok(fd);
    }
    let fd = sock::socket(family, s.sock_type, proto).map_err(sys(s, "socket"))?;
    apply_options(fd.as_fd(), s, v6)?;
    if let Some(addr) = local {
        sock::bind(fd.as_fd(), &Address::Inet(addr)).map_err(|source| {
            if source.raw_os_error() == Some(libc::EADDRINUSE) {
                SocketError::AddressInUse {
                    inode: s.inode,
                    address: format!(
                        "{} {addr}",
                        if proto == libc::IPPROTO_TCP {
                            "tcp"
                        } else {
                            "udp"
                        }
                    ),
                }
            } else {
                sys(s, "bind")(source)
            }
        })?;
    }
    match state {
        InetState::Listening { backlog } => {
            sock::listen(fd.as_fd(), *backlog).map_err(sys(s, "listen"))?;
            if let Some(t) = s.options.tcp.as_ref().filter(|t| t.fastopen > 0) {
                sock::set_int(
                    fd.as_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN,
                    t.fastopen,
                )
                .map_err(sys(s, "TCP_FASTOPEN"))?;
            }
        }
        InetState::UdpConnected { remote } => {
            sock::connect(fd.as_fd(), &Address::Inet(*remote)).map_err(sys(s, "connect"))?;
        }
        InetState::Open | InetState::Established { .. } | InetState::CloseWait { .. } => {}
    }
    Ok(fd)
}

/// A TCP socket in CLOSE_WAIT holding `queue`: connected over loopback to
/// a throwaway listener whose accepted end sends the queue and closes.
fn close_wait(s: &SocketImage, v6: bool, queue: &str) -> Result<OwnedFd, SocketError> {
    let data = decode(s, queue)?;
    let (family, any) = if v6 {
        (libc::AF_INET6, "[::1]:0")
    } else {
        (libc::AF_INET, "127.0.0.1:0")
    };
    let any: std::net::SocketAddr = any.parse().map_err(|_| SocketError::Image {
        inode: s.inode,
        detail: "loopback address".into(),
    })?;
    let lo = "the loopback listener of a CLOSE_WAIT connection (is loopback up?)";
    let listener = sock::socket(family, libc::SOCK_STREAM, 0).map_err(sys(s, lo))?;
    sock::bind(listener.as_fd(), &Address::Inet(any)).map_err(sys(s, lo))?;
    sock::listen(listener.as_fd(), 1).map_err(sys(s, lo))?;
    let at = sock::local_address(listener.as_fd()).map_err(sys(s, lo))?;
    let fd = sock::socket(family, libc::SOCK_STREAM, 0).map_err(sys(s, "socket"))?;
    sock::connect(fd.as_fd(), &at).map_err(sys(s, "connect over loopback"))?;
    let peer = sock::accept(listener.as_fd()).map_err(sys(s, "accept over loopback"))?;
    if !data.is_empty() {
        sock::send_all(peer.as_fd(), &data).map_err(sys(s, "writing queued data"))?;
    }
    drop(peer);
    Ok(fd)
}

fn unix_address(name: &UnixName, inode: u64) -> Result<Address, SocketError> {
    match name {
        UnixName::Path { path, .. } => Ok(Address::Unix(path.as_bytes().to_vec())),
        UnixName::Abstract { name } => {
            let mut raw = vec![0u8];
            raw.extend(hex::decode(name).map_err(|e| SocketError::Image {
                inode,
                detail: format!("abstract name is not hex: {e}"),
            })?);
            Ok(Address::Unix(raw))
        }
    }
}

/// Binds `fd` to `name`. A socket file left at the path by the dumped
/// program (nobody listens on it) is removed first, as restarting the
/// program would do; a path a live socket answers on is in use.
fn bind_unix(s: &SocketImage, fd: BorrowedFd<'_>, name: &UnixName) -> Result<(), SocketError> {
    let address = unix_address(name, s.inode)?;
    if let UnixName::Path { path, .. } = name {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() && !someone_listens(path, s.sock_type) {
                std::fs::remove_file(path).map_err(sys(s, "removing the stale socket file"))?;
            }
        }
    }
    sock::bind(fd, &address).map_err(|source| {
        if source.raw_os_error() == Some(libc::EADDRINUSE) {
            SocketError::AddressInUse {
                inode: s.inode,
                address: describe(s),
            }
        } else {
            sys(s, "bind")(source)
        }
    })?;
    if let UnixName::Path {
        path,
        mode,
        uid,
        gid,
        unlinked,
    } = name
    {
        if *unlinked {
            std::fs::remove_file(path).map_err(sys(s, "unlinking the socket file"))?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                .map_err(sys(s, "chmod of the socket file"))?;
            std::os::unix::fs::lchown(path, Some(*uid), Some(*gid))
                .map_err(sys(s, "chown of the socket file"))?;
        }
    }
    Ok(())
}

fn someone_listens(path: &str, sock_type: i32) -> bool {
    let Ok(probe) = sock::socket(libc::AF_UNIX, sock_type, 0) else {
        return false;
    };
    sock::connect(probe.as_fd(), &Address::Unix(path.as_bytes().to_vec())).is_ok()
}

fn create_unix(
    s: &SocketImage,
    by_inode: &BTreeMap<u64, &SocketImage>,
    made: &mut BTreeMap<u64, OwnedFd>,
) -> Result<(), SocketError> {
    let SocketKind::Unix { name, state, .. } = &s.kind else {
        return Ok(());
    };
    match state {
        UnixState::Connected { peer } => {
            let other = by_inode.get(peer).ok_or(SocketError::PeerMissing {
                inode: s.inode,
                peer: *peer,
            })?;
            let mutual = matches!(&other.kind, SocketKind::Unix { state: UnixState::Connected { peer }, .. } if *peer == s.inode);
            let named = |x: &SocketImage| matches!(&x.kind, SocketKind::Unix { name: Some(_), .. });
            if mutual && (s.sock_type != libc::SOCK_DGRAM || (!named(s) && !named(other))) {
                let (a, b) = sock::unix_pair(s.sock_type).map_err(sys(s, "socketpair"))?;
                made.insert(s.inode, a);
                made.insert(other.inode, b);
                return Ok(());
            }
            // A datagram socket connected to a named one: bound now,
            // connected once every name exists.
            let fd = sock::socket(libc::AF_UNIX, s.sock_type, 0).map_err(sys(s, "socket"))?;
            if let Some(n) = name {
                bind_unix(s, fd.as_fd(), n)?;
            }
            made.insert(s.inode, fd);
        }
        UnixState::PeerClosed => {
            let (a, b) = sock::unix_pair(s.sock_type).map_err(sys(s, "socketpair"))?;
            if let SocketKind::Unix { queue, .. } = &s.kind {
                for m in queue {
                    let data = decode(s, m)?;
                    sock::send_all(b.as_fd(), &data).map_err(sys(s, "writing queued data"))?;
                }
            }
            drop(b);
            made.insert(s.inode, a);
        }
        UnixState::Open | UnixState::Listening { .. } => {
            let fd = sock::socket(libc::AF_UNIX, s.sock_type, 0).map_err(sys(s, "socket"))?;
            if let Some(n) = name {
                bind_unix(s, fd.as_fd(), n)?;
            }
            if let UnixState::Listening { backlog } = state {
                sock::listen(fd.as_fd(), *backlog).map_err(sys(s, "listen"))?;
            }
            made.insert(s.inode, fd);
        }
    }
    Ok(())
}

fn connect_by_name(
    s: &SocketImage,
    fd: BorrowedFd<'_>,
    peer: u64,
    by_inode: &BTreeMap<u64, &SocketImage>,
) -> Result<(), SocketError> {
    if s.sock_type != libc::SOCK_DGRAM {
        return Ok(());
    }
    if sock::peer_address(fd).is_ok() {
        return Ok(()); // a socketpair
    }
    let other = by_inode.get(&peer).ok_or(SocketError::PeerMissing {
        inode: s.inode,
        peer,
    })?;
    let SocketKind::Unix {
        name: Some(name), ..
    } = &other.kind
    else {
        return Err(SocketError::Image {
            inode: s.inode,
            detail: format!("connected to unnamed datagram socket {peer}"),
        });
    };
    let address = unix_address(name, other.inode)?;
    sock::connect(fd, &address).map_err(sys(s, "connect"))
}

fn decode(s: &SocketImage, m: &str) -> Result<Vec<u8>, SocketError> {
    hex::decode(m).map_err(|e| SocketError::Image {
        inode: s.inode,
        detail: format!("queued message is not hex: {e}"),
    })
}

/// Sends `s`'s queued messages back into it: from its peer for a pair,
/// from a fresh unbound socket to its name otherwise.
fn send_queue(
    s: &SocketImage,
    by_inode: &BTreeMap<u64, &SocketImage>,
    made: &BTreeMap<u64, OwnedFd>,
) -> Result<(), SocketError> {
    let SocketKind::Unix {
        state, queue, name, ..
    } = &s.kind
    else {
        return Ok(());
    };
    if queue.is_empty() || matches!(state, UnixState::PeerClosed) {
        return Ok(());
    }
    if let UnixState::Connected { peer } = state {
        let own_peer = made
            .get(&s.inode)
            .and_then(|fd| sock::peer_address(fd.as_fd()).ok());
        let pair = matches!(&by_inode.get(peer).map(|p| &p.kind), Some(SocketKind::Unix { state: UnixState::Connected { peer: back }, .. }) if *back == s.inode);
        if let (true, Some(_), Some(from)) = (pair, own_peer, made.get(peer)) {
            for m in queue {
                let data = decode(s, m)?;
                sock::send_all(from.as_fd(), &data).map_err(sys(s, "writing queued data"))?;
            }
            return Ok(());
        }
    }
    let Some(name) = name else {
        return Err(SocketError::Image {
            inode: s.inode,
            detail: "messages queued in an unnamed socket without a peer".into(),
        });
    };
    let address = unix_address(name, s.inode)?;
    let from = sock::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0).map_err(sys(s, "socket"))?;
    for m in queue {
        let data = decode(s, m)?;
        sock::connect(from.as_fd(), &address).map_err(sys(s, "connect to queue data"))?;
        sock::send_all(from.as_fd(), &data).map_err(sys(s, "writing queued data"))?;
    }
    Ok(())
}

/// An eventfd with the dumped counter (written after creation: eventfd()
/// takes only 32 bits) and mode, above fd_base.
fn create_eventfd(e: &EventfdImage, fd_base: RawFd) -> Result<RawFd, SocketError> {
    let err = |op| {
        move |source| SocketError::Eventfd {
            id: e.id,
            op,
            source,
        }
    };
    let mut flags = libc::EFD_CLOEXEC | libc::EFD_NONBLOCK;
    if e.semaphore {
        flags |= libc::EFD_SEMAPHORE;
    }
    let fd = restore_sys::eventfd(flags).map_err(err("eventfd"))?;
    let result = (|| {
        if e.count > 0 {
            restore_sys::write_all(fd.as_raw_fd(), &e.count.to_ne_bytes())
                .map_err(err("writing the counter"))?;
        }
        sock::set_status_flags(fd.as_fd(), e.flags as i32 & libc::O_NONBLOCK)
            .map_err(err("F_SETFL"))?;
        restore_sys::dup_at_least(fd.as_raw_fd(), fd_base).map_err(err("F_DUPFD_CLOEXEC"))
    })();
    result
}

/// Opens FIFO `f` read-write (never blocks), refills its buffer, above fd_base.
fn keep_fifo(f: &FifoImage, fd_base: RawFd) -> Result<RawFd, SocketError> {
    let err = |op: &'static str| {
        let path = f.path.clone();
        move |source| SocketError::Fifo { path, op, source }
    };
    let fd = restore_sys::open_raw(
        std::path::Path::new(&f.path),
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
    )
    .map_err(err("open"))?;
    // SAFETY: fd was just opened by us and is owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let data = hex::decode(&f.data).map_err(|e| SocketError::Fifo {
        path: f.path.clone(),
        op: "buffered data",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    if f.capacity > 0 {
        restore_sys::set_pipe_size(fd.as_raw_fd(), f.capacity).map_err(err("F_SETPIPE_SZ"))?;
    }
    if !data.is_empty() {
        restore_sys::write_all(fd.as_raw_fd(), &data).map_err(err("writing buffered data"))?;
    }
    restore_sys::dup_at_least(fd.as_raw_fd(), fd_base).map_err(err("F_DUPFD_CLOEXEC"))
}

/// An inotify instance with every watch at its own watch descriptor: the
/// kernel hands them out in increasing order, so a lower one is added and
/// removed again until the wanted one comes; the IN_IGNORED events that
/// leaves are read away before anyone sees them.
fn create_inotify(e: &InotifyImage, fd_base: RawFd) -> Result<RawFd, SocketError> {
    let err = |path: &str, op: &'static str| {
        let what = format!("inotify {} watch of {path}", e.id);
        move |source| SocketError::Inotify { what, op, source }
    };
    let fd = restore_sys::inotify_init(libc::IN_CLOEXEC | libc::IN_NONBLOCK)
        .map_err(err("(new)", "inotify_init1"))?;
    let raw = fd.as_raw_fd();
    for w in &e.watches {
        loop {
            let got = restore_sys::inotify_add_watch(raw, &w.path, w.mask)
                .map_err(err(&w.path, "inotify_add_watch"))?;
            if got == w.wd {
                break;
            }
            if got > w.wd {
                return Err(err(&w.path, "inotify_add_watch")(std::io::Error::other(
                    format!("got watch descriptor {got}, wanted {}", w.wd),
                )));
            }
            restore_sys::inotify_rm_watch(raw, got).map_err(err(&w.path, "inotify_rm_watch"))?;
        }
    }
    restore_sys::drain(raw);
    sock::set_status_flags(fd.as_fd(), e.flags as i32 & libc::O_NONBLOCK)
        .map_err(err("(new)", "F_SETFL"))?;
    restore_sys::dup_at_least(raw, fd_base).map_err(err("(new)", "F_DUPFD_CLOEXEC"))
}

fn create_signalfd(e: &SignalfdImage, fd_base: RawFd) -> Result<RawFd, SocketError> {
    let err = |op| {
        move |source| SocketError::EventFd {
            kind: "signalfd",
            id: e.id,
            op,
            source,
        }
    };
    let nonblock = e.flags as i32 & libc::O_NONBLOCK;
    let fd =
        restore_sys::signalfd(e.mask, libc::SFD_CLOEXEC | nonblock).map_err(err("signalfd"))?;
    restore_sys::dup_at_least(fd.as_raw_fd(), fd_base).map_err(err("F_DUPFD_CLOEXEC"))
}

/// A timerfd armed by the rule of [`TimerfdImage`], with its unread
/// expirations put back (TFD_IOC_SET_TICKS) on top of any that came due
/// while the tree was down.
fn create_timerfd(e: &TimerfdImage, fd_base: RawFd) -> Result<RawFd, SocketError> {
    let err = |op| {
        move |source| SocketError::EventFd {
            kind: "timerfd",
            id: e.id,
            op,
            source,
        }
    };
    let nonblock = e.flags as i32 & libc::O_NONBLOCK;
    let fd = restore_sys::timerfd_create(e.clockid, libc::TFD_CLOEXEC | nonblock)
        .map_err(err("timerfd_create"))?;
    const TFD_TIMER_ABSTIME: i32 = 1;
    if e.value != (0, 0) || e.interval != (0, 0) {
        let (flags, value) = match e.expires {
            Some(at) => (e.settime_flags | TFD_TIMER_ABSTIME, at),
            None => (e.settime_flags & !TFD_TIMER_ABSTIME, e.value),
        };
        restore_sys::timerfd_settime(fd.as_raw_fd(), flags, value, e.interval)
            .map_err(err("timerfd_settime"))?;
    }
    if e.ticks > 0 {
        let due = restore_sys::timerfd_ticks(fd.as_raw_fd()).map_err(err("reading its fdinfo"))?;
        restore_sys::timerfd_set_ticks(fd.as_raw_fd(), e.ticks + due)
            .map_err(err("TFD_IOC_SET_TICKS"))?;
    }
    restore_sys::dup_at_least(fd.as_raw_fd(), fd_base).map_err(err("F_DUPFD_CLOEXEC"))
}

fn create_epoll(
    e: &EpollImage,
    set: &SocketSet,
    pipe_end: &impl Fn(u64, bool) -> Option<RawFd>,
    fd_base: RawFd,
) -> Result<RawFd, SocketError> {
    let err = |tfd: i32, events: u32| {
        move |source| SocketError::Epoll {
            id: e.id,
            tfd,
            events,
            source,
        }
    };
    let low = sock::epoll_create().map_err(err(-1, 0))?;
    // Above fd_base at once: registrations borrow low numbers for their
    // targets, which must never be the epoll fd itself.
    let high = restore_sys::dup_at_least(low.as_raw_fd(), fd_base).map_err(err(-1, 0))?;
    drop(low);
    // SAFETY: `high` was just created by us and is owned by nothing else.
    let ep = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) };
    for t in &e.targets {
        if matches!(t.object, EpollObject::Signalfd { .. }) {
            continue; // registered by the epoll's holder (SocketSet::deferred)
        }
        let file = match t.object {
            EpollObject::Socket { inode } => set.sockets.get(&inode).copied(),
            EpollObject::Pipe { inode, write_end } => pipe_end(inode, write_end),
            EpollObject::Eventfd { id } => set.eventfds.get(&id).copied(),
            EpollObject::Signalfd { id } => set.signalfds.get(&id).copied(),
            EpollObject::Timerfd { id } => set.timerfds.get(&id).copied(),
            EpollObject::Inotify { id } => set.inotifies.get(&id).copied(),
        }
        .ok_or(SocketError::EpollTarget {
            id: e.id,
            object: t.object,
        })?;
        sock::with_file_at(file, t.tfd, || {
            sock::epoll_add(ep.as_fd(), t.tfd, t.events, t.data)
        })
        .map_err(err(t.tfd, t.events))?;
    }
    Ok(std::os::fd::IntoRawFd::into_raw_fd(ep))
}
