//! Memory the restore runtime creates and writes: staging segments at fixed
//! addresses, and the shared control region through which restored
//! processes report to the restore command.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("mmap {addr:#x}+{len:#x}: {source}")]
    Map {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("write of {len:#x} bytes at {addr:#x} outside every staging mapping")]
    OutOfBounds { addr: u64, len: u64 },
    #[error("madvise {addr:#x}+{len:#x}: {source}")]
    Advise {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// A mapping this process created at a fixed address; writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub addr: u64,
    pub len: u64,
}

/// How a staging mapping is backed.
pub enum Backing<'a> {
    Anon,
    /// MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN (a stack's VM_GROWSDOWN
    /// survives `mremap`, it cannot be added later).
    AnonGrowsDown,
    /// MAP_PRIVATE of this fd at this offset.
    PrivateFile {
        fd: &'a std::os::fd::OwnedFd,
        offset: u64,
    },
    /// MAP_SHARED | MAP_ANONYMOUS: a new shmem object.
    SharedAnon,
    /// MAP_SHARED of this fd (e.g. a memfd) from offset 0.
    Shared {
        fd: &'a std::os::fd::OwnedFd,
    },
}

/// A new memfd named `name`, `len` bytes long.
pub fn memfd(name: &str, len: u64) -> Result<std::os::fd::OwnedFd, MemError> {
    use std::os::fd::FromRawFd;
    let map_err = |source| MemError::Map {
        addr: 0,
        len,
        source,
    };
    let cname = std::ffi::CString::new(name)
        .map_err(|_| map_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: memfd_create with a valid C string; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(map_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(len).map_err(map_err)?;
    Ok(file.into())
}

impl Mapping {
    /// Maps `len` bytes read-write at exactly `addr`, failing (EEXIST) rather
    /// than replacing anything already there.
    pub fn create(addr: u64, len: u64, backing: Backing<'_>) -> Result<Mapping, MemError> {
        use std::os::fd::AsRawFd;
        let (flags, fd, offset) = match backing {
            Backing::Anon => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
            Backing::AnonGrowsDown => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
                -1,
                0,
            ),
            Backing::PrivateFile { fd, offset } => {
                (libc::MAP_PRIVATE, fd.as_raw_fd(), offset as i64)
            }
            Backing::SharedAnon => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0),
            Backing::Shared { fd } => (libc::MAP_SHARED, fd.as_raw_fd(), 0),
        };
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so
        // no memory this process uses can be affected.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED_NOREPLACE,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map {
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        if p as u64 != addr {
            // Old kernels ignore NOREPLACE and return another address.
            // SAFETY: unmaps only what this call just mapped.
            unsafe { libc::munmap(p, len as usize) };
            return Err(MemError::Map {
                addr,
                len,
                source: io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        Ok(Mapping { addr, len })
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }
}

/// The staging mappings of this process (inherited ones included).
#[derive(Debug, Clone, Default)]
pub struct Staging {
    mappings: Vec<Mapping>,
}

impl Staging {
    pub fn add(&mut self, m: Mapping) {
        self.mappings.push(m);
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        if self.mappings.iter().any(|m| m.contains(addr, len)) {
            Ok(())
        } else {
            Err(MemError::OutOfBounds { addr, len })
        }
    }

    /// Copies `bytes` to staging address `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), MemError> {
        self.check(addr, bytes.len() as u64)?;
        // SAFETY: the range lies inside a read-write mapping this process
        // created (or inherited) for staging, which no Rust object aliases.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    /// Runs `fill` on the `len` bytes of staging memory at `addr` (e.g. to
    /// decompress straight into place). Callers running on several threads
    /// must pass disjoint ranges.
    pub fn fill_with<R>(
        &self,
        addr: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, MemError> {
        self.check(addr, len)?;
        // SAFETY: the range lies inside a read-write staging mapping that no
        // Rust object aliases; concurrent callers write disjoint ranges (the
        // restore plan gives every page one destination).
        let slice = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
        Ok(fill(slice))
    }

    /// Fills `len` bytes at `addr` with zeros (creating anonymous pages).
    pub fn zero(&self, addr: u64, len: u64) -> Result<(), MemError> {
        self.check(addr, len)?;
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
        Ok(())
    }

    /// Faults `len` bytes at `addr` in for writing in one call
    /// (MADV_POPULATE_WRITE: the page tables filled in a batch, no fault
    /// per page), before they are written. Best effort: where the kernel
    /// cannot (older than 5.14, or out of memory) the writes fault as usual.
    pub fn prefault(&self, addr: u64, len: u64) {
        if self.check(addr, len).is_ok() {
            // SAFETY: the range is a read-write staging mapping; populating
            // it changes no contents.
            unsafe {
                libc::madvise(
                    addr as *mut libc::c_void,
                    len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
    }

    /// `advice` (MADV_DONTNEED, MADV_POPULATE_WRITE) on every range of
    /// `ranges` (address, length), in as few calls as the kernel allows:
    /// `process_madvise` on this process's own pidfd takes up to 1024
    /// ranges a call (Linux 6.13+ accepts every advice for the caller; 6.16+
    /// also batches the TLB flushes of MADV_DONTNEED). Where it is refused
    /// (older kernels), one `madvise` per range.
    pub fn advise_ranges(&self, ranges: &[(u64, u64)], advice: i32) -> Result<(), MemError> {
        for &(addr, len) in ranges {
            self.check(addr, len)?;
        }
        let one_by_one = |ranges: &[(u64, u64)]| -> Result<(), MemError> {
            ranges
                .iter()
                .try_for_each(|&(addr, len)| advise(addr, len, advice))
        };
        let Ok(pidfd) = super::socket::pidfd_open(std::process::id() as i32) else {
            return one_by_one(ranges);
        };
        for batch in ranges.chunks(1024) {
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len as usize,
                })
                .collect();
            let want: u64 = batch.iter().map(|&(_, len)| len).sum();
            // SAFETY: iov lists staging ranges of this process (checked
            // above) and outlives the call.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                    iov.as_ptr(),
                    iov.len(),
                    advice,
                    0u32,
                )
            };
            if done < 0 || done as u64 != want {
                // Refused, or stopped part way: the rest one by one (both
                // advices may be given twice).
                one_by_one(batch)?;
            }
        }
        Ok(())
    }

    /// Drops pages back to their backing (MADV_DONTNEED).
    pub fn zap(&self, addr: u64, len: u64) -> Result<(), MemError> {
        self.check(addr, len)?;
        advise(addr, len, libc::MADV_DONTNEED)
    }
}

/// `madvise(addr, len, advice)` on a staging range the caller checked.
fn advise(addr: u64, len: u64, advice: i32) -> Result<(), MemError> {
    // SAFETY: the range is a staging mapping (checked by the caller);
    // dropping or populating its pages affects no Rust object.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if r != 0 {
        return Err(MemError::Advise {
            addr,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A MAP_SHARED anonymous region created before forking, so every restored
/// process and the restore command see the same bytes.
#[derive(Debug)]
pub struct SharedRegion {
    addr: u64,
    len: u64,
}

impl SharedRegion {
    pub fn new(len: u64) -> Result<SharedRegion, MemError> {
        Self::map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)
    }

    /// Maps the first `len` bytes of `fd` (a memfd another process maps
    /// too) shared: both see the same bytes, and futex words in it work
    /// across them (shared futexes are keyed by file and offset).
    pub fn from_fd(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> Result<SharedRegion, MemError> {
        use std::os::fd::AsRawFd;
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    fn map(len: u64, flags: i32, fd: i32) -> Result<SharedRegion, MemError> {
        let len = len.next_multiple_of(PAGE);
        // SAFETY: a fresh shared mapping (anonymous, or of an fd the caller
        // borrows for the call) at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map {
                addr: 0,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(SharedRegion {
            addr: p as u64,
            len,
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

    /// The u32 at byte `offset`, as an atomic.
    pub fn word(&self, offset: u64) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.len,
            "control word {offset:#x} outside region"
        );
        // SAFETY: aligned, inside the mapping, which lives as long as `self`;
        // other processes only access it atomically.
        unsafe { &*((self.addr + offset) as *const AtomicU32) }
    }

    /// Copies `bytes` into the region at `offset`.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        assert!(
            offset + bytes.len() as u64 <= self.len,
            "control bytes outside region"
        );
        // SAFETY: inside the mapping; readers only look after a state word says it is written.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.addr + offset) as *mut u8,
                bytes.len(),
            )
        };
    }

    pub fn read_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        assert!(offset + len <= self.len, "control bytes outside region");
        let mut out = vec![0u8; len as usize];
        // SAFETY: inside the mapping; plain bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset) as *const u8,
                out.as_mut_ptr(),
                len as usize,
            )
        };
        out
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made by the constructor; nothing borrows it
        // past `self` (word() and the byte accessors borrow `self`).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Adds one to a shared futex word and wakes every waiter.
pub fn futex_add_and_wake(word: &AtomicU32) {
    word.fetch_add(1, Ordering::AcqRel);
    // SAFETY: FUTEX_WAKE on a valid, shared (not FUTEX_PRIVATE) word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32,
            libc::FUTEX_WAKE,
            i32::MAX,
            0,
            0,
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advise_ranges_drops_exactly_the_ranges_given() {
        let pages = 3000u64;
        let len = pages * PAGE;
        let addr = crate::sys::testing::map_anon(len as usize, false) as u64;
        let mut staging = Staging::default();
        staging.add(Mapping { addr, len });
        staging
            .write(addr, &vec![0xab; len as usize])
            .expect("fill");
        // Every other page: more ranges than one process_madvise call takes.
        let ranges: Vec<(u64, u64)> = (0..pages)
            .step_by(2)
            .map(|p| (addr + p * PAGE, PAGE))
            .collect();
        staging
            .advise_ranges(&ranges, libc::MADV_DONTNEED)
            .expect("advise");
        // SAFETY: the staging mapping made above, read only here.
        let mem = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
        for (p, page) in mem.chunks(PAGE as usize).enumerate() {
            let want = if p % 2 == 0 { 0 } else { 0xab };
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
        let outside =
            staging.advise_ranges(&[(addr, PAGE), (addr + len, PAGE)], libc::MADV_DONTNEED);
        assert!(
            matches!(outside, Err(MemError::OutOfBounds { .. })),
            "{outside:?}"
        );
    }
}
