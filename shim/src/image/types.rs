//! The image data model, format v1: what `manifest.json`, `tree.json` and
//! every `proc-<pid>.json` hold. These types are the contract between the
//! dumper, the image reader/writer, `inspect`/`verify` and the restorer.
//!
//! Layout of an image directory:
//!
//! ```text
//! DIR/
//!   manifest.json        Manifest: format name + version, provenance, every file below
//!                        with its size and xxh3-128 checksum
//!   tree.json            Tree: one ProcessEntry per process (pid, ppid, creds, ...)
//!   proc-<pid>.json      ProcessImage: VMAs with their page runs, mm fields, fds,
//!                        signals, threads (registers, xsave, ...)
//!   pipes.json           PipeImage list: buffered data of pipes seen in the tree
//!   sockets.json         SocketsImage: sockets and epoll instances (since 1.1;
//!                        an image without it has none), see `image::sockets`
//!   proc-<pid>.runs      the process's page runs, binary (since 1.5), see `image::runs`
//!   plan.bin             the restore plan, binary (since 1.6, optional), see
//!                        `restore::plan_store`
//!   pages.index.json     PageIndex: frame offsets, sizes, checksums
//!   pages                page store: concatenated independent zstd frames,
//!                        each holding `pages_per_frame` whole pages (the last fewer)
//! ```
//!
//! Addresses and sizes are plain JSON numbers (u64); binary blobs (xsave,
//! siginfo, pipe data, seccomp programs) are lowercase hex strings.
//! Rules a reader enforces: see `image::reader`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "cowsnap-image";
/// Major version: a reader refuses any other major.
pub const FORMAT_MAJOR: u32 = 1;
/// Minor version: a reader refuses a newer minor (it may carry data it would drop).
/// 1: `sockets.json` (sockets and epoll), optional for a reader.
/// 2: `Tree::saved_files` (deleted files and files on tmpfs, with their
/// contents in the page store), optional for a reader.
/// 3: `posix_timers` of a process, optional for a reader.
/// 4: `Tree::mount_ns` (the tree's own mount namespace), optional for a reader.
/// 5: page runs in a binary `proc-<pid>.runs` per process
/// ([`ProcessImage::runs_file`]), no longer in its JSON.
/// 6: the restore plan, computed at dump, in `plan.bin`
/// (`restore::plan_store`), optional for a reader.
pub const FORMAT_MINOR: u32 = 6;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TREE_FILE: &str = "tree.json";
pub const PIPES_FILE: &str = "pipes.json";
pub const PAGE_INDEX_FILE: &str = "pages.index.json";
pub const PAGES_FILE: &str = "pages";
/// The stored restore plan (since 1.6; an image without one is planned at restore).
pub const PLAN_FILE: &str = "plan.bin";

/// Page sizes an image may have (powers of two): Linux's 4 KiB, the 16 and
/// 64 KiB of arm64 and ppc64, with a margin. Every size derived from an
/// untrusted image is bounded through these.
pub const MIN_PAGE_SIZE: u64 = 4 << 10;
pub const MAX_PAGE_SIZE: u64 = 1 << 20;
/// Largest decompressed frame (`pages_per_frame * page_size`), so that
/// whoever decompresses one (a buffer per thread) allocates a bounded size.
pub const MAX_FRAME_BYTES: u64 = 256 << 20;

/// Name of the per-process metadata file.
pub fn process_file_name(pid: i32) -> String {
    format!("proc-{pid}.json")
}

/// Index of a unique page in the page store (0-based, dense).
pub type PageId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatVersion {
    pub major: u32,
    pub minor: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    pub format_version: FormatVersion,
    /// `CARGO_PKG_VERSION` of the cowsnap that wrote the image.
    pub engine_version: String,
    /// `uname -r` of the dumping machine.
    pub kernel_release: String,
    /// `uname -m`, e.g. `x86_64`.
    pub arch: String,
    pub page_size: u64,
    /// Seconds since the epoch (UTC) when the image was completed.
    pub created_unix: u64,
    /// Pid of the root of the dumped tree (as seen by the dumper).
    pub root_pid: i32,
    /// Every other file of the image; a reader refuses a missing or extra-sized one.
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// xxh3-128 of the whole file, 32 lowercase hex digits.
    pub xxh3_128: String,
}

/// `tree.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Parents before children (a pre-order walk from the root).
    pub processes: Vec<ProcessEntry>,
    /// SysV shared memory segments of the tree's IPC namespace: every one
    /// the tree has attached, and unattached ones (see `dump::sysv`).
    /// Absent in images written before cowsnap restored SysV shm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysv_shm: Vec<SysvShmSegment>,
    /// Size at dump time of every executable and mapped file the tree
    /// uses, by path (as the processes saw it): restore refuses a file that
    /// has another size now. Absent in older images (then only existence
    /// is checked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_sizes: BTreeMap<String, u64>,
    /// Files whose contents the image carries (see [`SavedFile`]): every
    /// file deleted while the tree had it open or mapped, and the files on
    /// tmpfs mounts it used. Absent in images before format 1.2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_files: Vec<SavedFile>,
    /// The tree's mount namespace when it was not the dumper's (see
    /// [`MountNs`]). Absent when it was, and in images before format 1.4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_ns: Option<MountNs>,
}

/// The mount namespace of a tree that did not share the dumper's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountNs {
    /// The tree had a root directory of its own (a container, pivot_root):
    /// its mounts are its runtime's to make (runc, for `restore-init`); a
    /// CLI restore leaves the tree in the caller's namespace, as before 1.4.
    OwnRoot,
    /// A private copy of the dumper's namespace (`unshare --mount`) whose
    /// only differences are `mounts` and `unmounted`: the restored root
    /// gets a new mount namespace, private propagation, these mounts
    /// again, in order, and none at `unmounted`.
    PrivateCopy {
        mounts: Vec<RecreatedMount>,
        /// Mount points the dumper had and the tree did not (mounted
        /// outside after the copy was made, which private propagation kept
        /// from the tree), latest first; detached in the restored
        /// namespace when they are mounted there.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unmounted: Vec<String>,
    },
}

/// A mount the tree saw and the dumper did not, of a kind restore makes
/// afresh (nothing of its contents is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecreatedMount {
    /// Absolute path, as the tree saw it.
    pub mountpoint: String,
    pub fstype: RecreatedFs,
    /// The source mountinfo showed (a name only: these filesystems have no
    /// device); empty means the filesystem's name.
    #[serde(default)]
    pub source: String,
    /// Per-mount flags as mountinfo shows them (`rw`, `nosuid`, `nodev`,
    /// `noexec`, `relatime`, ...): see [`MOUNT_FLAGS`].
    pub flags: Vec<String>,
    /// The filesystem's own options (`size=1024k,mode=755`; `hidepid=2`),
    /// without `rw`/`ro`; passed as the mount's data.
    #[serde(default)]
    pub data: String,
}

/// Filesystems a restore can make again from nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecreatedFs {
    /// A procfs, mounted by a process of the restored pid namespace.
    Proc,
    /// An empty tmpfs.
    Tmpfs,
}

impl RecreatedFs {
    pub fn name(self) -> &'static str {
        match self {
            RecreatedFs::Proc => "proc",
            RecreatedFs::Tmpfs => "tmpfs",
        }
    }
}

/// The per-mount flags mountinfo can show, with their `MS_*` bits.
pub const MOUNT_FLAGS: [(&str, u64); 9] = [
    ("rw", 0),
    ("ro", libc::MS_RDONLY),
    ("nosuid", libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC),
    ("relatime", libc::MS_RELATIME),
    ("noatime", libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("strictatime", libc::MS_STRICTATIME),
];

/// A file the image carries with its contents, because it may not exist at
/// restore: one deleted while open or mapped (`deleted`; restore re-creates
/// it unlinked), or one on a tmpfs mount, which dies with a container
/// (restore creates it at `path` when nothing is there, and otherwise uses
/// the file that is, as for any other path). Fds refer to it by
/// [`FdKind::File::saved`], mappings by `dev` and `inode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFile {
    /// Dense, from 0, in this list's order.
    pub id: u32,
    /// As the tree saw it (without " (deleted)").
    pub path: String,
    pub deleted: bool,
    /// Device (as `makedev`) and inode at dump: what mappings name.
    pub dev: u64,
    pub inode: u64,
    /// Length in bytes.
    pub size: u64,
    /// Permission bits (st_mode & 0o7777), owner and group.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The contents, as [file page, first page id, pages] runs in ascending
    /// file order; what no run covers is a hole (reads as zeros).
    pub pages: Vec<[u64; 3]>,
}

/// One SysV shared memory segment, as `/proc/sysvipc/shm` and `IPC_STAT`
/// describe it, with its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvShmSegment {
    /// `IPC_PRIVATE` (0) for private segments and for segments marked destroyed.
    pub key: i32,
    /// The id processes use; a mapping's inode in /proc/PID/maps.
    pub shmid: i32,
    /// `shm_segsz` in bytes (attachments are this rounded up to pages).
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits, plus SHM_DEST (0o1000: removed, alive while attached)
    /// and SHM_LOCKED (0o2000), as /proc/sysvipc/shm shows them.
    pub mode: u32,
    /// Creator and last shmat/shmdt pids in the dumper's pid namespace (not restored).
    pub cpid: i32,
    pub lpid: i32,
    pub nattch: u64,
    /// Page runs covering the segment's pages exactly, `start` being the
    /// byte offset in the segment.
    pub pages: Vec<PageRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// Pid in the dumper's pid namespace.
    pub pid: i32,
    /// Parent pid at dump time (a reparented process names its new parent);
    /// 0 for the root of the dump.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Pids of this task from the outermost to the innermost pid namespace
    /// (`NSpid:` of /proc/PID/status). The last is the pid inside the task's own namespace.
    pub nspid: Vec<i32>,
    /// Thread ids (dumper's namespace), the thread-group leader first.
    pub tids: Vec<i32>,
    pub comm: String,
    /// Target of /proc/PID/exe.
    pub exe: String,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub creds: Creds,
    pub rlimits: Vec<Rlimit>,
    /// Namespace identities (`/proc/PID/ns/<name>` inode numbers), by name.
    pub namespaces: Vec<NamespaceId>,
    /// The per-process metadata file, [`process_file_name`].
    pub file: String,
    /// Set for a zombie: a child that has exited and that its parent has
    /// not reaped yet. Nothing of it but its identity (pid, nspid, ppid,
    /// pgid, sid, comm) and this exit status exists: `tids` is empty and its
    /// process file is an empty [`ProcessImage`]. Never the root. Absent in
    /// images written before cowsnap dumped zombies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zombie: Option<ZombieExit>,
}

/// How a zombie ended: what its parent's `waitpid` will report. The dump
/// reads it from `exit_code` (field 52) of /proc/PID/stat, which for a
/// zombie is the wait status (`exit(3)` shows 768, death by SIGTERM 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum ZombieExit {
    /// `_exit(code)`: WIFEXITED, WEXITSTATUS = code.
    Exited { code: u8 },
    /// Killed by `signal` (WIFSIGNALED); `core_dumped` is WCOREDUMP.
    Killed { signal: u8, core_dumped: bool },
}

impl ZombieExit {
    /// Decodes a wait status; `None` for anything that is not a final one
    /// (a stop or continue report, or stray high bits).
    pub fn from_wait_status(status: u32) -> Option<ZombieExit> {
        if status > 0xffff {
            return None;
        }
        let signal = (status & 0x7f) as u8;
        match signal {
            0 => Some(ZombieExit::Exited {
                code: (status >> 8) as u8,
            }),
            // 0x7f marks a stopped child, not a dead one.
            0x7f => None,
            _ if status >> 8 != 0 => None,
            _ => Some(ZombieExit::Killed {
                signal,
                core_dumped: status & 0x80 != 0,
            }),
        }
    }

    /// The wait status `waitpid` reports for this exit.
    pub fn wait_status(self) -> u32 {
        match self {
            ZombieExit::Exited { code } => u32::from(code) << 8,
            ZombieExit::Killed {
                signal,
                core_dumped,
            } => u32::from(signal) | if core_dumped { 0x80 } else { 0 },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub securebits: u32,
    pub no_new_privs: bool,
    /// Seccomp mode from /proc/PID/status: 0 off, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// Filters as returned by PTRACE_SECCOMP_GET_FILTER (index 0 is the
    /// oldest), so in the order they were installed; each a hex string of
    /// `struct sock_filter` (8 bytes each).
    pub seccomp_filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Resource number (RLIMIT_*).
    pub resource: u32,
    /// Lowercase name, e.g. `nofile`, for readers.
    pub name: String,
    /// `u64::MAX` is RLIM_INFINITY.
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceId {
    /// `pid`, `mnt`, `net`, ...
    pub kind: String,
    pub inode: u64,
}

/// `proc-<pid>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    pub pid: i32,
    pub mm: MmFields,
    /// Sorted by `start`, non-overlapping.
    pub vmas: Vec<Vma>,
    pub fds: Vec<Fd>,
    pub signals: ProcessSignals,
    pub itimers: Itimers,
    /// Thread-group leader first; same order as [`ProcessEntry::tids`].
    pub threads: Vec<ThreadImage>,
    /// (address, pages) runs of shared memory (shared anonymous, memfd)
    /// this process had no page table entry for at dump: dump faulted them
    /// in to store them (they are part of the object), restore drops them
    /// from this process's page tables again, so memory use (PSS) matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmapped_shmem: Vec<[u64; 2]>,
    /// POSIX timers (`timer_create`) of the process, in id order (since
    /// format 1.3; an older image has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<PosixTimer>,
    /// The file holding every VMA's page runs (`proc-<pid>.runs`, see
    /// [`super::runs`]), since format 1.5; before, the runs are in the
    /// JSON. The reader fills [`Vma::pages`] from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_file: Option<String>,
}

/// The mm fields `PR_SET_MM_MAP` restores, plus auxv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    /// Current program break (brk(0) executed in the task).
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// /proc/PID/auxv as (type, value) pairs, without the terminating AT_NULL.
    pub auxv: Vec<[u64; 2]>,
    /// /proc/PID/exe, the file PR_SET_MM_EXE_FILE should name.
    pub exe_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE (false), from the `p`/`s` column.
    pub shared: bool,
    pub kind: VmaKind,
    /// Path as shown in /proc/PID/maps for file-backed and shmem VMAs
    /// (with a trailing " (deleted)" stripped, see `deleted`).
    pub path: Option<String>,
    pub deleted: bool,
    /// Device (major:minor as `makedev`) and inode of the backing object; 0 for anonymous.
    pub dev: u64,
    pub inode: u64,
    /// Offset into the backing object in bytes.
    pub offset: u64,
    /// Two-letter VmFlags from smaps (`rd`, `wr`, `dc`, `gd`, `wf`, `hg`, ...).
    pub vm_flags: Vec<String>,
    /// Page runs covering [start, end) exactly, in address order. Since
    /// format 1.5 they are stored in the process's binary runs file
    /// ([`ProcessImage::runs_file`]) and absent from the JSON; the reader
    /// puts them back here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRun>,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmaKind {
    /// MAP_PRIVATE | MAP_ANONYMOUS (not heap or stack).
    PrivateAnon,
    /// MAP_SHARED | MAP_ANONYMOUS (shown as "/dev/zero (deleted)").
    SharedAnon,
    /// MAP_PRIVATE of a regular file; only COW'ed (anonymous) pages are stored.
    PrivateFile,
    /// MAP_SHARED of a regular file; nothing stored, the file holds the data.
    SharedFile,
    /// A memfd mapping ("/memfd:NAME (deleted)"); pages stored.
    Memfd,
    /// A SysV shm attachment ("/SYSV<key> (deleted)", inode = shmid); pages stored.
    SysvShm,
    Heap,
    Stack,
    Vdso,
    Vvar,
    Vsyscall,
    /// Anything else (e.g. a device mapping); restore refuses it by kind.
    Other,
}

/// A run of consecutive virtual pages within one VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PageRun {
    /// Pages with stored contents: page `i` of the run is page id `first + i`.
    Stored {
        start: u64,
        pages: u64,
        first: PageId,
    },
    /// Present pages whose contents are all zero (or the kernel zero page): not stored.
    Zero { start: u64, pages: u64 },
    /// Not present and not swapped. For file mappings: comes from the file.
    Absent { start: u64, pages: u64 },
    /// File mappings only: present at dump time as the file's own page-cache
    /// pages (not COW copies), so nothing is stored; restore maps them again
    /// from the file so the restored tree's memory use (PSS) matches.
    /// Contents-wise the same as `Absent`. Not in images written before.
    Mapped { start: u64, pages: u64 },
}

impl PageRun {
    pub fn start(&self) -> u64 {
        match *self {
            PageRun::Stored { start, .. }
            | PageRun::Zero { start, .. }
            | PageRun::Absent { start, .. }
            | PageRun::Mapped { start, .. } => start,
        }
    }
    pub fn pages(&self) -> u64 {
        match *self {
            PageRun::Stored { pages, .. }
            | PageRun::Zero { pages, .. }
            | PageRun::Absent { pages, .. }
            | PageRun::Mapped { pages, .. } => pages,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    /// O_* flags from /proc/PID/fdinfo (includes O_CLOEXEC as the kernel reports it).
    pub flags: u32,
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FdKind {
    /// A regular file: restore reopens `path` with `flags` and seeks to `pos`.
    File {
        path: String,
        pos: u64,
        size: u64,
        deleted: bool,
        /// Set when this fd's open file description is shared with at least
        /// one other fd of the tree (inherited through fork, or dup'ed): all
        /// fds with the same id are one description, opened once on restore.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<u32>,
        /// The [`SavedFile`] that carries this file's contents (always set
        /// for a deleted file; for a file on tmpfs when it was saved).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saved: Option<u32>,
    },
    Directory {
        path: String,
    },
    /// A character or block device such as /dev/null.
    Device {
        path: String,
        rdev: u64,
        pos: u64,
    },
    /// One end of a pipe; `inode` identifies the pipe, so ends are matched across the tree.
    /// Buffered data is in pipes.json under the same inode.
    Pipe {
        inode: u64,
    },
    /// A terminal (pty slave, console); `path` as the link reads.
    Tty {
        path: String,
        rdev: u64,
    },
    /// A named FIFO: reopened by `path` (which must still be a FIFO) with
    /// the fd's flags; its buffered data is in `sockets.json` under
    /// (`dev`, `inode`), written back once by the restoring root.
    Fifo {
        path: String,
        dev: u64,
        inode: u64,
    },
    /// A socket of `sockets.json`, by its inode (one socket, however many fds hold it).
    Socket {
        inode: u64,
    },
    /// An epoll instance of `sockets.json`; `id` numbers the instances of
    /// the tree (found by kcmp: anon inodes share one inode number).
    Epoll {
        id: u32,
    },
    /// An eventfd of `sockets.json`, by the kernel's `eventfd-id`.
    Eventfd {
        id: u64,
    },
    /// A signalfd of `sockets.json` (numbered by kcmp, like epoll).
    Signalfd {
        id: u32,
    },
    /// A timerfd of `sockets.json` (numbered by kcmp, like epoll).
    Timerfd {
        id: u32,
    },
    /// An inotify instance of `sockets.json` (numbered by kcmp, like epoll).
    Inotify {
        id: u32,
    },
    /// Anything else (fanotify, ...); restore refuses it naming `link`.
    Unsupported {
        link: String,
    },
}

/// `pipes.json`: data buffered in the pipes the tree holds, read without consuming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeImage {
    pub inode: u64,
    /// Hex of the buffered bytes.
    pub data: String,
    /// F_GETPIPE_SZ.
    pub capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSignals {
    /// Signals 1..=64: index i is signal i+1.
    pub actions: Vec<SigAction>,
    /// Process-wide pending signals, each a 128-byte siginfo as hex (PTRACE_PEEKSIGINFO_SHARED).
    pub shared_pending: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// sa_handler (0 = SIG_DFL, 1 = SIG_IGN).
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Itimers {
    /// (interval, value) in microseconds for ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub real: [u64; 2],
    pub virt: [u64; 2],
    pub prof: [u64; 2],
}

/// `sigev_notify` values a POSIX timer of an image may have.
pub const SIGEV_SIGNAL: i32 = 0;
pub const SIGEV_NONE: i32 = 1;
/// SIGEV_SIGNAL | SIGEV_THREAD_ID (4): the signal goes to one thread.
pub const SIGEV_THREAD_ID: i32 = 4;

/// One POSIX timer, restored with the same id (`PR_TIMER_CREATE_RESTORE_IDS`).
/// The rule for time spent while the tree was down, as for a timerfd: a
/// timer on CLOCK_REALTIME or CLOCK_TAI keeps its absolute expiry
/// (`expires`; missed expirations show as the first signal's overrun); one
/// on CLOCK_MONOTONIC or CLOCK_BOOTTIME resumes with the time it had left
/// (`value`): downtime does not count. (Whether it was set with
/// TIMER_ABSTIME the kernel does not tell.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clockid: i32,
    /// [`SIGEV_SIGNAL`], [`SIGEV_NONE`] or [`SIGEV_THREAD_ID`].
    pub notify: i32,
    /// Signal sent on expiry (for SIGEV_NONE: what the kernel keeps, unused).
    pub signo: i32,
    pub sigev_value: u64,
    /// SIGEV_THREAD_ID: the target, a [`ThreadImage::tid`] of this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<i32>,
    /// Time left at dump (`timer_gettime`), (seconds, nanoseconds); (0, 0): disarmed.
    pub value: (i64, i64),
    pub interval: (i64, i64),
    /// For a CLOCK_REALTIME / CLOCK_TAI timer that is armed: its expiry on `clockid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<(i64, i64)>,
    /// `timer_getoverrun` at dump (the overrun of the last signal delivered):
    /// recorded, not restored (the kernel has no way to set it).
    #[serde(default)]
    pub overrun: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadImage {
    pub tid: i32,
    /// Tids from outermost to innermost pid namespace.
    pub nstid: Vec<i32>,
    /// Registers exactly as seen at the ptrace stop (no syscall-restart fix-up applied).
    pub regs: UserRegs,
    /// NT_X86_XSTATE regset as hex (its length is the task's xsave size).
    pub xsave: String,
    /// Blocked signal mask.
    pub sigmask: u64,
    /// Thread-directed pending signals, 128-byte siginfo hex each.
    pub pending: Vec<String>,
    pub sigaltstack: SigAltStack,
    /// set_tid_address / CLONE_CHILD_CLEARTID pointer (PR_GET_TID_ADDRESS).
    pub clear_child_tid: u64,
    pub rseq: Option<Rseq>,
    pub comm: String,
}

/// `struct user_regs_struct` of x86_64, field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// PTRACE_GET_RSEQ_CONFIGURATION.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
}

/// `pages.index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageIndex {
    pub page_size: u64,
    /// Every frame but the last holds exactly this many pages.
    pub pages_per_frame: u64,
    /// Total unique pages stored.
    pub page_count: u64,
    pub frames: Vec<FrameEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameEntry {
    /// Byte offset of the zstd frame in `pages`.
    pub offset: u64,
    /// Compressed length in bytes.
    pub compressed_len: u64,
    /// First page id in the frame.
    pub first_page: PageId,
    pub page_count: u64,
    /// xxh3-64 of the decompressed frame contents, 16 hex digits.
    pub xxh3_64: String,
    /// xxh3-64 of the compressed frame bytes, 16 hex digits: lets a reader
    /// check every frame at the speed of reading (restore does, before any
    /// process exists). Not in images written before format 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_xxh3_64: Option<String>,
}
