//! Errors of reading and writing images. Every variant names the file (and
//! field, where there is one) it concerns, so that a refused image says
//! exactly what is wrong with it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not supported yet: {0}")]
    NotSupported(String),
    /// `plan.bin` refused or found to differ (`restore::plan_store`).
    #[error("{0}")]
    StoredPlan(String),

    // --- creating an image ---
    #[error("{path}: image directory exists and is not empty")]
    DirNotEmpty { path: PathBuf },
    #[error("{path}: exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path}: is a symbolic link to {target:?}, which is not a directory")]
    SymlinkNotADirectory { path: PathBuf, target: PathBuf },
    #[error(
        "{path}: cannot create the image directory: its parent directory {parent:?} does not exist"
    )]
    ParentMissing { path: PathBuf, parent: PathBuf },
    #[error("{path}: cannot create the image directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: written twice to the same image")]
    DuplicateFile { name: String },
    #[error("cannot commit image: {name} was not written")]
    NotWritten { name: String },
    #[error("{file}: cannot serialize: {source}")]
    Serialize {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("page store: appended {len} bytes, not a multiple of the page size {page_size}")]
    PartialPage { len: usize, page_size: u64 },
    #[error("page store: committed {pages} pages but only {reserved} were reserved")]
    ReserveOverrun { pages: u64, reserved: u64 },
    #[error("page store: invalid option {field} = {value}")]
    BadOption { field: &'static str, value: u64 },
    #[error("page store: compressing frame {frame}: {source}")]
    Compress {
        frame: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("page store: a {role} thread panicked")]
    WorkerPanicked { role: &'static str },
    #[error("page store: already finished")]
    PageStoreFinished,

    // --- manifest.json ---
    #[error("{dir}: incomplete image (no manifest.json)")]
    Incomplete { dir: PathBuf },
    #[error("{file}: field format is {found:?}, expected {expected:?}")]
    BadFormatName {
        file: String,
        found: String,
        expected: String,
    },
    #[error("{file}: format_version.major is {found}, this cowsnap reads only major {supported}")]
    UnknownMajor {
        file: String,
        found: u64,
        supported: u32,
    },
    #[error("{file}: format_version.minor is {found}, newer than {supported} (this cowsnap would drop data)")]
    NewerMinor {
        file: String,
        found: u64,
        supported: u32,
    },
    #[error("{file}: field page_size is {page_size}, not a power of two from 4096 to 1048576")]
    BadPageSize { file: String, page_size: u64 },
    #[error("{file}: field page_size is {found}, manifest says {expected}")]
    PageSizeMismatch {
        file: String,
        found: u64,
        expected: u64,
    },
    #[error("manifest.json: file name {name:?} is not a plain file name of the image")]
    UnsafeFileName { name: String },
    #[error("manifest.json: file {name} listed twice")]
    DuplicateFileEntry { name: String },
    #[error("manifest.json: required file {name} not listed")]
    NotInManifest { name: String },
    #[error("{file}: field {field} = {value:?} is not {digits} hex digits")]
    BadChecksumField {
        file: String,
        field: String,
        value: String,
        digits: usize,
    },
    #[error("{dir}: file {name} listed in manifest.json is missing")]
    MissingFile { dir: PathBuf, name: String },
    #[error("{name}: size is {actual} bytes, manifest.json says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("{name}: xxh3-128 is {actual}, manifest.json says {expected}")]
    ChecksumMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: invalid JSON{}: {source}", field_note(.field))]
    Json {
        file: String,
        /// Where in the document (`processes[0].pid`), empty if at the top
        /// or unknown (a syntax error).
        field: String,
        #[source]
        source: serde_json::Error,
    },

    // --- sockets.json ---
    #[error("sockets.json: socket {inode}: {detail}")]
    BadSocket { inode: u64, detail: String },
    #[error("sockets.json: epoll {id}: {detail}")]
    BadEpoll { id: u32, detail: String },
    #[error("{file}: pid {pid} fd {fd} is {what}, which sockets.json does not describe")]
    FdObjectMissing {
        file: String,
        pid: i32,
        fd: i32,
        what: String,
    },

    // --- tree.json and proc-<pid>.json ---
    #[error("tree.json: pid {pid} listed twice")]
    DuplicatePid { pid: i32 },
    #[error("tree.json: no processes")]
    EmptyTree,
    #[error("tree.json: first process is pid {first}, manifest.json root_pid is {root_pid}")]
    RootPidMismatch { root_pid: i32, first: i32 },
    #[error("tree.json: pid {pid} comes before its parent {ppid} (parents must come first)")]
    ParentAfterChild { pid: i32, ppid: i32 },
    #[error(
        "tree.json: the root, pid {pid}, is a zombie (a zombie is restored only under its parent)"
    )]
    ZombieRoot { pid: i32 },
    #[error("tree.json: pid {pid} names zombie {zombie} as its parent (a zombie has no children)")]
    ZombieParent { pid: i32, zombie: i32 },
    #[error(
        "{file}: pid {pid} is a zombie but has {what} (a zombie has nothing but its exit status)"
    )]
    ZombieNotEmpty {
        file: String,
        pid: i32,
        what: String,
    },
    #[error(
        "tree.json: zombie pid {pid} was killed by signal {signal}, which cannot end a process"
    )]
    ZombieSignal { pid: i32, signal: u8 },
    #[error("tree.json: pid {pid} names file {file:?}, which manifest.json does not list")]
    ProcessFileMissing { pid: i32, file: String },
    #[error("{file}: field pid is {found}, tree.json says {expected}")]
    ProcessPidMismatch {
        file: String,
        expected: i32,
        found: i32,
    },
    #[error("{file}: pid {pid}: vma {start:#x} maps SysV shm segment {shmid} beyond what tree.json's sysv_shm records ({why})")]
    SysvShmUnrecorded {
        file: String,
        pid: i32,
        start: u64,
        shmid: i32,
        why: &'static str,
    },
    #[error("{file}: pid {pid}: POSIX timer {id}: {why}")]
    BadPosixTimer {
        file: String,
        pid: i32,
        id: i32,
        why: String,
    },
    #[error("tree.json: SysV shm segment {shmid} (key {key:#x}): {why}")]
    BadSysvShm { shmid: i32, key: i32, why: String },
    #[error("tree.json: mount_ns mount {index} ({mountpoint:?}): {why}")]
    BadRecreatedMount {
        index: usize,
        mountpoint: String,
        why: String,
    },
    #[error("tree.json: saved file {id} ({path:?}): {why}")]
    BadSavedFile { id: u32, path: String, why: String },
    #[error("{file}: pid {pid} {what} names saved file {id}, which tree.json does not hold")]
    SavedFileMissing {
        file: String,
        pid: i32,
        what: String,
        id: u32,
    },
    #[error("{file}: {why}")]
    BadRuns { file: String, why: String },
    #[error("{file}: pid {pid}: vma {start:#x}-{end:#x} is empty, inverted or not page aligned")]
    BadVma {
        file: String,
        pid: i32,
        start: u64,
        end: u64,
    },
    #[error(
        "{file}: pid {pid}: vma {b_start:#x} comes after vma {a_start:#x} (vmas must be sorted)"
    )]
    VmasUnsorted {
        file: String,
        pid: i32,
        a_start: u64,
        b_start: u64,
    },
    #[error("{file}: pid {pid}: vmas {:#x}-{:#x} and {:#x}-{:#x} overlap", a.0, a.1, b.0, b.1)]
    OverlappingVmas {
        file: String,
        pid: i32,
        a: (u64, u64),
        b: (u64, u64),
    },
    #[error(
        "{file}: pid {pid}: vma {vma_start:#x}: page run at {run_start:#x} is not page aligned"
    )]
    UnalignedRun {
        file: String,
        pid: i32,
        vma_start: u64,
        run_start: u64,
    },
    #[error("{file}: pid {pid}: vma {vma_start:#x}: page run at {run_start:#x} has no pages")]
    EmptyRun {
        file: String,
        pid: i32,
        vma_start: u64,
        run_start: u64,
    },
    #[error("{file}: pid {pid}: page runs of vma {vma_start:#x}-{vma_end:#x} do not cover it exactly: expected {expected:#x}, found {found:#x}")]
    RunsDoNotCoverVma {
        file: String,
        pid: i32,
        vma_start: u64,
        vma_end: u64,
        /// The address the next run should start at (or the vma end).
        expected: u64,
        /// Where the next run starts (or where the runs end).
        found: u64,
    },
    #[error("{file}: pid {pid}: vma {vma_start:#x}: page id {page_id} out of range (the store holds {page_count} pages)")]
    PageOutOfRange {
        file: String,
        pid: i32,
        vma_start: u64,
        page_id: u64,
        page_count: u64,
    },

    // --- pages.index.json and pages ---
    #[error("pages.index.json: field pages_per_frame is 0")]
    ZeroPagesPerFrame,
    #[error("pages.index.json: frames of {pages_per_frame} pages of {page_size} bytes exceed {max} bytes")]
    FrameTooLarge {
        pages_per_frame: u64,
        page_size: u64,
        max: u64,
    },
    #[error("pages.index.json: frame {frame} is {compressed_len} bytes, shorter than any zstd frame of {page_count} pages ({min} bytes)")]
    FrameTooShort {
        frame: usize,
        compressed_len: u64,
        page_count: u64,
        min: u64,
    },
    #[error("pages.index.json: frame {frame} at offset {offset}, expected {expected} (frames must be contiguous)")]
    FrameNotContiguous {
        frame: usize,
        offset: u64,
        expected: u64,
    },
    #[error("pages.index.json: frame {frame} first_page is {first_page}, expected {expected}")]
    FramePagesNotContiguous {
        frame: usize,
        first_page: u64,
        expected: u64,
    },
    #[error("pages.index.json: frame {frame} holds {page_count} pages, expected {expected} (pages_per_frame {pages_per_frame})")]
    FramePageCount {
        frame: usize,
        page_count: u64,
        expected: u64,
        pages_per_frame: u64,
    },
    #[error(
        "pages.index.json: frames hold {frames_total} pages, field page_count says {page_count}"
    )]
    PageCountMismatch { page_count: u64, frames_total: u64 },
    #[error("pages: frame {frame} at offset {offset} ({compressed_len} bytes) runs past the end of the file ({file_size} bytes)")]
    TruncatedFrame {
        frame: usize,
        offset: u64,
        compressed_len: u64,
        file_size: u64,
    },
    #[error("pages: {trailing} bytes after the last frame (ends at {frames_end})")]
    PagesTrailingBytes { frames_end: u64, trailing: u64 },
    #[error("pages: frame {frame} out of range (the index has {frame_count} frames)")]
    FrameOutOfRange { frame: usize, frame_count: usize },
    #[error("pages: page id {page_id} out of range (the store holds {page_count} pages)")]
    PageIdOutOfRange { page_id: u64, page_count: u64 },
    #[error("pages: frame {frame} at offset {offset} does not decompress: {reason}")]
    FrameCorrupt {
        frame: usize,
        offset: u64,
        reason: String,
    },
    #[error("pages: frame {frame} decompresses to {actual} bytes, expected {expected}")]
    FrameLength {
        frame: usize,
        expected: u64,
        actual: u64,
    },
    #[error("pages: frame {frame}: xxh3-64 is {actual}, pages.index.json says {expected}")]
    FrameChecksum {
        frame: usize,
        expected: String,
        actual: String,
    },
    #[error("pages: destination for frame {frame} is {actual} bytes, expected {expected}")]
    FrameBufferSize {
        frame: usize,
        expected: u64,
        actual: u64,
    },
}

/// ` in field F` for a JSON error below the document's top level.
fn field_note(field: &str) -> String {
    if field.is_empty() || field == "." {
        String::new()
    } else {
        format!(" in field {field}")
    }
}

impl ImageError {
    /// Wraps a JSON error of image file `file` with the path of the field
    /// it concerns.
    pub(crate) fn json(file: &str, error: serde_path_to_error::Error<serde_json::Error>) -> Self {
        ImageError::Json {
            file: file.into(),
            field: error.path().to_string(),
            source: error.into_inner(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}
