//! SysV shared memory of the dumped tree: which segments go into the image
//! (`Tree::sysv_shm`) and their contents.
//!
//! Which segments: every segment some process of the tree has attached (a
//! `/SYSV<key>` VMA, inode = shmid), plus unattached ones:
//! - the tree has its own IPC namespace (not the dumper's, e.g. a
//!   container): every segment of that namespace;
//! - the tree shares the dumper's namespace: the segments whose creator or
//!   last attacher (cpid/lpid) is a process of the tree; others belong to
//!   someone else.
//!
//! The list comes from `/proc/sysvipc/shm`, which always shows the *reader's*
//! IPC namespace (`/proc/<pid>/root/proc/sysvipc/shm` would not help): a
//! scoped thread enters the tree's namespace (`setns`, which only moves that
//! thread) to read it and to attach the segments it must read.
//!
//! Contents: a page run per segment page, ids shared with the VMA scan. When
//! the tree's VMAs cover every page of a segment, the runs are composed
//! from them (nothing read twice, the segment is not touched); otherwise
//! the segment is attached read-only in the dumper, only its resident pages
//! (`mincore`) are faulted in (reading a hole would allocate a page in the
//! live segment), and the scanner reads them, deduplicating by PFN against
//! the pages the VMAs already stored. Swapped-out segment pages are not
//! seen by either path (shmem keeps their swap entries off the page tables).
//!
//! Attaching changes the segment's `shm_atim`/`shm_lpid`, and nothing else.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;

use crate::image::types::{PageRun, SysvShmSegment, Vma};
use crate::sys::procfs::MapsEntry;
use crate::sys::shm::{attach_len, Attachment, ShmError};

use super::memory::{MemoryError, MemoryScanner, PageSink};

const SYSVIPC_SHM: &str = "/proc/sysvipc/shm";

#[derive(Debug, thiserror::Error)]
pub enum SysvError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/sysvipc/shm: {what} in line {line:?}")]
    Parse { line: String, what: String },
    #[error("entering the IPC namespace of pid {pid}: {source}")]
    Namespace {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("SysV shm segment {shmid}: {source}")]
    Shm {
        shmid: i32,
        #[source]
        source: ShmError,
    },
    #[error("pid {pid} has SysV shm {shmid} attached at {start:#x}, but the tree's IPC namespace has no such segment")]
    Unlisted { pid: i32, shmid: i32, start: u64 },
    #[error("SysV shm segment {shmid}: {source}")]
    Memory {
        shmid: i32,
        #[source]
        source: MemoryError,
    },
    #[error("the thread reading the tree's IPC namespace panicked")]
    ThreadPanicked,
}

/// One line of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmLine {
    pub key: i32,
    pub shmid: i32,
    /// Octal in the file; permission bits with SHM_DEST / SHM_LOCKED.
    pub perms: u32,
    pub size: u64,
    pub cpid: i32,
    pub lpid: i32,
    pub nattch: u64,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
}

/// Parses `/proc/sysvipc/shm` (columns found by their header names, so
/// columns newer kernels add, such as rss and swap, do not matter).
pub fn parse_sysvipc_shm(text: &str) -> Result<Vec<ShmLine>, SysvError> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or(SysvError::Parse {
                line: header.to_string(),
                what: format!("no column {name:?}"),
            })
    };
    let cols = [
        col("key")?,
        col("shmid")?,
        col("perms")?,
        col("size")?,
        col("cpid")?,
        col("lpid")?,
        col("nattch")?,
        col("uid")?,
        col("gid")?,
        col("cuid")?,
        col("cgid")?,
    ];
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = |what: String| SysvError::Parse {
            line: line.to_string(),
            what,
        };
        let field = |k: usize| -> Result<&str, SysvError> {
            fields
                .get(cols[k])
                .copied()
                .ok_or_else(|| bad(format!("no field {}", names[cols[k]])))
        };
        let get = |k: usize, octal: bool| -> Result<i64, SysvError> {
            let s = field(k)?;
            let v = if octal {
                i64::from_str_radix(s, 8)
            } else {
                s.parse::<i64>()
            };
            v.map_err(|_| bad(format!("bad {} {s:?}", names[cols[k]])))
        };
        let narrow = |k: usize, v: i64| bad(format!("{} {v} out of range", names[cols[k]]));
        let i32_of = |k: usize, radix8: bool| -> Result<i32, SysvError> {
            let v = get(k, radix8)?;
            i32::try_from(v).map_err(|_| narrow(k, v))
        };
        let u32_of = |k: usize| -> Result<u32, SysvError> {
            let v = get(k, false)?;
            u32::try_from(v).map_err(|_| narrow(k, v))
        };
        let u64_of = |k: usize| -> Result<u64, SysvError> {
            let s = field(k)?;
            s.parse::<u64>()
                .map_err(|_| bad(format!("bad {} {s:?}", names[cols[k]])))
        };
        out.push(ShmLine {
            key: i32_of(0, false)?,
            shmid: i32_of(1, false)?,
            perms: i32_of(2, true)? as u32,
            size: u64_of(3)?,
            cpid: i32_of(4, false)?,
            lpid: i32_of(5, false)?,
            nattch: u64_of(6)?,
            uid: u32_of(7)?,
            gid: u32_of(8)?,
            cuid: u32_of(9)?,
            cgid: u32_of(10)?,
        });
    }
    Ok(out)
}

/// Which of `lines` the image keeps: see the module doc.
pub fn select<'a>(
    lines: &'a [ShmLine],
    own_namespace: bool,
    tree_pids: &[i32],
    attached: &HashSet<i32>,
) -> Vec<&'a ShmLine> {
    lines
        .iter()
        .filter(|l| {
            own_namespace
                || attached.contains(&l.shmid)
                || tree_pids.contains(&l.cpid)
                || tree_pids.contains(&l.lpid)
        })
        .collect()
}

/// What one page of a segment is, merged over the VMAs that map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Absent,
    Zero,
    Stored(u64),
}

/// The segment's page runs composed from the VMAs mapping it, if they
/// cover every page; a page stored (or zero) in any VMA wins over absent.
fn compose(len: u64, page: u64, vmas: &[&Vma]) -> Option<Vec<PageRun>> {
    let n = (len / page) as usize;
    let mut seen: Vec<Option<Seen>> = vec![None; n];
    for vma in vmas {
        for run in &vma.pages {
            for i in 0..run.pages() {
                let offset = vma.offset + (run.start() - vma.start) + i * page;
                let Some(slot) = seen.get_mut((offset / page) as usize) else {
                    continue;
                };
                let s = match *run {
                    PageRun::Stored { first, .. } => Seen::Stored(first + i),
                    PageRun::Zero { .. } => Seen::Zero,
                    PageRun::Absent { .. } | PageRun::Mapped { .. } => Seen::Absent,
                };
                *slot = Some(slot.map_or(s, |old| old.max(s)));
            }
        }
    }
    let mut runs: Vec<PageRun> = Vec::new();
    for (k, s) in seen.into_iter().enumerate() {
        let start = k as u64 * page;
        let s = s?;
        let merged = match (runs.last_mut(), s) {
            (Some(PageRun::Absent { pages, .. }), Seen::Absent) => {
                *pages += 1;
                true
            }
            (Some(PageRun::Zero { pages, .. }), Seen::Zero) => {
                *pages += 1;
                true
            }
            (Some(PageRun::Stored { pages, first, .. }), Seen::Stored(id))
                if *first + *pages == id =>
            {
                *pages += 1;
                true
            }
            _ => false,
        };
        if !merged {
            runs.push(match s {
                Seen::Absent => PageRun::Absent { start, pages: 1 },
                Seen::Zero => PageRun::Zero { start, pages: 1 },
                Seen::Stored(first) => PageRun::Stored {
                    start,
                    pages: 1,
                    first,
                },
            });
        }
    }
    Some(runs)
}

/// What the thread in the tree's IPC namespace hands back: the chosen
/// segments, and the dumper's read-only attachments of those to read.
type InNamespace = (Vec<ShmLine>, Vec<(i32, Attachment)>);

fn ns_inode(pid: &str) -> Result<u64, SysvError> {
    let path = format!("/proc/{pid}/ns/ipc");
    std::fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|source| SysvError::Read { path, source })
}

/// The segments of the tree rooted at `root` (see the module doc).
/// `tree_pids`: every process of the tree; `attached`: (pid, VMA) of every
/// SysV shm VMA the memory scan found. Pages go to `sink` through `scanner`.
pub fn collect_segments(
    root: i32,
    tree_pids: &[i32],
    attached: &[(i32, Vma)],
    scanner: &mut MemoryScanner,
    sink: &mut dyn PageSink,
    page: u64,
) -> Result<Vec<SysvShmSegment>, SysvError> {
    let own_namespace = ns_inode(&root.to_string())? != ns_inode("self")?;
    let attached_ids: HashSet<i32> = attached.iter().map(|(_, v)| v.inode as i32).collect();
    let mut by_id: BTreeMap<i32, Vec<&Vma>> = BTreeMap::new();
    for (_, v) in attached {
        by_id.entry(v.inode as i32).or_default().push(v);
    }

    // In the tree's namespace: list, select, attach what must be read.
    let in_ns = || -> Result<InNamespace, SysvError> {
        if own_namespace {
            let path = format!("/proc/{root}/ns/ipc");
            let ns = std::fs::File::open(&path).map_err(|source| SysvError::Read {
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWIPC)
                .map_err(|source| SysvError::Namespace { pid: root, source })?;
        }
        let text = std::fs::read_to_string(SYSVIPC_SHM).map_err(|source| SysvError::Read {
            path: SYSVIPC_SHM.into(),
            source,
        })?;
        let lines = parse_sysvipc_shm(&text)?;
        let chosen: Vec<ShmLine> = select(&lines, own_namespace, tree_pids, &attached_ids)
            .into_iter()
            .copied()
            .collect();
        let mut attachments = Vec::new();
        for l in &chosen {
            let vmas = by_id.get(&l.shmid).map(Vec::as_slice).unwrap_or(&[]);
            if compose(attach_len(l.size), page, vmas).is_none() {
                let a =
                    Attachment::new(l.shmid, l.size, true).map_err(|source| SysvError::Shm {
                        shmid: l.shmid,
                        source,
                    })?;
                attachments.push((l.shmid, a));
            }
        }
        Ok((chosen, attachments))
    };
    let (chosen, mut attachments) = std::thread::scope(|s| {
        s.spawn(in_ns)
            .join()
            .unwrap_or(Err(SysvError::ThreadPanicked))
    })?;
    for (pid, v) in attached {
        if !chosen.iter().any(|l| l.shmid == v.inode as i32) {
            return Err(SysvError::Unlisted {
                pid: *pid,
                shmid: v.inode as i32,
                start: v.start,
            });
        }
    }

    let me = std::process::id() as i32;
    let mut out = Vec::with_capacity(chosen.len());
    for l in &chosen {
        let len = attach_len(l.size);
        let vmas = by_id.get(&l.shmid).map(Vec::as_slice).unwrap_or(&[]);
        let pages = match compose(len, page, vmas) {
            Some(runs) => runs,
            None => {
                let k = attachments
                    .iter()
                    .position(|(id, _)| *id == l.shmid)
                    .ok_or(SysvError::Unlisted {
                        pid: root,
                        shmid: l.shmid,
                        start: 0,
                    })?;
                let (_, a) = attachments.swap_remove(k);
                scan_attachment(l, &a, me, scanner, sink)?
            }
        };
        out.push(SysvShmSegment {
            key: l.key,
            shmid: l.shmid,
            size: l.size,
            uid: l.uid,
            gid: l.gid,
            cuid: l.cuid,
            cgid: l.cgid,
            mode: l.perms,
            cpid: l.cpid,
            lpid: l.lpid,
            nattch: l.nattch,
            pages,
        });
    }
    Ok(out)
}

/// Page runs of a segment read through the dumper's own attachment `a`.
fn scan_attachment(
    l: &ShmLine,
    a: &Attachment,
    me: i32,
    scanner: &mut MemoryScanner,
    sink: &mut dyn PageSink,
) -> Result<Vec<PageRun>, SysvError> {
    let shm_err = |source| SysvError::Shm {
        shmid: l.shmid,
        source,
    };
    for (k, resident) in a.resident().map_err(shm_err)?.into_iter().enumerate() {
        if resident {
            a.fault_in(k as u64);
        }
    }
    let entry = MapsEntry {
        start: a.addr(),
        end: a.addr() + a.len(),
        read: true,
        shared: true,
        inode: l.shmid as u64,
        path: format!("/SYSV{:08x}", l.key as u32),
        deleted: true,
        ..Default::default()
    };
    let vmas = scanner
        .scan_process(me, &[entry], sink)
        .map_err(|source| SysvError::Memory {
            shmid: l.shmid,
            source,
        })?;
    let base = a.addr();
    Ok(vmas
        .into_iter()
        .flat_map(|v| v.pages)
        .map(|r| match r {
            PageRun::Stored {
                start,
                pages,
                first,
            } => PageRun::Stored {
                start: start - base,
                pages,
                first,
            },
            PageRun::Zero { start, pages } => PageRun::Zero {
                start: start - base,
                pages,
            },
            PageRun::Absent { start, pages } | PageRun::Mapped { start, pages } => {
                PageRun::Absent {
                    start: start - base,
                    pages,
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::types::VmaKind;

    const FIXTURE: &str = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
         0      32768   600                 20580 22762 22763      3     0     0     0     0 1795301882 1795301882 1795301882                 24576                     0
  12345678         17  1644                  4096   100   101      0  1000   100     0     0          0          0 1795301882                  4096                     0
";

    #[test]
    fn parses_every_column_it_needs() {
        let lines = parse_sysvipc_shm(FIXTURE).expect("parse");
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            ShmLine {
                key: 0,
                shmid: 32768,
                perms: 0o600,
                size: 20580,
                cpid: 22762,
                lpid: 22763,
                nattch: 3,
                uid: 0,
                gid: 0,
                cuid: 0,
                cgid: 0
            }
        );
        assert_eq!(lines[1].key, 12345678);
        assert_eq!(lines[1].perms, 0o1644);
        assert_eq!((lines[1].uid, lines[1].gid), (1000, 100));
    }

    #[test]
    fn parses_old_kernels_without_rss_and_negative_keys() {
        let text = "key shmid perms size cpid lpid nattch uid gid cuid cgid atime dtime ctime\n\
                    -559038737 5 600 8192 1 2 0 0 0 0 0 0 0 0\n";
        let lines = parse_sysvipc_shm(text).expect("parse");
        assert_eq!(lines[0].key, -559038737);
        assert_eq!(lines[0].size, 8192);
    }

    #[test]
    fn refuses_malformed_lines() {
        let header = FIXTURE.lines().next().unwrap_or_default();
        for bad in [
            "0 x 600 1 1 1 1 0 0 0 0 0 0 0 0 0",
            "0 1 9 1 1 1 1 0 0 0 0 0 0 0 0 0",
            "0 1",
        ] {
            let text = format!("{header}\n{bad}\n");
            assert!(
                matches!(parse_sysvipc_shm(&text), Err(SysvError::Parse { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_sysvipc_shm("key shmid\n"),
            Err(SysvError::Parse { .. })
        ));
        assert_eq!(parse_sysvipc_shm("").expect("empty").len(), 0);
    }

    #[test]
    fn selection_by_namespace_attachment_and_pids() {
        let lines = parse_sysvipc_shm(FIXTURE).expect("parse");
        let none = HashSet::new();
        let ids = |v: Vec<&ShmLine>| v.iter().map(|l| l.shmid).collect::<Vec<_>>();
        assert_eq!(ids(select(&lines, true, &[], &none)), vec![32768, 17]);
        assert!(select(&lines, false, &[], &none).is_empty());
        assert_eq!(ids(select(&lines, false, &[101], &none)), vec![17]);
        assert_eq!(ids(select(&lines, false, &[22762], &none)), vec![32768]);
        let attached: HashSet<i32> = [17].into();
        assert_eq!(ids(select(&lines, false, &[], &attached)), vec![17]);
    }

    /// A segment whose pages 0..4 a child maps (its VMA is scanned first)
    /// and whose pages 4..8 nobody maps: the record reuses the VMA's page
    /// ids, reads only page 4 (5 is zero, 6 and 7 were never touched).
    #[test]
    fn partly_mapped_segment_is_read_through_an_attachment_without_storing_twice() {
        use crate::dump::memory::VecSink;
        use crate::sys::pagemap::{page_size, zero_page_pfn};
        use crate::sys::procfs::read_smaps;
        use crate::sys::shm;
        use crate::sys::testing::{poke, touch, TestChild};

        struct Seg(i32);
        impl Drop for Seg {
            fn drop(&mut self) {
                let _ = shm::remove(self.0);
            }
        }
        let ps = page_size();
        let seg = Seg(shm::create(0, 8 * ps, 0o600).expect("shmget"));
        let mine = Attachment::new(seg.0, 8 * ps, false).expect("attach");
        let pattern = |p: u64| vec![(p as u8 + 1) * 3; 64];
        for p in 0..5 {
            poke((mine.addr() + p * ps) as usize, &pattern(p));
        }
        poke((mine.addr() + 5 * ps) as usize, &[0u8; 64]);
        let id = seg.0;
        let child = TestChild::fork(move || {
            let a = Attachment::new(id, 8 * ps, false).expect("child attach");
            let base = a.addr();
            std::mem::forget(a); // stays attached until the child dies
            for p in 0..4 {
                touch((base + p * ps) as usize);
            }
            shm::tests::unmap(base + 4 * ps, 4 * ps);
            base as i64
        });
        let mut sink = VecSink {
            page_size: ps as usize,
            data: Vec::new(),
            reserved: 0,
        };
        let mut scanner = MemoryScanner::new(ps, zero_page_pfn().expect("zero pfn"));
        let maps: Vec<MapsEntry> = read_smaps(child.pid)
            .expect("smaps")
            .into_iter()
            .filter(|m| m.start == child.value as u64)
            .collect();
        assert_eq!(maps.len(), 1, "the child's window");
        let vmas = scanner
            .scan_process(child.pid, &maps, &mut sink)
            .expect("scan child");
        assert_eq!(vmas[0].kind, crate::image::types::VmaKind::SysvShm);
        let stored_by_vmas = scanner.stats().pages_stored;
        assert_eq!(stored_by_vmas, 4);
        let attached = vec![(child.pid, vmas[0].clone())];
        let segments = collect_segments(
            child.pid,
            &[child.pid],
            &attached,
            &mut scanner,
            &mut sink,
            ps,
        )
        .expect("collect");
        let s = segments
            .iter()
            .find(|s| s.shmid == id)
            .expect("the attached segment is recorded");
        assert_eq!((s.size, s.mode & 0o777, s.key), (8 * ps, 0o600, 0));
        assert_eq!(
            scanner.stats().pages_stored,
            6,
            "only pages 4 and 5 (allocated, all zeros) are new"
        );
        let PageRun::Stored { first, .. } = vmas[0].pages[0] else {
            panic!("child's pages: {:?}", vmas[0].pages);
        };
        assert_eq!(
            s.pages,
            vec![
                // Pages 0..4 keep the child's ids; pages 4 and 5 got the
                // next ones (5 holds zeros, but it is allocated).
                PageRun::Stored {
                    start: 0,
                    pages: 6,
                    first
                },
                PageRun::Absent {
                    start: 6 * ps,
                    pages: 2
                },
            ]
        );
        assert_eq!(first + 4, stored_by_vmas, "page 4 is the one new page");
        assert_eq!(&sink.page(first + 4)[..64], &pattern(4)[..]);
        assert_eq!(&sink.page(first)[..64], &pattern(0)[..]);
        assert_eq!(&sink.page(first + 5)[..64], &[0u8; 64][..]);
        drop(mine);
    }

    fn vma(start: u64, offset: u64, pages: Vec<PageRun>) -> Vma {
        let len: u64 = pages.iter().map(|r| r.pages()).sum::<u64>() * 4096;
        Vma {
            start,
            end: start + len,
            prot: 3,
            shared: true,
            kind: VmaKind::SysvShm,
            path: Some("/SYSV00000000".into()),
            deleted: true,
            dev: 1,
            inode: 7,
            offset,
            vm_flags: Vec::new(),
            pages,
        }
    }

    #[test]
    fn composes_segment_runs_from_covering_vmas() {
        const P: u64 = 4096;
        // Process A maps pages 0..2 (page 1 never faulted), process B pages 1..4.
        let a = vma(
            0x10000,
            0,
            vec![
                PageRun::Stored {
                    start: 0x10000,
                    pages: 1,
                    first: 10,
                },
                PageRun::Absent {
                    start: 0x11000,
                    pages: 1,
                },
            ],
        );
        let b = vma(
            0x50000,
            P,
            vec![
                PageRun::Stored {
                    start: 0x50000,
                    pages: 1,
                    first: 11,
                },
                PageRun::Zero {
                    start: 0x51000,
                    pages: 1,
                },
                PageRun::Absent {
                    start: 0x52000,
                    pages: 1,
                },
            ],
        );
        let runs = compose(4 * P, P, &[&a, &b]).expect("covered");
        assert_eq!(
            runs,
            vec![
                PageRun::Stored {
                    start: 0,
                    pages: 2,
                    first: 10
                },
                PageRun::Zero {
                    start: 2 * P,
                    pages: 1
                },
                PageRun::Absent {
                    start: 3 * P,
                    pages: 1
                },
            ]
        );
        // Page 4 of a 5-page segment is in no VMA: not composable.
        assert!(compose(5 * P, P, &[&a, &b]).is_none());
        assert!(compose(P, P, &[]).is_none());
    }
}
