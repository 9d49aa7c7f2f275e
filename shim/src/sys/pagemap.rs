//! /proc/PID/pagemap: one 64-bit entry per virtual page, read in large
//! chunks. Root sees PFNs; without CAP_SYS_ADMIN the PFN field reads 0,
//! which callers must treat as "no identity". Also finds the PFN of the
//! kernel zero page once, so zero-page PTEs can be recognised without
//! reading their contents.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: short read at page {vpage:#x}: got {got} of {want} bytes")]
    Short {
        path: PathBuf,
        vpage: u64,
        got: usize,
        want: usize,
    },
    #[error("mapping a probe page for the zero-page PFN: {0}")]
    Probe(std::io::Error),
}

/// One pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    const EXCLUSIVE: u64 = 1 << 56;
    const PFN_MASK: u64 = (1 << 55) - 1;

    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    pub fn swapped(self) -> bool {
        self.0 & Self::SWAPPED != 0
    }
    /// Page-cache page (file or shmem), as opposed to a private anonymous page.
    pub fn file_or_shared_anon(self) -> bool {
        self.0 & Self::FILE_OR_SHARED_ANON != 0
    }
    /// Mapped by exactly one process (PM_MMAP_EXCLUSIVE).
    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    /// PFN of a present page (0 if the reader may not see PFNs).
    pub fn pfn(self) -> Option<u64> {
        if self.present() {
            Some(self.0 & Self::PFN_MASK)
        } else {
            None
        }
    }
    /// (type, offset) of a swapped page: bits 0-4 type, 5-54 offset.
    pub fn swap_entry(self) -> Option<(u8, u64)> {
        if self.swapped() && !self.present() {
            let raw = self.0 & Self::PFN_MASK;
            Some(((raw & 0x1f) as u8, raw >> 5))
        } else {
            None
        }
    }
}

/// An open /proc/PID/pagemap.
pub struct Pagemap {
    file: File,
    path: PathBuf,
    page_size: u64,
}

impl Pagemap {
    pub fn open(pid: i32) -> Result<Pagemap, PagemapError> {
        let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let file = File::open(&path).map_err(|source| PagemapError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Pagemap {
            file,
            path,
            page_size: page_size(),
        })
    }

    /// Reads the entries of `pages` pages starting at virtual address `start`
    /// into `out` (cleared first), with as few preads as the kernel allows.
    pub fn read(
        &self,
        start: u64,
        pages: usize,
        out: &mut Vec<PagemapEntry>,
    ) -> Result<(), PagemapError> {
        out.clear();
        out.resize(pages, PagemapEntry(0));
        // SAFETY: PagemapEntry is repr(transparent)-like (a single u64 field, no
        // padding); viewing the initialised Vec storage as bytes of the same
        // length is sound and any byte pattern is a valid u64.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, pages * 8) };
        let first_vpage = start / self.page_size;
        let mut done = 0usize;
        while done < bytes.len() {
            let off = first_vpage * 8 + done as u64;
            match self.file.read_at(&mut bytes[done..], off) {
                Ok(0) => {
                    return Err(PagemapError::Short {
                        path: self.path.clone(),
                        vpage: first_vpage + (done / 8) as u64,
                        got: done,
                        want: bytes.len(),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(PagemapError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Whether frame `pfn` is one of the kernel's zero pages (the 4 KiB one or
/// a frame of the huge zero page: `KPF_ZERO_PAGE` in /proc/kpageflags).
/// `None` when /proc/kpageflags cannot be read.
pub fn is_kernel_zero_frame(kpageflags: &std::fs::File, pfn: u64) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    const KPF_ZERO_PAGE: u64 = 24;
    let mut word = [0u8; 8];
    kpageflags
        .read_exact_at(&mut word, pfn.checked_mul(8)?)
        .ok()?;
    Some(u64::from_ne_bytes(word) >> KPF_ZERO_PAGE & 1 == 1)
}

/// PFN of the kernel's shared zero page, found by read-faulting a fresh
/// private anonymous page in this process. `None` if PFNs are hidden.
pub fn zero_page_pfn() -> Result<Option<u64>, PagemapError> {
    let ps = page_size() as usize;
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ps,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(PagemapError::Probe(std::io::Error::last_os_error()));
    }
    // SAFETY: `addr` is a readable mapping of `ps` bytes made above; the
    // volatile read forces the read fault that maps the zero page.
    unsafe { std::ptr::read_volatile(addr as *const u8) };
    let result = Pagemap::open(std::process::id() as i32).and_then(|pm| {
        let mut out = Vec::new();
        pm.read(addr as u64, 1, &mut out)?;
        Ok(out[0].pfn().filter(|&pfn| pfn != 0))
    });
    // SAFETY: unmapping exactly the mapping made above, which nothing else uses.
    unsafe { libc::munmap(addr, ps) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bits() {
        let e = PagemapEntry((1 << 63) | (1 << 61) | (1 << 56) | 0x1234);
        assert!(e.present() && e.file_or_shared_anon() && e.exclusive() && !e.swapped());
        assert_eq!(e.pfn(), Some(0x1234));
        assert_eq!(e.swap_entry(), None);
        let s = PagemapEntry((1 << 62) | (77 << 5) | 3);
        assert!(!s.present() && s.swapped());
        assert_eq!(s.pfn(), None);
        assert_eq!(s.swap_entry(), Some((3, 77)));
    }

    #[test]
    fn zero_page_pfn_and_dirty_pages_in_self() {
        let zero = zero_page_pfn().expect("probe").expect("root sees PFNs");
        let ps = page_size() as usize;
        let mut buf = vec![0u8; 4 * ps];
        // Align to a page inside the buffer.
        let base = (buf.as_ptr() as usize + ps - 1) & !(ps - 1);
        let off = base - buf.as_ptr() as usize;
        buf[off] = 1;
        buf[off + ps] = 2;
        let pm = Pagemap::open(std::process::id() as i32).expect("open");
        let mut out = Vec::new();
        pm.read(base as u64, 2, &mut out).expect("read");
        assert!(out[0].present() && out[1].present());
        assert!(!out[0].file_or_shared_anon());
        let (a, b) = (out[0].pfn().expect("pfn"), out[1].pfn().expect("pfn"));
        assert_ne!(a, b);
        assert_ne!(a, zero);
        assert_ne!(a, 0);
    }
}
