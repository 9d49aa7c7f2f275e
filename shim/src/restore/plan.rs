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
//!
//! Zombies take no part: they have no memory (the reader refuses one that
//! has), so they reference no page, hold nothing and get an empty plan; they
//! are leaves, forked by their parent like any child.

use std::collections::{BTreeMap, HashMap};

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
        "tree.json: process {pid} has zombie {zombie} as its parent (a zombie has no children)"
    )]
    ZombieParent { pid: i32, zombie: i32 },
    #[error(
        "proc-{pid}.json: processes and tree disagree (tree has pid {tree_pid} at this position)"
    )]
    ProcessOrder { pid: i32, tree_pid: i32 },
    #[error("no staging hole of {bytes} bytes free in every target layout")]
    NoStagingSpace { bytes: u64 },
    #[error("proc-{pid}.json: VMA {start:#x}-{end:#x} has {pages} pages, more than the {max} a restore plans page by page")]
    VmaTooLarge {
        pid: i32,
        start: u64,
        end: u64,
        pages: u64,
        max: u64,
    },
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
    /// MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN, for VMAs that had
    /// VM_GROWSDOWN (the main stack): `mremap` keeps the flags of the VMA
    /// it moves from, and the kernel never adds VM_GROWSDOWN to an existing
    /// VMA, so the staging mapping must have it for the target to grow on
    /// demand. Staging never touches the guard gap below it (fills and zaps
    /// stay inside the segment), so it never grows there.
    AnonGrowsDown,
    /// MAP_PRIVATE of a file at `offset`; unpopulated pages read the file.
    /// `file`: its (dev, inode) at dump, which names a saved file.
    PrivateFile {
        path: String,
        file: (u64, u64),
        offset: u64,
    },
    /// MAP_SHARED | MAP_ANONYMOUS: one shmem object for all its mappers.
    SharedAnon,
    /// A memfd named `name` (as `memfd_create` takes it), mapped MAP_SHARED.
    Memfd { name: String },
    /// An attachment of SysV shm segment `shmid` (created beforehand by the
    /// root, see `restore::sysv`); the segment's first `len` bytes.
    SysvShm { shmid: i32 },
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
    /// Before forking, after creating its segments: pages this process
    /// writes at staging addresses of segments it inherited, for its subtree.
    pub pre_fork_writes: Vec<PageFill>,
    /// After forking children: private pages written at staging addresses.
    pub writes: Vec<PageFill>,
    /// After forking children: all-zero pages written at staging addresses
    /// (anonymous pages that must exist in a private file mapping).
    pub zero_writes: Vec<Zap>,
    /// After forking children: ranges zapped back to their backing.
    pub zaps: Vec<Zap>,
    /// In the blob, in this order. (The target VMAs themselves, for
    /// protections, flags and mappings not staged, are the image's.)
    pub moves: Vec<Move>,
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
/// Pages of one VMA the plan handles (256 GiB): it walks a VMA page by
/// page, absent pages too, holding some 50 bytes per page, so an image
/// must not be able to make it loop or allocate without bound.
pub const MAX_VMA_PAGES: u64 = 1 << 26;

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

fn page_wants(vma: &Vma) -> Vec<(u64, Want)> {
    let mut wants = Vec::with_capacity((vma.len() / PAGE) as usize);
    for run in &vma.pages {
        let (start, pages) = (run.start(), run.pages());
        match *run {
            PageRun::Stored { first, .. } => {
                wants.extend((0..pages).map(|i| (start + i * PAGE, Want::Page(first + i))))
            }
            PageRun::Zero { .. } => {
                wants.extend((0..pages).map(|i| (start + i * PAGE, Want::Zero)))
            }
            PageRun::Absent { .. } | PageRun::Mapped { .. } => {
                wants.extend((0..pages).map(|i| (start + i * PAGE, Want::Absent)))
            }
        }
    }
    wants
}

/// The restore tree: parents, depths, LCA queries.
struct Forest {
    parent: Vec<Option<ProcIdx>>,
    depth: Vec<usize>,
    /// Euler-tour entry and exit times: `a` is an ancestor-or-self of `b`
    /// iff `enter[a] <= enter[b] && exit[b] <= exit[a]`.
    enter: Vec<usize>,
    exit: Vec<usize>,
}

impl Forest {
    fn new(parent: Vec<Option<ProcIdx>>, depth: Vec<usize>) -> Forest {
        let n = parent.len();
        let mut children: Vec<Vec<ProcIdx>> = vec![Vec::new(); n];
        for (p, parent) in parent.iter().enumerate() {
            if let Some(q) = parent {
                children[*q].push(p);
            }
        }
        let (mut enter, mut exit) = (vec![0; n], vec![0; n]);
        let mut clock = 0;
        let mut stack: Vec<(ProcIdx, usize)> = (0..n)
            .filter(|&p| parent[p].is_none())
            .map(|p| (p, 0))
            .collect();
        while let Some((p, next)) = stack.pop() {
            if next == 0 {
                enter[p] = clock;
                clock += 1;
            }
            if let Some(&child) = children[p].get(next) {
                stack.push((p, next + 1));
                stack.push((child, 0));
            } else {
                exit[p] = clock;
                clock += 1;
            }
        }
        Forest {
            parent,
            depth,
            enter,
            exit,
        }
    }

    /// Whether `a` is `b` or one of its ancestors.
    fn is_ancestor(&self, a: ProcIdx, b: ProcIdx) -> bool {
        self.enter[a] <= self.enter[b] && self.exit[b] <= self.exit[a]
    }

    /// `p` and its ancestors, the root first.
    fn lineage(&self, mut p: ProcIdx) -> Vec<ProcIdx> {
        let mut line = vec![p];
        while let Some(q) = self.parent[p] {
            line.push(q);
            p = q;
        }
        line.reverse();
        line
    }

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
        // Stored runs of private memory: (process, VMA index, run). Plain
        // loops over runs, not an iterator chain per page: this walks every
        // reference of the tree twice.
        let each_run = |f: &mut dyn FnMut(ProcIdx, usize, u64, PageId, u64)| {
            for (p, image) in processes.iter().enumerate() {
                for (v, vma) in image.vmas.iter().enumerate() {
                    if !is_private_memory(vma.kind) {
                        continue;
                    }
                    for run in &vma.pages {
                        if let PageRun::Stored {
                            start,
                            pages,
                            first,
                        } = *run
                        {
                            f(p, v, start, first, pages);
                        }
                    }
                }
            }
        };
        // Counts per id by a difference array: O(runs + ids).
        let mut diff: Vec<i64> = Vec::new();
        each_run(&mut |_, _, _, first, pages| {
            let end = (first + pages) as usize;
            if end >= diff.len() {
                diff.resize(end + 1, 0);
            }
            diff[first as usize] += 1;
            diff[end] -= 1;
        });
        let ids = diff.len().saturating_sub(1);
        let mut start = Vec::with_capacity(ids + 1);
        let (mut total, mut running) = (0usize, 0i64);
        for d in diff.iter().take(ids) {
            running += d;
            start.push(total);
            total += running as usize;
        }
        start.push(total);
        let mut next = start.clone();
        let mut entries = vec![(0, 0, 0); total];
        each_run(&mut |p, v, addr, first, pages| {
            for i in 0..pages {
                let id = (first + i) as usize;
                entries[next[id]] = (p, v, addr + i * PAGE);
                next[id] += 1;
            }
        });
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

/// What the before-fork segments hold, slot by slot: each write is
/// (writer, page). The creator of a segment writes first; a descendant may
/// write another page at the same slot before it forks, which its own
/// subtree then sees instead (copy-on-write keeps everyone else's view).
#[derive(Default)]
struct Populated {
    /// The first write of every slot, dense per segment (NO_PAGE: none).
    first: Vec<Vec<(ProcIdx, PageId)>>,
    /// Further writes of a slot (deep chains rewrite the same slot).
    more: HashMap<Slot, Vec<(ProcIdx, PageId)>>,
}

impl Populated {
    fn writes(&self, slot: Slot) -> impl Iterator<Item = (ProcIdx, PageId)> + '_ {
        let first = self
            .first
            .get(slot.segment)
            .and_then(|v| v.get((slot.offset / PAGE) as usize))
            .copied()
            .filter(|&(_, id)| id != NO_PAGE);
        let more = if self.more.is_empty() {
            None
        } else {
            self.more.get(&slot)
        };
        first.into_iter().chain(more.into_iter().flatten().copied())
    }

    fn insert(&mut self, slot: Slot, writer: ProcIdx, id: PageId, segments: &[Segment]) {
        if self.first.len() < segments.len() {
            self.first.resize(segments.len(), Vec::new());
        }
        let held = &mut self.first[slot.segment];
        if held.is_empty() {
            *held = vec![(0, NO_PAGE); (segments[slot.segment].len / PAGE) as usize];
        }
        let entry = &mut held[(slot.offset / PAGE) as usize];
        if entry.1 == NO_PAGE {
            *entry = (writer, id);
        } else {
            self.more.entry(slot).or_default().push((writer, id));
        }
    }

    /// The page process `p` sees at `slot` before writing anything itself
    /// after forking: the write of its nearest ancestor-or-self.
    fn visible(&self, slot: Slot, p: ProcIdx, forest: &Forest) -> Option<PageId> {
        self.writes(slot)
            .filter(|&(w, _)| forest.is_ancestor(w, p))
            .max_by_key(|&(w, _)| forest.depth[w])
            .map(|(_, id)| id)
    }

    /// Whether `writer` may put page `id` at `slot` without hiding a page
    /// from one of its users, or having its own page hidden from one.
    fn can_write(
        &self,
        slot: Slot,
        writer: ProcIdx,
        id: PageId,
        refs: &References,
        forest: &Forest,
    ) -> bool {
        let users_below = |page: PageId, top: ProcIdx| {
            refs.of(page)
                .iter()
                .any(|&(u, _, _)| forest.is_ancestor(top, u))
        };
        self.writes(slot).all(|(w, other)| {
            if w == writer {
                false
            } else if forest.is_ancestor(w, writer) {
                !users_below(other, writer)
            } else if forest.is_ancestor(writer, w) {
                !users_below(id, w)
            } else {
                true
            }
        })
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

/// The before-fork segments each process creates, indexed by the address
/// range of their template VMA, so that finding those that hold an address
/// costs a lookup per template process, not a scan of every segment (a
/// process of 20,000 VMAs has as many segments).
struct Created {
    /// Per creator, per template process: template start -> (template end,
    /// segment), in creation order. The VMAs of one process do not overlap,
    /// so at most one start range holds an address.
    by_creator: Vec<HashMap<ProcIdx, ByStart>>,
}

/// Template start -> (template end, segment) of one creator and template
/// process.
type ByStart = BTreeMap<u64, Vec<(u64, SegmentId)>>;

impl Created {
    fn new(processes: usize) -> Created {
        Created {
            by_creator: vec![HashMap::new(); processes],
        }
    }

    fn insert(
        &mut self,
        creator: ProcIdx,
        template_process: ProcIdx,
        template: &Vma,
        s: SegmentId,
    ) {
        self.by_creator[creator]
            .entry(template_process)
            .or_default()
            .entry(template.start)
            .or_default()
            .push((template.end, s));
    }

    /// The segments `creator` made whose template holds `addr`, oldest
    /// first (the order they were created in), into `out`.
    fn containing(&self, creator: ProcIdx, addr: u64, out: &mut Vec<SegmentId>) {
        out.clear();
        for by_start in self.by_creator[creator].values() {
            if let Some((_, segments)) = by_start.range(..=addr).next_back() {
                out.extend(
                    segments
                        .iter()
                        .filter(|&&(end, _)| addr < end)
                        .map(|&(_, s)| s),
                );
            }
        }
        out.sort_unstable();
    }
}

/// Builds the plan. `processes[i]` must describe `tree[i]`.
pub fn plan(tree: &[ProcessEntry], processes: &[ProcessImage]) -> Result<RestorePlan, PlanError> {
    let forest = build_forest(tree, processes)?;
    check_vma_sizes(processes)?;
    let mut segments: Vec<Segment> = Vec::new();
    let mut stats = PlanStats::default();

    // 1. Every reference to a stored page from private memory, grouped by
    //    page id (ids are dense: a counting sort, in tree order per page).
    let refs = References::collect(processes);

    // 2. Shared pages. Holder = LCA of the users; it writes the page into
    //    a staging slot before it forks. The slot is looked for in the
    //    segments the holder sees (created by it or an ancestor, the oldest
    //    first), at the holder's own address when it uses the page, else at
    //    the first user's: then one region keeps one segment through the
    //    whole tree, and every process moves it into place in one piece. A
    //    new segment (holder, template VMA) is made only when no slot fits.
    let mut created = Created::new(processes.len());
    let mut candidates: Vec<SegmentId> = Vec::new();
    let mut template_of: Vec<(ProcIdx, usize)> = Vec::new();
    let mut slot_of = Slots::new(refs.page_count());
    let mut populated = Populated::default();
    let mut pre_fork: Vec<Vec<PageFill>> = vec![Vec::new(); processes.len()];
    let lineages: Vec<Vec<ProcIdx>> = (0..processes.len()).map(|p| forest.lineage(p)).collect();
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
        let (up, uv, uaddr) = *group.iter().find(|r| r.0 == holder).unwrap_or(&group[0]);
        let user_vma = &processes[up].vmas[uv];
        let user_backing = backing_of(user_vma);
        let found = lineages[holder].iter().find_map(|&ancestor| {
            created.containing(ancestor, uaddr, &mut candidates);
            candidates.iter().find_map(|&segment| {
                let (tp, tv) = template_of[segment];
                let template = &processes[tp].vmas[tv];
                if uaddr < template.start || uaddr >= template.end {
                    return None;
                }
                let slot = Slot {
                    segment,
                    offset: uaddr - template.start,
                };
                (segment_matches(
                    &segments[segment],
                    slot.offset,
                    &user_backing,
                    user_vma.start,
                    uaddr,
                ) && populated.can_write(slot, holder, id, &refs, &forest))
                .then_some(slot)
            })
        });
        let slot = match found {
            Some(slot) => slot,
            None => {
                segments.push(Segment {
                    holder,
                    before_fork: true,
                    backing: user_backing,
                    staging: 0,
                    len: user_vma.len(),
                    populate: Vec::new(),
                });
                template_of.push((up, uv));
                created.insert(holder, up, user_vma, segments.len() - 1);
                Slot {
                    segment: segments.len() - 1,
                    offset: uaddr - user_vma.start,
                }
            }
        };
        slot_of.insert(id, slot);
        populated.insert(slot, holder, id, &segments);
        if segments[slot.segment].holder == holder {
            segments[slot.segment].populate.push(PageFill {
                offset: slot.offset,
                pages: 1,
                first: id,
            });
        } else {
            pre_fork[holder].push(PageFill {
                offset: relative(slot.segment, slot.offset),
                pages: 1,
                first: id,
            });
        }
    }
    for segment in segments.iter_mut() {
        let fills = std::mem::take(&mut segment.populate);
        segment.populate = fill_runs(fills.into_iter().map(|f| (f.offset, f.first)));
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
            pre_fork_writes: std::mem::take(&mut pre_fork[p]),
            writes: Vec::new(),
            zero_writes: Vec::new(),
            zaps: Vec::new(),
            moves: Vec::new(),
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
                &forest,
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
        for op in plan
            .writes
            .iter_mut()
            .chain(plan.pre_fork_writes.iter_mut())
        {
            op.offset = absolute(&segments, op.offset);
        }
        for op in plan.zero_writes.iter_mut().chain(plan.zaps.iter_mut()) {
            op.staging = absolute(&segments, op.staging);
        }
        merge_fills(&mut plan.writes);
        merge_fills(&mut plan.pre_fork_writes);
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

/// Shared memory objects (MAP_SHARED anonymous memory, memfds, SysV shm
/// attachments): sharing needs no fork here, every mapper of the object sees
/// the same pages. One segment per object (kind, dev, inode), created (or
/// attached) and populated at object offsets by the LCA of its mappers
/// before it forks them; each mapper moves its window of the object into
/// place. A SysV segment's pages no VMA shows are written by the root when
/// it creates the segment, not here.
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
            if !matches!(
                vma.kind,
                VmaKind::SharedAnon | VmaKind::Memfd | VmaKind::SysvShm
            ) {
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
            VmaKind::SysvShm => SegmentBacking::SysvShm {
                shmid: first.inode as i32,
            },
            _ => SegmentBacking::SharedAnon,
        };
        let mut pages: std::collections::BTreeMap<u64, PageId> = Default::default();
        // Present all-zero pages are not stored, but they were memory of the
        // object: the holder allocates them (zero writes) once it has forked.
        let mut zeros: std::collections::BTreeSet<u64> = Default::default();
        for &(p, v) in &mappers {
            let vma = &processes[p].vmas[v];
            for (addr, want) in page_wants(vma) {
                let offset = vma.offset + (addr - vma.start);
                match want {
                    Want::Page(id) => {
                        pages.entry(offset).or_insert(id);
                        stats.pages_inherited += 1;
                    }
                    Want::Zero => {
                        zeros.insert(offset);
                    }
                    Want::Absent => {}
                }
            }
        }
        zeros.retain(|offset| !pages.contains_key(offset));
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
        plans[holder]
            .zero_writes
            .extend(zeros.into_iter().map(|offset| Zap {
                staging: relative(segment, offset),
                len: PAGE,
            }));
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
            file: (vma.dev, vma.inode),
            offset: vma.offset,
        },
        (VmaKind::SharedAnon, _) => SegmentBacking::SharedAnon,
        _ if grows_down(vma) => SegmentBacking::AnonGrowsDown,
        _ => SegmentBacking::Anon,
    }
}

/// Whether the VMA had VM_GROWSDOWN (smaps VmFlags `gd`): the main stack, or
/// a MAP_GROWSDOWN mapping. Only anonymous private memory keeps it.
fn grows_down(vma: &Vma) -> bool {
    matches!(
        vma.kind,
        VmaKind::PrivateAnon | VmaKind::Heap | VmaKind::Stack
    ) && vma.vm_flags.iter().any(|f| f == "gd")
}

/// Every VMA the plan walks page by page is at most [`MAX_VMA_PAGES`] long.
fn check_vma_sizes(processes: &[ProcessImage]) -> Result<(), PlanError> {
    for image in processes {
        for vma in &image.vmas {
            let walked = is_private_memory(vma.kind)
                || matches!(
                    vma.kind,
                    VmaKind::SharedAnon | VmaKind::Memfd | VmaKind::SysvShm
                );
            let pages = vma.end.saturating_sub(vma.start) / PAGE;
            if walked && pages > MAX_VMA_PAGES {
                return Err(PlanError::VmaTooLarge {
                    pid: image.pid,
                    start: vma.start,
                    end: vma.end,
                    pages,
                    max: MAX_VMA_PAGES,
                });
            }
        }
    }
    Ok(())
}

/// Each process's parent in the restore tree (its index), after the checks
/// the planner makes of the tree: a stored plan must describe a tree the
/// planner would have accepted (`restore::plan_store`).
pub(super) fn tree_parents(
    tree: &[ProcessEntry],
    processes: &[ProcessImage],
) -> Result<Vec<Option<ProcIdx>>, PlanError> {
    Ok(build_forest(tree, processes)?.parent)
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
        if let Some(&pi) = index.get(&entry.ppid) {
            if tree[pi].zombie.is_some() {
                return Err(PlanError::ZombieParent {
                    pid: entry.pid,
                    zombie: entry.ppid,
                });
            }
        }
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
        1 => Ok(Forest::new(parent, depth)),
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

/// Whether segment `segment` at byte `offset` shows what `vma` shows at `addr`
/// when neither was written.
/// Whether `segment` at `offset` can stand for page `addr` of a VMA that
/// starts at `vma_start` and has backing `vma_backing` (its
/// [`backing_of`], computed once per VMA by the caller).
fn segment_matches(
    segment: &Segment,
    offset: u64,
    vma_backing: &SegmentBacking,
    vma_start: u64,
    addr: u64,
) -> bool {
    match (&segment.backing, vma_backing) {
        (SegmentBacking::Anon, SegmentBacking::Anon) => true,
        (SegmentBacking::AnonGrowsDown, SegmentBacking::AnonGrowsDown) => true,
        (
            SegmentBacking::PrivateFile {
                path: a,
                file: fa,
                offset: oa,
            },
            SegmentBacking::PrivateFile {
                path: b,
                file: fb,
                offset: ob,
            },
        ) => a == b && fa == fb && oa + offset == ob + (addr - vma_start),
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
    forest: &Forest,
    segments: &mut Vec<Segment>,
    plan: &mut ProcessPlan,
    taken: &mut Taken,
    stats: &mut PlanStats,
) {
    let wants = page_wants(vma);
    let vma_backing = backing_of(vma);
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
            if !taken.contains(slot)
                && segment_matches(&segments[segment], offset, &vma_backing, vma.start, addr)
            {
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
        let holds = populated.visible(base, p, forest);
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
                // A page moved in from a segment of the other growsdown
                // kind would split the VMA (and give or take away
                // VM_GROWSDOWN): such a page is written instead.
                let same_kind = |slot: Slot| {
                    (segments[slot.segment].backing == SegmentBacking::AnonGrowsDown)
                        == grows_down(vma)
                };
                match slot_of.get(id) {
                    Some(slot) if !taken.contains(slot) && same_kind(slot) => {
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
