//! SysV shared memory: `shmget`, `shmat`/`shmdt`, `shmctl`, the IPC
//! namespace's `shm_next_id` knob, and `mincore` over an attachment. The
//! dump attaches segments read-only to read them; the restore creates them
//! again and attaches them where the plan says.
//!
//! Every call acts in the calling thread's IPC namespace (`shmget`, `shmat`,
//! `shmctl` and the `kernel.shm_*` sysctls all follow `current`'s namespace).

use std::io;

const PAGE: u64 = 4096;
/// `shm_perm.mode` bit: the segment was IPC_RMID'ed and lives on while attached.
pub const SHM_DEST: u32 = 0o1000;
/// `shm_perm.mode` bit: SHM_LOCK'ed.
pub const SHM_LOCKED: u32 = 0o2000;
const SHM_NEXT_ID: &str = "/proc/sys/kernel/shm_next_id";

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shmget(key {key:#x}, {size} bytes): {source}")]
    Get {
        key: i32,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("shmat(shmid {shmid}): {source}")]
    Attach {
        shmid: i32,
        #[source]
        source: io::Error,
    },
    #[error("shmctl(shmid {shmid}, {op}): {source}")]
    Ctl {
        shmid: i32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("writing {value} to {SHM_NEXT_ID}: {source}")]
    NextId {
        value: i32,
        #[source]
        source: io::Error,
    },
    #[error("moving shmid {shmid}'s attachment to {to:#x}+{len:#x}: {source}")]
    Place {
        shmid: i32,
        to: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("mincore {addr:#x}+{len:#x}: {source}")]
    Mincore {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// What `IPC_STAT` says about a segment (pids in the caller's pid namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmStat {
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits with SHM_DEST / SHM_LOCKED.
    pub mode: u32,
    pub size: u64,
    pub cpid: i32,
    pub lpid: i32,
    pub nattch: u64,
    /// Last shmat, seconds since the epoch (0: never attached).
    pub atime: i64,
}

fn ctl(shmid: i32, cmd: i32, op: &'static str, buf: *mut libc::shmid_ds) -> Result<(), ShmError> {
    // SAFETY: `buf` is null (for commands that take none) or points to a
    // valid shmid_ds owned by the caller.
    if unsafe { libc::shmctl(shmid, cmd, buf) } < 0 {
        return Err(ShmError::Ctl {
            shmid,
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn stat_raw(shmid: i32) -> Result<libc::shmid_ds, ShmError> {
    // SAFETY: shmid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    ctl(shmid, libc::IPC_STAT, "IPC_STAT", &mut ds)?;
    Ok(ds)
}

pub fn stat(shmid: i32) -> Result<ShmStat, ShmError> {
    let ds = stat_raw(shmid)?;
    Ok(ShmStat {
        key: ds.shm_perm.__key,
        uid: ds.shm_perm.uid,
        gid: ds.shm_perm.gid,
        cuid: ds.shm_perm.cuid,
        cgid: ds.shm_perm.cgid,
        mode: u32::from(ds.shm_perm.mode),
        size: ds.shm_segsz as u64,
        cpid: ds.shm_cpid,
        lpid: ds.shm_lpid,
        nattch: ds.shm_nattch,
        atime: ds.shm_atime,
    })
}

/// Creates a new segment (`IPC_CREAT | IPC_EXCL`, permission bits of `mode`).
pub fn create(key: i32, size: u64, mode: u32) -> Result<i32, ShmError> {
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: plain syscall, no pointers.
    let id = unsafe { libc::shmget(key, size as usize, flags) };
    if id < 0 {
        return Err(ShmError::Get {
            key,
            size,
            source: io::Error::last_os_error(),
        });
    }
    Ok(id)
}

/// Sets owner, group and permission bits (`IPC_SET`; creator ids stay).
pub fn set_owner(shmid: i32, uid: u32, gid: u32, mode: u32) -> Result<(), ShmError> {
    let mut ds = stat_raw(shmid)?;
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = (mode & 0o777) as libc::c_ushort;
    ctl(shmid, libc::IPC_SET, "IPC_SET", &mut ds)
}

pub fn remove(shmid: i32) -> Result<(), ShmError> {
    ctl(shmid, libc::IPC_RMID, "IPC_RMID", std::ptr::null_mut())
}

pub fn lock(shmid: i32) -> Result<(), ShmError> {
    ctl(shmid, libc::SHM_LOCK, "SHM_LOCK", std::ptr::null_mut())
}

/// The id the next segment of this IPC namespace gets. The kernel uses it
/// once and sets the knob back to -1 itself (it refuses a written -1).
/// `scratch`: where a private procfs may be mounted for the moment when
/// /proc/sys is read-only (in a container; see `ns::write_proc_sys`).
pub fn set_next_id(value: i32, scratch: &std::path::Path) -> Result<(), ShmError> {
    super::ns::write_proc_sys("kernel/shm_next_id", &value.to_string(), scratch)
        .map_err(|source| ShmError::NextId { value, source })
}

/// Makes sure no chosen id is left pending (after a `shmget` that failed
/// before using it): consumes it with a throwaway segment, removed at once.
pub fn clear_next_id() -> Result<(), ShmError> {
    let pending = std::fs::read_to_string(SHM_NEXT_ID)
        .map_err(|source| ShmError::NextId { value: -1, source })?;
    if pending.trim() == "-1" {
        return Ok(());
    }
    let id = create(libc::IPC_PRIVATE, PAGE, 0o600)?;
    remove(id)
}

/// The segment with this key, if any (never for IPC_PRIVATE).
pub fn find_key(key: i32) -> Option<i32> {
    if key == libc::IPC_PRIVATE {
        return None;
    }
    // SAFETY: plain syscall, no pointers; size 0 and no flags only look up.
    let id = unsafe { libc::shmget(key, 0, 0) };
    (id >= 0).then_some(id)
}

/// Bytes an attachment of a `size`-byte segment covers.
pub fn attach_len(size: u64) -> u64 {
    size.next_multiple_of(PAGE)
}

/// An attachment at a kernel-chosen address, detached when dropped.
#[derive(Debug)]
pub struct Attachment {
    shmid: i32,
    addr: u64,
    len: u64,
}

impl Attachment {
    /// Attaches segment `shmid` of `size` bytes, read-only or read-write.
    pub fn new(shmid: i32, size: u64, readonly: bool) -> Result<Attachment, ShmError> {
        let flags = if readonly { libc::SHM_RDONLY } else { 0 };
        // SAFETY: a null address lets the kernel pick a free range; nothing
        // this process uses is replaced.
        let p = unsafe { libc::shmat(shmid, std::ptr::null(), flags) };
        if p as isize == -1 {
            return Err(ShmError::Attach {
                shmid,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Attachment {
            shmid,
            addr: p as u64,
            len: attach_len(size),
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Which pages of the segment are in memory (`mincore`): reading
    /// only those never allocates a page in the segment.
    pub fn resident(&self) -> Result<Vec<bool>, ShmError> {
        let pages = (self.len / PAGE) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is our attachment; `vec` has one byte per page.
        let r = unsafe {
            libc::mincore(
                self.addr as *mut libc::c_void,
                self.len as usize,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(ShmError::Mincore {
                addr: self.addr,
                len: self.len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }

    /// Reads one byte of page `page` so that it is mapped here (and
    /// /proc/self/pagemap shows its frame). Only for resident pages.
    pub fn fault_in(&self, page: u64) {
        if page * PAGE >= self.len {
            return;
        }
        // SAFETY: inside our readable attachment; a volatile read of a byte
        // no Rust object aliases.
        unsafe { std::ptr::read_volatile((self.addr + page * PAGE) as *const u8) };
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // SAFETY: detaches the attachment this value made; nothing refers to it after.
        unsafe { libc::shmdt(self.addr as *const libc::c_void) };
        let _ = self.shmid;
    }
}

/// Attaches segment `shmid` (`size` bytes) read-write and leaves its first
/// `len` bytes at exactly `to`, failing rather than replacing a mapping
/// there. The rest of the attachment is unmapped. The mapping stays (it is
/// the caller's staging memory) and counts in the segment's `shm_nattch`.
pub fn attach_at(shmid: i32, size: u64, to: u64, len: u64) -> Result<(), ShmError> {
    let place_err = |source| ShmError::Place {
        shmid,
        to,
        len,
        source,
    };
    let full = attach_len(size);
    if len > full || !len.is_multiple_of(PAGE) {
        return Err(place_err(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    // A reservation proves `to` free (MAP_FIXED_NOREPLACE); the move replaces only it.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let reserved = unsafe {
        libc::mmap(
            to as *mut libc::c_void,
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(place_err(io::Error::last_os_error()));
    }
    if reserved as u64 != to {
        // SAFETY: unmaps only what this call just mapped.
        unsafe { libc::munmap(reserved, len as usize) };
        return Err(place_err(io::Error::from_raw_os_error(libc::EEXIST)));
    }
    let release = |addr: u64, n: u64| {
        // SAFETY: unmaps only ranges this function mapped.
        unsafe { libc::munmap(addr as *mut libc::c_void, n as usize) };
    };
    // SAFETY: a null address lets the kernel pick a free range.
    let p = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
    if p as isize == -1 {
        let e = io::Error::last_os_error();
        release(to, len);
        return Err(ShmError::Attach { shmid, source: e });
    }
    let at = p as u64;
    // SAFETY: moves the head of our own attachment over our own reservation.
    let moved = unsafe {
        libc::mremap(
            p,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        release(at, full);
        release(to, len);
        return Err(place_err(e));
    }
    if full > len {
        release(at + len, full - len);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A segment removed at the end of the test, whatever happens.
    struct Seg(i32);
    impl Drop for Seg {
        fn drop(&mut self) {
            let _ = remove(self.0);
        }
    }

    #[test]
    fn create_stat_attach_place_remove() {
        let size = 3 * PAGE + 100;
        let seg = Seg(create(0, size, 0o640).expect("shmget"));
        let st = stat(seg.0).expect("stat");
        assert_eq!(
            (st.key, st.size, st.mode & 0o777, st.nattch),
            (0, size, 0o640, 0)
        );
        set_owner(seg.0, 12, 34, 0o604).expect("IPC_SET");
        let st = stat(seg.0).expect("stat");
        assert_eq!((st.uid, st.gid, st.mode & 0o777), (12, 34, 0o604));

        let a = Attachment::new(seg.0, size, false).expect("attach");
        assert_eq!(a.len(), 4 * PAGE);
        assert_eq!(stat(seg.0).expect("stat").nattch, 1);
        // SAFETY: our read-write attachment, page 2.
        unsafe { std::ptr::write_volatile((a.addr() + 2 * PAGE) as *mut u8, 0x5a) };
        assert_eq!(
            a.resident().expect("mincore"),
            vec![false, false, true, false]
        );

        // Placed at a fixed address: the same pages, counted as an attachment.
        let hole = crate::sys::testing::map_anon(8 * PAGE as usize, false) as u64;
        // SAFETY: our own test mapping, unmapped so attach_at can take it.
        unsafe { libc::munmap(hole as *mut libc::c_void, 8 * PAGE as usize) };
        attach_at(seg.0, size, hole, 3 * PAGE).expect("attach_at");
        // SAFETY: the placed attachment is readable at `hole`.
        let byte = unsafe { std::ptr::read_volatile((hole + 2 * PAGE) as *const u8) };
        assert_eq!(byte, 0x5a);
        assert_eq!(stat(seg.0).expect("stat").nattch, 2);
        // A second placement at the same address is refused, not replacing it.
        assert!(attach_at(seg.0, size, hole, PAGE).is_err());
        drop(a);
        assert_eq!(stat(seg.0).expect("stat").nattch, 1);
        // SAFETY: unmaps the placed attachment of this test.
        unsafe { libc::munmap(hole as *mut libc::c_void, 3 * PAGE as usize) };
        assert_eq!(stat(seg.0).expect("stat").nattch, 0);
    }

    #[test]
    fn next_id_chooses_the_id() {
        let _lock = NEXT_ID_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // In an IPC namespace of its own (this thread's only, gone with it):
        // any other process making a segment of the host's namespace between
        // the knob and the shmget would take the chosen id.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC).expect("unshare IPC");
            next_id_chooses_the_id_here();
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    }

    fn next_id_chooses_the_id_here() {
        let first = Seg(create(0, PAGE, 0o600).expect("shmget"));
        let want = first.0 + 3; // same sequence number, a later index
                                // Used only where /proc/sys is read-only.
        let scratch_dir = tempfile::tempdir().expect("tempdir");
        let scratch = scratch_dir.path().join("proc");
        set_next_id(want, &scratch).expect("shm_next_id");
        let got = Seg(create(0, PAGE, 0o600).expect("shmget"));
        assert_eq!(got.0, want);
        // A chosen id left pending is consumed, so the next segment is the kernel's pick.
        set_next_id(want + 1, &scratch).expect("shm_next_id");
        clear_next_id().expect("clear");
        let next = Seg(create(0, PAGE, 0o600).expect("shmget"));
        assert_ne!(next.0, want + 1);
        drop(first);
    }

    /// munmap for tests (e.g. part of an attachment).
    pub fn unmap(addr: u64, len: u64) {
        // SAFETY: test code unmapping a range it mapped and no longer uses.
        assert_eq!(
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) },
            0
        );
    }

    /// shm_next_id is one knob per namespace: tests that set it take turns.
    pub static NEXT_ID_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
}
