//! Tests of the planner by simulation: a plan is replayed on a model of
//! fork (page tables copied, physical pages shared), copy-on-write writes,
//! MADV_DONTNEED and mremap; every process must end with exactly the
//! contents of its image, and pages that were one physical page in the
//! image must be one physical page again.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::*;
use crate::image::types::{Creds, Itimers, ProcessSignals};

/// Effective content of a virtual page.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Page(PageId),
    Zero,
    File(String, u64),
}

#[derive(Debug, Clone)]
struct VPage {
    /// Index into the physical page table; None = not populated.
    phys: Option<usize>,
    /// What an unpopulated page reads.
    backing: Content,
}

#[derive(Default)]
struct Machine {
    phys: Vec<Content>,
    /// Final target pages of each process: address -> (content, physical id).
    finals: BTreeMap<i32, BTreeMap<u64, (Content, Option<usize>)>>,
}

type Space = BTreeMap<u64, VPage>;

impl Machine {
    fn new_phys(&mut self, c: Content) -> usize {
        self.phys.push(c);
        self.phys.len() - 1
    }

    fn map_segment(&mut self, space: &mut Space, seg: &Segment) {
        for k in 0..seg.len / PAGE {
            let backing = match &seg.backing {
                SegmentBacking::PrivateFile { path, offset, .. } => {
                    Content::File(path.clone(), offset + k * PAGE)
                }
                _ => Content::Zero,
            };
            let addr = seg.staging + k * PAGE;
            assert!(
                !space.contains_key(&addr),
                "segment maps over an existing page at {addr:#x}"
            );
            space.insert(
                addr,
                VPage {
                    phys: None,
                    backing,
                },
            );
        }
        for fill in &seg.populate {
            for k in 0..fill.pages {
                let phys = self.new_phys(Content::Page(fill.first + k));
                let page = space
                    .get_mut(&(seg.staging + fill.offset + k * PAGE))
                    .expect("populate outside segment");
                page.phys = Some(phys);
            }
        }
    }

    fn run(&mut self, plan: &RestorePlan, p: ProcIdx, mut space: Space) {
        let me = &plan.processes[p];
        for &s in &me.creates {
            if plan.segments[s].before_fork {
                self.map_segment(&mut space, &plan.segments[s]);
            }
        }
        for w in &me.pre_fork_writes {
            for k in 0..w.pages {
                let phys = self.new_phys(Content::Page(w.first + k));
                space
                    .get_mut(&(w.offset + k * PAGE))
                    .expect("pre-fork write to unmapped staging")
                    .phys = Some(phys);
            }
        }
        for &child in &me.children {
            self.run(plan, child, space.clone());
        }
        for &s in &me.creates {
            if !plan.segments[s].before_fork {
                self.map_segment(&mut space, &plan.segments[s]);
            }
        }
        for w in &me.writes {
            for k in 0..w.pages {
                let phys = self.new_phys(Content::Page(w.first + k));
                space
                    .get_mut(&(w.offset + k * PAGE))
                    .expect("write to unmapped staging")
                    .phys = Some(phys);
            }
        }
        for z in &me.zero_writes {
            for k in 0..z.len / PAGE {
                let phys = self.new_phys(Content::Zero);
                space
                    .get_mut(&(z.staging + k * PAGE))
                    .expect("zero write to unmapped staging")
                    .phys = Some(phys);
            }
        }
        for z in &me.zaps {
            for k in 0..z.len / PAGE {
                space
                    .get_mut(&(z.staging + k * PAGE))
                    .expect("zap of unmapped staging")
                    .phys = None;
            }
        }
        let mut target: BTreeMap<u64, (Content, Option<usize>)> = BTreeMap::new();
        for m in &me.moves {
            let src = m.source(plan);
            for k in 0..m.len / PAGE {
                let page = space.remove(&(src + k * PAGE)).unwrap_or_else(|| {
                    panic!(
                        "pid {}: move source {:#x} not mapped (moved twice?)",
                        me.pid,
                        src + k * PAGE
                    )
                });
                let content = match page.phys {
                    Some(ph) => self.phys[ph].clone(),
                    None => page.backing.clone(),
                };
                let old = target.insert(m.target + k * PAGE, (content, page.phys));
                assert!(
                    old.is_none(),
                    "pid {}: two moves onto {:#x}",
                    me.pid,
                    m.target + k * PAGE
                );
            }
        }
        self.finals.insert(me.pid, target);
    }
}

fn simulate(plan: &RestorePlan) -> Machine {
    let mut machine = Machine::default();
    machine.run(plan, 0, Space::new());
    machine
}

/// Checks every process ends with its image's contents and returns the
/// number of distinct physical pages holding stored pages after restore.
fn check(tree: &[ProcessEntry], images: &[ProcessImage], plan: &RestorePlan) -> usize {
    let machine = simulate(plan);
    let mut phys_of_page: HashMap<PageId, HashSet<usize>> = HashMap::new();
    for (entry, image) in tree.iter().zip(images) {
        let finals = &machine.finals[&entry.pid];
        let mut expected_pages = 0;
        for vma in image.vmas.iter().filter(|v| {
            is_private_memory(v.kind)
                || matches!(
                    v.kind,
                    VmaKind::SharedAnon | VmaKind::Memfd | VmaKind::SysvShm
                )
        }) {
            for (addr, want) in page_wants(vma) {
                expected_pages += 1;
                let (content, phys) = finals.get(&addr).unwrap_or_else(|| {
                    panic!("pid {}: nothing at {addr:#x} after restore", entry.pid)
                });
                let expected = match want {
                    Want::Page(id) => Content::Page(id),
                    Want::Zero => Content::Zero,
                    Want::Absent => match backing_of(vma) {
                        SegmentBacking::PrivateFile { path, offset, .. } => {
                            Content::File(path, offset + addr - vma.start)
                        }
                        _ => Content::Zero,
                    },
                };
                assert_eq!(content, &expected, "pid {} at {addr:#x}", entry.pid);
                if let (Want::Page(id), Some(ph)) = (want, phys) {
                    phys_of_page.entry(id).or_default().insert(*ph);
                }
            }
        }
        assert_eq!(
            finals.len(),
            expected_pages,
            "pid {}: extra pages moved into place",
            entry.pid
        );
    }
    for (id, phys) in &phys_of_page {
        assert_eq!(
            phys.len(),
            1,
            "page id {id} is {} physical pages after restore",
            phys.len()
        );
    }
    phys_of_page.len()
}

fn entry(pid: i32, ppid: i32) -> ProcessEntry {
    ProcessEntry {
        pid,
        ppid,
        pgid: pid,
        sid: pid,
        nspid: vec![pid],
        tids: vec![pid],
        comm: "t".into(),
        exe: "/bin/true".into(),
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o22,
        creds: Creds::default(),
        rlimits: vec![],
        namespaces: vec![],
        file: format!("proc-{pid}.json"),
        zombie: None,
    }
}

/// A VMA from a per-page description: Some(id) stored, None zero.
fn vma(kind: VmaKind, start: u64, pages: &[Option<PageId>]) -> Vma {
    let mut runs: Vec<PageRun> = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        let addr = start + i as u64 * PAGE;
        let run = match p {
            Some(id) => PageRun::Stored {
                start: addr,
                pages: 1,
                first: *id,
            },
            None => PageRun::Zero {
                start: addr,
                pages: 1,
            },
        };
        match (runs.last_mut(), run) {
            (
                Some(PageRun::Stored {
                    pages,
                    first,
                    start: s,
                }),
                PageRun::Stored { first: f, .. },
            ) if *first + *pages == f && *s + *pages * PAGE == addr => *pages += 1,
            (Some(PageRun::Zero { pages, .. }), PageRun::Zero { .. }) => *pages += 1,
            _ => runs.push(run),
        }
    }
    Vma {
        start,
        end: start + pages.len() as u64 * PAGE,
        prot: 3,
        shared: false,
        kind,
        path: if kind == VmaKind::PrivateFile {
            Some("/lib/data".into())
        } else {
            None
        },
        deleted: false,
        dev: 0,
        inode: 0,
        offset: 0,
        vm_flags: vec![],
        pages: runs,
    }
}

fn image(pid: i32, vmas: Vec<Vma>) -> ProcessImage {
    ProcessImage {
        unmapped_shmem: Vec::new(),
        posix_timers: Vec::new(),
        runs_file: None,
        pid,
        mm: crate::image::types::MmFields {
            exe_file: String::new(),
            ..crate::image::types::MmFields::default()
        },
        vmas,
        fds: vec![],
        signals: ProcessSignals {
            actions: vec![],
            shared_pending: vec![],
        },
        itimers: Itimers::default(),
        threads: vec![],
    }
}

const R: u64 = 0x7f00_0000_0000;
const N: u64 = 64;

fn parent_pages() -> Vec<Option<PageId>> {
    (0..N)
        .map(|i| if i % 4 == 3 { None } else { Some(i) })
        .collect()
}

/// A child's view of the parent's region with pages `dirty` replaced by fresh ids from `next`.
fn dirtied(base: &[Option<PageId>], dirty: &[u64], next: &mut PageId) -> Vec<Option<PageId>> {
    let mut pages = base.to_vec();
    for &d in dirty {
        pages[d as usize] = Some(*next);
        *next += 1;
    }
    pages
}

fn run_case(tree: Vec<ProcessEntry>, images: Vec<ProcessImage>) -> (RestorePlan, usize) {
    let plan = plan(&tree, &images).expect("plan");
    let unique = check(&tree, &images, &plan);
    (plan, unique)
}

fn vma_count_per_process(plan: &RestorePlan) -> Vec<usize> {
    // Moves that are adjacent in both source and target become one VMA.
    plan.processes
        .iter()
        .map(|p| {
            let mut moves = p.moves.clone();
            moves.sort_by_key(|m| m.target);
            let mut count = 0;
            let mut last: Option<Move> = None;
            for m in moves {
                match last {
                    Some(l)
                        if l.segment == m.segment
                            && l.offset + l.len == m.offset
                            && l.target + l.len == m.target => {}
                    _ => count += 1,
                }
                last = Some(m);
            }
            count
        })
        .collect()
}

#[test]
fn plain_parent_and_children_share_everything_not_dirtied() {
    let base = parent_pages();
    let mut next = 1000;
    let mut tree = vec![entry(10, 1)];
    let mut images = vec![image(10, vec![vma(VmaKind::PrivateAnon, R, &base)])];
    for c in 0..4 {
        let mut pages = dirtied(&base, &[c, c + 10, c + 20], &mut next);
        if c == 0 {
            pages[30] = None; // this child zeroed a page it shared (MADV_DONTNEED)
        }
        tree.push(entry(11 + c as i32, 10));
        images.push(image(
            11 + c as i32,
            vec![vma(VmaKind::PrivateAnon, R, &pages)],
        ));
    }
    let (plan, unique) = run_case(tree, images);
    assert_eq!(unique, 48 + 12);
    assert_eq!(plan.stats.pages_copied, 0);
    // One VMA per process, one segment created before fork by the parent.
    assert_eq!(vma_count_per_process(&plan), vec![1; 5]);
    assert_eq!(plan.segments.iter().filter(|s| s.before_fork).count(), 1);
}

#[test]
fn split_vma_in_child_keeps_sharing() {
    let base = parent_pages();
    let mut next = 1000;
    let child = dirtied(&base, &[5], &mut next);
    let mut a = vma(VmaKind::PrivateAnon, R, &child[..20]);
    let mut b = vma(VmaKind::PrivateAnon, R + 20 * PAGE, &child[20..]);
    a.prot = 1;
    b.prot = 3;
    let tree = vec![entry(10, 1), entry(11, 10)];
    let images = vec![
        image(10, vec![vma(VmaKind::PrivateAnon, R, &base)]),
        image(11, vec![a, b]),
    ];
    let (plan, _) = run_case(tree, images);
    assert_eq!(plan.stats.pages_copied, 0);
}

#[test]
fn moved_vma_in_child_keeps_sharing() {
    let base = parent_pages();
    let mut next = 1000;
    let child = dirtied(&base, &[1, 2], &mut next);
    let tree = vec![entry(10, 1), entry(11, 10)];
    let images = vec![
        image(10, vec![vma(VmaKind::PrivateAnon, R, &base)]),
        image(
            11,
            vec![vma(VmaKind::PrivateAnon, R + 0x10_0000_0000, &child)],
        ),
    ];
    let (plan, unique) = run_case(tree, images);
    assert_eq!(unique, 48 + 2);
    assert_eq!(vma_count_per_process(&plan), vec![1, 1]);
}

#[test]
fn parent_dirtied_after_fork_pages_shared_by_siblings_only() {
    let original = parent_pages();
    let mut next = 1000;
    // The parent rewrote pages 0..16 after forking; children still share the originals.
    let parent = dirtied(&original, &(0..16).collect::<Vec<_>>(), &mut next);
    let mut tree = vec![entry(10, 1)];
    let mut images = vec![image(10, vec![vma(VmaKind::PrivateAnon, R, &parent)])];
    for c in 0..3 {
        let pages = dirtied(&original, &[40 + c], &mut next);
        tree.push(entry(11 + c as i32, 10));
        images.push(image(
            11 + c as i32,
            vec![vma(VmaKind::PrivateAnon, R, &pages)],
        ));
    }
    let (plan, _) = run_case(tree, images);
    assert_eq!(plan.stats.pages_copied, 0);
    assert_eq!(
        vma_count_per_process(&plan),
        vec![1; 4],
        "no fragmentation: sibling pages share the parent's segment"
    );
}

#[test]
fn sibling_only_sharing_when_parent_has_no_such_region() {
    let original = parent_pages();
    let mut next = 1000;
    let mut tree = vec![entry(10, 1)];
    let mut images = vec![image(10, vec![])];
    for c in 0..3 {
        let pages = dirtied(&original, &[c], &mut next);
        tree.push(entry(11 + c as i32, 10));
        images.push(image(
            11 + c as i32,
            vec![vma(VmaKind::PrivateAnon, R, &pages)],
        ));
    }
    let (plan, unique) = run_case(tree, images);
    assert_eq!(unique, 48 + 3);
    assert_eq!(plan.stats.pages_copied, 0);
    assert_eq!(
        plan.segments[0].holder, 0,
        "the parent holds pages it does not use"
    );
    // Pages shared by two of the three children live in the same segment as
    // those shared by all three: each child moves one piece.
    assert_eq!(vma_count_per_process(&plan), vec![0, 1, 1, 1]);
}

#[test]
fn deep_chain_and_reparented_grandchildren() {
    let base = parent_pages();
    let mut next = 1000;
    let mut tree = vec![entry(100, 1)];
    let mut images = vec![image(100, vec![vma(VmaKind::PrivateAnon, R, &base)])];
    let mut pages = base.clone();
    for d in 1..20 {
        pages = dirtied(&pages, &[d % N], &mut next);
        tree.push(entry(100 + d as i32, 100 + d as i32 - 1));
        images.push(image(
            100 + d as i32,
            vec![vma(VmaKind::PrivateAnon, R, &pages)],
        ));
    }
    // Two reparented grandchildren hang directly off the root and share
    // pages the vanished middle process had dirtied.
    let mid = dirtied(&base, &[50, 51], &mut next);
    for g in 0..2 {
        tree.push(entry(200 + g, 100));
        images.push(image(200 + g, vec![vma(VmaKind::PrivateAnon, R, &mid)]));
    }
    let (plan, _) = run_case(tree, images);
    assert_eq!(plan.stats.pages_copied, 0);
    // Every level rewrites pages of the root's segment for its own subtree
    // (before forking) instead of making a segment of its own. The two
    // grandchildren share other versions of pages 50 and 51 than the chain,
    // with the same LCA (the root): those two pages come in as overlays.
    let mut expected = vec![1; 20];
    expected.extend([3, 3]);
    assert_eq!(vma_count_per_process(&plan), expected);
    // The root's segment, and one for the grandchildren's versions.
    assert_eq!(plan.segments.iter().filter(|s| s.before_fork).count(), 2);
}

#[test]
fn private_file_mapping_with_cow_pages_and_absent_pages() {
    let mut pages: Vec<Option<PageId>> = vec![None; 16];
    pages[3] = Some(7);
    let parent = {
        let mut v = vma(VmaKind::PrivateFile, R, &pages);
        // Pages other than 3 are not present: they read the file.
        v.pages = vec![
            PageRun::Absent { start: R, pages: 3 },
            PageRun::Stored {
                start: R + 3 * PAGE,
                pages: 1,
                first: 7,
            },
            PageRun::Zero {
                start: R + 4 * PAGE,
                pages: 1,
            },
            PageRun::Absent {
                start: R + 5 * PAGE,
                pages: 11,
            },
        ];
        v
    };
    let mut child = parent.clone();
    child.pages = vec![
        PageRun::Absent { start: R, pages: 3 },
        PageRun::Stored {
            start: R + 3 * PAGE,
            pages: 2,
            first: 7,
        },
        PageRun::Absent {
            start: R + 5 * PAGE,
            pages: 11,
        },
    ];
    let tree = vec![entry(10, 1), entry(11, 10)];
    let images = vec![image(10, vec![parent]), image(11, vec![child])];
    let (plan, unique) = run_case(tree, images);
    assert_eq!(unique, 2);
    assert_eq!(
        plan.processes[0].zero_writes.len(),
        1,
        "a zero anonymous page in a file mapping is written"
    );
}

#[test]
fn zombies_are_leaves_with_empty_plans() {
    let base = parent_pages();
    let mut next = 1000;
    let zombie = |pid: i32, ppid: i32| ProcessEntry {
        tids: vec![],
        zombie: Some(crate::image::types::ZombieExit::Exited { code: 7 }),
        ..entry(pid, ppid)
    };
    let mut tree = vec![entry(10, 1), zombie(11, 10)];
    let mut images = vec![
        image(10, vec![vma(VmaKind::PrivateAnon, R, &base)]),
        image(11, vec![]),
    ];
    let pages = dirtied(&base, &[1, 2], &mut next);
    tree.push(entry(12, 10));
    images.push(image(12, vec![vma(VmaKind::PrivateAnon, R, &pages)]));
    tree.push(zombie(13, 12));
    images.push(image(13, vec![]));
    let (planned, unique) = run_case(tree.clone(), images.clone());
    assert_eq!(unique, 48 + 2);
    // Forked by their parents like any child, with nothing to do.
    assert_eq!(planned.processes[0].children, vec![1, 2]);
    assert_eq!(planned.processes[2].children, vec![3]);
    for z in [1, 3] {
        let p = &planned.processes[z];
        assert!(p.children.is_empty() && p.creates.is_empty() && p.moves.is_empty());
        assert!(p.writes.is_empty() && p.pre_fork_writes.is_empty() && p.zaps.is_empty());
        assert!(planned.segments.iter().all(|s| s.holder != z));
    }
    // The sharing of the live processes is what it is without the zombies.
    let live: Vec<usize> = vec![0, 2];
    let (plain, _) = run_case(
        live.iter().map(|&i| tree[i].clone()).collect(),
        live.iter().map(|&i| images[i].clone()).collect(),
    );
    assert_eq!(planned.stats, plain.stats);

    // A zombie is never a parent.
    tree.push(entry(14, 13));
    images.push(image(14, vec![]));
    assert_eq!(
        plan(&tree, &images),
        Err(PlanError::ZombieParent {
            pid: 14,
            zombie: 13
        })
    );
}

#[test]
fn tree_errors_are_precise() {
    let images = vec![image(10, vec![]), image(11, vec![])];
    let tree = vec![entry(10, 1), entry(11, 99)];
    assert_eq!(
        plan(&tree, &images),
        Err(PlanError::MissingParent { pid: 11, ppid: 99 })
    );
    let tree = vec![entry(11, 10), entry(10, 1)];
    let images2 = vec![image(11, vec![]), image(10, vec![])];
    assert_eq!(
        plan(&tree, &images2),
        Err(PlanError::ParentAfterChild { pid: 11, ppid: 10 })
    );
    let tree = vec![entry(10, 1), entry(12, 1)];
    let images3 = vec![image(10, vec![]), image(12, vec![])];
    assert!(matches!(
        plan(&tree, &images3),
        Err(PlanError::MissingParent { pid: 12, ppid: 1 })
    ));
}

/// Found by reviewing the parsers; replayed by the fuzz corpus (input `fuzz/corpus/image/regress-huge-vma`):
/// a VMA of 2^52 absent pages shared by two processes made the plan walk
/// it page by page, for ever (and collect it into a vector of 2^52 wants).
#[test]
fn a_vma_too_large_to_plan_is_refused_at_once() {
    let mut huge = vma(VmaKind::PrivateAnon, 0x1000, &[Some(0)]);
    let end = 0xffff_ffff_ffff_f000;
    huge.pages.push(PageRun::Absent {
        start: huge.end,
        pages: (end - huge.end) / PAGE,
    });
    huge.end = end;
    let images = vec![image(10, vec![huge.clone()]), image(11, vec![huge])];
    let tree = vec![entry(10, 1), entry(11, 10)];
    assert_eq!(
        plan(&tree, &images),
        Err(PlanError::VmaTooLarge {
            pid: 10,
            start: 0x1000,
            end,
            pages: (end - 0x1000) / PAGE,
            max: MAX_VMA_PAGES,
        })
    );
}

#[test]
fn staging_avoids_every_target_vma() {
    let base = parent_pages();
    let tree = vec![entry(10, 1)];
    // A target VMA sitting where staging would start by default.
    let images = vec![image(
        10,
        vec![vma(VmaKind::PrivateAnon, STAGING_FLOOR, &base)],
    )];
    let (plan, _) = run_case(tree, images);
    for s in &plan.segments {
        assert!(
            s.staging >= STAGING_FLOOR + N * PAGE,
            "segment at {:#x} overlaps the target",
            s.staging
        );
    }
}

#[test]
fn shared_anonymous_object_is_one_segment_mapped_by_all() {
    // One 16-page object: the parent maps all of it, a child maps pages
    // 4..12 elsewhere, a grandchild maps it all at the parent's address.
    let pages: Vec<Option<PageId>> = (0..16)
        .map(|i| if i % 5 == 0 { None } else { Some(i) })
        .collect();
    let mut whole = vma(VmaKind::SharedAnon, R, &pages);
    whole.shared = true;
    whole.inode = 77;
    let mut window = vma(VmaKind::SharedAnon, R + 0x100_0000, &pages[4..12]);
    window.shared = true;
    window.inode = 77;
    window.offset = 4 * PAGE;
    let tree = vec![entry(10, 1), entry(11, 10), entry(12, 11)];
    let images = vec![
        image(10, vec![whole.clone()]),
        image(11, vec![window]),
        image(12, vec![whole]),
    ];
    let (plan, unique) = run_case(tree, images);
    assert_eq!(
        unique, 12,
        "every stored page of the object is one physical page"
    );
    let shared: Vec<&Segment> = plan
        .segments
        .iter()
        .filter(|s| s.backing == SegmentBacking::SharedAnon)
        .collect();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].holder, 0);
    assert_eq!(shared[0].len, 16 * PAGE);
}

#[test]
fn the_same_shared_object_mapped_twice_in_one_process_is_refused() {
    let pages: Vec<Option<PageId>> = (0..4).map(Some).collect();
    let mut a = vma(VmaKind::SharedAnon, R, &pages);
    a.inode = 5;
    let mut b = vma(VmaKind::SharedAnon, R + 0x10_0000, &pages);
    b.inode = 5;
    let result = plan(&[entry(10, 1)], &[image(10, vec![a, b])]);
    assert!(
        matches!(result, Err(PlanError::NotSupported { pid: 10, .. })),
        "{result:?}"
    );
}

#[test]
fn sysv_segment_attached_by_siblings_is_held_by_their_parent() {
    // Segment 4100 (12 pages): child 11 has it all attached, child 12 only
    // pages 2..10 (it unmapped the rest) at another address; the parent
    // has it detached. Segment 4200 is attached by child 12 alone.
    let pages: Vec<Option<PageId>> = (0..12).map(Some).collect();
    let sysv = |start: u64, pages: &[Option<PageId>], shmid: u64, offset: u64| {
        let mut v = vma(VmaKind::SysvShm, start, pages);
        v.shared = true;
        v.inode = shmid;
        v.dev = 1;
        v.offset = offset;
        v.path = Some("/SYSV00000000".into());
        v
    };
    let own: Vec<Option<PageId>> = (20..24).map(Some).collect();
    let tree = vec![entry(10, 1), entry(11, 10), entry(12, 10)];
    let images = vec![
        image(10, vec![vma(VmaKind::PrivateAnon, R, &[None])]),
        image(11, vec![sysv(R + 0x100_0000, &pages, 4100, 0)]),
        image(
            12,
            vec![
                sysv(R + 0x200_0000, &pages[2..10], 4100, 2 * PAGE),
                sysv(R + 0x300_0000, &own, 4200, 0),
            ],
        ),
    ];
    let (plan, unique) = run_case(tree, images);
    assert_eq!(unique, 16, "every stored page of each segment is one page");
    let held: Vec<(i32, ProcIdx, u64)> = plan
        .segments
        .iter()
        .filter_map(|s| match s.backing {
            SegmentBacking::SysvShm { shmid } => Some((shmid, s.holder, s.len)),
            _ => None,
        })
        .collect();
    assert_eq!(held, vec![(4100, 0, 12 * PAGE), (4200, 2, 4 * PAGE)]);
    let first = plan
        .segments
        .iter()
        .position(|s| s.backing == SegmentBacking::SysvShm { shmid: 4100 })
        .expect("segment 4100");
    assert!(plan.segments[first].before_fork);
    assert!(plan.processes[0].creates.contains(&first));
    assert!(plan.processes[2]
        .moves
        .iter()
        .any(|m| m.segment == first && m.offset == 2 * PAGE && m.len == 8 * PAGE));
}

#[test]
fn zero_pages_of_a_shared_object_are_allocated_by_its_holder() {
    // Pages 0, 5, 10, 15 of the object are present and all zero.
    let pages: Vec<Option<PageId>> = (0..16)
        .map(|i| if i % 5 == 0 { None } else { Some(i) })
        .collect();
    let mut whole = vma(VmaKind::Memfd, R, &pages);
    whole.shared = true;
    whole.inode = 9;
    whole.path = Some("/memfd:x".into());
    let mut window = whole.clone();
    window.start = R + 0x100_0000;
    window.end = window.start + 4 * PAGE;
    window.offset = 8 * PAGE;
    window.pages = vma(VmaKind::Memfd, window.start, &pages[8..12]).pages;
    let (plan, _) = run_case(
        vec![entry(10, 1), entry(11, 10), entry(12, 10)],
        vec![
            image(10, vec![]),
            image(11, vec![whole]),
            image(12, vec![window]),
        ],
    );
    let object = &plan.segments[0];
    assert_eq!(object.holder, 0, "the LCA of both mappers holds the object");
    let zeroed: Vec<u64> = plan.processes[0]
        .zero_writes
        .iter()
        .flat_map(|z| (0..z.len / PAGE).map(move |k| z.staging + k * PAGE - object.staging))
        .collect();
    assert_eq!(zeroed, vec![0, 5 * PAGE, 10 * PAGE, 15 * PAGE]);
    assert!(plan.processes[1].zero_writes.is_empty());
    assert!(plan.processes[2].zero_writes.is_empty());
}

/// A [stack] VMA with VM_GROWSDOWN (smaps `gd`).
fn stack_vma(start: u64, pages: &[Option<PageId>]) -> Vma {
    let mut v = vma(VmaKind::Stack, start, pages);
    v.vm_flags = ["rd", "wr", "mr", "mw", "me", "gd", "ac"]
        .map(String::from)
        .to_vec();
    v
}

/// Backing of the segment every move into `[start, end)` of process `p` comes from.
fn backings_moved_into(plan: &RestorePlan, p: usize, start: u64, end: u64) -> Vec<SegmentBacking> {
    plan.processes[p]
        .moves
        .iter()
        .filter(|m| m.target >= start && m.target < end)
        .map(|m| plan.segments[m.segment].backing.clone())
        .collect()
}

const S: u64 = 0x7ffc_0000_0000;

#[test]
fn growsdown_stack_is_staged_in_growsdown_segments_and_stays_shared() {
    let base = parent_pages();
    let stack: Vec<Option<PageId>> = (0..16).map(|i| Some(5000 + i)).collect();
    let mut next = 1000;
    let mut tree = vec![entry(10, 1)];
    let mut images = vec![image(
        10,
        vec![vma(VmaKind::PrivateAnon, R, &base), stack_vma(S, &stack)],
    )];
    for c in 0..3u64 {
        let pages = dirtied(&base, &[c], &mut next);
        let mut own_stack = dirtied(&stack, &[15 - c], &mut next);
        if c == 2 {
            // This child's stack grew two pages below the parent's.
            let mut grown = vec![Some(next), Some(next + 1)];
            next += 2;
            grown.extend(own_stack);
            own_stack = grown;
        }
        let start = if c == 2 { S - 2 * PAGE } else { S };
        tree.push(entry(11 + c as i32, 10));
        images.push(image(
            11 + c as i32,
            vec![
                vma(VmaKind::PrivateAnon, R, &pages),
                stack_vma(start, &own_stack),
            ],
        ));
    }
    let (plan, _) = run_case(tree, images);
    assert_eq!(plan.stats.pages_copied, 0, "stack pages stay shared");
    for p in 0..4 {
        let stack = backings_moved_into(&plan, p, S - 2 * PAGE, S + 16 * PAGE);
        assert!(!stack.is_empty(), "process {p} moves its stack");
        assert!(
            stack.iter().all(|b| *b == SegmentBacking::AnonGrowsDown),
            "process {p}: stack staged in {stack:?}"
        );
        let region = backings_moved_into(&plan, p, R, R + N * PAGE);
        assert!(
            region.iter().all(|b| *b == SegmentBacking::Anon),
            "process {p}: plain region staged in {region:?}"
        );
    }
    // Parent and same-sized children: region and stack, one VMA each.
    assert_eq!(vma_count_per_process(&plan)[..3], [2, 2, 2]);
}

#[test]
fn page_shared_between_growsdown_and_plain_memory_is_not_moved_across_kinds() {
    // The child's stack holds the physical page the parent has in its plain
    // region (which the child unmapped): moving it in from the plain
    // segment would split the stack
    // VMA and lose VM_GROWSDOWN there, so it is written instead.
    let base = parent_pages();
    let stack: Vec<Option<PageId>> = (0..8).map(|i| Some(5000 + i)).collect();
    let mut child_stack = stack.clone();
    child_stack[3] = Some(5); // page 5 of the parent's region
    let tree = vec![entry(10, 1), entry(11, 10)];
    let images = vec![
        image(
            10,
            vec![vma(VmaKind::PrivateAnon, R, &base), stack_vma(S, &stack)],
        ),
        image(11, vec![stack_vma(S, &child_stack)]),
    ];
    let plan = plan(&tree, &images).expect("plan");
    assert_eq!(plan.stats.pages_copied, 1, "{:?}", plan.stats);
    for p in 0..2 {
        let stack = backings_moved_into(&plan, p, S, S + 8 * PAGE);
        assert!(
            stack.iter().all(|b| *b == SegmentBacking::AnonGrowsDown),
            "process {p}: stack staged in {stack:?}"
        );
    }
}
