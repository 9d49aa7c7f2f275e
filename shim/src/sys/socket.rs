//! Sockets and epoll, wrapped once: socket options as integers, addresses
//! as `std::net::SocketAddr` or raw unix names, `pidfd_getfd` (the dumper
//! takes a copy of a tracee's socket: the same socket, so getsockopt and
//! repair mode act on the original), peeking queued messages with
//! `SO_PEEK_OFF`, and `epoll_ctl`.
//!
//! Nothing here decides what to dump or restore; `dump::sockets` and
//! `restore::sockets` do. Fds are `OwnedFd` where this module creates them.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::restore_sys::{cvt, cvt_long};

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only; a returned fd is ours to own.
    let fd = cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a new fd of ours on the same open file
/// description as `fd` of the process (close-on-exec). Needs ptrace access.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only; a returned fd is ours to own.
    let got = cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// `getsockopt(fd, level, name)` of an int-sized option.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value/len point to an int and its size, valid for the call.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `setsockopt(fd, level, name, &value)` of an int-sized option.
pub fn set_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a pointer to an int and its size, valid for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// `getsockopt` of an option of type `T` (a plain C struct).
pub fn get_struct<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value is size_of::<T>() writable bytes; T is a plain C struct
    // for which all-zero (and anything the kernel writes) is valid.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised, then (partly) written by the kernel.
    Ok(unsafe { value.assume_init() })
}

/// `setsockopt` of a byte string option (SO_BINDTODEVICE).
pub fn set_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: value is a valid slice for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// `getsockopt` of a byte string option (SO_BINDTODEVICE), without a trailing NUL.
pub fn get_bytes(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 64];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is len writable bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    let mut v = buf[..(len as usize).min(buf.len())].to_vec();
    while v.last() == Some(&0) {
        v.pop();
    }
    Ok(v)
}

/// `SO_LINGER`: Some(seconds) when lingering is on.
pub fn get_linger(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let l: libc::linger = get_struct(fd, libc::SOL_SOCKET, libc::SO_LINGER)?;
    Ok((l.l_onoff != 0).then_some(l.l_linger))
}

pub fn set_linger(fd: BorrowedFd<'_>, seconds: i32) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: seconds,
    };
    // SAFETY: a pointer to a linger struct and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// An address as the kernel's sockaddr_storage holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Inet(SocketAddr),
    /// AF_UNIX: the raw sun_path bytes (empty: unnamed; leading 0: abstract).
    Unix(Vec<u8>),
    /// Another family (its number).
    Other(i32),
}

fn from_storage(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Address {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Address::Inet(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Address::Inet(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        libc::AF_UNIX => {
            // SAFETY: ss_family says the storage holds a sockaddr_un.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_un>() };
            let header = size_of::<libc::sa_family_t>();
            let n = (len as usize).saturating_sub(header).min(a.sun_path.len());
            let mut path: Vec<u8> = a.sun_path[..n].iter().map(|&c| c as u8).collect();
            // A filesystem name may come NUL-terminated; an abstract one keeps its bytes.
            if path.first() != Some(&0) {
                if let Some(end) = path.iter().position(|&b| b == 0) {
                    path.truncate(end);
                }
            }
            Address::Unix(path)
        }
        other => Address::Other(other),
    }
}

fn to_storage(addr: &Address) -> io::Result<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        Address::Inet(SocketAddr::V4(v4)) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let a = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = v4.port().to_be();
            a.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        Address::Inet(SocketAddr::V6(v6)) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let a = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = v6.port().to_be();
            a.sin6_addr.s6_addr = v6.ip().octets();
            a.sin6_flowinfo = v6.flowinfo();
            a.sin6_scope_id = v6.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
        Address::Unix(path) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_un.
            let a = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_un>()
            };
            if path.len() > a.sun_path.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "unix socket name of {} bytes is longer than sun_path",
                        path.len()
                    ),
                ));
            }
            a.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (d, &s) in a.sun_path.iter_mut().zip(path.iter()) {
                *d = s as libc::c_char;
            }
            size_of::<libc::sa_family_t>() + path.len()
        }
        Address::Other(family) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("address family {family}"),
            ))
        }
    };
    Ok((storage, len as libc::socklen_t))
}

type NameCall =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

fn name_of(fd: BorrowedFd<'_>, call: NameCall) -> io::Result<Address> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage/len describe a writable sockaddr_storage.
    cvt(unsafe {
        call(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    Ok(from_storage(&storage, len))
}

/// `getsockname`.
pub fn local_address(fd: BorrowedFd<'_>) -> io::Result<Address> {
    name_of(fd, libc::getsockname)
}

/// `getpeername`; ENOTCONN when not connected.
pub fn peer_address(fd: BorrowedFd<'_>) -> io::Result<Address> {
    name_of(fd, libc::getpeername)
}

/// `socket(family, type | SOCK_CLOEXEC | extra, protocol)`.
pub fn socket(family: i32, sock_type: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments; the returned fd is ours.
    let fd = cvt(unsafe { libc::socket(family, sock_type | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `socketpair(AF_UNIX, type | SOCK_CLOEXEC)`.
pub fn unix_pair(sock_type: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is two writable ints.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            sock_type | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: the kernel just returned these fds to us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn bind(fd: BorrowedFd<'_>, addr: &Address) -> io::Result<()> {
    let (storage, len) = to_storage(addr)?;
    // SAFETY: storage holds a valid address of length len.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(|_| ())
}

pub fn connect(fd: BorrowedFd<'_>, addr: &Address) -> io::Result<()> {
    let (storage, len) = to_storage(addr)?;
    // SAFETY: storage holds a valid address of length len.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(|_| ())
}

pub fn listen(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    let backlog = backlog.min(i32::MAX as u32) as i32;
    // SAFETY: integer arguments.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(|_| ())
}

/// `accept4(fd, NULL, NULL, SOCK_CLOEXEC)`.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the returned fd is ours.
    let got = cvt(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// `ioctl(fd, SIOCINQ)`: bytes to read (for UDP: the next datagram's size).
pub fn bytes_to_read(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n)
}

/// One message peeked from a socket's receive queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    pub data: Vec<u8>,
    /// Ancillary data came with it (SCM_RIGHTS, credentials, ...).
    pub ancillary: bool,
}

/// Every message queued to be read from `fd`, without consuming any: peeks
/// with `MSG_PEEK` at a moving `SO_PEEK_OFF`, then puts the socket's own
/// peek offset back. A stream socket yields its bytes in chunks. Fds that
/// come with a peeked message (SCM_RIGHTS) are closed at once; the caller
/// sees `ancillary`. `limit`: at most this many bytes in all.
pub fn peek_queue(fd: BorrowedFd<'_>, limit: usize) -> io::Result<Vec<Peeked>> {
    let saved = get_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let result = peek_all(fd, limit);
    let restored = set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, saved);
    let out = result?;
    restored?;
    Ok(out)
}

fn peek_all(fd: BorrowedFd<'_>, limit: usize) -> io::Result<Vec<Peeked>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    let mut control = [0u64; 64];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero is a valid msghdr; the pointers set below live
        // across the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 64]>();
        // SAFETY: msg describes writable buffers owned by this frame.
        let n = unsafe {
            libc::recvmsg(
                fd.as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(out);
            }
            return Err(e);
        }
        let ancillary = msg.msg_controllen > 0;
        if ancillary {
            close_passed_fds(&msg);
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a queued message is larger than {} bytes", buf.len()),
            ));
        }
        if n == 0 && !ancillary {
            // A stream at EOF, or an empty datagram: only the latter is queued.
            if get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? == libc::SOCK_STREAM {
                return Ok(out);
            }
        }
        total += n as usize;
        if total > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {limit} bytes queued"),
            ));
        }
        out.push(Peeked {
            data: buf[..n as usize].to_vec(),
            ancillary,
        });
        if n == 0 {
            // An empty datagram does not move the peek offset: stop rather
            // than peek it forever (the rest of the queue is unreachable).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an empty datagram is queued",
            ));
        }
    }
}

/// Closes every fd an SCM_RIGHTS control message gave us.
fn close_passed_fds(msg: &libc::msghdr) {
    // SAFETY: msg was filled by recvmsg; the CMSG macros walk its control
    // buffer within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let header = libc::CMSG_LEN(0) as usize;
                let n = ((*c).cmsg_len as usize).saturating_sub(header) / size_of::<libc::c_int>();
                for i in 0..n {
                    libc::close(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// `send(fd, data, MSG_DONTWAIT | MSG_NOSIGNAL)`, all of it as one message
/// (a datagram) or in as many writes as a stream needs.
pub fn send_all(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    loop {
        // SAFETY: data[off..] is a valid readable slice.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast(),
                data.len() - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        off += n as usize;
        if off >= data.len() {
            return Ok(());
        }
    }
}

/// `shutdown(fd, how)` with the diag bits (1: no more reads, 2: no more writes).
pub fn shutdown_bits(fd: BorrowedFd<'_>, bits: u8) -> io::Result<()> {
    let how = match bits & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: integer arguments.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), how) }).map(|_| ())
}

/// `fcntl(F_GETFL)` / `fcntl(F_SETFL)` status flags.
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> io::Result<()> {
    // SAFETY: integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }).map(|_| ())
}

/// `epoll_create1(EPOLL_CLOEXEC)`.
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: integer argument; the returned fd is ours.
    let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})`.
pub fn epoll_add(epfd: BorrowedFd<'_>, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: ev is a valid epoll_event for the call.
    cvt(unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

/// Whether `fd` is an open fd of this process.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD with an integer argument only.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Runs `f` with `file` reachable at fd number `target` of this process,
/// then puts back whatever `target` held before (or closes it): the kernel
/// keys an epoll registration by file *and* fd number, so a registration is
/// made with the target file at the number it was made with originally.
pub fn with_file_at<T>(
    file: RawFd,
    target: RawFd,
    f: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    if file == target {
        return f();
    }
    let saved = if is_open(target) {
        // SAFETY: fcntl with integer arguments; the copy is ours.
        let fd_flags = cvt(unsafe { libc::fcntl(target, libc::F_GETFD) })?;
        // SAFETY: as above.
        let copy = cvt(unsafe { libc::fcntl(target, libc::F_DUPFD_CLOEXEC, 3) })?;
        Some((copy, fd_flags & libc::FD_CLOEXEC != 0))
    } else {
        None
    };
    // SAFETY: dup3 with integer arguments; `target` is ours to replace (it
    // is put back below).
    let placed = cvt(unsafe { libc::dup3(file, target, libc::O_CLOEXEC) });
    let result = placed.and_then(|_| f());
    // SAFETY: integer arguments; `saved` is the copy made above.
    unsafe {
        match saved {
            Some((s, cloexec)) => {
                libc::dup3(s, target, if cloexec { libc::O_CLOEXEC } else { 0 });
                libc::close(s);
            }
            None => {
                libc::close(target);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn addresses_round_trip_through_bind_and_getsockname() {
        let s = socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("socket");
        let want = Address::Inet("127.0.0.1:0".parse().expect("addr"));
        bind(s.as_fd(), &want).expect("bind");
        match local_address(s.as_fd()).expect("getsockname") {
            Address::Inet(SocketAddr::V4(a)) => {
                assert_eq!(*a.ip(), Ipv4Addr::LOCALHOST);
                assert_ne!(a.port(), 0);
            }
            other => panic!("{other:?}"),
        }
        let s6 = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).expect("socket6");
        bind(s6.as_fd(), &Address::Inet("[::1]:0".parse().expect("addr"))).expect("bind6");
        assert!(
            matches!(local_address(s6.as_fd()), Ok(Address::Inet(SocketAddr::V6(a))) if *a.ip() == Ipv6Addr::LOCALHOST)
        );
        let abstract_name = format!("\0cowsnap-test-{}", std::process::id()).into_bytes();
        let u = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0).expect("unix");
        bind(u.as_fd(), &Address::Unix(abstract_name.clone())).expect("bind abstract");
        assert_eq!(
            local_address(u.as_fd()).expect("name"),
            Address::Unix(abstract_name)
        );
        assert_eq!(
            peer_address(u.as_fd()).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTCONN))
        );
    }

    #[test]
    fn peek_queue_sees_every_datagram_and_consumes_none() {
        let (a, b) = unix_pair(libc::SOCK_DGRAM).expect("pair");
        for m in [&b"one"[..], b"two!", b"three"] {
            send_all(a.as_fd(), m).expect("send");
        }
        let got = peek_queue(b.as_fd(), 1 << 20).expect("peek");
        let data: Vec<&[u8]> = got.iter().map(|p| p.data.as_slice()).collect();
        assert_eq!(data, vec![&b"one"[..], b"two!", b"three"]);
        assert!(got.iter().all(|p| !p.ancillary));
        assert_eq!(
            get_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).expect("off"),
            -1
        );
        let mut buf = [0u8; 16];
        // SAFETY: buf is writable.
        let n = unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), 16, 0) };
        assert_eq!(&buf[..n as usize], b"one", "peek consumed data");

        let (c, d) = unix_pair(libc::SOCK_STREAM).expect("stream pair");
        send_all(c.as_fd(), &[5u8; 300_000]).ok();
        let total: usize = peek_queue(d.as_fd(), 1 << 20)
            .expect("peek stream")
            .iter()
            .map(|p| p.data.len())
            .sum();
        assert_eq!(total, bytes_to_read(d.as_fd()).expect("inq") as usize);
        assert!(total > 0);
        assert!(peek_queue(d.as_fd(), 10).is_err(), "limit not enforced");
    }

    #[test]
    fn with_file_at_places_and_puts_back() {
        let (a, _b) = unix_pair(libc::SOCK_STREAM).expect("pair");
        let f = std::fs::File::open("/dev/null").expect("null");
        let target = f.as_raw_fd();
        let ep = epoll_create().expect("epoll");
        with_file_at(a.as_raw_fd(), target, || {
            epoll_add(ep.as_fd(), target, libc::EPOLLIN as u32, 7)
        })
        .expect("add");
        // `target` is /dev/null again.
        let link = std::fs::read_link(format!("/proc/self/fd/{target}")).expect("link");
        assert_eq!(link, std::path::Path::new("/dev/null"));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", ep.as_raw_fd()))
            .expect("fdinfo");
        assert!(info.contains(&format!("tfd: {target:>8}")), "{info}");
    }
}
