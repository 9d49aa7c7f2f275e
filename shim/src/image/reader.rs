//! Opens and validates an image. `Image::open` refuses, with the file and
//! field named, anything a restore could trip over:
//!
//! - `manifest.json`: absent (incomplete image), another format name, another
//!   major version or a newer minor, a page size that is not a power of two
//!   from 4 KiB to 1 MiB,
//!   file names that are not plain names of the image, a required file
//!   (`tree.json`, `pipes.json`, `pages.index.json`, `pages`) not listed;
//! - every listed file: missing, another size, another xxh3-128 (the `pages`
//!   file is hashed streaming, in MiB chunks);
//! - every JSON file: unparsable (the file is named);
//! - `pages.index.json`: frames not contiguous, past the end of `pages`, page
//!   ids not dense, frame page counts off, frames over 256 MiB decompressed
//!   or shorter than any zstd frame of their length (so page counts, and
//!   what `inspect` and restore allocate per page, stay proportional to the
//!   size of `pages`), bytes after the last frame;
//! - `tree.json`: empty, duplicate pids, root not first, a child before its
//!   parent, a process file not in the manifest or naming another pid;
//!   a zombie as the root, as a parent, with threads, or killed by a signal
//!   that cannot end a process; a zombie's process file that is not empty
//!   (any VMA, fd, thread, signal action or pending signal);
//! - `proc-<pid>.json`: VMAs empty, unaligned, unsorted or overlapping or
//!   whose offset plus length overflows, page
//!   runs unaligned, empty or not covering their VMA exactly, page ids past
//!   the store;
//! - `tree.json` `sysv_shm`: a shmid twice, a size that overflows when
//!   rounded to pages, page runs not covering the segment's pages exactly or
//!   past the store, a SysV shm VMA whose segment is not recorded or is
//!   smaller than the VMA's window (or whose window's end overflows).
//!
//! Frame contents are not decompressed here (`inspect::verify` does that;
//! restore checks each frame's checksum as it decompresses it).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::{xxh3_128, Xxh3Default};

use super::pagestore::{validate_index, PageStoreReader};
use super::sockets::{EpollObject, SocketKind, SocketsImage, UnixState, SOCKETS_FILE};
use super::types::FdKind;
use super::types::{
    FileEntry, Manifest, MountNs, PageIndex, PageRun, PipeImage, ProcessEntry, ProcessImage, Tree,
    VmaKind, ZombieExit, FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME, MANIFEST_FILE, MAX_PAGE_SIZE,
    MIN_PAGE_SIZE, MOUNT_FLAGS, PAGES_FILE, PAGE_INDEX_FILE, PIPES_FILE, PLAN_FILE, SIGEV_NONE,
    SIGEV_SIGNAL, SIGEV_THREAD_ID, TREE_FILE,
};
use super::ImageError;

/// Chunk size for hashing the `pages` file: large enough to run at memory speed.
const HASH_CHUNK: usize = 4 << 20;

pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tree: Tree,
    /// Same order as `tree.processes`.
    pub processes: Vec<ProcessImage>,
    pub pipes: Vec<PipeImage>,
    /// `sockets.json` (empty for an image without one).
    pub sockets: SocketsImage,
    pub index: PageIndex,
    /// `plan.bin` as stored (checksummed, not decoded: see
    /// `restore::plan_store`); `None` for an image without one.
    pub plan: Option<Vec<u8>>,
}

impl Image {
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = match std::fs::read(&manifest_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => {
                return Err(ImageError::Incomplete { dir: dir.into() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::io(dir, e))
            }
            Err(e) => return Err(ImageError::io(&manifest_path, e)),
        };
        let manifest = parse_manifest(&manifest_bytes)?;
        check_file_list(&manifest)?;

        // Sizes first (cheap, catches truncation), then contents.
        for entry in &manifest.files {
            let path = dir.join(&entry.name);
            let actual = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ImageError::MissingFile {
                        dir: dir.into(),
                        name: entry.name.clone(),
                    })
                }
                Err(e) => return Err(ImageError::io(&path, e)),
            };
            check_size(entry, actual)?;
        }
        let mut contents: HashMap<String, Vec<u8>> = HashMap::new();
        let mut pages_entry = None;
        for (i, entry) in manifest.files.iter().enumerate() {
            if entry.name == PAGES_FILE {
                pages_entry = Some(i);
                continue;
            }
            let path = dir.join(&entry.name);
            let bytes = std::fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
            check_hash(i, entry, xxh3_128(&bytes))?;
            contents.insert(entry.name.clone(), bytes);
        }
        // `pages` is read whole only when a frame lacks the checksum of its
        // compressed bytes (images before format 1.1): otherwise those
        // checksums (in the index, whose own checksum was just checked)
        // cover every byte of it, the index's frames tiling the file, and
        // whoever reads frames checks them (restore: all of them, in
        // parallel, before any process exists; `verify`: the whole file too).
        let image = Image::from_checked_files(dir, manifest, contents)?;
        if let Some(i) = pages_entry {
            if !image
                .index
                .frames
                .iter()
                .all(|f| f.compressed_xxh3_64.is_some())
            {
                image.check_pages_file(i)?;
            }
        }
        Ok(image)
    }

    /// Checks the whole `pages` file against its manifest checksum
    /// (`entry`: its index in the manifest's files).
    fn check_pages_file(&self, entry: usize) -> Result<(), ImageError> {
        let path = self.dir.join(PAGES_FILE);
        check_hash(entry, &self.manifest.files[entry], hash_file(&path)?)
    }

    /// [`check_pages_file`](Self::check_pages_file) by name: `verify` checks
    /// every byte of the image.
    pub fn verify_pages_file(&self) -> Result<(), ImageError> {
        match self
            .manifest
            .files
            .iter()
            .position(|f| f.name == PAGES_FILE)
        {
            Some(i) => self.check_pages_file(i),
            None => Ok(()),
        }
    }

    /// The rest of [`open`](Self::open), once every file of `manifest` has
    /// its size and checksum: parses and cross-checks `contents` (every
    /// listed file but `pages`, by name). [`super::fuzz`] opens in-memory
    /// images through here too.
    pub(crate) fn from_checked_files(
        dir: &Path,
        manifest: Manifest,
        mut contents: HashMap<String, Vec<u8>>,
    ) -> Result<Image, ImageError> {
        let mut take = |name: &str| contents.remove(name).unwrap_or_default();

        let index: PageIndex = parse_json(PAGE_INDEX_FILE, &take(PAGE_INDEX_FILE))?;
        let pages_size = manifest
            .files
            .iter()
            .find(|f| f.name == PAGES_FILE)
            .map_or(0, |f| f.size);
        validate_index(&index, manifest.page_size, pages_size)?;

        let tree: Tree = parse_json(TREE_FILE, &take(TREE_FILE))?;
        check_tree(&tree, &manifest)?;
        let mut processes = Vec::with_capacity(tree.processes.len());
        for entry in &tree.processes {
            let mut process: ProcessImage = parse_json(&entry.file, &take(&entry.file))?;
            if let Some(name) = &process.runs_file {
                let expected = super::runs::runs_file_name(entry.pid);
                let bad = |why: String| ImageError::BadRuns {
                    file: entry.file.clone(),
                    why,
                };
                if *name != expected {
                    return Err(bad(format!(
                        "field runs_file is {name:?}, expected {expected:?}"
                    )));
                }
                if !manifest.files.iter().any(|f| f.name == *name) {
                    return Err(bad(format!(
                        "runs file {name} is not listed in manifest.json"
                    )));
                }
                super::runs::decode_into(name, &take(name), &mut process.vmas, manifest.page_size)?;
            }
            if process.pid != entry.pid {
                return Err(ImageError::ProcessPidMismatch {
                    file: entry.file.clone(),
                    expected: entry.pid,
                    found: process.pid,
                });
            }
            if entry.zombie.is_some() {
                check_zombie_image(&entry.file, &process)?;
            }
            check_process(&entry.file, &process, manifest.page_size, index.page_count)?;
            check_posix_timers(&entry.file, &process)?;
            processes.push(process);
        }
        check_sysv_shm(&tree, &processes, manifest.page_size, index.page_count)?;
        check_saved_files(&tree, &processes, manifest.page_size, index.page_count)?;
        check_mount_ns(&tree)?;
        let pipes: Vec<PipeImage> = parse_json(PIPES_FILE, &take(PIPES_FILE))?;
        // Optional: images of format 1.0 have no sockets.
        let sockets: SocketsImage = if manifest.files.iter().any(|f| f.name == SOCKETS_FILE) {
            parse_json(SOCKETS_FILE, &take(SOCKETS_FILE))?
        } else {
            SocketsImage::default()
        };
        check_sockets(&sockets, &processes, &pipes)?;
        let plan = manifest
            .files
            .iter()
            .any(|f| f.name == PLAN_FILE)
            .then(|| take(PLAN_FILE));

        Ok(Image {
            dir: dir.into(),
            manifest,
            tree,
            processes,
            pipes,
            sockets,
            index,
            plan,
        })
    }

    pub fn page_reader(&self) -> Result<PageStoreReader, ImageError> {
        PageStoreReader::open(&self.dir, &self.index)
    }

    pub fn page_size(&self) -> u64 {
        self.manifest.page_size
    }

    /// The tree entry and memory image of `pid`.
    pub fn process(&self, pid: i32) -> Option<(&ProcessEntry, &ProcessImage)> {
        let i = self.tree.processes.iter().position(|p| p.pid == pid)?;
        Some((&self.tree.processes[i], &self.processes[i]))
    }
}

/// Checks format name and version on the raw JSON first, so that an image of
/// another major version is refused as such even if its fields differ.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ImageError> {
    let value: serde_json::Value = parse_json(MANIFEST_FILE, bytes)?;
    let format = value.get("format").and_then(|f| f.as_str());
    if format != Some(FORMAT_NAME) {
        return Err(ImageError::BadFormatName {
            file: MANIFEST_FILE.into(),
            found: format.unwrap_or("(missing)").into(),
            expected: FORMAT_NAME.into(),
        });
    }
    let major = value
        .pointer("/format_version/major")
        .and_then(|v| v.as_u64());
    let minor = value
        .pointer("/format_version/minor")
        .and_then(|v| v.as_u64());
    if let Some(major) = major {
        if major != u64::from(FORMAT_MAJOR) {
            return Err(ImageError::UnknownMajor {
                file: MANIFEST_FILE.into(),
                found: major,
                supported: FORMAT_MAJOR,
            });
        }
    }
    if let Some(minor) = minor {
        if minor > u64::from(FORMAT_MINOR) {
            return Err(ImageError::NewerMinor {
                file: MANIFEST_FILE.into(),
                found: minor,
                supported: FORMAT_MINOR,
            });
        }
    }
    let manifest: Manifest =
        serde_path_to_error::deserialize(value).map_err(|e| ImageError::json(MANIFEST_FILE, e))?;
    if !manifest.page_size.is_power_of_two()
        || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&manifest.page_size)
    {
        return Err(ImageError::BadPageSize {
            file: MANIFEST_FILE.into(),
            page_size: manifest.page_size,
        });
    }
    Ok(manifest)
}

/// Every listed name is a plain file of the image, listed once, and the
/// files every image has are there.
pub(crate) fn check_file_list(manifest: &Manifest) -> Result<(), ImageError> {
    let mut seen = HashSet::new();
    for FileEntry { name, .. } in &manifest.files {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && name != MANIFEST_FILE
            && !name.contains('/')
            && !name.contains('\0');
        if !plain {
            return Err(ImageError::UnsafeFileName { name: name.clone() });
        }
        if !seen.insert(name.as_str()) {
            return Err(ImageError::DuplicateFileEntry { name: name.clone() });
        }
    }
    for required in [TREE_FILE, PIPES_FILE, PAGE_INDEX_FILE, PAGES_FILE] {
        if !seen.contains(required) {
            return Err(ImageError::NotInManifest {
                name: required.into(),
            });
        }
    }
    Ok(())
}

fn check_tree(tree: &Tree, manifest: &Manifest) -> Result<(), ImageError> {
    let first = tree.processes.first().ok_or(ImageError::EmptyTree)?;
    if first.pid != manifest.root_pid {
        return Err(ImageError::RootPidMismatch {
            root_pid: manifest.root_pid,
            first: first.pid,
        });
    }
    let all: HashSet<i32> = tree.processes.iter().map(|p| p.pid).collect();
    let listed: HashSet<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if first.zombie.is_some() {
        return Err(ImageError::ZombieRoot { pid: first.pid });
    }
    let zombies: HashSet<i32> = tree
        .processes
        .iter()
        .filter(|p| p.zombie.is_some())
        .map(|p| p.pid)
        .collect();
    let mut seen = HashSet::new();
    for entry in &tree.processes {
        if !seen.insert(entry.pid) {
            return Err(ImageError::DuplicatePid { pid: entry.pid });
        }
        if zombies.contains(&entry.ppid) {
            return Err(ImageError::ZombieParent {
                pid: entry.pid,
                zombie: entry.ppid,
            });
        }
        match entry.zombie {
            Some(_) if !entry.tids.is_empty() => {
                return Err(ImageError::ZombieNotEmpty {
                    file: TREE_FILE.into(),
                    pid: entry.pid,
                    what: format!("threads {:?}", entry.tids),
                })
            }
            Some(ZombieExit::Killed { signal, .. }) if !signal_ends_process(signal) => {
                return Err(ImageError::ZombieSignal {
                    pid: entry.pid,
                    signal,
                })
            }
            _ => {}
        }
        // A parent outside the dump (the root's, or a reaper outside the
        // tree) is fine; a parent inside it must come first.
        if all.contains(&entry.ppid) && !seen.contains(&entry.ppid) {
            return Err(ImageError::ParentAfterChild {
                pid: entry.pid,
                ppid: entry.ppid,
            });
        }
        if !listed.contains(entry.file.as_str()) {
            return Err(ImageError::ProcessFileMissing {
                pid: entry.pid,
                file: entry.file.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a process can die of `signal` (SIGKILL, or a signal whose
/// default action terminates it, with or without a core dump).
pub fn signal_ends_process(signal: u8) -> bool {
    let stop_or_ignore = [
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGURG,
        libc::SIGWINCH,
    ];
    (1..=64).contains(&signal) && !stop_or_ignore.contains(&i32::from(signal))
}

/// A zombie's process file holds nothing: what would it be restored into?
fn check_zombie_image(file: &str, process: &ProcessImage) -> Result<(), ImageError> {
    let what = if !process.vmas.is_empty() {
        format!("{} VMAs", process.vmas.len())
    } else if !process.fds.is_empty() {
        format!("{} fds", process.fds.len())
    } else if !process.threads.is_empty() {
        format!("{} threads", process.threads.len())
    } else if !process.signals.actions.is_empty() || !process.signals.shared_pending.is_empty() {
        "signal state".into()
    } else if !process.posix_timers.is_empty() {
        format!("{} POSIX timers", process.posix_timers.len())
    } else {
        return Ok(());
    };
    Err(ImageError::ZombieNotEmpty {
        file: file.into(),
        pid: process.pid,
        what,
    })
}

/// VMAs sorted and disjoint, page runs page aligned and covering each VMA
/// exactly, stored page ids inside the store.
pub(crate) fn check_process(
    file: &str,
    process: &ProcessImage,
    page_size: u64,
    page_count: u64,
) -> Result<(), ImageError> {
    let pid = process.pid;
    let mut prev: Option<(u64, u64)> = None;
    for vma in &process.vmas {
        // The offset too: restore adds the length to it (a file or
        // segment offset past 2^64 is no mapping).
        if vma.start >= vma.end
            || vma.start % page_size != 0
            || vma.end % page_size != 0
            || vma.offset.checked_add(vma.end - vma.start).is_none()
        {
            return Err(ImageError::BadVma {
                file: file.into(),
                pid,
                start: vma.start,
                end: vma.end,
            });
        }
        if let Some((p_start, p_end)) = prev {
            if vma.start < p_start {
                return Err(ImageError::VmasUnsorted {
                    file: file.into(),
                    pid,
                    a_start: p_start,
                    b_start: vma.start,
                });
            }
            if vma.start < p_end {
                return Err(ImageError::OverlappingVmas {
                    file: file.into(),
                    pid,
                    a: (p_start, p_end),
                    b: (vma.start, vma.end),
                });
            }
        }
        let not_covered = |expected: u64, found: u64| ImageError::RunsDoNotCoverVma {
            file: file.into(),
            pid,
            vma_start: vma.start,
            vma_end: vma.end,
            expected,
            found,
        };
        let mut addr = vma.start;
        for run in &vma.pages {
            if run.start() % page_size != 0 {
                return Err(ImageError::UnalignedRun {
                    file: file.into(),
                    pid,
                    vma_start: vma.start,
                    run_start: run.start(),
                });
            }
            if run.pages() == 0 {
                return Err(ImageError::EmptyRun {
                    file: file.into(),
                    pid,
                    vma_start: vma.start,
                    run_start: run.start(),
                });
            }
            if run.start() != addr {
                return Err(not_covered(addr, run.start()));
            }
            let end = run
                .pages()
                .checked_mul(page_size)
                .and_then(|len| addr.checked_add(len))
                .unwrap_or(u64::MAX);
            if end > vma.end {
                return Err(not_covered(vma.end, end));
            }
            if let PageRun::Stored { first, pages, .. } = *run {
                if first
                    .checked_add(pages)
                    .is_none_or(|last| last > page_count)
                {
                    return Err(ImageError::PageOutOfRange {
                        file: file.into(),
                        pid,
                        vma_start: vma.start,
                        page_id: first.max(page_count),
                        page_count,
                    });
                }
            }
            addr = end;
        }
        if addr != vma.end {
            return Err(not_covered(vma.end, addr));
        }
        prev = Some((vma.start, vma.end));
    }
    Ok(())
}

/// Clocks a POSIX timer of an image may be on: the ones restore can arm
/// by the downtime rule of [`PosixTimer`] (CPU-time clocks are refused).
pub const POSIX_TIMER_CLOCKS: [i32; 4] = [
    libc::CLOCK_REALTIME,
    libc::CLOCK_MONOTONIC,
    libc::CLOCK_BOOTTIME,
    libc::CLOCK_TAI,
];

/// Whether a timer on `clockid` keeps its absolute expiry across a restore.
pub fn posix_timer_clock_is_absolute(clockid: i32) -> bool {
    clockid == libc::CLOCK_REALTIME || clockid == libc::CLOCK_TAI
}

/// POSIX timers: unique non-negative ids, a clock of [`POSIX_TIMER_CLOCKS`],
/// a notify kind restore can create, a signal `timer_create` accepts, a
/// SIGEV_THREAD_ID target that is a thread of the process, normalised
/// times, and an absolute expiry exactly for an armed timer on an absolute
/// clock. Dump runs the same check before writing (`dump::posix_timers`).
pub fn check_posix_timers(file: &str, process: &ProcessImage) -> Result<(), ImageError> {
    let mut seen = std::collections::BTreeSet::new();
    let valid_time = |t: (i64, i64)| t.0 >= 0 && (0..1_000_000_000).contains(&t.1);
    for t in &process.posix_timers {
        let bad = |why: String| ImageError::BadPosixTimer {
            file: file.into(),
            pid: process.pid,
            id: t.id,
            why,
        };
        if t.id < 0 {
            return Err(bad("negative id".into()));
        }
        if !seen.insert(t.id) {
            return Err(bad("id recorded twice".into()));
        }
        if !POSIX_TIMER_CLOCKS.contains(&t.clockid) {
            return Err(bad(format!(
                "clock {} is not supported (CLOCK_REALTIME, MONOTONIC, BOOTTIME, TAI)",
                t.clockid
            )));
        }
        match t.notify {
            SIGEV_SIGNAL | SIGEV_THREAD_ID => {
                if !(1..=64).contains(&t.signo)
                    || t.signo == libc::SIGKILL
                    || t.signo == libc::SIGSTOP
                {
                    return Err(bad(format!("signal {} cannot be a timer's", t.signo)));
                }
            }
            SIGEV_NONE if (0..=64).contains(&t.signo) => {}
            SIGEV_NONE => return Err(bad(format!("signal {} out of range", t.signo))),
            other => return Err(bad(format!("notify kind {other} is not supported"))),
        }
        match (t.notify == SIGEV_THREAD_ID, t.thread) {
            (true, Some(tid)) if process.threads.iter().any(|th| th.tid == tid) => {}
            (true, Some(tid)) => {
                return Err(bad(format!(
                    "SIGEV_THREAD_ID target {tid} is not a thread of the process"
                )))
            }
            (true, None) => return Err(bad("SIGEV_THREAD_ID without a target thread".into())),
            (false, Some(tid)) => {
                return Err(bad(format!(
                    "a target thread {tid} without SIGEV_THREAD_ID"
                )))
            }
            (false, None) => {}
        }
        for (what, time) in [("value", t.value), ("interval", t.interval)] {
            if !valid_time(time) {
                return Err(bad(format!("{what} {time:?} is not a valid time")));
            }
        }
        let armed = t.value != (0, 0);
        match (armed && posix_timer_clock_is_absolute(t.clockid), t.expires) {
            (true, Some(at)) if valid_time(at) => {}
            (true, Some(at)) => return Err(bad(format!("expiry {at:?} is not a valid time"))),
            (true, None) => {
                return Err(bad("armed on an absolute clock without its expiry".into()))
            }
            (false, Some(_)) => {
                return Err(bad(
                    "an expiry for a disarmed timer or a relative clock".into()
                ))
            }
            (false, None) => {}
        }
    }
    Ok(())
}

/// SysV shm records: unique ids, page runs covering each segment's pages
/// (offsets from 0) with ids in the store; every SysV shm VMA's segment
/// recorded and large enough for the VMA's window.
/// Every socket and epoll fd names an object of `sockets.json`, every object
/// is described once, connected unix sockets name each other, queued data
/// is hex, and epoll registrations name objects of the image.
pub(crate) fn check_sockets(
    sockets: &SocketsImage,
    processes: &[ProcessImage],
    pipes: &[PipeImage],
) -> Result<(), ImageError> {
    let mut by_inode = std::collections::BTreeMap::new();
    for s in &sockets.sockets {
        let bad = |detail: String| ImageError::BadSocket {
            inode: s.inode,
            detail,
        };
        if by_inode.insert(s.inode, s).is_some() {
            return Err(bad("described twice".into()));
        }
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&s.sock_type) {
            return Err(bad(format!("socket type {} is not supported", s.sock_type)));
        }
        if let SocketKind::Unix { queue, .. } = &s.kind {
            if let Some(m) = queue.iter().find(|m| hex::decode(m).is_err()) {
                return Err(bad(format!("queued message is not hex: {m:.40}")));
            }
        }
    }
    for s in &sockets.sockets {
        if let SocketKind::Unix {
            state: UnixState::Connected { peer },
            ..
        } = &s.kind
        {
            let Some(other) = by_inode.get(peer) else {
                return Err(ImageError::BadSocket {
                    inode: s.inode,
                    detail: format!("peer {peer} is not described"),
                });
            };
            let back = matches!(&other.kind, SocketKind::Unix { state: UnixState::Connected { peer }, .. } if *peer == s.inode);
            if s.sock_type != libc::SOCK_DGRAM && !back {
                return Err(ImageError::BadSocket {
                    inode: s.inode,
                    detail: format!("peer {peer} is not connected back to it"),
                });
            }
        }
    }
    let epoll_ids: HashSet<u32> = sockets.epolls.iter().map(|e| e.id).collect();
    if epoll_ids.len() != sockets.epolls.len() {
        return Err(ImageError::BadEpoll {
            id: sockets.epolls.first().map_or(0, |e| e.id),
            detail: "an epoll id is described twice".into(),
        });
    }
    for e in &sockets.epolls {
        for t in &e.targets {
            let known = match t.object {
                EpollObject::Socket { inode } => by_inode.contains_key(&inode),
                EpollObject::Pipe { inode, .. } => pipes.iter().any(|p| p.inode == inode),
                EpollObject::Eventfd { id } => sockets.eventfds.iter().any(|e| e.id == id),
                EpollObject::Signalfd { id } => sockets.signalfds.iter().any(|e| e.id == id),
                EpollObject::Timerfd { id } => sockets.timerfds.iter().any(|e| e.id == id),
                EpollObject::Inotify { id } => sockets.inotifies.iter().any(|e| e.id == id),
            };
            if !known {
                return Err(ImageError::BadEpoll {
                    id: e.id,
                    detail: format!(
                        "registration of fd {} names {:?}, which the image does not hold",
                        t.tfd, t.object
                    ),
                });
            }
        }
    }
    for p in processes {
        for fd in &p.fds {
            let missing = match fd.kind {
                FdKind::Socket { inode } => {
                    (!by_inode.contains_key(&inode)).then(|| format!("socket {inode}"))
                }
                FdKind::Epoll { id } => (!epoll_ids.contains(&id)).then(|| format!("epoll {id}")),
                FdKind::Eventfd { id } => {
                    (!sockets.eventfds.iter().any(|e| e.id == id)).then(|| format!("eventfd {id}"))
                }
                FdKind::Signalfd { id } => (!sockets.signalfds.iter().any(|e| e.id == id))
                    .then(|| format!("signalfd {id}")),
                FdKind::Inotify { id } => {
                    (!sockets.inotifies.iter().any(|e| e.id == id)).then(|| format!("inotify {id}"))
                }
                FdKind::Timerfd { id } => {
                    (!sockets.timerfds.iter().any(|e| e.id == id)).then(|| format!("timerfd {id}"))
                }
                _ => None,
            };
            if let Some(what) = missing {
                return Err(ImageError::FdObjectMissing {
                    file: crate::image::types::process_file_name(p.pid),
                    pid: p.pid,
                    fd: fd.fd,
                    what,
                });
            }
        }
    }
    Ok(())
}

/// `tree.json`'s saved files: ids dense from 0, absolute paths, mode bits
/// only, (dev, inode) unique, content runs ascending inside the file and
/// inside the page store; every fd's `saved` names one of them.
/// The mounts a restore makes again: absolute, normal paths (no `..`, no
/// NUL), flags restore knows, data without NUL. Restore mounts them only
/// in the tree's new namespace, never in the caller's.
pub(crate) fn check_mount_ns(tree: &Tree) -> Result<(), ImageError> {
    let Some(MountNs::PrivateCopy { mounts, unmounted }) = &tree.mount_ns else {
        return Ok(());
    };
    let normal = |path: &str| {
        path.starts_with('/')
            && !path.contains('\0')
            && std::path::Path::new(path).components().all(|c| {
                !matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            })
    };
    if let Some(path) = unmounted.iter().find(|p| !normal(p) || *p == "/") {
        return Err(ImageError::BadRecreatedMount {
            index: 0,
            mountpoint: path.clone(),
            why: "unmounted: not an absolute, normal path other than /".into(),
        });
    }
    for (index, m) in mounts.iter().enumerate() {
        let bad = |why: String| ImageError::BadRecreatedMount {
            index,
            mountpoint: m.mountpoint.clone(),
            why,
        };
        if !normal(&m.mountpoint) {
            return Err(bad("mountpoint is not an absolute, normal path".into()));
        }
        if let Some(flag) = m
            .flags
            .iter()
            .find(|f| !MOUNT_FLAGS.iter().any(|(name, _)| name == f))
        {
            return Err(bad(format!("unknown mount flag {flag:?}")));
        }
        if m.data.contains('\0') || m.source.contains('\0') {
            return Err(bad("data or source holds a NUL".into()));
        }
    }
    Ok(())
}

pub(crate) fn check_saved_files(
    tree: &Tree,
    processes: &[ProcessImage],
    page_size: u64,
    page_count: u64,
) -> Result<(), ImageError> {
    let mut keys = HashSet::new();
    for (i, f) in tree.saved_files.iter().enumerate() {
        let bad = |why: String| ImageError::BadSavedFile {
            id: f.id,
            path: f.path.clone(),
            why,
        };
        if f.id as usize != i {
            return Err(bad(format!(
                "listed at position {i} (ids are dense, in order)"
            )));
        }
        if !f.path.starts_with('/') || f.path.contains('\0') {
            return Err(bad("path is not absolute".into()));
        }
        if f.mode & !0o7777 != 0 {
            return Err(bad(format!("mode {:#o} has bits beyond 0o7777", f.mode)));
        }
        if !keys.insert((f.dev, f.inode)) {
            return Err(bad(format!("dev {} inode {} saved twice", f.dev, f.inode)));
        }
        let file_pages = f.size.div_ceil(page_size);
        let mut next = 0u64;
        for &[file_page, first, pages] in &f.pages {
            if pages == 0 || file_page < next {
                return Err(bad(format!(
                    "content run at file page {file_page} of {pages} pages is empty or out of order"
                )));
            }
            if file_page.checked_add(pages).is_none_or(|e| e > file_pages) {
                return Err(bad(format!(
                    "content run at file page {file_page} of {pages} pages runs past its {} bytes",
                    f.size
                )));
            }
            if first.checked_add(pages).is_none_or(|e| e > page_count) {
                return Err(bad(format!(
                    "page id {first} + {pages} past the store's {page_count} pages"
                )));
            }
            next = file_page + pages;
        }
    }
    for p in processes {
        for fd in &p.fds {
            if let FdKind::File {
                saved: Some(id), ..
            } = fd.kind
            {
                if id as usize >= tree.saved_files.len() {
                    return Err(ImageError::SavedFileMissing {
                        file: super::types::process_file_name(p.pid),
                        pid: p.pid,
                        what: format!("fd {}", fd.fd),
                        id,
                    });
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn check_sysv_shm(
    tree: &Tree,
    processes: &[ProcessImage],
    page_size: u64,
    page_count: u64,
) -> Result<(), ImageError> {
    let mut seen = HashSet::new();
    for s in &tree.sysv_shm {
        let bad = |why: String| ImageError::BadSysvShm {
            shmid: s.shmid,
            key: s.key,
            why,
        };
        if !seen.insert(s.shmid) {
            return Err(bad("listed twice".into()));
        }
        let Some(len) = s.size.checked_next_multiple_of(page_size) else {
            return Err(bad(format!(
                "size {:#x} overflows when rounded to pages",
                s.size
            )));
        };
        let mut offset = 0u64;
        for run in &s.pages {
            if run.start() != offset || run.pages() == 0 {
                return Err(bad(format!(
                    "page run at offset {:#x} of {} pages, expected one at {offset:#x}",
                    run.start(),
                    run.pages()
                )));
            }
            if let PageRun::Stored { first, pages, .. } = *run {
                if first.checked_add(pages).is_none_or(|l| l > page_count) {
                    return Err(bad(format!(
                        "page id {first} + {pages} past the store's {page_count} pages"
                    )));
                }
            }
            offset = run
                .pages()
                .checked_mul(page_size)
                .and_then(|l| offset.checked_add(l))
                .unwrap_or(u64::MAX);
        }
        if offset != len {
            return Err(bad(format!(
                "page runs cover {offset:#x} bytes, the segment has {len:#x}"
            )));
        }
    }
    for (entry, process) in tree.processes.iter().zip(processes) {
        for v in process.vmas.iter().filter(|v| v.kind == VmaKind::SysvShm) {
            let unrecorded = |why| ImageError::SysvShmUnrecorded {
                file: entry.file.clone(),
                pid: process.pid,
                start: v.start,
                shmid: v.inode as i32,
                why,
            };
            let Some(s) = tree.sysv_shm.iter().find(|s| s.shmid == v.inode as i32) else {
                return Err(unrecorded("no such segment"));
            };
            // An end or a segment length past u64 is refused, not wrapped.
            let segment_len = s.size.checked_next_multiple_of(page_size);
            let window_end = v.offset.checked_add(v.len());
            if window_end.is_none_or(|end| segment_len.is_none_or(|len| end > len)) {
                return Err(unrecorded("the window ends past the segment"));
            }
        }
    }
    Ok(())
}

fn parse_json<T: DeserializeOwned>(file: &str, bytes: &[u8]) -> Result<T, ImageError> {
    // Through serde_path_to_error, so that a wrong value names its field.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| ImageError::json(file, e))?;
    de.end().map_err(|source| ImageError::Json {
        file: file.into(),
        field: String::new(),
        source,
    })?;
    Ok(value)
}

/// A listed file's size against the manifest's.
pub(crate) fn check_size(entry: &FileEntry, actual: u64) -> Result<(), ImageError> {
    if actual != entry.size {
        return Err(ImageError::SizeMismatch {
            name: entry.name.clone(),
            expected: entry.size,
            actual,
        });
    }
    Ok(())
}

/// A listed file's xxh3-128 against `files[i].xxh3_128` of the manifest.
pub(crate) fn check_hash(i: usize, entry: &FileEntry, actual: u128) -> Result<(), ImageError> {
    let expected = parse_hex_u128(&entry.xxh3_128, &format!("files[{i}].xxh3_128"))?;
    if actual != expected {
        return Err(ImageError::ChecksumMismatch {
            name: entry.name.clone(),
            expected: format!("{expected:032x}"),
            actual: format!("{actual:032x}"),
        });
    }
    Ok(())
}

fn parse_hex_u128(value: &str, field: &str) -> Result<u128, ImageError> {
    let bad = || ImageError::BadChecksumField {
        file: MANIFEST_FILE.into(),
        field: field.into(),
        value: value.into(),
        digits: 32,
    };
    if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    u128::from_str_radix(value, 16).map_err(|_| bad())
}

/// Streaming xxh3-128 of a file, in large chunks.
fn hash_file(path: &Path) -> Result<u128, ImageError> {
    let mut file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut hasher = Xxh3Default::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::{self, build, edit_json, edit_manifest, rewrite};
    use serde_json::json;

    fn open_err(dir: &Path) -> ImageError {
        match Image::open(dir) {
            Ok(_) => panic!("image at {} opened, expected a refusal", dir.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let mut image = Image::open(&dir).unwrap();
        assert_eq!(image.tree, testutil::tree());
        // The runs came back from the binary runs files.
        for (p, pid) in image
            .processes
            .iter_mut()
            .zip([testutil::ROOT, testutil::CHILD])
        {
            assert_eq!(p.runs_file, Some(format!("proc-{pid}.runs")));
            p.runs_file = None;
        }
        assert_eq!(image.processes[0], testutil::process(testutil::ROOT));
        assert_eq!(image.processes[1], testutil::process(testutil::CHILD));
        assert_eq!(image.pipes, testutil::pipes());
        assert_eq!(image.index.page_count, testutil::PAGES);
        assert_eq!(image.index.frames.len(), 3);
        assert_eq!(image.manifest.root_pid, testutil::ROOT);
        let reader = image.page_reader().unwrap();
        for id in 0..testutil::PAGES {
            assert_eq!(reader.read_page(id).unwrap(), testutil::page(id));
        }
        let (entry, process) = image.process(testutil::CHILD).unwrap();
        assert_eq!(entry.ppid, testutil::ROOT);
        assert_eq!(process.pid, testutil::CHILD);
    }

    #[test]
    fn refuses_incomplete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        assert!(matches!(open_err(&dir), ImageError::Incomplete { .. }));
    }

    #[test]
    fn refuses_bad_format_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| m["format"] = json!("criu"));
        assert!(matches!(
            open_err(&dir),
            ImageError::BadFormatName { found, .. } if found == "criu"
        ));
    }

    #[test]
    fn refuses_unknown_major() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // A future major may change anything, even drop fields: still named as such.
        edit_manifest(&dir, |m| {
            m["format_version"]["major"] = json!(2);
            m.as_object_mut().unwrap().remove("files");
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::UnknownMajor {
                found: 2,
                supported: FORMAT_MAJOR,
                ..
            }
        ));
    }

    #[test]
    fn refuses_newer_minor() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| {
            m["format_version"]["minor"] = json!(FORMAT_MINOR + 1)
        });
        assert!(
            matches!(open_err(&dir), ImageError::NewerMinor { found, .. } if found == u64::from(FORMAT_MINOR) + 1)
        );
    }

    #[test]
    fn refuses_bad_page_size() {
        // Not a power of two; powers of two outside 4 KiB..=1 MiB (a frame
        // or a VMA's page count derived from them would overflow).
        for page_size in [3000, 0, 2048, 1 << 21, 1 << 62] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = build(tmp.path());
            edit_manifest(&dir, |m| m["page_size"] = json!(page_size));
            assert!(
                matches!(
                    open_err(&dir),
                    ImageError::BadPageSize { page_size: p, .. } if p == page_size
                ),
                "{page_size}"
            );
        }
    }

    #[test]
    fn refuses_index_page_size_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| v["page_size"] = json!(8192));
        assert!(matches!(
            open_err(&dir),
            ImageError::PageSizeMismatch {
                found: 8192,
                expected: 4096,
                ..
            }
        ));
    }

    #[test]
    fn refuses_unsafe_file_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| m["files"][0]["name"] = json!("../etc/passwd"));
        assert!(matches!(
            open_err(&dir),
            ImageError::UnsafeFileName { name } if name == "../etc/passwd"
        ));
    }

    #[test]
    fn refuses_duplicate_file_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| {
            let first = m["files"][0].clone();
            m["files"].as_array_mut().unwrap().push(first);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::DuplicateFileEntry { .. }
        ));
    }

    #[test]
    fn refuses_required_file_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| {
            m["files"]
                .as_array_mut()
                .unwrap()
                .retain(|f| f["name"] != json!(PIPES_FILE));
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::NotInManifest { name } if name == PIPES_FILE
        ));
    }

    #[test]
    fn refuses_bad_checksum_field() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| m["files"][0]["xxh3_128"] = json!("xyz"));
        assert!(matches!(
            open_err(&dir),
            ImageError::BadChecksumField { field, .. } if field == "files[0].xxh3_128"
        ));
    }

    #[test]
    fn refuses_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        std::fs::remove_file(dir.join(PIPES_FILE)).unwrap();
        assert!(matches!(
            open_err(&dir),
            ImageError::MissingFile { name, .. } if name == PIPES_FILE
        ));
    }

    #[test]
    fn refuses_size_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let mut tree = std::fs::read(dir.join(TREE_FILE)).unwrap();
        tree.push(b'\n');
        std::fs::write(dir.join(TREE_FILE), &tree).unwrap();
        assert!(matches!(
            open_err(&dir),
            ImageError::SizeMismatch { name, expected, actual }
                if name == TREE_FILE && actual == expected + 1
        ));
    }

    #[test]
    fn refuses_checksum_mismatch_json() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let path = dir.join("proc-101.json");
        let text = std::fs::read_to_string(&path).unwrap();
        // Same length, other content: only the checksum can tell.
        let altered = text.replacen("\"pid\":101", "\"pid\":109", 1);
        assert_ne!(text, altered);
        std::fs::write(&path, altered).unwrap();
        assert!(matches!(
            open_err(&dir),
            ImageError::ChecksumMismatch { name, .. } if name == "proc-101.json"
        ));
    }

    #[test]
    fn refuses_checksum_mismatch_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let path = dir.join(PAGES_FILE);
        let mut pages = std::fs::read(&path).unwrap();
        let last = pages.len() - 1;
        pages[last] ^= 0x55;
        std::fs::write(&path, pages).unwrap();
        // Every frame has the checksum of its compressed bytes: open leaves
        // `pages` to them (restore checks them all first), and `verify`
        // checks the whole file as well.
        let image = Image::open(&dir).unwrap();
        assert!(matches!(
            image.page_reader().unwrap().verify_frames(),
            Err(ImageError::FrameChecksum { frame: 2, .. })
        ));
        assert!(matches!(
            crate::image::inspect::verify(&dir),
            Err(ImageError::ChecksumMismatch { name, .. }) if name == PAGES_FILE
        ));
        // An image whose frames lack those checksums (before format 1.1)
        // is refused at open, by the whole file's checksum.
        let index = dir.join(PAGE_INDEX_FILE);
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        for frame in value["frames"].as_array_mut().unwrap() {
            frame.as_object_mut().unwrap().remove("compressed_xxh3_64");
        }
        rewrite(&dir, PAGE_INDEX_FILE, &serde_json::to_vec(&value).unwrap());
        assert!(matches!(
            open_err(&dir),
            ImageError::ChecksumMismatch { name, .. } if name == PAGES_FILE
        ));
    }

    #[test]
    fn refuses_a_runs_file_of_another_name_or_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let json = dir.join("proc-101.json");
        let original = std::fs::read(&json).unwrap();
        let mut value: serde_json::Value = serde_json::from_slice(&original).unwrap();
        value["runs_file"] = json!("proc-100.runs");
        rewrite(&dir, "proc-101.json", &serde_json::to_vec(&value).unwrap());
        let e = open_err(&dir).to_string();
        assert!(
            e.contains("proc-101.json: field runs_file is \"proc-100.runs\""),
            "{e}"
        );
        rewrite(&dir, "proc-101.json", &original);
        edit_manifest(&dir, |m| {
            m["files"]
                .as_array_mut()
                .unwrap()
                .retain(|f| f["name"] != "proc-101.runs");
        });
        let e = open_err(&dir).to_string();
        assert!(e.contains("runs file proc-101.runs is not listed"), "{e}");
    }

    #[test]
    fn refuses_bad_json() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        rewrite(&dir, "proc-101.json", b"{\"pid\": 101, \"vmas\": [");
        assert!(matches!(
            open_err(&dir),
            ImageError::Json { file, .. } if file == "proc-101.json"
        ));
    }

    #[test]
    fn json_errors_name_the_file_and_field() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, TREE_FILE, |v| {
            v["processes"][1]["pid"] = json!(1.8e19)
        });
        let err = open_err(&dir);
        let text = err.to_string();
        assert!(
            text.starts_with("tree.json: invalid JSON in field processes[1].pid: invalid type"),
            "{text}"
        );
        edit_manifest(&dir, |m| m["page_size"] = json!("4096"));
        let text = open_err(&dir).to_string();
        assert!(
            text.starts_with("manifest.json: invalid JSON in field page_size: "),
            "{text}"
        );
    }

    #[test]
    fn refuses_frames_not_contiguous() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| {
            let off = v["frames"][1]["offset"].as_u64().unwrap();
            v["frames"][1]["offset"] = json!(off + 1);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::FrameNotContiguous { frame: 1, .. }
        ));
    }

    #[test]
    fn refuses_truncated_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let mut pages = std::fs::read(dir.join(PAGES_FILE)).unwrap();
        pages.pop();
        rewrite(&dir, PAGES_FILE, &pages);
        assert!(matches!(
            open_err(&dir),
            ImageError::TruncatedFrame { frame: 2, .. }
        ));
    }

    #[test]
    fn refuses_trailing_bytes_in_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let mut pages = std::fs::read(dir.join(PAGES_FILE)).unwrap();
        pages.extend_from_slice(&[0; 7]);
        rewrite(&dir, PAGES_FILE, &pages);
        assert!(matches!(
            open_err(&dir),
            ImageError::PagesTrailingBytes { trailing: 7, .. }
        ));
    }

    #[test]
    fn refuses_frame_first_page_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| {
            v["frames"][1]["first_page"] = json!(3)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::FramePagesNotContiguous {
                frame: 1,
                first_page: 3,
                expected: 2
            }
        ));
    }

    #[test]
    fn refuses_short_middle_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| {
            v["frames"][0]["page_count"] = json!(1)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::FramePageCount {
                frame: 0,
                page_count: 1,
                ..
            }
        ));
    }

    #[test]
    fn refuses_page_count_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| v["page_count"] = json!(9));
        assert!(matches!(
            open_err(&dir),
            ImageError::PageCountMismatch {
                page_count: 9,
                frames_total: 5
            }
        ));
    }

    #[test]
    fn refuses_zero_pages_per_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| v["pages_per_frame"] = json!(0));
        assert!(matches!(open_err(&dir), ImageError::ZeroPagesPerFrame));
    }

    #[test]
    fn refuses_bad_frame_checksum_field() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, PAGE_INDEX_FILE, |v| {
            v["frames"][2]["xxh3_64"] = json!("12")
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::BadChecksumField { field, digits: 16, .. } if field == "frames[2].xxh3_64"
        ));
    }

    #[test]
    fn refuses_page_out_of_range() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-101.json", |v| {
            v["vmas"][1]["pages"][0]["first"] = json!(testutil::PAGES);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::PageOutOfRange { pid: 101, vma_start: 0x30000, page_id, page_count, .. }
                if page_id == testutil::PAGES && page_count == testutil::PAGES
        ));
    }

    /// Makes pid 100's first VMA (0x10000, 4 pages) a SysV shm window of
    /// segment 7, recorded in tree.json with `runs`.
    fn sysv_image(dir: &Path, record: bool, runs: serde_json::Value) {
        edit_json(dir, "proc-100.json", |v| {
            v["vmas"][0]["kind"] = json!("sysv_shm");
            v["vmas"][0]["shared"] = json!(true);
            v["vmas"][0]["inode"] = json!(7);
        });
        if record {
            edit_json(dir, "tree.json", |v| {
                v["sysv_shm"] = json!([{
                    "key": 0, "shmid": 7, "size": 0x3f00, "uid": 0, "gid": 0,
                    "cuid": 0, "cgid": 0, "mode": 0o600, "cpid": 100, "lpid": 100,
                    "nattch": 1, "pages": runs
                }]);
            });
        }
    }

    #[test]
    fn sysv_shm_records_load_and_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let runs = json!([
            {"kind": "stored", "start": 0, "pages": 2, "first": 0},
            {"kind": "absent", "start": 0x2000, "pages": 2}
        ]);
        sysv_image(&dir, true, runs);
        let image = Image::open(&dir).expect("opens");
        assert_eq!(image.tree.sysv_shm.len(), 1);
        assert_eq!(image.tree.sysv_shm[0].size, 0x3f00);

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        sysv_image(&dir, false, json!([]));
        assert!(matches!(
            open_err(&dir),
            ImageError::SysvShmUnrecorded {
                pid: 100,
                start: 0x10000,
                shmid: 7,
                ..
            }
        ));

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        sysv_image(
            &dir,
            true,
            json!([{"kind": "absent", "start": 0, "pages": 3}]),
        );
        assert!(matches!(
            open_err(&dir),
            ImageError::BadSysvShm { shmid: 7, ref why, .. } if why.contains("cover")
        ));

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let past = json!([{"kind": "stored", "start": 0, "pages": 4, "first": testutil::PAGES}]);
        sysv_image(&dir, true, past);
        assert!(matches!(
            open_err(&dir),
            ImageError::BadSysvShm { shmid: 7, ref why, .. } if why.contains("past the store")
        ));
    }

    /// An image whose tree.json holds `mount_ns`.
    fn mount_ns_image(mount_ns: serde_json::Value) -> Result<Image, ImageError> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "tree.json", |v| v["mount_ns"] = mount_ns);
        Image::open(&dir)
    }

    #[test]
    fn mount_ns_loads_and_each_way_a_mount_can_be_wrong_is_named() {
        // Older images have none.
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Image::open(&build(tmp.path())).unwrap().tree.mount_ns, None);
        let proc = json!({"mountpoint": "/proc", "fstype": "proc", "flags": ["rw", "nosuid"]});
        let tmpfs = json!({"mountpoint": "/mnt/t", "fstype": "tmpfs", "flags": ["rw"],
                           "data": "size=1024k,mode=755"});
        let image = mount_ns_image(json!({"kind": "private_copy", "mounts": [proc, tmpfs]}))
            .expect("opens");
        let Some(MountNs::PrivateCopy { mounts, unmounted }) = image.tree.mount_ns else {
            panic!("not a private copy: {:?}", image.tree.mount_ns);
        };
        assert_eq!(mounts.len(), 2);
        assert!(unmounted.is_empty(), "unmounted defaults to none");
        assert_eq!(mounts[0].data, "", "data defaults to empty");
        assert_eq!(mounts[1].fstype, super::super::types::RecreatedFs::Tmpfs);
        let own = mount_ns_image(json!({"kind": "own_root"})).expect("opens");
        assert_eq!(own.tree.mount_ns, Some(MountNs::OwnRoot));

        let why = |m: serde_json::Value| match mount_ns_image(
            json!({"kind": "private_copy", "mounts": [m]}),
        ) {
            Err(ImageError::BadRecreatedMount { index: 0, why, .. }) => why,
            other => panic!("expected BadRecreatedMount, got {:?}", other.map(|_| ())),
        };
        let with = |field: &str, value: serde_json::Value| {
            let mut m = json!({"mountpoint": "/mnt/t", "fstype": "tmpfs", "flags": ["rw"]});
            m[field] = value;
            m
        };
        assert!(why(with("mountpoint", json!("mnt/t"))).contains("absolute"));
        assert!(why(with("mountpoint", json!("/mnt/../etc"))).contains("normal"));
        assert!(why(with("flags", json!(["rw", "bind"]))).contains("unknown mount flag \"bind\""));
        assert!(why(with("data", json!("size=1\0"))).contains("NUL"));
        let err = mount_ns_image(json!({"kind": "private_copy", "mounts": [],
            "unmounted": ["/"]}))
        .map(|_| ())
        .expect_err("/ is never detached");
        assert!(
            matches!(err, ImageError::BadRecreatedMount { ref why, .. } if why.contains("unmounted"))
        );
        // A filesystem restore cannot make is refused by the parser, named.
        let err = mount_ns_image(json!({"kind": "private_copy",
            "mounts": [with("fstype", json!("ext4"))]}))
        .map(|_| ())
        .expect_err("ext4 is not recreated");
        assert!(err.to_string().contains("ext4"), "{err}");
    }

    /// Found by reviewing the parsers; replayed by the fuzz corpus (inputs `fuzz/corpus/tree/regress-sysv-size-overflow`,
    /// `fuzz/corpus/process/regress-sysv-window-overflow`): sizes near
    /// 2^64 overflowed while being rounded or added (a panic with overflow
    /// checks, a wrapped comparison without).
    #[test]
    fn refuses_sysv_sizes_that_overflow() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        sysv_image(&dir, true, json!([]));
        edit_json(&dir, "tree.json", |v| {
            v["sysv_shm"][0]["size"] = json!(u64::MAX)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::BadSysvShm { shmid: 7, ref why, .. } if why.contains("overflows")
        ));

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let runs = json!([{"kind": "absent", "start": 0, "pages": 4}]);
        sysv_image(&dir, true, runs);
        // Offset plus length fits in u64, the segment's length does not.
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][0]["offset"] = json!(u64::MAX - 0x4fff)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::SysvShmUnrecorded { pid: 100, shmid: 7, why, .. } if why.contains("past the segment")
        ));
    }

    /// An image whose tree.json holds `files` as its saved files.
    fn saved_image(files: serde_json::Value) -> Result<Image, ImageError> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "tree.json", |v| v["saved_files"] = files);
        Image::open(&dir)
    }

    fn saved_file(id: u32, pages: serde_json::Value) -> serde_json::Value {
        json!({"id": id, "path": "/dev/shm/x", "deleted": true, "dev": 1, "inode": id + 10,
               "size": 5000, "mode": 0o600, "uid": 0, "gid": 0, "pages": pages})
    }

    #[test]
    fn saved_files_load_and_each_way_they_can_be_wrong_is_named() {
        let image =
            saved_image(json!([saved_file(0, json!([[0, 0, 1], [1, 3, 1]]))])).expect("opens");
        assert_eq!(image.tree.saved_files[0].pages, vec![[0, 0, 1], [1, 3, 1]]);
        let why = |files: serde_json::Value| match saved_image(files) {
            Err(ImageError::BadSavedFile { why, .. }) => why,
            other => panic!("expected BadSavedFile, got {:?}", other.map(|_| ())),
        };
        assert!(why(json!([saved_file(1, json!([]))])).contains("dense"));
        let mut relative = saved_file(0, json!([]));
        relative["path"] = json!("shm/x");
        assert!(why(json!([relative])).contains("not absolute"));
        let mut mode = saved_file(0, json!([]));
        mode["mode"] = json!(0o100600);
        assert!(why(json!([mode])).contains("beyond 0o7777"));
        let mut twice = saved_file(1, json!([]));
        twice["inode"] = json!(10);
        assert!(why(json!([saved_file(0, json!([])), twice])).contains("saved twice"));
        assert!(why(json!([saved_file(0, json!([[1, 0, 1], [0, 1, 1]]))])).contains("out of order"));
        assert!(
            why(json!([saved_file(0, json!([[0, 0, 3]]))])).contains("runs past its 5000 bytes")
        );
        let past = json!([saved_file(0, json!([[0, testutil::PAGES, 1]]))]);
        assert!(why(past).contains("past the store"));

        // An fd naming a saved file the tree does not hold.
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["fds"].as_array_mut().unwrap().push(json!({
                "fd": 5, "flags": 0, "kind": {"type": "file", "path": "/x", "pos": 0,
                "size": 0, "deleted": true, "saved": 3}
            }));
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::SavedFileMissing {
                pid: 100,
                id: 3,
                ..
            }
        ));
    }

    /// A valid periodic SIGEV_THREAD_ID timer of the leader (tid 100).
    fn timer_json() -> serde_json::Value {
        json!({
            "id": 3, "clockid": 1, "notify": 4, "signo": 34, "sigev_value": 7,
            "thread": 100, "value": [0, 250_000_000], "interval": [0, 500_000_000],
            "overrun": 0
        })
    }

    fn timer_err(f: impl FnOnce(&mut serde_json::Value)) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["posix_timers"] = json!([timer_json()]);
            f(&mut v["posix_timers"]);
        });
        match open_err(&dir) {
            e @ ImageError::BadPosixTimer { pid: 100, .. } => e.to_string(),
            other => panic!("not a timer error: {other}"),
        }
    }

    #[test]
    fn posix_timers_load_and_older_images_have_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let image = Image::open(&dir).expect("no timers");
        assert!(image.processes[0].posix_timers.is_empty());
        edit_json(&dir, "proc-100.json", |v| {
            let mut realtime = timer_json();
            realtime["id"] = json!(0);
            realtime["clockid"] = json!(0);
            realtime["notify"] = json!(0);
            realtime["thread"] = serde_json::Value::Null;
            realtime["expires"] = json!([1_800_000_000, 5]);
            let mut none = timer_json();
            none["id"] = json!(9);
            none["notify"] = json!(1);
            none["signo"] = json!(0);
            none["thread"] = serde_json::Value::Null;
            v["posix_timers"] = json!([realtime, timer_json(), none]);
        });
        let image = Image::open(&dir).expect("timers load");
        let t = &image.processes[0].posix_timers;
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].thread, Some(100));
        assert_eq!(t[0].expires, Some((1_800_000_000, 5)));
    }

    #[test]
    fn refuses_zombie_with_posix_timers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        zombie_image(&dir, 9, |v| {
            let mut t = timer_json();
            t["notify"] = json!(0);
            t["thread"] = serde_json::Value::Null;
            v["posix_timers"] = json!([t]);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ZombieNotEmpty { pid: 101, what: ref w, .. } if w == "1 POSIX timers"
        ));
    }

    #[test]
    fn refuses_posix_timer_bad_clock() {
        let e = timer_err(|t| t[0]["clockid"] = json!(2));
        assert!(e.contains("clock 2 is not supported"), "{e}");
    }

    #[test]
    fn refuses_posix_timer_bad_signal() {
        for sig in [0, 9, 19, 65] {
            let e = timer_err(|t| t[0]["signo"] = json!(sig));
            assert!(e.contains(&format!("signal {sig} cannot")), "{e}");
        }
    }

    #[test]
    fn refuses_posix_timer_duplicate_or_negative_id() {
        let e = timer_err(|t| {
            let again = t[0].clone();
            t.as_array_mut().unwrap().push(again);
        });
        assert!(e.contains("timer 3: id recorded twice"), "{e}");
        let e = timer_err(|t| t[0]["id"] = json!(-1));
        assert!(e.contains("negative id"), "{e}");
    }

    #[test]
    fn refuses_posix_timer_target_not_a_thread() {
        let e = timer_err(|t| t[0]["thread"] = json!(101));
        assert!(e.contains("target 101 is not a thread"), "{e}");
        let e = timer_err(|t| t[0]["thread"] = serde_json::Value::Null);
        assert!(e.contains("without a target thread"), "{e}");
        let e = timer_err(|t| t[0]["notify"] = json!(0));
        assert!(e.contains("without SIGEV_THREAD_ID"), "{e}");
    }

    #[test]
    fn refuses_posix_timer_bad_notify() {
        let e = timer_err(|t| t[0]["notify"] = json!(2));
        assert!(e.contains("notify kind 2"), "{e}");
    }

    #[test]
    fn refuses_posix_timer_bad_times() {
        let e = timer_err(|t| t[0]["value"] = json!([0, 1_000_000_000]));
        assert!(e.contains("value (0, 1000000000)"), "{e}");
        let e = timer_err(|t| t[0]["interval"] = json!([-1, 0]));
        assert!(e.contains("interval (-1, 0)"), "{e}");
    }

    #[test]
    fn refuses_posix_timer_expiry_mismatch() {
        // Relative clock with an expiry.
        let e = timer_err(|t| t[0]["expires"] = json!([5, 0]));
        assert!(e.contains("an expiry for"), "{e}");
        // Armed realtime timer without one.
        let e = timer_err(|t| t[0]["clockid"] = json!(0));
        assert!(e.contains("without its expiry"), "{e}");
        let e = timer_err(|t| {
            t[0]["clockid"] = json!(11);
            t[0]["expires"] = json!([5, -1]);
        });
        assert!(e.contains("expiry (5, -1)"), "{e}");
    }

    #[test]
    fn refuses_unsorted_vmas() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"].as_array_mut().unwrap().swap(0, 1);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::VmasUnsorted {
                pid: 100,
                a_start: 0x20000,
                b_start: 0x10000,
                ..
            }
        ));
    }

    #[test]
    fn refuses_overlapping_vmas() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // Move the second VMA (and its run) to start inside the first.
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][1]["start"] = json!(0x13000);
            v["vmas"][1]["end"] = json!(0x15000);
            v["vmas"][1]["pages"][0]["start"] = json!(0x13000);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::OverlappingVmas {
                pid: 100,
                a: (0x10000, 0x14000),
                b: (0x13000, 0x15000),
                ..
            }
        ));
    }

    #[test]
    fn refuses_unaligned_vma() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][1]["end"] = json!(0x22010)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::BadVma {
                pid: 100,
                start: 0x20000,
                end: 0x22010,
                ..
            }
        ));
    }

    /// Found by reviewing the parsers (now in the fuzz corpus): restore planning adds a shared VMA's
    /// length to its offset, which overflowed.
    #[test]
    fn refuses_vma_offset_that_overflows() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][1]["offset"] = json!(u64::MAX - 0x1000)
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::BadVma {
                pid: 100,
                start: 0x20000,
                ..
            }
        ));
    }

    #[test]
    fn refuses_runs_not_covering_vma() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // Drop the last (absent) run: the VMA's last page is described by nothing.
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][0]["pages"].as_array_mut().unwrap().pop();
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::RunsDoNotCoverVma {
                pid: 100,
                vma_start: 0x10000,
                expected: 0x14000,
                found: 0x13000,
                ..
            }
        ));
    }

    #[test]
    fn refuses_unaligned_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            v["vmas"][0]["pages"][1]["start"] = json!(0x12008);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::UnalignedRun {
                pid: 100,
                run_start: 0x12008,
                ..
            }
        ));
    }

    #[test]
    fn refuses_empty_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-100.json", |v| {
            let runs = v["vmas"][0]["pages"].as_array_mut().unwrap();
            runs.insert(1, json!({"kind": "zero", "start": 0x12000, "pages": 0}));
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::EmptyRun {
                pid: 100,
                run_start: 0x12000,
                ..
            }
        ));
    }

    #[test]
    fn refuses_process_file_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, TREE_FILE, |v| {
            let mut extra = v["processes"][1].clone();
            extra["pid"] = json!(102);
            extra["file"] = json!("proc-102.json");
            v["processes"].as_array_mut().unwrap().push(extra);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ProcessFileMissing { pid: 102, file } if file == "proc-102.json"
        ));
    }

    #[test]
    fn refuses_duplicate_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, TREE_FILE, |v| {
            let dup = v["processes"][1].clone();
            v["processes"].as_array_mut().unwrap().push(dup);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::DuplicatePid { pid: 101 }
        ));
    }

    #[test]
    fn refuses_empty_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, TREE_FILE, |v| v["processes"] = json!([]));
        assert!(matches!(open_err(&dir), ImageError::EmptyTree));
    }

    #[test]
    fn refuses_root_pid_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_manifest(&dir, |m| m["root_pid"] = json!(101));
        assert!(matches!(
            open_err(&dir),
            ImageError::RootPidMismatch {
                root_pid: 101,
                first: 100
            }
        ));
    }

    #[test]
    fn refuses_parent_after_child() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // A third process (reusing 101's file name is irrelevant: the order check comes first).
        edit_json(&dir, TREE_FILE, |v| {
            let mut grandchild = v["processes"][1].clone();
            grandchild["pid"] = json!(102);
            grandchild["ppid"] = json!(103);
            let mut parent = v["processes"][1].clone();
            parent["pid"] = json!(103);
            let list = v["processes"].as_array_mut().unwrap();
            list.push(grandchild);
            list.push(parent);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ParentAfterChild {
                pid: 102,
                ppid: 103
            }
        ));
    }

    /// Makes pid 101 a zombie killed by `signal` (an empty process file,
    /// no threads), then lets `f` break it.
    fn zombie_image(dir: &Path, signal: u8, f: impl FnOnce(&mut serde_json::Value)) {
        edit_json(dir, TREE_FILE, |v| {
            v["processes"][1]["tids"] = json!([]);
            v["processes"][1]["zombie"] =
                json!({"how": "killed", "signal": signal, "core_dumped": false});
        });
        edit_json(dir, "proc-101.json", |v| {
            v["vmas"] = json!([]);
            v["fds"] = json!([]);
            v["threads"] = json!([]);
            v["signals"] = json!({"actions": [], "shared_pending": []});
            f(v);
        });
    }

    #[test]
    fn zombie_with_empty_process_file_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        zombie_image(&dir, 15, |_| {});
        let image = Image::open(&dir).expect("a zombie opens");
        assert_eq!(
            image.tree.processes[1].zombie,
            Some(ZombieExit::Killed {
                signal: 15,
                core_dumped: false
            })
        );
        assert!(image.processes[1].threads.is_empty());
        // Without the field (images of older cowsnaps) no process is a zombie.
        assert_eq!(image.tree.processes[0].zombie, None);
        assert!(!std::fs::read_to_string(dir.join("tree.json"))
            .unwrap()
            .contains("\"zombie\":null"));
    }

    #[test]
    fn refuses_zombie_with_memory_fds_or_threads() {
        for (key, what) in [("vmas", "VMAs"), ("fds", "fds"), ("threads", "threads")] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = build(tmp.path());
            let full = testutil::process(testutil::CHILD);
            let value = serde_json::to_value(&full).unwrap();
            zombie_image(&dir, 9, |v| v[key] = value[key].clone());
            assert!(
                matches!(
                    open_err(&dir),
                    ImageError::ZombieNotEmpty { pid: 101, what: ref w, ref file }
                        if w.ends_with(what) && file == "proc-101.json"
                ),
                "{key}"
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        zombie_image(&dir, 9, |_| {});
        edit_json(&dir, TREE_FILE, |v| {
            v["processes"][1]["tids"] = json!([101])
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ZombieNotEmpty { pid: 101, .. }
        ));
    }

    #[test]
    fn refuses_zombie_root_parent_or_signal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, TREE_FILE, |v| {
            v["processes"][0]["zombie"] = json!({"how": "exited", "code": 0});
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ZombieRoot { pid: 100 }
        ));

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        zombie_image(&dir, 9, |_| {});
        edit_json(&dir, TREE_FILE, |v| {
            let mut grandchild = v["processes"][0].clone();
            grandchild["pid"] = json!(102);
            grandchild["ppid"] = json!(101);
            grandchild["file"] = json!("proc-100.json");
            v["processes"].as_array_mut().unwrap().push(grandchild);
        });
        assert!(matches!(
            open_err(&dir),
            ImageError::ZombieParent {
                pid: 102,
                zombie: 101
            }
        ));

        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        zombie_image(&dir, libc::SIGCHLD as u8, |_| {});
        assert!(matches!(
            open_err(&dir),
            ImageError::ZombieSignal { pid: 101, signal } if i32::from(signal) == libc::SIGCHLD
        ));
    }

    #[test]
    fn wait_status_round_trip() {
        for status in [0u32, 7 << 8, 255 << 8, 9, 15, 11 | 0x80, 64] {
            let exit = ZombieExit::from_wait_status(status).expect("final status");
            assert_eq!(exit.wait_status(), status);
        }
        // Stopped, continued and garbage are not exits.
        for status in [0x137f, 0xffff, 0x1_0000, 0x10f] {
            assert_eq!(ZombieExit::from_wait_status(status), None, "{status:#x}");
        }
        assert!(signal_ends_process(9) && signal_ends_process(15) && signal_ends_process(40));
        assert!(!signal_ends_process(0) && !signal_ends_process(19) && !signal_ends_process(65));
    }

    #[test]
    fn refuses_process_pid_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        edit_json(&dir, "proc-101.json", |v| v["pid"] = json!(109));
        assert!(matches!(
            open_err(&dir),
            ImageError::ProcessPidMismatch { expected: 101, found: 109, file } if file == "proc-101.json"
        ));
    }
}
