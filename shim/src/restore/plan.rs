//! The restore plan: how a process tree rebuilds the copy-on-write sharing
//! of its private memory. Pure computation over an image; no syscalls.
//!
//! Private anonymous memory can only be shared by `fork`, so a page used by
//! several processes must be held by their lowest common ancestor (LCA) in
//! the restore tree before it forks them. Everything is built in a
//! *staging area* (addresses used by no target layout), and each process
//! finally `mremap`s staging ranges into place: moving page-table entries
//! keeps the sharing, whatever the target address.
//!
//! ```text
//!   holder L (LCA of the page's users)         user X (descendant of L)
//!   ---------------------------------          -------------------------------
//!   create segment S at staging address s      inherits S at s (fork)
//!   populate S with the shared pages           forks its own children first,
//!   fork children                              then writes its private pages and
//!   write own private pages                    zaps pages it must not see, in its
//!                                              copy of S (copy-on-write)
//!   blob: mremap s+o -> target                 blob: mremap s+o -> target
//! ```
//!
//! A *segment* is keyed by (holder, template process, template VMA): the
//! template fixes where in the segment a page lives, so a region every user
//! maps at the same address (or moved as a whole) becomes one piece moved in
//! one `mremap`, and the restored VMA layout matches the original.
//! Modifications always happen after a process has forked its children, so
//! children see exactly what the holder populated.

use std::collections::HashMap;

use crate::image::types::{PageId, PageRun, ProcessEntry, ProcessImage, Vma, VmaKind};

/// Index of a process in [`RestorePlan::processes`] (the tree's pre-order).
pub type ProcIdx = usize;
/// Index of a segment in [`RestorePlan::segments`].
pub type SegmentId = usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "tree.json: pid {pid} has parent {ppid}, which is not in the image and is not the root"
    )]
    MissingParent { pid: i32, ppid: i32 },
    #[error("tree.json: no root process (every process names a parent in the image)")]
    NoRoot,
    #[error("tree.json: more than one root process: pids {0:?}")]
    SeveralRoots(Vec<i32>),
    #[error("tree.json: process {pid} listed before its parent {ppid}")]
    ParentAfterChild { pid: i32, ppid: i32 },
    #[error(
        "proc-{pid}.json: processes and tree disagree (tree has pid {tree_pid} at this position)"
    )]
    ProcessOrder { pid: i32, tree_pid: i32 },
    #[error("no staging hole of {bytes} bytes free in every target layout")]
    NoStagingSpace { bytes: u64 },
    #[error("not supported: pid {pid} VMA {start:#x}-{end:#x} of kind {kind:?}: {why}")]
    NotSupported {
        pid: i32,
        start: u64,
        end: u64,
        kind: VmaKind,
        why: &'static str,
    },
}

/// What backs a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentBacking {
    /// MAP_PRIVATE | MAP_ANONYMOUS.
    Anon,
    /// MAP_PRIVATE of a file at `offset`; unpopulated pages read the file.
    PrivateFile { path: String, offset: u64 },
    /// MAP_SHARED | MAP_ANONYMOUS: one shmem object for all its mappers.
    SharedAnon,
    /// A memfd named `name` (as `memfd_create` takes it), mapped MAP_SHARED.
    Memfd { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The process that creates and populates it.
    pub holder: ProcIdx,
    /// Created before the holder forks (it holds pages for descendants), or after.
    pub before_fork: bool,
    pub backing: SegmentBacking,
    /// Staging address, the same in every process that inherits it.
    pub staging: u64,
    pub len: u64,
    /// Pages the holder writes before forking: (page offset in segment, page id), runs.
    pub populate: Vec<PageFill>,
}

/// `pages` consecutive pages written at byte offset `offset` of a segment
/// (or, in [`ProcessPlan::writes`], at a staging address) from consecutive page ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFill {
    pub offset: u64,
    pub pages: u64,
    pub first: PageId,
}

/// A range moved by the blob from staging to its target address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub segment: SegmentId,
    /// Byte offset in the segment.
    pub offset: u64,
    pub target: u64,
    pub len: u64,
}

impl Move {
    pub fn source(&self, plan: &RestorePlan) -> u64 {
        plan.segments[self.segment].staging + self.offset
    }
}

/// Whole-page zeroing of a staging range (MADV_DONTNEED: anonymous pages
/// become zero-fill, private file pages read the file again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zap {
    pub staging: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    pub pid: i32,
    pub parent: Option<ProcIdx>,
    pub children: Vec<ProcIdx>,
    /// Segments this process creates (see [`Segment::before_fork`]).
    pub creates: Vec<SegmentId>,
    /// After forking children: private pages written at staging addresses.
    pub writes: Vec<PageFill>,
    /// After forking children: all-zero pages written at staging addresses
    /// (anonymous pages that must exist in a private file mapping).
    pub zero_writes: Vec<Zap>,
    /// After forking children: ranges zapped back to their backing.
    pub zaps: Vec<Zap>,
    /// In the blob, in this order.
    pub moves: Vec<Move>,
    /// Target VMAs (every kind), for protections, flags and non-staged mappings.
    pub vmas: Vec<Vma>,
}

/// Figures a reader (or `inspect`) wants about a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Page references satisfied by inheriting a page (sharing rebuilt).
    pub pages_inherited: u64,
    /// Page references written by their only user.
    pub pages_private: u64,
    /// Page references that had to be copied, losing sharing the original had.
    pub pages_copied: u64,
    pub moves: u64,
    pub segments: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// Parents before children, the same order as the image's tree.
    pub processes: Vec<ProcessPlan>,
    pub segments: Vec<Segment>,
    /// Staging area [start, end) used by every segment.
    pub staging: (u64, u64),
    pub stats: PlanStats,
}

const PAGE: u64 = 4096;
/// Lowest address considered for staging, and the gap kept between segments.
const STAGING_FLOOR: u64 = 0x1000_0000_0000;
const STAGING_GAP: u64 = 16 * PAGE;
const USER_TOP: u64 = 0x7fff_ffff_f000;

/// Whether VMAs of this kind are rebuilt from staging segments by fork sharing.
fn is_private_memory(kind: VmaKind) -> bool {
    matches!(
        kind,
        VmaKind::PrivateAnon | VmaKind::Heap | VmaKind::Stack | VmaKind::PrivateFile
    )
}

/// Content a process wants at one page of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Page(PageId),
    Zero,
    Absent,
}

fn page_wants(vma: &Vma) -> impl Iterator<Item = (u64, Want)> + '_ {
    vma.pages.iter().flat_map(|run| {
        let (start, pages) = (run.start(), run.pages());
        (0..pages).map(move |i| {
            let addr = start + i * PAGE;
            let want = match *run {
                PageRun::Stored { first, .. } => Want::Page(first + i),
                PageRun::Zero { .. } => Want::Zero,
                PageRun::Absent { .. } => Want::Absent,
            };
            (addr, want)
        })
    })
}

/// The restore tree: parents, depths, LCA queries.
struct Forest {
    parent: Vec<Option<ProcIdx>>,
    depth: Vec<usize>,
}

impl Forest {
    fn lca(&self, mut a: ProcIdx, mut b: ProcIdx) -> ProcIdx {
        while self.depth[a] > self.depth[b] {
            a = self.parent[a].unwrap_or(a);
        }
        while self.depth[b] > self.depth[a] {
            b = self.parent[b].unwrap_or(b);
        }
        while a != b {
            match (self.parent[a], self.parent[b]) {
                (Some(pa), Some(pb)) => {
                    a = pa;
                    b = pb;
                }
                // Unreachable with a single root; stop at the roots.
                _ => break,
            }
        }
        a
    }
}

/// Where a shared page lives: its segment and byte offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    segment: SegmentId,
    offset: u64,
}

/// Marks "no page" in [`Populated`].
const NO_PAGE: PageId = PageId::MAX;

/// References to stored pages from private memory, grouped by page id:
/// `entries[start[id]..start[id + 1]]` are (process, VMA index, address) in
/// tree order. Built by counting sort: page ids are dense.
struct References {
    start: Vec<usize>,
    entries: Vec<(ProcIdx, usize, u64)>,
}

impl References {
    fn collect(processes: &[ProcessImage]) -> References {
        let each = || {
            processes.iter().enumerate().flat_map(|(p, image)| {
                image
                    .vmas
                    .iter()
                    .enumerate()
                    .filter(|(_, vma)| is_private_memory(vma.kind))
                    .flat_map(move |(v, vma)| {
                        page_wants(vma).filter_map(move |(addr, want)| match want {
                            Want::Page(id) => Some((id, (p, v, addr))),
                            _ => None,
                        })
                    })
            })
        };
        let mut count: Vec<usize> = Vec::new();
        for (id, _) in each() {
            let id = id as usize;
            if id >= count.len() {
                count.resize(id + 1, 0);
            }
            count[id] += 1;
        }
        let mut start = Vec::with_capacity(count.len() + 1);
        let mut total = 0;
        for c in &count {
            start.push(total);
            total += c;
        }
        start.push(total);
        let mut next = start.clone();
        let mut entries = vec![(0, 0, 0); total];
        for (id, entry) in each() {
            entries[next[id as usize]] = entry;
            next[id as usize] += 1;
        }
        References { start, entries }
    }

    fn page_count(&self) -> PageId {
        (self.start.len() - 1) as PageId
    }

    fn of(&self, id: PageId) -> &[(ProcIdx, usize, u64)] {
        &self.entries[self.start[id as usize]..self.start[id as usize + 1]]
    }
}

/// The slot of every shared page, indexed by page id.
struct Slots {
    of: Vec<Option<Slot>>,
}

impl Slots {
    fn new(page_count: PageId) -> Slots {
        Slots {
            of: vec![None; page_count as usize],
        }
    }
    fn insert(&mut self, id: PageId, slot: Slot) {
        self.of[id as usize] = Some(slot);
    }
    fn get(&self, id: PageId) -> Option<Slot> {
        self.of.get(id as usize).copied().flatten()
    }
}

/// Which page each before-fork segment holds at each page offset.
#[derive(Default)]
struct Populated {
    by_segment: Vec<Vec<PageId>>,
}

impl Populated {
    fn insert(&mut self, slot: Slot, id: PageId, segments: &[Segment]) {
        if self.by_segment.len() < segments.len() {
            self.by_segment.resize(segments.len(), Vec::new());
        }
        let held = &mut self.by_segment[slot.segment];
        if held.is_empty() {
            *held = vec![NO_PAGE; (segments[slot.segment].len / PAGE) as usize];
        }
        held[(slot.offset / PAGE) as usize] = id;
    }
    fn get(&self, slot: Slot) -> Option<PageId> {
        let id = *self
            .by_segment
            .get(slot.segment)?
            .get((slot.offset / PAGE) as usize)?;
        (id != NO_PAGE).then_some(id)
    }
}

/// Staging pages one process already moves: a bitmap per segment.
#[derive(Default, Clone)]
struct Taken {
    bits: Vec<Vec<u64>>,
}

impl Taken {
    fn contains(&self, slot: Slot) -> bool {
        let k = (slot.offset / PAGE) as usize;
        self.bits
            .get(slot.segment)
            .and_then(|b| b.get(k / 64))
            .is_some_and(|w| w & (1 << (k % 64)) != 0)
    }
    fn insert(&mut self, slot: Slot, segments: &[Segment]) {
        if self.bits.len() <= slot.segment {
            self.bits.resize(slot.segment + 1, Vec::new());
        }
        let bits = &mut self.bits[slot.segment];
        if bits.is_empty() {
            *bits = vec![0; (segments[slot.segment].len / PAGE).div_ceil(64) as usize];
        }
        let k = (slot.offset / PAGE) as usize;
        bits[k / 64] |= 1 << (k % 64);
    }
}

/// Builds the plan. `processes[i]` must describe `tree[i]`.
pub fn plan(tree: &[ProcessEntry], processes: &[ProcessImage]) -> Result<RestorePlan, PlanError> {
    let forest = build_forest(tree, processes)?;
    let mut segments: Vec<Segment> = Vec::new();
    let mut stats = PlanStats::default();

    // 1. Every reference to a stored page from private memory, grouped by
    //    page id (ids are dense: a counting sort, in tree order per page).
    let refs = References::collect(processes);

    // 2. Shared pages. Holder = LCA of the users. Slot: the holder's own
    //    segment at the holder's own address when it uses the page; else the
    //    holder's segment at the first user's address when the holder has a
    //    compatible VMA there and that slot is free (the holder then writes its
    //    own private page over it after forking); else a segment templated on
    //    the first user's VMA. One segment per (holder, template process, VMA).
    let mut segment_of: HashMap<(ProcIdx, ProcIdx, usize), SegmentId> = HashMap::new();
    let mut slot_of = Slots::new(refs.page_count());
    let mut populated = Populated::default();
    let mut deferred: Vec<(PageId, ProcIdx, (ProcIdx, usize, u64))> = Vec::new();
    let mut segment_for =
        |segments: &mut Vec<Segment>, holder: ProcIdx, tp: ProcIdx, tv: usize| -> SegmentId {
            *segment_of.entry((holder, tp, tv)).or_insert_with(|| {
                let vma = &processes[tp].vmas[tv];
                segments.push(Segment {
                    holder,
                    before_fork: true,
                    backing: backing_of(vma),
                    staging: 0,
                    len: vma.len(),
                    populate: Vec::new(),
                });
                segments.len() - 1
            })
        };
    for id in 0..refs.page_count() {
        let group = refs.of(id);
        let Some(&(first_proc, _, _)) = group.first() else {
            continue;
        };
        if group.iter().all(|r| r.0 == first_proc) {
            continue; // one user: written by that user after its forks
        }
        let holder = group
            .iter()
            .skip(1)
            .fold(first_proc, |l, r| forest.lca(l, r.0));
        match group.iter().find(|r| r.0 == holder) {
            Some(&(hp, hv, haddr)) => {
                let segment = segment_for(&mut segments, holder, hp, hv);
                let slot = Slot {
                    segment,
                    offset: haddr - processes[hp].vmas[hv].start,
                };
                slot_of.insert(id, slot);
                populated.insert(slot, id, &segments);
            }
            None => deferred.push((id, holder, group[0])),
        }
    }
    for (id, holder, (up, uv, uaddr)) in deferred {
        let user_vma = &processes[up].vmas[uv];
        let in_holder = processes[holder].vmas.iter().position(|v| {
            v.start <= uaddr
                && uaddr < v.end
                && is_private_memory(v.kind)
                && same_backing_at(v, user_vma, uaddr)
        });
        let slot = in_holder
            .map(|hv| {
                let segment = segment_for(&mut segments, holder, holder, hv);
                Slot {
                    segment,
                    offset: uaddr - processes[holder].vmas[hv].start,
                }
            })
            .filter(|slot| populated.get(*slot).is_none())
            .unwrap_or_else(|| {
                let segment = segment_for(&mut segments, holder, up, uv);
                Slot {
                    segment,
                    offset: uaddr - user_vma.start,
                }
            });
        slot_of.insert(id, slot);
        populated.insert(slot, id, &segments);
    }
    for (segment, held) in populated.by_segment.iter().enumerate() {
        let pairs = held
            .iter()
            .enumerate()
            .filter(|(_, &id)| id != NO_PAGE)
            .map(|(k, &id)| (k as u64 * PAGE, id));
        segments[segment].populate = fill_runs(pairs);
    }

    // 3. Per process: pieces for every private VMA.
    let mut plans: Vec<ProcessPlan> = tree
        .iter()
        .enumerate()
        .map(|(p, entry)| ProcessPlan {
            pid: entry.pid,
            parent: forest.parent[p],
            children: Vec::new(),
            creates: Vec::new(),
            writes: Vec::new(),
            zero_writes: Vec::new(),
            zaps: Vec::new(),
            moves: Vec::new(),
            vmas: processes[p].vmas.clone(),
        })
        .collect();
    for p in 0..plans.len() {
        if let Some(parent) = forest.parent[p] {
            plans[parent].children.push(p);
        }
    }
    for (s, segment) in segments.iter().enumerate() {
        plans[segment.holder].creates.push(s);
    }

    let mut taken: Vec<Taken> = vec![Taken::default(); processes.len()];
    plan_shared_objects(
        processes,
        &forest,
        &mut segments,
        &mut plans,
        &mut taken,
        &mut stats,
    )?;
    for (p, image) in processes.iter().enumerate() {
        for vma in &image.vmas {
            if !is_private_memory(vma.kind) {
                continue;
            }
            plan_vma(
                p,
                vma,
                &slot_of,
                &populated,
                &mut segments,
                &mut plans[p],
                &mut taken[p],
                &mut stats,
            );
        }
    }

    let staging = assign_staging(&mut segments, processes)?;
    // Fills and zaps were recorded relative to segments; now that staging
    // addresses are known, make the process-side ones absolute.
    for plan in &mut plans {
        for op in plan.writes.iter_mut() {
            op.offset = absolute(&segments, op.offset);
        }
        for op in plan.zero_writes.iter_mut().chain(plan.zaps.iter_mut()) {
            op.staging = absolute(&segments, op.staging);
        }
        merge_fills(&mut plan.writes);
        merge_zaps(&mut plan.zero_writes);
        merge_zaps(&mut plan.zaps);
    }
    stats.segments = segments.len() as u64;
    stats.moves = plans.iter().map(|p| p.moves.len() as u64).sum();
    Ok(RestorePlan {
        processes: plans,
        segments,
        staging,
        stats,
    })
}

/// Shared memory objects (MAP_SHARED anonymous memory, memfds): sharing
/// needs no fork here, every mapper of the object sees the same pages. One
/// segment per object (kind, dev, inode), created and populated at object
/// offsets by the LCA of its mappers before it forks them; each mapper moves
/// its window of the object into place.
fn plan_shared_objects(
    processes: &[ProcessImage],
    forest: &Forest,
    segments: &mut Vec<Segment>,
    plans: &mut [ProcessPlan],
    taken: &mut [Taken],
    stats: &mut PlanStats,
) -> Result<(), PlanError> {
    // (kind, dev, inode) of each object, and its mappers (process, VMA index).
    type Object = ((VmaKind, u64, u64), Vec<(ProcIdx, usize)>);
    let mut objects: Vec<Object> = Vec::new();
    for (p, image) in processes.iter().enumerate() {
        for (v, vma) in image.vmas.iter().enumerate() {
            if !matches!(vma.kind, VmaKind::SharedAnon | VmaKind::Memfd) {
                continue;
            }
            let key = (vma.kind, vma.dev, vma.inode);
            match objects.iter_mut().find(|(k, _)| *k == key) {
                Some((_, mappers)) => mappers.push((p, v)),
                None => objects.push((key, vec![(p, v)])),
            }
        }
    }
    for ((kind, _, _), mappers) in objects {
        let holder = mappers
            .iter()
            .skip(1)
            .fold(mappers[0].0, |l, &(p, _)| forest.lca(l, p));
        let len = mappers
            .iter()
            .map(|&(p, v)| processes[p].vmas[v].offset + processes[p].vmas[v].len())
            .max()
            .unwrap_or(0);
        let first = &processes[mappers[0].0].vmas[mappers[0].1];
        let backing = match kind {
            VmaKind::Memfd => SegmentBacking::Memfd {
                name: memfd_name(first.path.as_deref().unwrap_or("")),
            },
            _ => SegmentBacking::SharedAnon,
        };
        let mut pages: std::collections::BTreeMap<u64, PageId> = Default::default();
        for &(p, v) in &mappers {
            let vma = &processes[p].vmas[v];
            for (addr, want) in page_wants(vma) {
                if let Want::Page(id) = want {
                    pages.entry(vma.offset + (addr - vma.start)).or_insert(id);
                    stats.pages_inherited += 1;
                }
            }
        }
        segments.push(Segment {
            holder,
            before_fork: true,
            backing,
            staging: 0,
            len,
            populate: fill_runs(pages.into_iter()),
        });
        let segment = segments.len() - 1;
        plans[holder].creates.push(segment);
        for &(p, v) in &mappers {
            let vma = &processes[p].vmas[v];
            for k in 0..vma.len() / PAGE {
                let slot = Slot {
                    segment,
                    offset: vma.offset + k * PAGE,
                };
                if taken[p].contains(slot) {
                    return Err(PlanError::NotSupported {
                        pid: processes[p].pid,
                        start: vma.start,
                        end: vma.end,
                        kind: vma.kind,
                        why: "the same shared memory is mapped twice in one process",
                    });
                }
                taken[p].insert(slot, segments);
            }
            plans[p].moves.push(Move {
                segment,
                offset: vma.offset,
                target: vma.start,
                len: vma.len(),
            });
        }
    }
    Ok(())
}

/// "/memfd:NAME" as /proc/PID/maps shows it → NAME.
fn memfd_name(path: &str) -> String {
    path.strip_prefix("/memfd:").unwrap_or(path).to_string()
}

fn backing_of(vma: &Vma) -> SegmentBacking {
    match (vma.kind, &vma.path) {
        (VmaKind::PrivateFile, Some(path)) => SegmentBacking::PrivateFile {
            path: path.clone(),
            offset: vma.offset,
        },
        (VmaKind::SharedAnon, _) => SegmentBacking::SharedAnon,
        _ => SegmentBacking::Anon,
    }
}

fn build_forest(tree: &[ProcessEntry], processes: &[ProcessImage]) -> Result<Forest, PlanError> {
    let mut index: HashMap<i32, ProcIdx> = HashMap::new();
    let mut parent = Vec::with_capacity(tree.len());
    let mut depth = Vec::with_capacity(tree.len());
    let mut roots = Vec::new();
    for (i, entry) in tree.iter().enumerate() {
        let image_pid = processes.get(i).map(|p| p.pid).unwrap_or(-1);
        if image_pid != entry.pid {
            return Err(PlanError::ProcessOrder {
                pid: image_pid,
                tree_pid: entry.pid,
            });
        }
        let in_image = tree.iter().any(|e| e.pid == entry.ppid);
        match index.get(&entry.ppid) {
            Some(&pi) => {
                parent.push(Some(pi));
                depth.push(depth[pi] + 1);
            }
            None if in_image => {
                return Err(PlanError::ParentAfterChild {
                    pid: entry.pid,
                    ppid: entry.ppid,
                })
            }
            None => {
                if i != 0 {
                    return Err(PlanError::MissingParent {
                        pid: entry.pid,
                        ppid: entry.ppid,
                    });
                }
                roots.push(entry.pid);
                parent.push(None);
                depth.push(0);
            }
        }
        index.insert(entry.pid, i);
    }
    match roots.len() {
        0 => Err(PlanError::NoRoot),
        1 => Ok(Forest { parent, depth }),
        _ => Err(PlanError::SeveralRoots(roots)),
    }
}

/// Collapses sorted (offset, id) pairs into runs of consecutive offsets and ids.
fn fill_runs(pairs: impl Iterator<Item = (u64, PageId)>) -> Vec<PageFill> {
    let mut runs: Vec<PageFill> = Vec::new();
    for (offset, id) in pairs {
        if let Some(last) = runs.last_mut() {
            if last.offset + last.pages * PAGE == offset && last.first + last.pages == id {
                last.pages += 1;
                continue;
            }
        }
        runs.push(PageFill {
            offset,
            pages: 1,
            first: id,
        });
    }
    runs
}

/// Staging addresses inside ops are first encoded as (segment << 40 | offset)
/// and resolved here once segments have addresses.
const SEG_SHIFT: u32 = 40;
fn relative(segment: SegmentId, offset: u64) -> u64 {
    ((segment as u64) << SEG_SHIFT) | offset
}
fn absolute(segments: &[Segment], rel: u64) -> u64 {
    let segment = (rel >> SEG_SHIFT) as usize;
    segments[segment].staging + (rel & ((1 << SEG_SHIFT) - 1))
}

fn merge_fills(fills: &mut Vec<PageFill>) {
    fills.sort_unstable_by_key(|f| f.offset);
    let mut out: Vec<PageFill> = Vec::with_capacity(fills.len());
    for f in fills.drain(..) {
        match out.last_mut() {
            Some(last)
                if last.offset + last.pages * PAGE == f.offset
                    && last.first + last.pages == f.first =>
            {
                last.pages += f.pages
            }
            _ => out.push(f),
        }
    }
    *fills = out;
}

fn merge_zaps(zaps: &mut Vec<Zap>) {
    zaps.sort_unstable_by_key(|z| z.staging);
    let mut out: Vec<Zap> = Vec::with_capacity(zaps.len());
    for z in zaps.drain(..) {
        match out.last_mut() {
            Some(last) if last.staging + last.len == z.staging => last.len += z.len,
            _ => out.push(z),
        }
    }
    *zaps = out;
}

/// Whether `vma` (at `addr`) and `other` (at the same address) show the same
/// content for pages nobody wrote: both anonymous, or the same file at the
/// same file offset.
fn same_backing_at(vma: &Vma, other: &Vma, addr: u64) -> bool {
    match (backing_of(vma), backing_of(other)) {
        (SegmentBacking::Anon, SegmentBacking::Anon) => true,
        (
            SegmentBacking::PrivateFile {
                path: a,
                offset: oa,
            },
            SegmentBacking::PrivateFile {
                path: b,
                offset: ob,
            },
        ) => a == b && oa + (addr - vma.start) == ob + (addr - other.start),
        _ => false,
    }
}

/// Whether segment `segment` at byte `offset` shows what `vma` shows at `addr`
/// when neither was written.
fn segment_matches(segment: &Segment, offset: u64, vma: &Vma, addr: u64) -> bool {
    match (&segment.backing, backing_of(vma)) {
        (SegmentBacking::Anon, SegmentBacking::Anon) => true,
        (
            SegmentBacking::PrivateFile {
                path: a,
                offset: oa,
            },
            SegmentBacking::PrivateFile {
                path: b,
                offset: ob,
            },
        ) => *a == b && oa + offset == ob + (addr - vma.start),
        _ => false,
    }
}

/// Most base candidates tried per VMA; further shared pages become overlays.
const MAX_BASES: usize = 8;

/// Plans one private VMA of process `p`: chooses base pieces (segment +
/// constant displacement covering most shared pages), overlays for shared
/// pages that sit elsewhere, an own segment for the rest, and the writes and
/// zaps that make every page what the image says. `taken` holds the staging
/// pages (segment, offset) this process already moves.
#[allow(clippy::too_many_arguments)]
fn plan_vma(
    p: ProcIdx,
    vma: &Vma,
    slot_of: &Slots,
    populated: &Populated,
    segments: &mut Vec<Segment>,
    plan: &mut ProcessPlan,
    taken: &mut Taken,
    stats: &mut PlanStats,
) {
    let wants: Vec<(u64, Want)> = page_wants(vma).collect();
    let n = wants.len();

    // Candidate bases: (segment, displacement = target address - segment offset).
    // Few distinct candidates per VMA: a short vector beats a hash map.
    let mut votes: Vec<((SegmentId, u64), u64)> = Vec::new();
    for &(addr, want) in &wants {
        if let Want::Page(id) = want {
            if let Some(slot) = slot_of.get(id) {
                let key = (slot.segment, addr.wrapping_sub(slot.offset));
                match votes.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, n)) => *n += 1,
                    None => votes.push((key, 1)),
                }
            }
        }
    }
    let mut candidates = votes;
    candidates.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    candidates.truncate(MAX_BASES);

    let mut source: Vec<Option<Slot>> = vec![None; n];
    for &((segment, disp), _) in &candidates {
        let seg_len = segments[segment].len;
        for (i, &(addr, _)) in wants.iter().enumerate() {
            let offset = addr.wrapping_sub(disp);
            if source[i].is_some() || offset >= seg_len {
                continue;
            }
            let slot = Slot { segment, offset };
            if !taken.contains(slot) && segment_matches(&segments[segment], offset, vma, addr) {
                source[i] = Some(slot);
                taken.insert(slot, segments);
            }
        }
    }

    // Uncovered positions form own segments, created after forking.
    let mut i = 0;
    while i < n {
        if source[i].is_some() {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && source[i].is_none() {
            i += 1;
        }
        let mut backing = backing_of(vma);
        if let SegmentBacking::PrivateFile { offset, .. } = &mut backing {
            *offset += wants[start].0 - vma.start;
        }
        segments.push(Segment {
            holder: p,
            before_fork: false,
            backing,
            staging: 0,
            len: (i - start) as u64 * PAGE,
            populate: Vec::new(),
        });
        let segment = segments.len() - 1;
        plan.creates.push(segment);
        for (k, s) in source.iter_mut().enumerate().take(i).skip(start) {
            let slot = Slot {
                segment,
                offset: (k - start) as u64 * PAGE,
            };
            *s = Some(slot);
            taken.insert(slot, segments);
        }
    }

    // Every position now has a base slot. A wanted shared page that sits in
    // another free slot is moved over it (overlay); else it is written.
    let is_file = vma.kind == VmaKind::PrivateFile;
    let mut moves: Vec<Move> = Vec::new();
    let mut overlays: Vec<Move> = Vec::new();
    for (i, &(addr, want)) in wants.iter().enumerate() {
        let Some(base) = source[i] else { continue };
        let holds = populated.get(base);
        let here = relative(base.segment, base.offset);
        let base_move = Move {
            segment: base.segment,
            offset: base.offset,
            target: addr,
            len: PAGE,
        };
        match want {
            Want::Page(id) if holds == Some(id) => {
                stats.pages_inherited += 1;
                push_move(&mut moves, base_move);
            }
            Want::Page(id) => {
                match slot_of.get(id) {
                    Some(slot) if !taken.contains(slot) => {
                        taken.insert(slot, segments);
                        let overlay = Move {
                            segment: slot.segment,
                            offset: slot.offset,
                            target: addr,
                            len: PAGE,
                        };
                        push_move(&mut overlays, overlay);
                        stats.pages_inherited += 1;
                        continue; // the base page stays in staging
                    }
                    Some(_) => stats.pages_copied += 1,
                    None => stats.pages_private += 1,
                }
                plan.writes.push(PageFill {
                    offset: here,
                    pages: 1,
                    first: id,
                });
                push_move(&mut moves, base_move);
            }
            Want::Zero => {
                if is_file {
                    plan.zero_writes.push(Zap {
                        staging: here,
                        len: PAGE,
                    });
                } else if holds.is_some() {
                    plan.zaps.push(Zap {
                        staging: here,
                        len: PAGE,
                    });
                }
                push_move(&mut moves, base_move);
            }
            Want::Absent => {
                if holds.is_some() {
                    plan.zaps.push(Zap {
                        staging: here,
                        len: PAGE,
                    });
                }
                push_move(&mut moves, base_move);
            }
        }
    }
    plan.moves.extend(moves);
    plan.moves.extend(overlays);
}

fn push_move(moves: &mut Vec<Move>, m: Move) {
    if let Some(last) = moves.last_mut() {
        if last.segment == m.segment
            && last.offset + last.len == m.offset
            && last.target + last.len == m.target
        {
            last.len += m.len;
            return;
        }
    }
    moves.push(m);
}

/// Gives every segment a staging address inside a hole that no target
/// layout of any process uses.
fn assign_staging(
    segments: &mut [Segment],
    processes: &[ProcessImage],
) -> Result<(u64, u64), PlanError> {
    let total: u64 = segments.iter().map(|s| s.len + STAGING_GAP).sum::<u64>() + STAGING_GAP;
    let mut used: Vec<(u64, u64)> = processes
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    used.sort_unstable();
    let mut candidate = STAGING_FLOOR;
    for &(start, end) in &used {
        if end <= candidate {
            continue;
        }
        if start >= candidate + total {
            break;
        }
        candidate = end.next_multiple_of(PAGE << 9);
    }
    if candidate + total > USER_TOP {
        return Err(PlanError::NoStagingSpace { bytes: total });
    }
    let mut cursor = candidate + STAGING_GAP;
    for segment in segments.iter_mut() {
        segment.staging = cursor;
        cursor += segment.len + STAGING_GAP;
    }
    Ok((candidate, cursor))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
