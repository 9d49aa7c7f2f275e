//! `plan.bin`: the restore plan computed when the image is written (format
//! 1.6), so that a restore does not plan again. Planning walks every
//! stored page; reading and checking a stored plan walks its runs.
//!
//! The file is one zstd frame. Decompressed, little-endian u64 fields:
//!
//! ```text
//!   magic "CSPLAN01"
//!   binding (16 bytes)   xxh3-128 of what the plan was made from: the page
//!                        size and the manifest entries (name, checksum) of
//!                        tree.json and every proc-<pid>.json / .runs
//!   staging start, end   stats: inherited, private, copied, moves, segments
//!   segment count, then per segment:
//!     holder, before_fork (0/1), backing (tag, fields), staging, len,
//!     populate (count, then offset, pages, first per fill)
//!   process count, then per process:
//!     pid, parent (u64::MAX: none), children, creates (count, ids),
//!     pre_fork_writes, writes (fills), zero_writes, zaps (count, then
//!     staging, len), moves (count, then segment, offset, target, len)
//!   backing tags: 0 anon, 1 anon grows-down, 2 private file (path:
//!     length + bytes, dev, inode, offset), 3 shared anon, 4 memfd (name),
//!     5 SysV shm (shmid)
//! ```
//!
//! A plan is data of the image, trusted as its pages are (whoever can
//! write one can write the other); what [`decode`] checks is that it
//! belongs to this image and cannot make the restore act outside it:
//!
//! - the binding matches the image's files (an image edited after it was
//!   written is refused rather than restored with a stale plan);
//! - processes are the tree's, with its parents and children;
//! - every index (segment, process, page id) is in range, every segment is
//!   created once by its holder, and every address range lies in the
//!   staging area, which no target VMA overlaps; moves land inside the
//!   process's own VMAs and stay inside their segment;
//! - a file, memfd or SysV backing is one the image's VMAs name.
//!
//! `cowsnap verify` also plans again and compares.

use std::collections::HashSet;

use xxhash_rust::xxh3::Xxh3;

use super::plan::{
    Move, PageFill, PlanStats, ProcessPlan, RestorePlan, Segment, SegmentBacking, Zap,
};
use crate::image::types::{FileEntry, VmaKind, TREE_FILE};
use crate::image::Image;

/// First 8 bytes of a decompressed plan file.
pub const PLAN_MAGIC: &[u8; 8] = b"CSPLAN01";
/// Most bytes a plan file may decompress to (the frame declares its size).
const MAX_PLAN_BYTES: u64 = 1 << 31;
const NONE: u64 = u64::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoredPlanError {
    #[error("plan.bin was made for other files than this image's (binding {stored:032x}, image {image:032x}): the image was changed after it was written")]
    Binding { stored: u128, image: u128 },
    #[error("plan.bin: {0}")]
    Bad(String),
    #[error("plan.bin differs from the plan of this image: {0}")]
    Differs(String),
    /// The tree the plan is for is one the planner refuses.
    #[error(transparent)]
    Tree(#[from] super::plan::PlanError),
}

fn bad(why: impl Into<String>) -> StoredPlanError {
    StoredPlanError::Bad(why.into())
}

/// What a plan is bound to: the page size and the checksums of the files
/// the planner reads, whatever their order in the manifest.
pub fn binding(files: &[FileEntry], page_size: u64) -> u128 {
    let mut inputs: Vec<&FileEntry> = files
        .iter()
        .filter(|f| f.name == TREE_FILE || f.name.starts_with("proc-"))
        .collect();
    inputs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Xxh3::new();
    h.update(&page_size.to_le_bytes());
    for f in inputs {
        for part in [f.name.as_bytes(), f.xxh3_128.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    h.digest128()
}

struct Out(Vec<u8>);

impl Out {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn ids(&mut self, ids: &[usize]) {
        self.u64(ids.len() as u64);
        for &i in ids {
            self.u64(i as u64);
        }
    }
    fn fills(&mut self, fills: &[PageFill]) {
        self.u64(fills.len() as u64);
        for f in fills {
            self.u64(f.offset);
            self.u64(f.pages);
            self.u64(f.first);
        }
    }
    fn zaps(&mut self, zaps: &[Zap]) {
        self.u64(zaps.len() as u64);
        for z in zaps {
            self.u64(z.staging);
            self.u64(z.len);
        }
    }
}

/// `plan` as the contents of `plan.bin`, bound to `binding`.
pub fn encode(plan: &RestorePlan, binding: u128) -> std::io::Result<Vec<u8>> {
    let mut o = Out(Vec::new());
    o.0.extend_from_slice(PLAN_MAGIC);
    o.0.extend_from_slice(&binding.to_le_bytes());
    o.u64(plan.staging.0);
    o.u64(plan.staging.1);
    let s = &plan.stats;
    for v in [
        s.pages_inherited,
        s.pages_private,
        s.pages_copied,
        s.moves,
        s.segments,
    ] {
        o.u64(v);
    }
    o.u64(plan.segments.len() as u64);
    for seg in &plan.segments {
        o.u64(seg.holder as u64);
        o.u64(u64::from(seg.before_fork));
        match &seg.backing {
            SegmentBacking::Anon => o.u64(0),
            SegmentBacking::AnonGrowsDown => o.u64(1),
            SegmentBacking::PrivateFile { path, file, offset } => {
                o.u64(2);
                o.bytes(path.as_bytes());
                o.u64(file.0);
                o.u64(file.1);
                o.u64(*offset);
            }
            SegmentBacking::SharedAnon => o.u64(3),
            SegmentBacking::Memfd { name } => {
                o.u64(4);
                o.bytes(name.as_bytes());
            }
            SegmentBacking::SysvShm { shmid } => {
                o.u64(5);
                o.u64(*shmid as u32 as u64);
            }
        }
        o.u64(seg.staging);
        o.u64(seg.len);
        o.fills(&seg.populate);
    }
    o.u64(plan.processes.len() as u64);
    for p in &plan.processes {
        o.u64(p.pid as u32 as u64);
        o.u64(p.parent.map_or(NONE, |i| i as u64));
        o.ids(&p.children);
        o.ids(&p.creates);
        o.fills(&p.pre_fork_writes);
        o.fills(&p.writes);
        o.zaps(&p.zero_writes);
        o.zaps(&p.zaps);
        o.u64(p.moves.len() as u64);
        for m in &p.moves {
            o.u64(m.segment as u64);
            o.u64(m.offset);
            o.u64(m.target);
            o.u64(m.len);
        }
    }
    zstd::bulk::compress(&o.0, 3)
}

struct In<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn u64(&mut self, what: &str) -> Result<u64, StoredPlanError> {
        let end = self.at + 8;
        let b = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| bad(format!("ends inside {what} at byte {}", self.at)))?;
        self.at = end;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// A count of items of at least `item` bytes each: never more than the
    /// bytes left could hold, so a forged count allocates nothing.
    fn count(&mut self, what: &str, item: usize) -> Result<usize, StoredPlanError> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n > left / item as u64 {
            return Err(bad(format!(
                "{what}: {n} items do not fit in the {left} bytes left"
            )));
        }
        Ok(n as usize)
    }
    fn index(&mut self, what: &str, below: usize) -> Result<usize, StoredPlanError> {
        let v = self.u64(what)?;
        if v >= below as u64 {
            return Err(bad(format!("{what} {v} is out of range (< {below})")));
        }
        Ok(v as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, StoredPlanError> {
        let n = self.count(what, 1)?;
        let b = &self.bytes[self.at..self.at + n];
        self.at += n;
        String::from_utf8(b.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
    }
    fn ids(&mut self, what: &str, below: usize) -> Result<Vec<usize>, StoredPlanError> {
        let n = self.count(what, 8)?;
        (0..n).map(|_| self.index(what, below)).collect()
    }
    fn fills(&mut self, what: &str) -> Result<Vec<PageFill>, StoredPlanError> {
        let n = self.count(what, 24)?;
        (0..n)
            .map(|_| {
                Ok(PageFill {
                    offset: self.u64(what)?,
                    pages: self.u64(what)?,
                    first: self.u64(what)?,
                })
            })
            .collect()
    }
    fn zaps(&mut self, what: &str) -> Result<Vec<Zap>, StoredPlanError> {
        let n = self.count(what, 16)?;
        (0..n)
            .map(|_| {
                Ok(Zap {
                    staging: self.u64(what)?,
                    len: self.u64(what)?,
                })
            })
            .collect()
    }
}

/// The plan stored in `bytes` (the contents of `plan.bin`) for `image`,
/// checked as the module doc says.
pub fn decode(bytes: &[u8], image: &Image) -> Result<RestorePlan, StoredPlanError> {
    let raw = decompress(bytes)?;
    let mut r = In { bytes: &raw, at: 0 };
    if raw.get(..8) != Some(&PLAN_MAGIC[..]) {
        return Err(bad("bad magic"));
    }
    let stored = raw
        .get(8..24)
        .map(|b| u128::from_le_bytes(b.try_into().expect("16 bytes")))
        .ok_or_else(|| bad("ends inside its header"))?;
    let expected = binding(&image.manifest.files, image.page_size());
    if stored != expected {
        return Err(StoredPlanError::Binding {
            stored,
            image: expected,
        });
    }
    r.at = 24;
    let staging = (r.u64("staging")?, r.u64("staging")?);
    let stats = PlanStats {
        pages_inherited: r.u64("stats")?,
        pages_private: r.u64("stats")?,
        pages_copied: r.u64("stats")?,
        moves: r.u64("stats")?,
        segments: r.u64("stats")?,
    };
    let nproc = image.processes.len();
    let nseg = r.count("segments", 7 * 8)?;
    let mut segments = Vec::with_capacity(nseg);
    for _ in 0..nseg {
        let holder = r.index("segment holder", nproc)?;
        let before_fork = match r.u64("before_fork")? {
            0 => false,
            1 => true,
            v => return Err(bad(format!("before_fork is {v}"))),
        };
        let backing = match r.u64("backing")? {
            0 => SegmentBacking::Anon,
            1 => SegmentBacking::AnonGrowsDown,
            2 => SegmentBacking::PrivateFile {
                path: r.string("path")?,
                file: (r.u64("dev")?, r.u64("inode")?),
                offset: r.u64("offset")?,
            },
            3 => SegmentBacking::SharedAnon,
            4 => SegmentBacking::Memfd {
                name: r.string("memfd name")?,
            },
            5 => SegmentBacking::SysvShm {
                shmid: r.u64("shmid")? as u32 as i32,
            },
            v => return Err(bad(format!("unknown backing {v}"))),
        };
        segments.push(Segment {
            holder,
            before_fork,
            backing,
            staging: r.u64("segment staging")?,
            len: r.u64("segment len")?,
            populate: r.fills("populate")?,
        });
    }
    let n = r.count("processes", 9 * 8)?;
    if n != nproc {
        return Err(bad(format!("{n} processes, the image has {nproc}")));
    }
    let mut processes = Vec::with_capacity(n);
    for k in 0..n {
        let pid = r.u64("pid")? as u32 as i32;
        let parent = match r.u64("parent")? {
            NONE => None,
            v if v < k as u64 => Some(v as usize),
            v => return Err(bad(format!("pid {pid}: parent {v} is not before it"))),
        };
        processes.push(ProcessPlan {
            pid,
            parent,
            children: r.ids("children", nproc)?,
            creates: r.ids("creates", nseg)?,
            pre_fork_writes: r.fills("pre_fork_writes")?,
            writes: r.fills("writes")?,
            zero_writes: r.zaps("zero_writes")?,
            zaps: r.zaps("zaps")?,
            moves: {
                let m = r.count("moves", 32)?;
                (0..m)
                    .map(|_| {
                        Ok(Move {
                            segment: r.index("move segment", nseg)?,
                            offset: r.u64("move")?,
                            target: r.u64("move")?,
                            len: r.u64("move")?,
                        })
                    })
                    .collect::<Result<_, StoredPlanError>>()?
            },
        });
    }
    if r.at != raw.len() {
        return Err(bad(format!(
            "{} bytes after the last process",
            raw.len() - r.at
        )));
    }
    let plan = RestorePlan {
        processes,
        segments,
        staging,
        stats,
    };
    check(&plan, image)?;
    Ok(plan)
}

/// The frame decompressed, with or without its declared size, never past
/// [`MAX_PLAN_BYTES`].
fn decompress(bytes: &[u8]) -> Result<Vec<u8>, StoredPlanError> {
    use std::io::Read;
    let decoder = zstd::stream::Decoder::new(bytes).map_err(|e| bad(format!("zstd: {e}")))?;
    let mut raw = Vec::new();
    decoder
        .take(MAX_PLAN_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| bad(format!("zstd: {e}")))?;
    if raw.len() as u64 > MAX_PLAN_BYTES {
        return Err(bad(format!(
            "decompresses to more than {MAX_PLAN_BYTES} bytes"
        )));
    }
    Ok(raw)
}

/// Whether [start, start+len) is a page-aligned range inside [lo, hi).
fn inside(start: u64, len: u64, lo: u64, hi: u64, page: u64) -> bool {
    start.is_multiple_of(page)
        && len.is_multiple_of(page)
        && start >= lo
        && start.checked_add(len).is_some_and(|end| end <= hi)
}

/// Whether [start, start+len) lies inside one of `ranges` (sorted, disjoint).
fn within(ranges: &[(u64, u64)], start: u64, len: u64, page: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= start);
    ranges
        .get(i)
        .is_some_and(|&(lo, hi)| inside(start, len, lo, hi, page))
}

/// Whether [start, start+len) is covered by `vmas` (sorted), adjacent ones
/// included: one move may carry several VMAs of one region.
fn covered(vmas: &[crate::image::types::Vma], start: u64, len: u64, page: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    if !start.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
        return false;
    }
    let mut at = start;
    let mut i = vmas.partition_point(|v| v.end <= start);
    while at < end {
        match vmas.get(i) {
            Some(v) if v.start <= at && at < v.end => at = v.end,
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The structural checks of the module doc, on a decoded plan.
fn check(plan: &RestorePlan, image: &Image) -> Result<(), StoredPlanError> {
    let page = image.page_size();
    let pages = image.index.page_count;
    let (lo, hi) = plan.staging;
    if lo % page != 0 || hi % page != 0 || lo >= hi {
        return Err(bad(format!("staging area {lo:#x}-{hi:#x}")));
    }
    let tree = &image.tree.processes;
    let parents = super::plan::tree_parents(tree, &image.processes)?;
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tree.len()];
    for (k, parent) in parents.iter().enumerate() {
        if let Some(parent) = *parent {
            children[parent].push(k);
        }
    }
    let page_ids_ok = |f: &PageFill| f.first.checked_add(f.pages).is_some_and(|e| e <= pages);
    let fill_len = |f: &PageFill| f.pages.saturating_mul(page);

    let mut files: HashSet<(&str, (u64, u64))> = HashSet::new();
    let mut memfds: HashSet<String> = HashSet::new();
    let mut shmids: HashSet<i32> = HashSet::new();
    for process in &image.processes {
        for v in &process.vmas {
            if v.start < hi && lo < v.end {
                return Err(bad(format!(
                    "staging area {lo:#x}-{hi:#x} overlaps pid {} VMA {:#x}-{:#x}",
                    process.pid, v.start, v.end
                )));
            }
            match (v.kind, &v.path) {
                (VmaKind::PrivateFile, Some(path)) => {
                    files.insert((path.as_str(), (v.dev, v.inode)));
                }
                (VmaKind::Memfd, Some(path)) => {
                    memfds.insert(path.strip_prefix("/memfd:").unwrap_or(path).to_string());
                }
                (VmaKind::SysvShm, _) => {
                    shmids.insert(v.inode as i32);
                }
                _ => {}
            }
        }
    }
    for (s, seg) in plan.segments.iter().enumerate() {
        let populated = seg
            .populate
            .iter()
            .all(|f| page_ids_ok(f) && inside(f.offset, fill_len(f), 0, seg.len, page));
        if !inside(seg.staging, seg.len, lo, hi, page) || !populated {
            return Err(bad(format!(
                "segment {s} ({:#x}, {:#x} bytes) or its pages lie outside the staging area",
                seg.staging, seg.len
            )));
        }
        let named = match &seg.backing {
            SegmentBacking::PrivateFile { path, file, .. } => {
                files.contains(&(path.as_str(), *file))
            }
            SegmentBacking::Memfd { name } => memfds.contains(name),
            SegmentBacking::SysvShm { shmid } => shmids.contains(shmid),
            _ => true,
        };
        if !named {
            return Err(bad(format!(
                "segment {s}: backing {:?} is named by no VMA of the image",
                seg.backing
            )));
        }
    }

    // Segments a process sees: those its ancestors created before forking
    // down to it, and its own.
    let mut created = vec![false; plan.segments.len()];
    let mut passed_on: Vec<Vec<usize>> = vec![Vec::new(); plan.processes.len()];
    for (k, p) in plan.processes.iter().enumerate() {
        let who = || format!("pid {}", tree[k].pid);
        let parent = parents[k];
        if p.pid != tree[k].pid || p.parent != parent || p.children != children[k] {
            return Err(bad(format!(
                "{}: its process entry is not the tree's (pid {}, parent {:?}, children {:?})",
                who(),
                p.pid,
                p.parent,
                p.children
            )));
        }
        let mut visible: Vec<usize> = parent.map(|q| passed_on[q].clone()).unwrap_or_default();
        let mut passes = visible.clone();
        for &s in &p.creates {
            if plan.segments[s].holder != k || std::mem::replace(&mut created[s], true) {
                return Err(bad(format!(
                    "{}: creates segment {s} it does not hold",
                    who()
                )));
            }
            visible.push(s);
            if plan.segments[s].before_fork {
                passes.push(s);
            }
        }
        passed_on[k] = passes;
        visible.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = visible
            .iter()
            .map(|&s| {
                (
                    plan.segments[s].staging,
                    plan.segments[s].staging + plan.segments[s].len,
                )
            })
            .collect();
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(bad(format!("{}: segments it sees overlap", who())));
        }
        let fills = p.pre_fork_writes.iter().chain(&p.writes);
        if !fills
            .clone()
            .all(|f| page_ids_ok(f) && within(&ranges, f.offset, fill_len(f), page))
        {
            return Err(bad(format!(
                "{}: a write outside its segments or the stored pages",
                who()
            )));
        }
        if !p
            .zero_writes
            .iter()
            .chain(&p.zaps)
            .all(|z| within(&ranges, z.staging, z.len, page))
        {
            return Err(bad(format!("{}: a zap outside its segments", who())));
        }
        for m in &p.moves {
            let seg = &plan.segments[m.segment];
            if visible.binary_search(&m.segment).is_err()
                || !inside(m.offset, m.len, 0, seg.len, page)
                || !covered(&image.processes[k].vmas, m.target, m.len, page)
            {
                return Err(bad(format!(
                    "{}: a move of {:#x} bytes to {:#x} outside segment {} it sees, or its VMAs",
                    who(),
                    m.len,
                    m.target,
                    m.segment
                )));
            }
        }
    }
    if let Some(s) = created.iter().position(|c| !c) {
        return Err(bad(format!("segment {s} is created by no process")));
    }
    Ok(())
}

/// Plans `image` again and compares with `stored` (`cowsnap verify`).
pub fn compare(stored: &RestorePlan, image: &Image) -> Result<(), StoredPlanError> {
    let fresh = super::plan::plan(&image.tree.processes, &image.processes)
        .map_err(|e| StoredPlanError::Differs(format!("planning the image fails: {e}")))?;
    if fresh.segments.len() != stored.segments.len() {
        return Err(StoredPlanError::Differs(format!(
            "{} segments stored, {} planned",
            stored.segments.len(),
            fresh.segments.len()
        )));
    }
    if let Some(s) = (0..fresh.segments.len()).find(|&s| fresh.segments[s] != stored.segments[s]) {
        return Err(StoredPlanError::Differs(format!("segment {s}")));
    }
    if let Some(p) = (0..fresh.processes.len()).find(|&p| fresh.processes[p] != stored.processes[p])
    {
        return Err(StoredPlanError::Differs(format!(
            "pid {}",
            fresh.processes[p].pid
        )));
    }
    if fresh != *stored {
        return Err(StoredPlanError::Differs("staging area or figures".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil;

    fn fixture() -> (tempfile::TempDir, Image, RestorePlan) {
        let tmp = tempfile::tempdir().unwrap();
        let image = Image::open(&testutil::build(tmp.path())).unwrap();
        let plan = super::super::plan::plan(&image.tree.processes, &image.processes).unwrap();
        assert!(!plan.segments.is_empty() && plan.processes.len() == 2);
        (tmp, image, plan)
    }

    fn bound(image: &Image) -> u128 {
        binding(&image.manifest.files, image.page_size())
    }

    /// `edit` applied to the fixture's plan, encoded with the right binding.
    fn refused(edit: impl FnOnce(&mut RestorePlan, &Image)) -> String {
        let (_tmp, image, mut plan) = fixture();
        edit(&mut plan, &image);
        let bytes = encode(&plan, bound(&image)).unwrap();
        decode(&bytes, &image).unwrap_err().to_string()
    }

    #[test]
    fn a_plan_round_trips_and_compares_equal() {
        let (_tmp, image, plan) = fixture();
        let bytes = encode(&plan, bound(&image)).unwrap();
        let decoded = decode(&bytes, &image).unwrap();
        assert_eq!(decoded, plan);
        compare(&decoded, &image).unwrap();
    }

    #[test]
    fn the_binding_covers_tree_and_process_files_in_any_order() {
        let (_tmp, image, _) = fixture();
        let mut files = image.manifest.files.clone();
        let b = binding(&files, 4096);
        files.reverse();
        assert_eq!(binding(&files, 4096), b, "order does not matter");
        assert_ne!(binding(&files, 8192), b, "page size counts");
        let pipes = files.iter_mut().find(|f| f.name == "pipes.json").unwrap();
        pipes.xxh3_128 = "0".repeat(32);
        assert_eq!(binding(&files, 4096), b, "pipes.json is not planned from");
        let process = files
            .iter_mut()
            .find(|f| f.name.starts_with("proc-") && f.name.ends_with(".runs"))
            .unwrap();
        process.xxh3_128 = "0".repeat(32);
        assert_ne!(binding(&files, 4096), b, "a runs file is");
    }

    #[test]
    fn a_plan_of_other_files_is_refused() {
        let (_tmp, image, plan) = fixture();
        let bytes = encode(&plan, bound(&image) ^ 1).unwrap();
        let e = decode(&bytes, &image).unwrap_err();
        assert!(matches!(e, StoredPlanError::Binding { .. }), "{e}");
        assert!(
            e.to_string().contains("changed after it was written"),
            "{e}"
        );
    }

    #[test]
    fn damaged_bytes_are_refused() {
        let (_tmp, image, plan) = fixture();
        let raw = zstd::bulk::decompress(&encode(&plan, bound(&image)).unwrap(), 1 << 20).unwrap();
        let pack = |raw: &[u8]| zstd::bulk::compress(raw, 1).unwrap();
        let mut magic = raw.clone();
        magic[0] = b'X';
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not zstd".to_vec(), "zstd"),
            (pack(&magic), "bad magic"),
            (pack(&raw[..raw.len() - 3]), "items do not fit"),
            (pack(&raw[..20]), "ends inside its header"),
            (
                pack(&[&raw[..], &[0u8; 8]].concat()),
                "8 bytes after the last process",
            ),
        ];
        for (bytes, want) in cases {
            let e = decode(&bytes, &image).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?}, got {e}");
        }
        // A count no remaining bytes could hold allocates nothing.
        let mut count = raw.clone();
        count[80..88].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = decode(&pack(&count), &image).unwrap_err().to_string();
        assert!(
            e.contains("segments: 18446744073709551615 items do not fit"),
            "{e}"
        );
    }

    #[test]
    fn indices_out_of_range_are_refused() {
        let e = refused(|p, _| p.segments[0].holder = 7);
        assert!(e.contains("segment holder 7 is out of range"), "{e}");
        let e = refused(|p, _| {
            let last = p.segments.len();
            p.processes[1].moves.push(Move {
                segment: last,
                offset: 0,
                target: 0x30000,
                len: 0x1000,
            })
        });
        assert!(e.contains("move segment"), "{e}");
        let e = refused(|p, image| {
            p.processes[1].writes.push(PageFill {
                offset: p.segments[0].staging,
                pages: 1,
                first: image.index.page_count,
            })
        });
        assert!(
            e.contains("pid 101: a write outside its segments or the stored pages"),
            "{e}"
        );
    }

    #[test]
    fn a_plan_reaching_outside_its_staging_or_vmas_is_refused() {
        let e = refused(|p, _| p.staging = (0x10000, 0x20000));
        assert!(e.contains("overlaps pid 100 VMA 0x10000-0x14000"), "{e}");
        let e = refused(|p, _| {
            let (_, hi) = p.staging;
            p.processes[0].zaps.push(Zap {
                staging: hi - 0x1000,
                len: 0x1000,
            })
        });
        assert!(e.contains("pid 100: a zap outside its segments"), "{e}");
        let e = refused(|p, _| {
            let m = p.processes[0].moves[0];
            p.processes[0].moves[0] = Move {
                target: 0x7000_0000,
                ..m
            };
        });
        assert!(e.contains("pid 100: a move of"), "{e}");
        let e = refused(|p, _| p.segments[0].len += 0x1000 * (1 << 40));
        assert!(e.contains("segment 0"), "{e}");
    }

    #[test]
    fn a_plan_not_of_this_tree_is_refused() {
        let e = refused(|p, _| p.processes[1].parent = None);
        assert!(
            e.contains("pid 101: its process entry is not the tree's"),
            "{e}"
        );
        let e = refused(|p, _| p.processes[0].pid = 5);
        assert!(e.contains("pid 100: its process entry"), "{e}");
        let e = refused(|p, _| {
            let s = p.processes[0].creates[0];
            p.processes[1].creates.push(s);
        });
        assert!(
            e.contains("pid 101: creates segment 0 it does not hold"),
            "{e}"
        );
        let e = refused(|p, _| {
            let orphan = p.segments[0].clone();
            p.segments.push(orphan);
        });
        assert!(e.contains("is created by no process"), "{e}");
        let e = refused(|p, _| {
            p.segments[0].backing = SegmentBacking::PrivateFile {
                path: "/etc/shadow".into(),
                file: (1, 2),
                offset: 0,
            }
        });
        assert!(e.contains("is named by no VMA of the image"), "{e}");
    }

    #[test]
    fn a_plan_for_a_tree_the_planner_refuses_is_refused() {
        // A child whose parent is not in the image, and a plan that agrees.
        let (_tmp, mut image, mut plan) = fixture();
        plan.processes[1].parent = None;
        plan.processes[0].children.clear();
        let bytes = encode(&plan, bound(&image)).unwrap();
        image.tree.processes[1].ppid = 999;
        let e = decode(&bytes, &image).unwrap_err();
        assert!(
            matches!(
                e,
                StoredPlanError::Tree(super::super::plan::PlanError::MissingParent {
                    pid: 101,
                    ppid: 999
                })
            ),
            "{e}"
        );
    }

    #[test]
    fn compare_finds_a_plan_that_differs() {
        let (_tmp, image, mut plan) = fixture();
        plan.stats.pages_copied += 1;
        let e = compare(&plan, &image).unwrap_err().to_string();
        assert!(e.contains("differs from the plan of this image"), "{e}");
        let (_tmp, image, mut plan) = fixture();
        plan.processes[1].writes.clear();
        let e = compare(&plan, &image).unwrap_err().to_string();
        assert!(e.contains("pid 101"), "{e}");
    }
}
