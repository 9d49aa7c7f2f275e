//! The typed, serialisable error the engine (the `cowsnap` binary run as a
//! child by the shim and by cowsnapd) reports to whoever ran it, so that a
//! caller answers with a precise status code instead of scraping stderr.
//!
//! Each engine error enum says which [`ErrorKind`] it is ([`Classify`]);
//! the kind is decided from the variant, never from the message. With
//! `cowsnap --error-json PATH COMMAND`, a failing command writes one
//! [`EngineError`] as JSON to PATH (`{"kind":"unsupported","message":…}`)
//! besides its usual `cowsnap: MESSAGE` line on stderr.
//!
//! This module must not depend on the containerd or gRPC crates: the
//! callers map a kind to their own codes.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::containerd::cr::CrError;
use crate::dump::DumpError;
use crate::image::ImageError;
use crate::restore::RestoreError;

/// What kind of failure, in the terms of gRPC's codes (which the shim and
/// cowsnapd send it as).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The process, file or image named does not exist.
    NotFound,
    /// What was asked is wrong whatever the system's state: a pid that is
    /// a kernel thread, a malformed or altered image.
    InvalidArgument,
    /// The engine refuses what it cannot checkpoint or restore (an fd of a
    /// kind restore cannot reopen, a newer image format, ...).
    Unsupported,
    /// The system is not in the state the operation needs (a tree already
    /// traced, a pid taken, a file of the image changed in the rootfs).
    FailedPrecondition,
    /// Transient: the tree kept changing, the engine was interrupted; a
    /// retry may succeed.
    Unavailable,
    /// Disk, memory or address space ran out.
    ResourceExhausted,
    /// Anything else: a bug or an unexpected kernel answer.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Internal => "internal",
        }
    }

    /// Every kind, in the order of their [`ErrorKind::wire`] numbers.
    const ALL: [ErrorKind; 7] = [
        ErrorKind::NotFound,
        ErrorKind::InvalidArgument,
        ErrorKind::Unsupported,
        ErrorKind::FailedPrecondition,
        ErrorKind::Unavailable,
        ErrorKind::ResourceExhausted,
        ErrorKind::Internal,
    ];

    /// The kind as a number from 1, for where no JSON fits (a restored
    /// process's slot in the restore's shared control region); 0 is "not
    /// told".
    pub fn wire(self) -> u32 {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == self)
            .map_or(0, |i| i as u32 + 1)
    }

    /// The kind numbered `n` by [`ErrorKind::wire`].
    pub fn from_wire(n: u32) -> Option<ErrorKind> {
        ErrorKind::ALL.get((n as usize).checked_sub(1)?).copied()
    }
}

/// An engine failure as it crosses a process boundary: its kind and its
/// message (which names the pid, fd or path concerned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub kind: ErrorKind,
    pub message: String,
}

impl EngineError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> EngineError {
        EngineError {
            kind,
            message: message.into(),
        }
    }

    /// `error`'s kind and message.
    pub fn of<E: Classify + std::fmt::Display + ?Sized>(error: &E) -> EngineError {
        EngineError::new(error.kind(), error.to_string())
    }

    /// Writes this error as JSON to `path` (what `--error-json` asks for).
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        std::fs::write(path, json)
    }

    /// The error a child wrote to `path`, if it wrote one that parses.
    pub fn read_from(path: &Path) -> Option<EngineError> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Which [`ErrorKind`] an error is.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}

impl Classify for EngineError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// The kind of a system call's failure.
pub fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
            ErrorKind::ResourceExhausted
        }
        Some(libc::ENOENT | libc::ESRCH) => ErrorKind::NotFound,
        Some(libc::EPERM | libc::EACCES | libc::EROFS | libc::EBUSY) => {
            ErrorKind::FailedPrecondition
        }
        Some(libc::EAGAIN | libc::EINTR) => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

fn errno_kind(errno: nix::errno::Errno) -> ErrorKind {
    io_kind(&io::Error::from(errno))
}

impl Classify for DumpError {
    fn kind(&self) -> ErrorKind {
        use crate::dump::tree::TreeError;
        match self {
            DumpError::Seize(e) => e.kind(),
            DumpError::TaskState(e) => {
                use crate::dump::task_state::TaskStateError as T;
                match e {
                    T::Seize(e) => e.kind(),
                    T::Unsettled { .. } => ErrorKind::Unavailable,
                    T::Ptrace { source, .. } => source.kind(),
                    T::Proc { source, .. } => io_kind(source),
                    T::NotSeized { .. } | T::Inject { .. } | T::Syscall { .. } => {
                        ErrorKind::Internal
                    }
                }
            }
            DumpError::Image(e) => e.kind(),
            DumpError::NotSupported(_) => ErrorKind::Unsupported,
            DumpError::NoSuchProcess { .. } => ErrorKind::NotFound,
            DumpError::Procfs(e) => procfs_kind(e),
            DumpError::Tree(e) => match e {
                TreeError::Procfs(e) => procfs_kind(e),
                TreeError::Read { source, .. } => io_kind(source),
                // An exec'd process whose parent is outside the container.
                TreeError::OutsideParent { .. } => ErrorKind::Unsupported,
                TreeError::NamespaceInit | TreeError::ContainsDumper { .. } => {
                    ErrorKind::InvalidArgument
                }
                TreeError::NoLongerZombie { .. } => ErrorKind::Unavailable,
                TreeError::Rlimit(_)
                | TreeError::RootMissing { .. }
                | TreeError::BadExitCode { .. } => ErrorKind::Internal,
            },
            DumpError::Memory(e) => {
                use crate::dump::memory::MemoryError as M;
                match e {
                    M::Store { source } => source.kind(),
                    M::Interrupted => ErrorKind::Unavailable,
                    M::Pagemap { .. } | M::Read { .. } | M::IdMismatch { .. } => {
                        ErrorKind::Internal
                    }
                }
            }
            DumpError::Fds(e) => fd_kind(e),
            DumpError::Sockets(e) => {
                use crate::dump::sockets::SocketError as S;
                use crate::sys::sock_diag::SockDiagError;
                match e {
                    S::Sys { source, .. } => io_kind(source),
                    S::Diag {
                        source: SockDiagError::Unsupported { .. },
                        ..
                    } => ErrorKind::Unsupported,
                    S::Diag { .. } | S::Lock(_) | S::Repair { .. } => ErrorKind::Internal,
                }
            }
            DumpError::Epoll(e) => {
                use crate::dump::epoll::EpollError as E;
                match e {
                    E::Procfs(e) => procfs_kind(e),
                    E::Fds(e) => fd_kind(e),
                    E::Kcmp { source, .. } => io_kind(source),
                }
            }
            DumpError::Sysv(e) => {
                use crate::dump::sysv::SysvError as S;
                match e {
                    S::Read { source, .. } => io_kind(source),
                    S::Namespace { source, .. } => errno_kind(*source),
                    S::Unlisted { .. } => ErrorKind::Unavailable,
                    S::Parse { .. } | S::Shm { .. } | S::Memory { .. } | S::ThreadPanicked => {
                        ErrorKind::Internal
                    }
                }
            }
            DumpError::SavedFile(e) => {
                use crate::dump::saved_files::SavedFileError as S;
                match e {
                    S::Io { source, .. } => io_kind(source),
                    S::Store { source, .. } => source.kind(),
                }
            }
            DumpError::Cgroup(e) => {
                use crate::sys::cgroup::CgroupError as C;
                match e {
                    C::NotAFreezer { .. } => ErrorKind::InvalidArgument,
                    C::Io { source, .. } => io_kind(source),
                    C::Timeout { .. } => ErrorKind::Unavailable,
                    C::Unexpected { .. } => ErrorKind::Internal,
                }
            }
            DumpError::MountNs(e) => match e {
                crate::dump::mount_ns::MountNsError::Io { source, .. } => io_kind(source),
                crate::dump::mount_ns::MountNsError::Parse { .. } => ErrorKind::Internal,
            },
            DumpError::Pagemap(_) => ErrorKind::Internal,
            DumpError::RootNotInCgroup { .. } => ErrorKind::InvalidArgument,
            DumpError::Interrupted => ErrorKind::Unavailable,
            DumpError::Watchdog(_) | DumpError::Signals(_) | DumpError::Supervisor(_) => {
                ErrorKind::Internal
            }
            DumpError::Engine(e) => e.kind,
        }
    }
}

fn procfs_kind(e: &crate::sys::procfs::ProcfsError) -> ErrorKind {
    match e {
        // A process of the tree that ended meanwhile.
        crate::sys::procfs::ProcfsError::Read { source, .. } => io_kind(source),
        crate::sys::procfs::ProcfsError::Parse { .. } => ErrorKind::Internal,
    }
}

fn fd_kind(e: &crate::dump::fds::FdError) -> ErrorKind {
    use crate::dump::fds::FdError as F;
    match e {
        F::Procfs(e) => procfs_kind(e),
        F::Stat { source, .. } | F::Kcmp { source, .. } => io_kind(source),
        F::Pipe { .. } => ErrorKind::Internal,
    }
}

impl Classify for crate::dump::seize::SeizeError {
    fn kind(&self) -> ErrorKind {
        use crate::dump::seize::SeizeError as S;
        match self {
            S::NoSuchProcess { .. } => ErrorKind::NotFound,
            S::Zombie { .. }
            | S::KernelThread { .. }
            | S::NotAProcess { .. }
            | S::Dumper { .. } => ErrorKind::InvalidArgument,
            S::LeaderExited { .. } => ErrorKind::Unsupported,
            S::AlreadyTraced { .. } => ErrorKind::FailedPrecondition,
            S::NotCollected { .. } | S::SignalStorm { .. } | S::Unstable { .. } => {
                ErrorKind::Unavailable
            }
            S::Ptrace(e) => e.kind(),
            S::Proc { source, .. } => io_kind(source),
            S::ProcParse { .. } | S::UnexpectedStop { .. } | S::WrongThread { .. } => {
                ErrorKind::Internal
            }
        }
    }
}

impl Classify for crate::sys::ptrace::PtraceError {
    fn kind(&self) -> ErrorKind {
        use crate::sys::ptrace::PtraceError as P;
        match self {
            // The task ended meanwhile.
            P::Request {
                errno: nix::errno::Errno::ESRCH,
                ..
            } => ErrorKind::NotFound,
            P::Request { errno, .. } if *errno == nix::errno::Errno::EPERM => {
                ErrorKind::FailedPrecondition
            }
            _ => ErrorKind::Internal,
        }
    }
}

impl Classify for ImageError {
    fn kind(&self) -> ErrorKind {
        use ImageError as I;
        match self {
            I::Io { source, .. } | I::CreateDir { source, .. } => io_kind(source),
            I::NotSupported(_) | I::UnknownMajor { .. } | I::NewerMinor { .. } => {
                ErrorKind::Unsupported
            }
            I::DirNotEmpty { .. }
            | I::NotADirectory { .. }
            | I::SymlinkNotADirectory { .. }
            | I::ParentMissing { .. } => ErrorKind::InvalidArgument,
            I::DuplicateFile { .. }
            | I::NotWritten { .. }
            | I::Serialize { .. }
            | I::PartialPage { .. }
            | I::ReserveOverrun { .. }
            | I::BadOption { .. }
            | I::Compress { .. }
            | I::WorkerPanicked { .. }
            | I::PageStoreFinished => ErrorKind::Internal,
            // Every other variant is an image that does not read as one:
            // incomplete, altered or malformed.
            _ => ErrorKind::InvalidArgument,
        }
    }
}

impl Classify for RestoreError {
    fn kind(&self) -> ErrorKind {
        use crate::restore::checks::CheckError as C;
        use crate::restore::plan::PlanError as P;
        match self {
            RestoreError::Image { source, .. } => source.kind(),
            RestoreError::Plan(e) => match e {
                P::NotSupported { .. } | P::VmaTooLarge { .. } => ErrorKind::Unsupported,
                P::NoStagingSpace { .. } => ErrorKind::ResourceExhausted,
                P::MissingParent { .. }
                | P::NoRoot
                | P::SeveralRoots(_)
                | P::ParentAfterChild { .. }
                | P::ZombieParent { .. }
                | P::ProcessOrder { .. } => ErrorKind::InvalidArgument,
            },
            // Altered after it was written, or forged.
            RestoreError::StoredPlan { .. } => ErrorKind::InvalidArgument,
            RestoreError::Check(e) => match e {
                C::DeletedMapping { .. } | C::Deleted { .. } | C::UnsupportedFd { .. } => {
                    ErrorKind::Unsupported
                }
                C::Missing { .. }
                | C::WrongType { .. }
                | C::SizeChanged { .. }
                | C::GrewNotAppendOnly { .. }
                | C::MappingPastEnd { .. }
                | C::PidTaken { .. } => ErrorKind::FailedPrecondition,
                C::Stat { source, .. } => io_kind(source),
                C::PidProbe { .. } => ErrorKind::Internal,
            },
            RestoreError::Clone(e) => match e {
                crate::sys::clone::CloneError::PidTaken { .. } => ErrorKind::FailedPrecondition,
                crate::sys::clone::CloneError::Failed { source, .. } => io_kind(source),
            },
            RestoreError::Mem(e) => match e {
                crate::sys::mem::MemError::Map { source, .. }
                | crate::sys::mem::MemError::Advise { source, .. } => io_kind(source),
                crate::sys::mem::MemError::OutOfBounds { .. } => ErrorKind::Internal,
            },
            RestoreError::NotSupported(_) => ErrorKind::Unsupported,
            // `restore --seccomp-profile FILE` that cannot be read or used.
            RestoreError::SeccompProfile { .. } => ErrorKind::InvalidArgument,
            RestoreError::Pidfile { source, .. } => io_kind(source),
            RestoreError::Reported { kind, .. } => *kind,
            RestoreError::Process { .. }
            | RestoreError::Blob { .. }
            | RestoreError::Died { .. } => ErrorKind::Internal,
        }
    }
}

impl Classify for CrError {
    fn kind(&self) -> ErrorKind {
        match self {
            CrError::NotSupported(_) => ErrorKind::Unsupported,
            CrError::Failed(_) => ErrorKind::Internal,
            CrError::Engine(error) => error.kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_error_round_trips_through_its_json_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("error.json");
        let error = EngineError::new(ErrorKind::Unsupported, "pid 7 fd 3 is netlink");
        error.write_to(&path).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            r#"{"kind":"unsupported","message":"pid 7 fd 3 is netlink"}"#
        );
        assert_eq!(EngineError::read_from(&path), Some(error));
        std::fs::write(&path, "not json").expect("write");
        assert_eq!(EngineError::read_from(&path), None);
    }

    #[test]
    fn kinds_come_from_the_variant() {
        assert_eq!(
            DumpError::NotSupported("pid 7 fd 3 is netlink".into()).kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            DumpError::NoSuchProcess { pid: 7 }.kind(),
            ErrorKind::NotFound
        );
        let full = ImageError::Io {
            path: "/x/pages".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(full.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(DumpError::Image(full).kind(), ErrorKind::ResourceExhausted);
        assert_eq!(
            ImageError::Incomplete { dir: "/x".into() }.kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            RestoreError::Check(crate::restore::checks::CheckError::PidTaken {
                pid: 7,
                comm: "sh".into()
            })
            .kind(),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(
            DumpError::Engine(EngineError::new(ErrorKind::Unavailable, "x")).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(io_kind(&io::Error::other("?")), ErrorKind::Internal);
        assert_eq!(
            RestoreError::Reported {
                pid: 7,
                kind: ErrorKind::FailedPrecondition,
                message: "/tmp/x is missing".into()
            }
            .kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn wire_numbers_round_trip_and_zero_is_none() {
        for kind in ErrorKind::ALL {
            assert_ne!(kind.wire(), 0);
            assert_eq!(ErrorKind::from_wire(kind.wire()), Some(kind));
        }
        assert_eq!(ErrorKind::from_wire(0), None);
        assert_eq!(ErrorKind::from_wire(8), None);
    }
}
