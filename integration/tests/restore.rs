//! End-to-end tests of `cowsnap restore` against the real kernel. Run as
//! root, one test at a time (`--test-threads=1`).
//!
//! Each mode test starts the reference tree (`cowsnap-refworkload`),
//! records what the kernel says about it (Pss_Anon, /proc/PID/maps, the
//! parent/child relations and threads), dumps it, and restores the image
//! into a new pid namespace while the original keeps running. The restored
//! processes reopen the same report file by path and report their own
//! (namespace) pid, which equals the original's: so only restored processes
//! are signalled, and only answers appended after the signals count. Then:
//! every restored process answers OK (its memory is byte for byte what it
//! should be), runs, has the original's layout and place in the tree, and
//! the restored tree uses no more anonymous memory than the original (the
//! sharing came back), and not noticeably less.
//!
//! Other tests: a restore in the current pid namespace after `dump --exit`
//! (same pids, process groups, sessions, executables), one image restored
//! twice at once, that the restore command leaves its caller's stdout and
//! stderr alone, and failures that must leave nothing running (a corrupted
//! page store, a missing file, pids taken, a SysV shm id taken).
//!
//! SysV shm: the `sysv-shm` mode test also compares the segments (ids,
//! keys, modes, sizes, attachments) in the restored tree's new IPC
//! namespace with the original's; a restore into the current namespaces
//! after `dump --exit` gets them back in this IPC namespace.
//!
//! Processes of other engineers' tests may run on the same machine at the
//! same time: "nothing left" is judged by command lines that mention this
//! test's own temporary directories.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The kernel's special mappings, placed by the kernel, not by the image.
const VDSO_LIKE: [&str; 3] = ["[vdso]", "[vvar]", "[vvar_vclock]"];
/// What `comm` the workload's processes have (TASK_COMM_LEN truncates it).
const WORKLOAD_COMM: &str = "cowsnap-refwork";
const INIT_COMM: &str = "cowsnap-init";

// ------------------------------------------------------------ helpers

/// `totals.pages_zero` of `cowsnap inspect --json`: pages that were the
/// kernel's zero page, which the image does not store and a restore does
/// not allocate.
fn zero_pages(images: &Path) -> u64 {
    let json = inspect_json(images);
    json["totals"]["pages_zero"]
        .as_u64()
        .unwrap_or_else(|| panic!("inspect --json has no totals.pages_zero: {json}"))
}

/// `root pid N` of the restore's summary line.
fn summary_root(output: &Output) -> Option<i32> {
    let text = String::from_utf8_lossy(&output.stdout);
    let at = text.find("root pid ")? + "root pid ".len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The number before `copied` in the restore's summary line.
fn summary_copied(output: &Output) -> Option<u64> {
    let text = String::from_utf8_lossy(&output.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| w.starts_with("copied"))?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// Takes charge of the tree a successful restore created (so a failing
/// assertion still kills it), or returns the restore's failure.
fn restored_tree(output: &Output, pidfile: &Path) -> Result<Restored, String> {
    if !output.status.success() {
        return Err(describe(output));
    }
    let from_file = fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let from_summary = summary_root(output);
    let Some(root) = from_file.or(from_summary) else {
        return Err(format!(
            "no root pid in {} nor in the summary:\n{}",
            pidfile.display(),
            describe(output)
        ));
    };
    let restored = Restored::new(root);
    assert_eq!(
        from_file,
        Some(root),
        "pid file {} (summary says {from_summary:?})",
        pidfile.display()
    );
    // A caller may not have read stdout (see restore_leaves_callers_stdio_alone).
    if from_summary.is_some() {
        assert_eq!(
            from_summary,
            Some(root),
            "root pid of the summary line vs the pid file:\n{}",
            describe(output)
        );
    }
    Ok(restored)
}

fn restore_ok(images: &Path, pidfile: &Path, extra: &[&str]) -> (Restored, Output) {
    let output = run_restore(images, pidfile, extra);
    let restored = restored_tree(&output, pidfile)
        .unwrap_or_else(|e| panic!("cowsnap restore {extra:?} failed:\n{e}"));
    assert!(
        summary_root(&output).is_some(),
        "no \"root pid N\" summary line on stdout:\n{}",
        describe(&output)
    );
    (restored, output)
}

// ------------------------------------------------------------ a restored tree

/// A restored tree, found from its root's pid as seen from here. Dropping
/// it kills the whole tree (and the namespace's init, if there is one).
struct Restored {
    root: i32,
    /// pid 1 of the new pid namespace (`cowsnap-init`), when the root's parent is one.
    init: Option<i32>,
    seen: Mutex<Vec<i32>>,
}

impl Restored {
    fn new(root: i32) -> Restored {
        let parent = ppid(root);
        let init = (parent > 0 && comm(parent) == INIT_COMM).then_some(parent);
        let restored = Restored {
            root,
            init,
            seen: Mutex::new(Vec::new()),
        };
        restored.pids();
        restored
    }

    /// Pids (as seen from here), root first, parents before children.
    fn pids(&self) -> Vec<i32> {
        descendants_seen(self.root, &self.seen)
    }

    /// (pid as seen from here, pid the process reports) for every process.
    fn targets(&self) -> Vec<(i32, i32)> {
        self.pids().into_iter().map(|p| (p, ns_pid(p))).collect()
    }

    fn assert_verifies(&self, report: &Path, context: &str) {
        let targets = self.targets();
        assert!(
            !targets.is_empty(),
            "{context}: restored root {} is gone",
            self.root
        );
        assert_processes_verify(report, &targets, context);
    }

    /// cowsnap-init, which lives as long as the namespace, has no file of
    /// the image `images` mapped (the image stays deletable).
    fn assert_init_maps_nothing_of(&self, images: &Path) {
        let init = self.init.expect("the namespace has cowsnap-init");
        let maps = std::fs::read_to_string(format!("/proc/{init}/maps")).expect("init maps");
        let dir = images.to_string_lossy();
        let held: Vec<&str> = maps.lines().filter(|l| l.contains(&*dir)).collect();
        assert!(
            held.is_empty(),
            "{INIT_COMM} {init} maps the image: {held:?}"
        );
    }

    /// The root is pid `ns_root` of a new namespace whose pid 1 is cowsnap-init.
    fn assert_in_new_namespace(&self, ns_root: i32) {
        let init = self.init.unwrap_or_else(|| {
            panic!(
                "the restored root {}'s parent {} is {:?}, not {INIT_COMM}",
                self.root,
                ppid(self.root),
                comm(ppid(self.root))
            )
        });
        assert_eq!(
            ns_pid(init),
            1,
            "{INIT_COMM} {init} is not pid 1 of its namespace"
        );
        assert_eq!(
            ns_pid(self.root),
            ns_root,
            "namespace pid of the restored root {}",
            self.root
        );
        assert_ne!(
            self.root, ns_root,
            "the restored root has its namespace pid outside too"
        );
    }

    /// Every process and thread exists and is not stopped, traced or a zombie.
    fn assert_running(&self, expected_processes: usize, context: &str) {
        let pids = self.pids();
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let mut problems = Vec::new();
        for pid in seen.iter().filter(|p| !pids.contains(p)) {
            problems.push(format!("pid {pid} left the tree"));
        }
        if pids.len() != expected_processes {
            problems.push(format!(
                "{} processes, expected {expected_processes}: {pids:?}",
                pids.len()
            ));
        }
        for &pid in &pids {
            for tid in tids(pid) {
                let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                    .unwrap_or_default();
                let state = status_field(&status, "State:").unwrap_or_default();
                let tracer = status_field(&status, "TracerPid:").unwrap_or_default();
                if state.is_empty() || state.starts_with(['Z', 'T', 't', 'X']) {
                    problems.push(format!("tid {tid} of {pid} in state {state:?}"));
                }
                if tracer != "0" {
                    problems.push(format!("tid {tid} of {pid} traced by {tracer}"));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "{context}: restored tree not running: {problems:?}"
        );
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let mut pids = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        pids.extend(descendants(self.root));
        // SIGKILL of a namespace's init kills every process in the namespace.
        if let Some(init) = self.init {
            let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
            pids.push(init);
        }
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Their parent (init of this namespace) reaps them; wait so the next
        // test does not see them, or find their pids taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

// ------------------------------------------------------------ what the kernel says

/// One process of a tree, keyed by its namespace pid in [`TreeView`].
#[derive(Debug, Clone)]
struct ProcView {
    /// Pid as seen from here.
    outer: i32,
    /// Namespace pid of the parent; 0 for the tree's root (its parent is outside the tree).
    ppid: i32,
    /// Namespace tids, sorted.
    tids: Vec<i32>,
    maps: Vec<MapsEntry>,
    pgid_sid: Option<(i32, i32)>,
    exe: String,
}

/// A tree as the kernel shows it, by namespace pid.
#[derive(Debug, Clone)]
struct TreeView {
    root: i32,
    procs: BTreeMap<i32, ProcView>,
    pss_anon: u64,
    /// Pss_Anon + Pss_Shmem: shared anonymous and memfd pages count as shmem.
    pss_anon_shmem: u64,
    pss: u64,
}

impl TreeView {
    /// `pids`: the tree as seen from here, root first.
    fn take(pids: &[i32]) -> TreeView {
        assert!(!pids.is_empty(), "an empty tree");
        let procs = pids
            .iter()
            .map(|&pid| {
                let parent = ppid(pid);
                let mut ns_tids: Vec<i32> = tids(pid).into_iter().map(|t| ns_tid(pid, t)).collect();
                ns_tids.sort_unstable();
                let view = ProcView {
                    outer: pid,
                    ppid: if pids.contains(&parent) {
                        ns_pid(parent)
                    } else {
                        0
                    },
                    tids: ns_tids,
                    maps: maps(pid),
                    pgid_sid: pgid_sid(pid),
                    exe: exe(pid),
                };
                (ns_pid(pid), view)
            })
            .collect();
        TreeView {
            root: ns_pid(pids[0]),
            procs,
            pss_anon: pss_anon(pids),
            pss_anon_shmem: pss_anon_shmem(pids),
            pss: pss_total(pids),
        }
    }

    fn outer_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.procs.values().map(|p| p.outer).collect();
        pids.sort_unstable();
        pids
    }
}

/// Same namespace pids, parents, and threads.
fn assert_same_structure(original: &TreeView, restored: &TreeView, context: &str) {
    assert_eq!(
        restored.root, original.root,
        "{context}: namespace pid of the root"
    );
    let want: Vec<i32> = original.procs.keys().copied().collect();
    let got: Vec<i32> = restored.procs.keys().copied().collect();
    assert_eq!(got, want, "{context}: namespace pids of the processes");
    let mut errors = Vec::new();
    for (pid, o) in &original.procs {
        let r = &restored.procs[pid];
        if r.ppid != o.ppid {
            errors.push(format!("pid {pid}: parent {} (was {})", r.ppid, o.ppid));
        }
        if r.tids.len() != o.tids.len() {
            errors.push(format!(
                "pid {pid}: {} threads (was {})",
                r.tids.len(),
                o.tids.len()
            ));
        } else if r.tids != o.tids {
            errors.push(format!(
                "pid {pid}: thread ids {:?} (were {:?})",
                r.tids, o.tids
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "{context}: tree structure differs:\n  {}",
        errors.join("\n  ")
    );
}

fn is_vdso_like(entry: &MapsEntry) -> bool {
    VDSO_LIKE.contains(&entry.path.as_str())
}

fn fmt_entry(e: &MapsEntry) -> String {
    format!("{:x}-{:x} {} {}", e.start, e.end, e.perms, e.path)
}

/// Every line of /proc/PID/maps equal (start, end, perms, path), except
/// that [vdso]/[vvar]/[vvar_vclock] only have to exist.
fn assert_same_maps(original: &TreeView, restored: &TreeView, context: &str) {
    // Per process: a one-line summary, then at most a few differing lines.
    let mut errors = Vec::new();
    for (pid, o) in &original.procs {
        let Some(r) = restored.procs.get(pid) else {
            continue;
        };
        let want: Vec<&MapsEntry> = o.maps.iter().filter(|e| !is_vdso_like(e)).collect();
        let got: Vec<&MapsEntry> = r.maps.iter().filter(|e| !is_vdso_like(e)).collect();
        let mut lines: Vec<String> = want
            .iter()
            .filter(|e| !got.contains(e))
            .map(|e| format!("missing {}", fmt_entry(e)))
            .collect();
        lines.extend(
            got.iter()
                .filter(|e| !want.contains(e))
                .map(|e| format!("extra   {}", fmt_entry(e))),
        );
        for special in VDSO_LIKE {
            let had = o.maps.iter().any(|e| e.path == special);
            let has = r.maps.iter().any(|e| e.path == special);
            if had && !has {
                lines.push(format!("no {special}"));
            }
        }
        if r.maps.len() != o.maps.len() || !lines.is_empty() {
            errors.push(format!(
                "pid {pid}: {} VMAs (the original had {}), {} lines differ:",
                r.maps.len(),
                o.maps.len(),
                lines.len()
            ));
            errors.extend(lines.iter().take(6).map(|l| format!("    {l}")));
        }
    }
    assert!(
        errors.is_empty(),
        "{context}: /proc/PID/maps differ from the original's:\n  {}",
        errors.join("\n  ")
    );
}

/// `restored` ≤ 1.01 × `original`, and ≥ `original` − 1% − the present
/// all-zero pages of the image (the restore does not allocate them).
fn assert_pss_within(what: &str, original: u64, restored: u64, zero_pages: u64, context: &str) {
    let upper = original + original / 100;
    let lower = original.saturating_sub(original / 100 + zero_pages * PAGE);
    eprintln!(
        "{context}: {what} original {} kB, restored {} kB (allowed {}..={} kB; {zero_pages} zero pages)",
        original / 1024,
        restored / 1024,
        lower / 1024,
        upper / 1024
    );
    assert!(
        restored <= upper,
        "{context}: restored {what} {restored} bytes > 1.01 × the original's {original} bytes: sharing was lost"
    );
    assert!(
        restored >= lower,
        "{context}: restored {what} {restored} bytes < the original's {original} bytes − 1% − {zero_pages} zero pages: memory is missing"
    );
}

// ------------------------------------------------------------ modes

/// Runs every check even when one fails, so a failing mode says everything
/// that is wrong with it at once.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn run(&mut self, what: &str, check: impl FnOnce()) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.0.push(format!("[{what}] {message}"));
        }
    }

    fn finish(self, context: &str) {
        assert!(
            self.0.is_empty(),
            "{context}: {} check(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn restore_mode(mode: &'static str) {
    let tree = RefTree::start(TreeSpec::small(mode));
    let original = TreeView::take(&tree.pids());
    let original_segments = if mode == "sysv-shm" {
        sysv_segments(None, &tree)
    } else {
        BTreeMap::new()
    };
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let zero = zero_pages(&images);

    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &["--pid-ns", "new"]);
    eprintln!("{mode}: {}", String::from_utf8_lossy(&output.stdout).trim());
    restored.assert_in_new_namespace(original.root);
    restored.assert_init_maps_nothing_of(&images);
    let view = TreeView::take(&restored.pids());
    let context = format!("{mode}, restored into a new pid namespace");
    let mut checks = Checks::default();
    checks.run("structure", || {
        assert_same_structure(&original, &view, &context)
    });
    checks.run("maps", || assert_same_maps(&original, &view, &context));
    checks.run("pss", || {
        assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, &context)
    });
    if matches!(mode, "shared-anon" | "memfd" | "sysv-shm") {
        checks.run("pss shmem", || {
            assert_pss_within(
                "Pss_Anon + Pss_Shmem",
                original.pss_anon_shmem,
                view.pss_anon_shmem,
                zero,
                &context,
            )
        });
    }
    checks.run("running", || {
        restored.assert_running(original.procs.len(), &context)
    });
    if mode == "sysv-shm" {
        // In the restored tree's own IPC namespace.
        checks.run("sysv segments", || {
            assert_same_segments(
                &original_segments,
                &sysv_segments(Some(restored.root), &tree),
                &context,
            )
        });
    }
    checks.run("verify", || {
        restored.assert_verifies(&tree.report, &context)
    });
    checks.run("running after verify", || {
        restored.assert_running(original.procs.len(), &format!("{context}, after verifying"))
    });
    // The original was never touched.
    checks.run("original", || {
        tree.assert_running_untraced(&format!("{mode}: original after the restore"));
        tree.assert_verifies(&format!("{mode}: original after the restore"));
    });
    if mode == "plain" {
        checks.run("sharing", || {
            assert_eq!(
                summary_copied(&output),
                Some(0),
                "plain: the restore copied pages (lost sharing):\n{}",
                describe(&output)
            )
        });
    }
    checks.finish(&context);
}

macro_rules! mode_tests {
    ($($name:ident => $mode:literal,)*) => {$(
        #[test]
        fn $name() {
            restore_mode($mode);
        }
    )*};
}

mode_tests! {
    restore_plain => "plain",
    restore_split_vma => "split-vma",
    restore_moved_vma => "moved-vma",
    restore_parent_dirty => "parent-dirty",
    restore_sibling => "sibling",
    restore_reparented => "reparented",
    restore_deep_chain => "deep-chain",
    restore_threads => "threads",
    restore_shared_anon => "shared-anon",
    restore_memfd => "memfd",
    restore_sysv_shm => "sysv-shm",
}

// ------------------------------------------------------------ SysV shm

/// What /proc/sysvipc/shm says about one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SegmentView {
    key: i32,
    /// Permission bits (and SHM_DEST / SHM_LOCKED).
    perms: u32,
    size: u64,
    nattch: u64,
}

/// The workload's reported segments as /proc/sysvipc/shm shows them, in
/// this process's IPC namespace or (`Some(pid)`) in `pid`'s, by shmid.
fn sysv_segments(ns_of: Option<i32>, tree: &RefTree) -> BTreeMap<i32, SegmentView> {
    // /proc/sysvipc/shm shows the reader's namespace: read it from a
    // thread that entered the other one.
    let text = thread::spawn(move || {
        if let Some(pid) = ns_of {
            let ns = fs::File::open(format!("/proc/{pid}/ns/ipc"))
                .unwrap_or_else(|e| panic!("open the IPC namespace of pid {pid}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWIPC)
                .unwrap_or_else(|e| panic!("enter the IPC namespace of pid {pid}: {e}"));
        }
        fs::read_to_string("/proc/sysvipc/shm").expect("read /proc/sysvipc/shm")
    })
    .join()
    .expect("namespace reader thread");
    let ids: Vec<i32> = tree.segments().iter().map(|s| s.0).collect();
    assert_eq!(
        ids.len(),
        2,
        "the workload reported {ids:?}, not two segments"
    );
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("/proc/sysvipc/shm has no {name} column"))
    };
    let (key, shmid, perms, size, nattch) = (
        col("key"),
        col("shmid"),
        col("perms"),
        col("size"),
        col("nattch"),
    );
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let id: i32 = f.get(shmid)?.parse().ok()?;
            ids.contains(&id).then(|| {
                let field = |k: usize| f.get(k).copied().unwrap_or_default();
                (
                    id,
                    SegmentView {
                        key: field(key).parse().unwrap_or(-1),
                        perms: u32::from_str_radix(field(perms), 8).unwrap_or(u32::MAX),
                        size: field(size).parse().unwrap_or(0),
                        nattch: field(nattch).parse().unwrap_or(u64::MAX),
                    },
                )
            })
        })
        .collect()
}

/// The same shmids with the same key, mode, size and number of attachments.
fn assert_same_segments(
    original: &BTreeMap<i32, SegmentView>,
    restored: &BTreeMap<i32, SegmentView>,
    context: &str,
) {
    assert_eq!(
        original.len(),
        2,
        "{context}: the original's segments: {original:?}"
    );
    assert_eq!(
        restored, original,
        "{context}: SysV segments (by shmid) differ from the original's"
    );
}

fn ipcrm(shmid: i32) {
    let status = Command::new("ipcrm")
        .args(["-m", &shmid.to_string()])
        .status()
        .expect("run ipcrm");
    assert!(status.success(), "ipcrm -m {shmid} failed");
}

/// After `dump --exit` the killed tree's segments stay (SIGKILL removes
/// none); once they are gone, a restore into the current namespaces gets
/// them back with their ids, keys and modes in this IPC namespace.
#[test]
fn restore_sysv_shm_in_current_namespace_after_dump_exit() {
    let mut tree = RefTree::start(TreeSpec::small("sysv-shm"));
    let original = TreeView::take(&tree.pids());
    let segments = sysv_segments(None, &tree);
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");
    for &id in segments.keys() {
        ipcrm(id);
    }
    let pidfile = dir.path().join("restored.pid");
    let (restored, _) = restore_ok(&images, &pidfile, &[]);
    let context = "sysv-shm restored into the current namespaces";
    assert_eq!(
        restored.root, tree.root,
        "{context}: the restored root's pid"
    );
    let view = TreeView::take(&restored.pids());
    assert_same_maps(&original, &view, context);
    assert_same_segments(&segments, &sysv_segments(None, &tree), context);
    restored.assert_running(original.procs.len(), context);
    restored.assert_verifies(&tree.report, context);
}

/// A segment id still taken fails the restore, naming it; the segments the
/// restore created before are removed, the one in the way is not.
#[test]
fn restore_sysv_shm_with_id_taken_fails_cleanly() {
    let mut tree = RefTree::start(TreeSpec::small("sysv-shm"));
    let pids = tree.pids();
    let segments = sysv_segments(None, &tree);
    let reported = tree.segments();
    let attached = reported.iter().find(|s| s.1).map(|s| s.0);
    let unattached = reported.iter().find(|s| !s.1).map(|s| s.0);
    let (Some(attached), Some(unattached)) = (attached, unattached) else {
        panic!("the workload reported {reported:?}");
    };
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");
    // The attached segment comes first in the image; only the other one is
    // in the way, and someone attached it after the dump: it is not the
    // tree's leftover any more (a leftover nobody used since is replaced,
    // see restore_replaces_the_segment_its_tree_left).
    ipcrm(attached);
    thread::sleep(Duration::from_millis(1100));
    attach_and_detach(unattached);
    let segments_before = sysv_segments(None, &tree);
    let pidfile = dir.path().join("restored.pid");
    let output = run_restore(&images, &pidfile, &[]);
    let context = "a SysV segment of the image still exists";
    assert_restore_failed(&output, &pidfile, &format!("shmid {unattached}"), context);
    assert_nothing_left(&[dir.path(), tree.dir.path()], &pids, context);
    let now = sysv_segments(None, &tree);
    assert!(
        !now.contains_key(&attached),
        "{context}: the segment the restore created ({attached}) is still there: {now:?}"
    );
    assert_eq!(
        now.get(&unattached),
        segments_before.get(&unattached),
        "{context}: the segment in the way was touched"
    );
    assert!(segments.contains_key(&unattached));
}

/// shmat + shmdt of `shmid`, read-only: it counts as used since.
fn attach_and_detach(shmid: i32) {
    // SAFETY: a read-only attach at an address the kernel picks, detached at once.
    unsafe {
        let at = libc::shmat(shmid, std::ptr::null(), libc::SHM_RDONLY);
        assert_ne!(
            at as isize,
            -1,
            "shmat {shmid}: {}",
            std::io::Error::last_os_error()
        );
        libc::shmdt(at);
    }
}

/// After `dump --exit`, the tree's unattached segment stays (SysV segments
/// outlive their processes); unused since, it is the tree's own leftover
/// and the restore in the same namespace replaces it with the image's.
#[test]
fn restore_replaces_the_segment_its_tree_left() {
    let mut tree = RefTree::start(TreeSpec::small("sysv-shm"));
    let reported = tree.segments();
    let unattached = reported
        .iter()
        .find(|s| !s.1)
        .map(|s| s.0)
        .unwrap_or_else(|| panic!("the workload reported {reported:?}"));
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");
    assert!(
        sysv_segments(None, &tree).contains_key(&unattached),
        "the unattached segment outlives the tree"
    );
    let pidfile = dir.path().join("restored.pid");
    let (restored, _) = restore_ok(&images, &pidfile, &[]);
    assert!(
        sysv_segments(None, &tree).contains_key(&unattached),
        "the segment is back under its id"
    );
    drop(restored);
    for (id, _) in sysv_segments(None, &tree) {
        ipcrm(id);
    }
}

// ------------------------------------------------------------ current namespace

#[test]
fn restore_plain_in_current_namespace_after_dump_exit() {
    let mut tree = RefTree::start(TreeSpec::small("plain"));
    let original = TreeView::take(&tree.pids());
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");
    let zero = zero_pages(&images);

    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &[]);
    eprintln!(
        "current: {}",
        String::from_utf8_lossy(&output.stdout).trim()
    );
    assert_eq!(restored.root, tree.root, "the restored root's pid");
    assert!(
        restored.init.is_none(),
        "a restore into the current namespace made a {INIT_COMM}"
    );
    let view = TreeView::take(&restored.pids());
    let context = "plain, restored into the current pid namespace";
    assert_eq!(view.outer_pids(), original.outer_pids(), "{context}: pids");
    assert_same_structure(&original, &view, context);
    let mut errors = Vec::new();
    for (pid, o) in &original.procs {
        let r = &view.procs[pid];
        assert_eq!(r.outer, *pid, "{context}: pid {pid} is {} here", r.outer);
        if r.pgid_sid != o.pgid_sid {
            errors.push(format!(
                "pid {pid}: (pgid, sid) {:?}, was {:?}",
                r.pgid_sid, o.pgid_sid
            ));
        }
        if r.exe != o.exe {
            errors.push(format!("pid {pid}: exe {:?}, was {:?}", r.exe, o.exe));
        }
    }
    assert!(errors.is_empty(), "{context}:\n  {}", errors.join("\n  "));
    assert_same_maps(&original, &view, context);
    assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, context);
    // Total Pss, file pages included: the image records the file pages the
    // original had mapped and the restorer maps them again.
    assert_pss_within("Pss", original.pss, view.pss, zero, context);
    restored.assert_running(original.procs.len(), context);
    restored.assert_verifies(&tree.report, context);
    restored.assert_running(original.procs.len(), &format!("{context}, after verifying"));
    assert_eq!(
        summary_copied(&output),
        Some(0),
        "plain: the restore copied pages (lost sharing):\n{}",
        describe(&output)
    );
}

/// Rewrites an image of the current format as format 1.4 wrote it: every
/// process's page runs back in its JSON (`vmas[i].pages`), no
/// `proc-<pid>.runs` files, minor version 4, checksums fixed.
fn as_format_1_4(images: &Path) {
    without_plan(images);
    let manifest_path = images.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).expect("manifest"))
            .expect("manifest.json");
    let names: Vec<String> = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["name"].as_str().map(String::from))
        .collect();
    let mut converted = 0;
    for name in names
        .iter()
        .filter(|n| n.starts_with("proc-") && n.ends_with(".json"))
    {
        let path = images.join(name);
        let mut process: cowsnap::image::types::ProcessImage =
            serde_json::from_slice(&fs::read(&path).expect("process file")).expect("process json");
        let runs = process
            .runs_file
            .take()
            .expect("a process file of format 1.5 names its runs");
        let bytes = fs::read(images.join(&runs)).expect("runs file");
        cowsnap::image::runs::decode_into(&runs, &bytes, &mut process.vmas, 4096).expect("runs");
        assert!(
            process.vmas.iter().all(|v| !v.pages.is_empty()),
            "{name}: runs decoded"
        );
        fs::write(&path, serde_json::to_vec(&process).expect("json")).expect("write process");
        fs::remove_file(images.join(&runs)).expect("remove runs file");
        manifest["files"]
            .as_array_mut()
            .expect("files")
            .retain(|f| f["name"] != runs.as_str());
        converted += 1;
    }
    assert!(converted > 1, "converted {converted} process files");
    manifest["format_version"]["minor"] = 4.into();
    fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("write");
    for name in names
        .iter()
        .filter(|n| n.starts_with("proc-") && n.ends_with(".json"))
    {
        rechecksum_in_manifest(images, name);
    }
}

/// The image as format 1.5 wrote it: no `plan.bin` (restore plans it).
fn without_plan(images: &Path) {
    let manifest_path = images.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).expect("manifest"))
            .expect("manifest.json");
    let files = manifest["files"].as_array_mut().expect("files");
    let before = files.len();
    files.retain(|f| f["name"] != "plan.bin");
    assert_eq!(files.len() + 1, before, "a fresh image lists plan.bin");
    fs::remove_file(images.join("plan.bin")).expect("remove plan.bin");
    manifest["format_version"]["minor"] = 5.into();
    fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("write");
}

/// How the restore got its plan, from its summary line.
fn plan_source(output: &Output) -> &'static str {
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("(plan from the image)") {
        "stored"
    } else if text.contains("(planned at restore)") {
        "planned"
    } else {
        "unknown"
    }
}

/// A fresh image restores from the plan stored in it; the same image as
/// format 1.5 wrote it (no plan) is planned at restore and comes back the
/// same: maps, sharing, memory.
#[test]
fn an_image_restores_from_its_stored_plan_and_one_without_a_plan_is_planned() {
    for stored in [true, false] {
        let mut tree = RefTree::start(TreeSpec::small("moved-vma"));
        let original = TreeView::take(&tree.pids());
        let (dir, images) = image_dir("restore");
        dump_ok(&tree, &images, &["--exit"]);
        tree.wait_exited("after dump --exit");
        let zero = zero_pages(&images);
        if !stored {
            without_plan(&images);
        }
        let verify = cowsnap(&["verify", path_str(&images)]);
        let said = String::from_utf8_lossy(&verify.stdout).into_owned();
        assert!(
            verify.status.success()
                && said.contains(if stored {
                    "the stored plan matches"
                } else {
                    "no stored plan"
                }),
            "verify (plan stored: {stored}): {}",
            describe(&verify)
        );
        let pidfile = dir.path().join("restored.pid");
        let (restored, output) = restore_ok(&images, &pidfile, &[]);
        let context = format!("moved-vma, plan stored: {stored}");
        assert_eq!(
            plan_source(&output),
            if stored { "stored" } else { "planned" },
            "{context}: {}",
            describe(&output)
        );
        let view = TreeView::take(&restored.pids());
        assert_eq!(view.outer_pids(), original.outer_pids(), "{context}: pids");
        assert_same_maps(&original, &view, &context);
        assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, &context);
        restored.assert_verifies(&tree.report, &context);
        assert_eq!(summary_copied(&output), Some(0), "{context}");
    }
}

/// A stored plan that is not this image's is refused before any process
/// exists: one left from before the image's process files were changed
/// (its binding no longer matches), and one edited to name a process the
/// tree does not have (binding kept). `verify` refuses both too.
#[test]
fn a_plan_that_does_not_match_its_image_is_refused() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    for case in ["process file changed", "plan edited"] {
        let (dir, images) = image_dir("restore");
        dump_ok(&tree, &images, &[]);
        let needle = match case {
            "process file changed" => {
                // The same process, written again: another checksum.
                let name = format!("proc-{}.json", tree.root);
                let value: serde_json::Value =
                    serde_json::from_slice(&fs::read(images.join(&name)).expect("read"))
                        .expect("process json");
                fs::write(
                    images.join(&name),
                    serde_json::to_vec_pretty(&value).expect("json"),
                )
                .expect("write");
                rechecksum_in_manifest(&images, &name);
                "plan.bin was made for other files than this image's"
            }
            _ => {
                // Magic, binding, staging and the figures take 80 bytes;
                // then the segment count and segment 0's holder.
                let bytes = fs::read(images.join("plan.bin")).expect("read plan.bin");
                let mut raw = zstd::decode_all(&bytes[..]).expect("decompress plan.bin");
                assert_eq!(&raw[..8], b"CSPLAN01", "plan.bin magic");
                assert!(
                    u64::from_le_bytes(raw[80..88].try_into().expect("8 bytes")) > 0,
                    "the plan has segments"
                );
                raw[88..96].copy_from_slice(&1000u64.to_le_bytes());
                fs::write(
                    images.join("plan.bin"),
                    zstd::encode_all(&raw[..], 3).expect("compress"),
                )
                .expect("write plan.bin");
                rechecksum_in_manifest(&images, "plan.bin");
                "plan.bin: segment holder 1000 is out of range"
            }
        };
        let pidfile = dir.path().join("restored.pid");
        let output = run_restore(&images, &pidfile, &["--pid-ns", "new"]);
        assert_restore_failed(&output, &pidfile, needle, case);
        assert_nothing_left(&[dir.path(), tree.dir.path()], &tree.pids(), case);
        let verify = cowsnap(&["verify", path_str(&images)]);
        assert!(
            !verify.status.success() && String::from_utf8_lossy(&verify.stderr).contains(needle),
            "{case}: verify should refuse the image too:
{}",
            describe(&verify)
        );
    }
    tree.assert_running_untraced("after the refused restores");
}

/// An image written before format 1.5 (page runs in the process JSON)
/// restores as it did, sharing and memory included.
#[test]
fn an_image_of_format_1_4_with_runs_in_json_still_restores() {
    let mut tree = RefTree::start(TreeSpec::small("plain"));
    let original = TreeView::take(&tree.pids());
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");
    let zero = zero_pages(&images);
    as_format_1_4(&images);
    let verify = Command::new(cowsnap_bin())
        .args(["verify"])
        .arg(&images)
        .output()
        .expect("run cowsnap verify");
    assert!(
        verify.status.success(),
        "verify of the 1.4 image: {}",
        describe(&verify)
    );

    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &[]);
    let context = "plain, image rewritten as format 1.4";
    let view = TreeView::take(&restored.pids());
    assert_eq!(view.outer_pids(), original.outer_pids(), "{context}: pids");
    assert_same_maps(&original, &view, context);
    assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, context);
    restored.assert_verifies(&tree.report, context);
    assert_eq!(
        summary_copied(&output),
        Some(0),
        "{context}: {}",
        describe(&output)
    );
}

// ------------------------------------------------------------ twice at once

#[test]
fn same_image_restored_twice_at_once() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let original = TreeView::take(&tree.pids());
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let zero = zero_pages(&images);

    let pidfiles = [dir.path().join("a.pid"), dir.path().join("b.pid")];
    let children: Vec<Child> = pidfiles
        .iter()
        .map(|p| spawn_restore(&images, p, &["--pid-ns", "new"]))
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .zip(&pidfiles)
        .map(|(c, p)| wait_restore(c, p))
        .collect();
    // Take charge of whatever was restored before asserting anything.
    let results: Vec<Result<Restored, String>> = outputs
        .iter()
        .zip(&pidfiles)
        .map(|(o, p)| restored_tree(o, p))
        .collect();
    let mut trees = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(t) => trees.push(t),
            Err(e) => panic!("restore #{i} of two at once failed:\n{e}"),
        }
    }
    assert_ne!(trees[0].root, trees[1].root, "two restores, one root");
    for (i, restored) in trees.iter().enumerate() {
        let context = format!("restore #{i} of two at once");
        restored.assert_in_new_namespace(original.root);
        let view = TreeView::take(&restored.pids());
        assert_same_structure(&original, &view, &context);
        assert_same_maps(&original, &view, &context);
        assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, &context);
        restored.assert_running(original.procs.len(), &context);
    }
    // The check the failure tests rely on sees restored trees and their inits.
    let seen = leftovers(&[tree.dir.path(), dir.path()], &tree.pids());
    for restored in &trees {
        for pid in restored.pids().into_iter().chain(restored.init) {
            assert!(
                seen.iter().any(|l| l.starts_with(&format!("pid {pid} "))),
                "leftovers() misses restored pid {pid}: {seen:?}"
            );
        }
    }
    // One tree at a time: both report the same namespace pids into one file.
    for (i, restored) in trees.iter().enumerate() {
        restored.assert_verifies(&tree.report, &format!("restore #{i} of two at once"));
    }
    tree.assert_verifies("original after two restores");
}

// ------------------------------------------------------------ the caller's stdio

/// Who holds an open fd on `link` (e.g. "pipe:[123]"): "pid/fd" strings.
fn holders(link: &str) -> Vec<String> {
    all_pids()
        .into_iter()
        .flat_map(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|dir| {
                    dir.filter_map(|e| {
                        let e = e.ok()?;
                        let target = fs::read_link(e.path()).ok()?;
                        (target.to_string_lossy() == link).then(|| {
                            format!(
                                "{pid} ({}) fd {}",
                                comm(pid),
                                e.file_name().to_string_lossy()
                            )
                        })
                    })
                    .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// `cowsnap restore` returns once the tree runs; a caller reading its
/// output through a pipe (a shell's `$(...)`, a supervisor) must then see
/// end-of-file: nothing the restore leaves running may hold the caller's
/// stdout or stderr. (The restored processes get the fds of the image.)
#[test]
fn restore_leaves_callers_stdio_alone() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let pidfile = dir.path().join("restored.pid");
    let mut child = Command::new(cowsnap_bin())
        .args([
            "restore",
            "-q",
            "--images",
            path_str(&images),
            "--pidfile",
            path_str(&pidfile),
        ])
        .args(["--pid-ns", "new"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cowsnap restore");
    let links: Vec<String> = ["1", "2"]
        .iter()
        .map(|fd| {
            fs::read_link(format!("/proc/{}/fd/{fd}", child.id()))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    // Read both pipes to end-of-file on threads; the restore's exit status
    // is collected separately, so a held pipe cannot hang the test.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<u8>)>();
    for (i, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = std::io::Read::read_to_end(&mut pipe, &mut bytes);
            }
            let _ = tx.send((i, bytes));
        });
    }
    drop(tx);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "cowsnap restore did not finish within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(10));
    };
    let mut outputs: [Option<Vec<u8>>; 2] = [None, None];
    let eof_deadline = Instant::now() + Duration::from_secs(10);
    while outputs.iter().any(Option::is_none) {
        let left = eof_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, bytes)) => outputs[i] = Some(bytes),
            Err(_) => break,
        }
    }
    let output = Output {
        status,
        stdout: outputs[0].clone().unwrap_or_default(),
        stderr: outputs[1].clone().unwrap_or_default(),
    };
    let restored =
        restored_tree(&output, &pidfile).unwrap_or_else(|e| panic!("cowsnap restore failed:\n{e}"));
    let held: Vec<String> = outputs
        .iter()
        .zip(&links)
        .zip(["stdout", "stderr"])
        .filter(|((out, _), _)| out.is_none())
        .map(|((_, link), name)| {
            // This test holds the read ends itself.
            let me = format!("{} ", std::process::id());
            let others: Vec<String> = holders(link)
                .into_iter()
                .filter(|h| !h.starts_with(&me))
                .collect();
            format!("{name} ({link}) held by {others:?}")
        })
        .collect();
    assert!(
        held.is_empty(),
        "10 s after cowsnap restore exited, its stdout/stderr pipes are still open: {}",
        held.join("; ")
    );
    restored.assert_verifies(&tree.report, "restored with piped stdio");
}

// ------------------------------------------------------------ failures

/// Processes this test may have left: a workload process, a namespace
/// init, or a restorer runtime (`cowsnap`) whose command line mentions one
/// of `markers` (this test's own directories), other than `allowed`.
fn leftovers(markers: &[&Path], allowed: &[i32]) -> Vec<String> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me && !allowed.contains(p))
        .filter_map(|pid| {
            let name = comm(pid);
            if name != WORKLOAD_COMM && name != INIT_COMM && name != "cowsnap" {
                return None;
            }
            let line = cmdline(pid);
            markers.iter().any(|m| line.contains(path_str(m))).then(|| {
                format!(
                    "pid {pid} {name} ({}) ppid {}: {line}",
                    task_state(pid),
                    ppid(pid)
                )
            })
        })
        .collect()
}

fn assert_nothing_left(markers: &[&Path], allowed: &[i32], context: &str) {
    // Killed processes take a moment to be torn down and reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = leftovers(markers, allowed);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: a failed restore left processes behind:\n  {}",
            left.join("\n  ")
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A failed restore: non-zero exit, `needle` in its message, no pid file.
fn assert_restore_failed(output: &Output, pidfile: &Path, needle: &str, context: &str) {
    let restored = if output.status.success() {
        restored_tree(output, pidfile).ok()
    } else {
        None
    };
    assert!(
        !output.status.success(),
        "{context}: restore should have failed:\n{}",
        describe(output)
    );
    drop(restored);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{context}: {}", stderr.trim());
    assert!(
        stderr.contains(needle),
        "{context}: the error should contain {needle:?}:\n{}",
        describe(output)
    );
    assert!(
        !pidfile.exists(),
        "{context}: a failed restore wrote the pid file {}",
        pidfile.display()
    );
}

#[test]
fn restore_of_corrupted_pages_fails_cleanly() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let pages = images.join("pages");
    let mut bytes = fs::read(&pages).unwrap_or_else(|e| panic!("read {}: {e}", pages.display()));
    assert!(bytes.len() > 16, "{} is nearly empty", pages.display());
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&pages, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", pages.display()));

    let pidfile = dir.path().join("restored.pid");
    let output = run_restore(&images, &pidfile, &["--pid-ns", "new"]);
    let context = "a byte of `pages` flipped";
    assert_restore_failed(&output, &pidfile, "pages", context);
    assert_nothing_left(&[dir.path(), tree.dir.path()], &tree.pids(), context);
    tree.assert_running_untraced(context);
    tree.assert_verifies(context);
}

/// Rewrites `xxh3_128` and `size` of `name` in the image's manifest to
/// match the file as it is now.
fn rechecksum_in_manifest(images: &Path, name: &str) {
    let path = images.join("manifest.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest.json");
    let bytes = fs::read(images.join(name)).expect("image file");
    let files = manifest["files"]
        .as_array_mut()
        .expect("manifest.json files");
    let entry = files
        .iter_mut()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in manifest.json"));
    entry["xxh3_128"] = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)).into();
    entry["size"] = (bytes.len() as u64).into();
    fs::write(&path, serde_json::to_vec_pretty(&manifest).expect("json")).expect("write manifest");
}

/// Frame 0 of `pages` replaced by a valid zstd frame of altered pages, the
/// index's offsets and lengths and the manifest's file checksums rewritten
/// to match: only the frame's own checksum in `pages.index.json` (which
/// stays) tells. The restore must refuse it before creating any process.
#[test]
fn restore_checks_every_frame_before_creating_processes() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let index_path = images.join("pages.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).expect("read index")).expect("index json");
    let pages = fs::read(images.join("pages")).expect("read pages");
    let frames = index["frames"].as_array_mut().expect("frames");
    let (offset, len) = (
        frames[0]["offset"].as_u64().expect("offset") as usize,
        frames[0]["compressed_len"]
            .as_u64()
            .expect("compressed_len") as usize,
    );
    let mut raw = zstd::decode_all(&pages[offset..offset + len]).expect("decompress frame 0");
    let at = raw.len() / 2;
    raw[at] ^= 0x5a;
    let altered = zstd::encode_all(&raw[..], 1).expect("compress frame 0");
    let delta = altered.len() as i64 - len as i64;
    let mut new_pages = pages[..offset].to_vec();
    new_pages.extend_from_slice(&altered);
    new_pages.extend_from_slice(&pages[offset + len..]);
    frames[0]["compressed_len"] = (altered.len() as u64).into();
    for frame in frames.iter_mut().skip(1) {
        let off = frame["offset"].as_u64().expect("offset") as i64;
        frame["offset"] = ((off + delta) as u64).into();
    }
    fs::write(images.join("pages"), &new_pages).expect("write pages");
    fs::write(
        &index_path,
        serde_json::to_vec_pretty(&index).expect("json"),
    )
    .expect("write index");
    rechecksum_in_manifest(&images, "pages");
    rechecksum_in_manifest(&images, "pages.index.json");

    let pidfile = dir.path().join("restored.pid");
    let err = fs::File::create(dir.path().join("restore.stderr")).expect("stderr file");
    let mut child = Command::new(cowsnap_bin())
        .args(["restore", "--images", path_str(&images), "--pid-ns", "new"])
        .arg("--pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn cowsnap restore");
    let status = wait_status(&mut child, "cowsnap restore");
    let stderr = fs::read_to_string(dir.path().join("restore.stderr")).unwrap_or_default();
    let context = "frame 0 altered, its index checksum kept";
    eprintln!("{context}: {}", stderr.trim());
    assert!(
        !status.success(),
        "{context}: the restore succeeded: {stderr}"
    );
    assert!(
        stderr.contains("frame 0") && stderr.contains("xxh3-64"),
        "{context}: the error should name frame 0 and its checksum: {stderr}"
    );
    assert!(
        !stderr.contains("restoring "),
        "{context}: processes were created before the frame was checked: {stderr}"
    );
    assert!(!pidfile.exists(), "{context}: a pid file was written");
    assert_nothing_left(&[dir.path(), tree.dir.path()], &tree.pids(), context);
    let verify = cowsnap(&["verify", path_str(&images)]);
    assert!(
        !verify.status.success() && String::from_utf8_lossy(&verify.stderr).contains("frame 0"),
        "{context}: verify should refuse the image too:\n{}",
        describe(&verify)
    );
    tree.assert_running_untraced(context);
}

#[test]
fn restore_with_opened_file_gone_fails_cleanly() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    // Every process of the tree holds the report file open.
    fs::remove_file(&tree.report)
        .unwrap_or_else(|e| panic!("remove {}: {e}", tree.report.display()));

    let pidfile = dir.path().join("restored.pid");
    let output = run_restore(&images, &pidfile, &["--pid-ns", "new"]);
    let context = "the report file deleted";
    assert_restore_failed(&output, &pidfile, path_str(&tree.report), context);
    assert_nothing_left(&[dir.path(), tree.dir.path()], &tree.pids(), context);
    assert!(
        !tree.report.exists(),
        "{context}: the restore recreated {}",
        tree.report.display()
    );
    tree.assert_running_untraced(context);
}

#[test]
fn restore_into_current_namespace_with_pids_taken_fails_cleanly() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let pids = tree.pids();
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);

    let pidfile = dir.path().join("restored.pid");
    let output = run_restore(&images, &pidfile, &[]);
    let context = "the original still running in this namespace";
    assert_restore_failed(&output, &pidfile, "is taken", context);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let taken = stderr
        .split("pid ")
        .filter_map(|rest| {
            let (num, after) = rest.split_once(' ')?;
            after
                .starts_with("is taken")
                .then(|| num.parse::<i32>().ok())?
        })
        .next();
    assert!(
        taken.is_some_and(|p| pids.contains(&p)),
        "{context}: the error should say \"pid N is taken\" with N one of {pids:?}:\n{}",
        describe(&output)
    );
    assert_nothing_left(&[dir.path(), tree.dir.path()], &pids, context);
    tree.assert_running_untraced(context);
    tree.assert_verifies(context);
}

/// `restore --pidfile FILE` where FILE cannot be created, or where writing
/// fails (`/dev/full`): the restore fails naming the file, and nothing of
/// the tree is left running (neither its processes nor its namespace init).
#[test]
fn restore_with_unwritable_pidfile_leaves_nothing_running() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let pids = tree.pids();
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let missing_dir = dir.path().join("no-such-dir").join("restored.pid");
    for pidfile in [missing_dir.as_path(), Path::new("/dev/full")] {
        let context = format!("--pidfile {}", pidfile.display());
        let out = fs::File::create(dir.path().join("restore.stdout")).expect("stdout file");
        let err = fs::File::create(dir.path().join("restore.stderr")).expect("stderr file");
        let mut child = Command::new(cowsnap_bin())
            .args(["restore", "-q", "--images", path_str(&images)])
            .args(["--pid-ns", "new", "--pidfile", path_str(pidfile)])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn cowsnap restore");
        let status = wait_status(&mut child, "cowsnap restore");
        let stderr = fs::read_to_string(dir.path().join("restore.stderr")).unwrap_or_default();
        eprintln!("{context}: {}", stderr.trim());
        assert!(
            !status.success(),
            "{context}: the restore should have failed ({status}): {stderr}"
        );
        assert!(
            stderr.contains(path_str(pidfile)),
            "{context}: the error should name the pid file: {stderr}"
        );
        assert_nothing_left(&[dir.path(), tree.dir.path()], &pids, &context);
    }
    assert!(
        !missing_dir.exists(),
        "a pid file appeared in a missing directory"
    );
    tree.assert_running_untraced("after the failed restores");
    tree.assert_verifies("after the failed restores");
}

// ------------------------------------------------------------ the CLI

#[test]
fn restore_help_mentions_its_options() {
    let output = cowsnap(&["restore", "--help"]);
    assert!(
        output.status.success(),
        "restore --help:\n{}",
        describe(&output)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for option in ["--images", "--pidfile", "--pid-ns"] {
        assert!(
            text.contains(option),
            "restore --help does not mention {option}:\n{text}"
        );
    }
}

/// SIGKILL of `cowsnap restore` before it released the tree: every process
/// it created dies with it (each is armed with a parent-death signal until
/// the release), so nothing is left parked at the barrier or half built.
#[test]
fn killing_the_restore_midway_leaves_nothing_behind() {
    require_root();
    let tree = RefTree::start(TreeSpec {
        mib: 256,
        ..TreeSpec::small("plain")
    });
    let pids = tree.pids();
    let (dir, images) = image_dir("restore");
    dump_ok(&tree, &images, &[]);
    let pidfile = dir.path().join("restored.pid");
    let markers = [dir.path(), tree.dir.path()];
    let mut restore = spawn_restore(&images, &pidfile, &["--pid-ns", "new"]);
    let controller = restore.id() as i32;
    // Kill it as soon as the first process it creates exists: far before a
    // 256 MiB tree can be in place and released.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = leftovers(&markers, &pids).len() > 1; // the controller itself is one
        if created || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    kill(Pid::from_raw(controller), Signal::SIGKILL).expect("SIGKILL the restore");
    let status = restore.wait().expect("wait for cowsnap restore");
    assert!(!status.success(), "the killed restore reported success");
    let context = "cowsnap restore SIGKILLed before the release";
    assert_nothing_left(&markers, &pids, context);
    assert!(!pidfile.exists(), "{context}: a pid file was written");
    tree.assert_running_untraced(context);
    tree.assert_verifies(context);
}

// ------------------------------------------------------------ pending signals of threads

/// `SigPnd` and `ShdPnd` of every thread of `pids` (as seen from here), by
/// namespace tid.
fn pending_by_ns_tid(pids: &[i32]) -> BTreeMap<i32, (u64, u64)> {
    let mask = |status: &str, key: &str| {
        status_field(status, key)
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .unwrap_or_else(|| panic!("{key} missing or not hex in:\n{status}"))
    };
    let mut out = BTreeMap::new();
    for &pid in pids {
        for tid in tids(pid) {
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .unwrap_or_else(|e| panic!("status of tid {tid} of pid {pid}: {e}"));
            out.insert(
                ns_tid(pid, tid),
                (mask(&status, "SigPnd:"), mask(&status, "ShdPnd:")),
            );
        }
    }
    out
}

/// `PENDING <pid> <tid> ...` lines appended to `report` after byte `offset`,
/// by (pid, tid): the signals the workload's signal threads took.
fn pending_lines(report: &Path, offset: usize) -> BTreeMap<(i32, i32), String> {
    let text = fs::read_to_string(report).unwrap_or_default();
    text.get(offset..)
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            if fields.next()? != "PENDING" {
                return None;
            }
            let pid = fields.next()?.parse().ok()?;
            let tid = fields.next()?.parse().ok()?;
            Some(((pid, tid), fields.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// The real-time signal the workload's `thread-signals` mode queues (SIGRTMIN + 6 with glibc).
const PENDING_RT: i32 = 40;

#[test]
fn restore_keeps_pending_signals_of_non_leader_threads() {
    let bit = |sig: i32| 1u64 << (sig - 1);
    let tree = RefTree::start(TreeSpec::small("thread-signals"));
    let original = TreeView::take(&tree.pids());
    let before = pending_by_ns_tid(&tree.pids());
    // The workload did what the test relies on: one thread per process has
    // exactly SIGUSR2 and the RT signal pending for it alone.
    let want = bit(libc::SIGUSR2) | bit(PENDING_RT);
    let holders: Vec<i32> = before
        .iter()
        .filter(|(_, &(own, _))| own == want)
        .map(|(&tid, _)| tid)
        .collect();
    assert_eq!(
        holders.len(),
        original.procs.len(),
        "threads with SIGUSR2 and signal {PENDING_RT} pending in the original: {before:?}"
    );
    assert!(
        before
            .iter()
            .all(|(tid, &(own, shared))| shared == 0 && (own == 0 || holders.contains(tid))),
        "other pending signals in the original: {before:?}"
    );

    let (dir, images) = image_dir("restore-pending");
    dump_ok(&tree, &images, &[]);
    let pidfile = dir.path().join("restored.pid");
    let (restored, _) = restore_ok(&images, &pidfile, &["--pid-ns", "new"]);
    let view = TreeView::take(&restored.pids());
    let context = "thread-signals, restored into a new pid namespace";
    let mut checks = Checks::default();
    checks.run("structure", || {
        assert_same_structure(&original, &view, context)
    });
    checks.run("pending per thread", || {
        assert_eq!(
            pending_by_ns_tid(&restored.pids()),
            before,
            "{context}: SigPnd/ShdPnd by namespace tid differ from the original's"
        )
    });
    checks.run("running", || {
        restored.assert_running(original.procs.len(), context)
    });
    checks.finish(context);

    // Each signal thread takes what is pending for it: same signals, same
    // si_code, the RT signal's value intact.
    let offset = fs::metadata(&tree.report).map(|m| m.len()).unwrap_or(0) as usize;
    restored.assert_verifies(&tree.report, context);
    let mut expected = BTreeMap::new();
    for (&pid, p) in &original.procs {
        let tid = p
            .tids
            .iter()
            .copied()
            .find(|t| holders.contains(t))
            .unwrap_or_else(|| panic!("pid {pid}: no thread with pending signals"));
        expected.insert(
            (pid, tid),
            format!(
                "{}:-6:0x0 {PENDING_RT}:-1:{:#x}",
                libc::SIGUSR2,
                0x5eed_0000_0000u64 | tid as u64
            ),
        );
    }
    let deadline = Instant::now() + PATIENCE;
    let mut got = pending_lines(&tree.report, offset);
    while got.len() < expected.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        got = pending_lines(&tree.report, offset);
    }
    assert_eq!(
        got, expected,
        "{context}: signals the restored threads took (signo:si_code:value)"
    );
    assert!(
        pending_by_ns_tid(&restored.pids())
            .values()
            .all(|&(own, shared)| own == 0 && shared == 0),
        "{context}: signals still pending after the threads took them"
    );
}

// ------------------------------------------------------------ growsdown stacks

/// The [stack] VMA of `pid`: (start, VmFlags) from /proc/PID/smaps.
fn stack_of(pid: i32) -> (u64, Vec<String>) {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("smaps of pid {pid}: {e}"));
    let mut lines = smaps.lines().skip_while(|l| !l.ends_with("[stack]"));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("pid {pid} has no [stack] VMA"));
    let start = head
        .split('-')
        .next()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("pid {pid}: smaps line {head:?}"));
    let flags = lines
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .unwrap_or_else(|| panic!("pid {pid}: [stack] has no VmFlags"))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (start, flags)
}

/// How far below its start the workload's `stack-growth` mode grows the stack on SIGUSR1.
const STACK_GROWTH: u64 = 64 * 1024;

#[test]
fn restored_stacks_keep_growsdown_and_grow_on_demand() {
    let tree = RefTree::start(TreeSpec::small("stack-growth"));
    let original = TreeView::take(&tree.pids());
    for pid in tree.pids() {
        let (_, flags) = stack_of(pid);
        assert!(
            flags.iter().any(|f| f == "gd"),
            "original pid {pid}: [stack] VmFlags {flags:?} lack gd"
        );
    }
    let (dir, images) = image_dir("restore-stack");
    dump_ok(&tree, &images, &[]);
    let zero = zero_pages(&images);
    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &["--pid-ns", "new"]);
    let view = TreeView::take(&restored.pids());
    let context = "stack-growth, restored into a new pid namespace";
    let mut checks = Checks::default();
    checks.run("structure", || {
        assert_same_structure(&original, &view, context)
    });
    checks.run("maps", || assert_same_maps(&original, &view, context));
    checks.run("pss", || {
        assert_pss_within("Pss_Anon", original.pss_anon, view.pss_anon, zero, context)
    });
    checks.run("sharing", || {
        assert_eq!(
            summary_copied(&output),
            Some(0),
            "{context}: the restore copied pages (lost sharing):\n{}",
            describe(&output)
        )
    });
    let starts: BTreeMap<i32, u64> = view
        .procs
        .values()
        .map(|p| {
            let (start, flags) = stack_of(p.outer);
            checks.run("growsdown", || {
                assert!(
                    flags.iter().any(|f| f == "gd"),
                    "{context}: restored pid {}: [stack] VmFlags {flags:?} lack gd",
                    p.outer
                )
            });
            (p.outer, start)
        })
        .collect();
    checks.finish(context);

    // Each process recurses below its stack's start (it dies of SIGSEGV
    // if the stack cannot grow) and checks the VMA followed.
    restored.assert_verifies(&tree.report, context);
    restored.assert_running(original.procs.len(), &format!("{context}, after growing"));
    for (&pid, &before) in &starts {
        let (now, flags) = stack_of(pid);
        assert!(
            now + STACK_GROWTH <= before,
            "{context}: pid {pid}'s [stack] starts at {now:#x}, was {before:#x}: it did not grow by {STACK_GROWTH:#x}"
        );
        assert!(
            flags.iter().any(|f| f == "gd"),
            "{context}: pid {pid} {flags:?}"
        );
    }
}

// ------------------------------------------------------------ zombies

fn report_len(report: &Path) -> usize {
    fs::metadata(report).map_or(0, |m| m.len()) as usize
}

#[test]
fn restore_brings_zombies_back_and_the_root_reaps_them() {
    let tree = RefTree::start(TreeSpec::small("zombie"));
    let zombies: Vec<i32> = tree
        .report_text()
        .lines()
        .filter_map(|l| l.strip_prefix("ZOMBIE ")?.trim().parse().ok())
        .collect();
    assert_eq!(zombies.len(), 2, "zombie mode reports two zombies");
    let live: Vec<i32> = tree
        .pids()
        .into_iter()
        .filter(|p| !zombies.contains(p))
        .collect();
    let original = TreeView::take(&live);
    let (dir, images) = image_dir("restore-zombies");
    dump_ok(&tree, &images, &[]);

    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &["--pid-ns", "new"]);
    eprintln!("zombie: {}", String::from_utf8_lossy(&output.stdout).trim());
    restored.assert_in_new_namespace(original.root);
    let context = "zombie, restored into a new pid namespace";

    // Zombies again: same pids, same parent, not reaped by anybody.
    let all = restored.pids();
    let restored_zombies: Vec<i32> = all
        .iter()
        .copied()
        .filter(|&p| zombies.contains(&ns_pid(p)))
        .collect();
    assert_eq!(
        restored_zombies.len(),
        2,
        "{context}: zombies of the restored tree {all:?}"
    );
    for &z in &restored_zombies {
        assert!(
            task_state(z).starts_with('Z'),
            "{context}: pid {z} ({}) is in state {:?}",
            ns_pid(z),
            task_state(z)
        );
        assert_eq!(ppid(z), restored.root, "{context}: parent of zombie {z}");
        let stat = fs::read_to_string(format!("/proc/{z}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
        assert!(state.is_some_and(|s| s.starts_with('Z')), "{stat}");
    }
    let live_restored: Vec<i32> = all
        .iter()
        .copied()
        .filter(|p| !restored_zombies.contains(p))
        .collect();
    let view = TreeView::take(&live_restored);
    assert_same_structure(&original, &view, context);
    assert_same_maps(&original, &view, context);

    // Every live process verifies; the restored root reaps both zombies on
    // that SIGUSR1, with the statuses they died with.
    let offset = report_len(&tree.report);
    let targets: Vec<(i32, i32)> = live_restored.iter().map(|&p| (p, ns_pid(p))).collect();
    assert_processes_verify(&tree.report, &targets, context);
    let from_restored = reaped_after(&tree.report, offset);
    for &z in &restored_zombies {
        let gone = !Path::new(&format!("/proc/{z}")).exists();
        assert!(gone, "{context}: zombie {z} still there after the reap");
    }
    // What is left is the live tree, running (the zombies left on purpose).
    let mut left = restored.pids();
    left.sort_unstable();
    let mut want = live_restored.clone();
    want.sort_unstable();
    assert_eq!(left, want, "{context}: the tree after the reap");
    for &pid in &left {
        let state = task_state(pid);
        assert!(
            state.starts_with(['S', 'R']),
            "{context}, after the reap: pid {pid} in state {state:?}"
        );
    }

    // The original root, asked the same, reaps its own with the same statuses.
    let offset = report_len(&tree.report);
    let targets: Vec<(i32, i32)> = live.iter().map(|&p| (p, p)).collect();
    assert_processes_verify(&tree.report, &targets, "zombie: the original");
    let from_original = reaped_after(&tree.report, offset);
    let expected: BTreeMap<i32, String> = [
        (zombies[0], (7 << 8).to_string()),
        (zombies[1], libc::SIGTERM.to_string()),
    ]
    .into();
    assert_eq!(from_original, expected, "the original's zombies");
    assert_eq!(from_restored, from_original, "{context}: reaped statuses");
}

// ------------------------------------------------------------ shared file descriptions

/// `FILE <pid> <shared-fd> <own-fd>` lines of `shared-file` mode.
fn file_lines(report: &Path) -> BTreeMap<i32, (i32, i32)> {
    let text = fs::read_to_string(report).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("FILE ")?.split(' ');
            let mut next = || w.next()?.parse::<i32>().ok();
            Some((next()?, (next()?, next()?)))
        })
        .collect()
}

fn fd_pos(pid: i32, fd: i32) -> Option<u64> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("pos:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether `a` and `b` (pid, fd) are one open file description, per kcmp.
fn same_description(a: (i32, i32), b: (i32, i32)) -> bool {
    cowsnap::sys::kcmp::same_file(a.0, a.1, b.0, b.1)
        .unwrap_or_else(|e| panic!("kcmp {a:?} {b:?}: {e}"))
}

/// Asserts every process's shared fd is the root's description at pos 5,
/// and every own fd is a description of its own.
fn assert_file_sharing(files: &BTreeMap<i32, (i32, i32)>, root: i32, context: &str) {
    let (root_shared, root_own) = files[&root];
    for (&pid, &(shared, own)) in files {
        assert_eq!(
            fd_pos(pid, shared),
            Some(5),
            "{context}: pid {pid} fd {shared} pos"
        );
        assert!(
            same_description((root, root_shared), (pid, shared)),
            "{context}: pid {pid} fd {shared} is not the root's shared-file description"
        );
        if pid != root {
            assert!(
                !same_description((root, root_own), (pid, own)),
                "{context}: pid {pid} own-file fd {own} shares the root's description"
            );
        }
    }
}

#[test]
fn restore_shares_inherited_file_descriptions_only() {
    let mut tree = RefTree::start(TreeSpec::small("shared-file"));
    let files = file_lines(&tree.report);
    assert_eq!(
        files.len(),
        tree.pids().len(),
        "FILE lines: {}",
        tree.report_text()
    );
    assert_file_sharing(&files, tree.root, "shared-file, original");
    let original = TreeView::take(&tree.pids());
    let (dir, images) = image_dir("restore-shared-file");
    dump_ok(&tree, &images, &["--exit"]);
    tree.wait_exited("after dump --exit");

    let pidfile = dir.path().join("restored.pid");
    let (restored, _output) = restore_ok(&images, &pidfile, &[]);
    let context = "shared-file, restored into the current pid namespace";
    assert_eq!(restored.root, tree.root, "{context}: root pid");
    restored.assert_running(original.procs.len(), context);
    assert_file_sharing(&files, restored.root, context);
    restored.assert_verifies(&tree.report, context);
}

// ------------------------------------------------------------ a log that grows

/// Prints 1, 2, 3, ... a line every 20 ms (Python, unbuffered).
const COUNTER: &str =
    "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.02)\n";

/// A one-process tree whose stdout and stderr are `log` and `log.err`,
/// opened as `>>` opens them (write-only, O_APPEND).
fn start_counter(log: &Path) -> Child {
    let append = |path: &Path| {
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    };
    Command::new("/usr/bin/python3")
        .args(["-c", COUNTER])
        .stdin(Stdio::null())
        .stdout(append(log))
        .stderr(append(&log.with_extension("err")))
        .spawn()
        .expect("start python3")
}

/// The numbers of the complete lines of `log`.
fn log_numbers(log: &Path) -> Vec<u64> {
    let text = fs::read_to_string(log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    let complete = &text[..text.rfind('\n').map_or(0, |at| at + 1)];
    complete
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("line {l:?} of {}: {text:?}", log.display()))
        })
        .collect()
}

/// Waits until `log` has at least `lines` complete lines.
fn wait_log_lines(log: &Path, lines: usize, context: &str) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let numbers = log_numbers(log);
        if numbers.len() >= lines {
            return numbers;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: {} has {} lines, waited for {lines}",
            log.display(),
            numbers.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `size` of fd `fd` of `pid` as the image recorded it.
fn image_file_size(images: &Path, pid: i32, fd: i32) -> u64 {
    let path = images.join(format!("proc-{pid}.json"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("process JSON");
    json["fds"]
        .as_array()
        .and_then(|fds| fds.iter().find(|f| f["fd"] == fd))
        .and_then(|f| f["kind"]["size"].as_u64())
        .unwrap_or_else(|| panic!("no file size of fd {fd} in {}", path.display()))
}

/// Bytes that the lines "1\n" ... "k\n" take.
fn counter_bytes(k: u64) -> u64 {
    (1..=k).map(|n| n.to_string().len() as u64 + 1).sum()
}

#[test]
fn a_log_that_grew_after_a_dump_without_exit_is_restored_and_appended_to() {
    require_root();
    let (dir, images) = image_dir("restore-log");
    let log = dir.path().join("out.log");
    let mut child = start_counter(&log);
    let pid = child.id() as i32;
    let context = "stdout >> a log, dumped without --exit";
    wait_log_lines(&log, 5, context);
    let out = cowsnap(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(out.status.success(), "{context}: dump:\n{}", describe(&out));
    let dumped = image_file_size(&images, pid, 1);
    // The lines the original had written when it was dumped, and its own after.
    let k = (1..).find(|&k| counter_bytes(k) >= dumped).expect("k");
    assert_eq!(counter_bytes(k), dumped, "{context}: the image's log size");
    wait_log_lines(&log, k as usize + 10, context);
    let _ = child.kill();
    wait_status(&mut child, "the original counter");
    // Every line the original wrote, before the dump and after.
    let m = log_numbers(&log).len();
    assert!(
        fs::metadata(&log).expect("log").len() > dumped,
        "{context}: the log grew"
    );

    let pidfile = dir.path().join("restored.pid");
    let (restored, _output) = restore_ok(&images, &pidfile, &[]);
    assert_eq!(restored.root, pid, "{context}: the restored pid");
    let numbers = wait_log_lines(&log, m + 5, &format!("{context}, restored"));
    // 1..=m from the original (before and after the dump), then the
    // restored one going on from k + 1: appended, nothing overwritten.
    let before: Vec<u64> = (1..=m as u64).collect();
    assert_eq!(numbers[..m], before[..], "{context}: the original's lines");
    let restored_lines = &numbers[m..];
    let expected: Vec<u64> = (k + 1..).take(restored_lines.len()).collect();
    assert_eq!(
        restored_lines,
        &expected[..],
        "{context}: the restored counter's lines (dumped after line {k})"
    );
    restored.assert_running(1, context);
}

#[test]
fn a_log_that_shrank_after_the_dump_is_refused_naming_it() {
    require_root();
    let (dir, images) = image_dir("restore-log-shrunk");
    let log = dir.path().join("out.log");
    let mut child = start_counter(&log);
    let pid = child.id() as i32;
    let context = "stdout >> a log truncated after the dump";
    wait_log_lines(&log, 5, context);
    let out = cowsnap(&[
        "dump",
        "--exit",
        "--pid",
        &pid.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(out.status.success(), "{context}: dump:\n{}", describe(&out));
    wait_status(&mut child, "the counter after dump --exit");
    let dumped = image_file_size(&images, pid, 1);
    fs::write(&log, "1\n").expect("truncate the log");

    let pidfile = dir.path().join("restored.pid");
    let output = run_restore(&images, &pidfile, &[]);
    let needle = format!(
        "pid {pid}: fd 1 file {:?} size changed: image {dumped}, now 2",
        path_str(&log)
    );
    assert_restore_failed(&output, &pidfile, &needle, context);
    assert_nothing_left(&[dir.path()], &[], context);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{context}: pid {pid} runs"
    );
    assert_eq!(
        fs::read_to_string(&log).expect("log"),
        "1\n",
        "{context}: log untouched"
    );
}

// ------------------------------------------------------------ mount namespace

/// A shell run as `unshare --pid --fork --mount-proc sh -c SCRIPT`: pid 1
/// of a new pid namespace, in a private copy of this mount namespace with
/// a procfs of its own on /proc. Dropping it kills the namespace.
struct Unshared {
    child: Child,
    /// The shell, pid 1 of the namespace, as seen from here.
    init: i32,
}

impl Unshared {
    /// Starts `script`, which touches `ready` once its mounts are made.
    fn start(script: &str, ready: &Path) -> Unshared {
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn unshare --pid --fork --mount-proc sh");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("unshare sh -c {script:?} ended early: {status}");
            }
            assert!(Instant::now() < deadline, "sh -c {script:?} not ready");
            thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id();
        let init = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("children of unshare")
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the namespace's init");
        Unshared { child, init }
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        // While unshare lives its init's pid cannot have been reused.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.init), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs mounted in this (the test's) mount namespace, lazily unmounted
/// on drop.
struct LateMount(std::path::PathBuf);

impl LateMount {
    fn new(at: &Path) -> LateMount {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=64k",
                "cowsnap-late",
                path_str(at),
            ])
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount tmpfs on {}: {status}",
            at.display()
        );
        LateMount(at.to_path_buf())
    }
}

impl Drop for LateMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `/proc/PID/ns/mnt` (PID may be `self`).
fn mnt_ns(pid: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/mnt: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// Each mount of `/proc/PID/mountinfo` without its ids and propagation
/// tags: (root, mount point, flags, fstype, source, options).
fn mount_table(pid: &str) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mountinfo: {e}"))
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields
                .iter()
                .position(|f| *f == "-")
                .unwrap_or(fields.len());
            let mut kept: Vec<&str> = fields[3..6.min(fields.len())].to_vec();
            kept.extend(fields.get(dash + 1..).unwrap_or_default());
            kept.join(" ")
        })
        .collect()
}

/// The pids a procfs shows (its numeric entries), sorted.
fn procfs_pids(dir: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn restore_gives_the_tree_its_private_mount_namespace_with_its_procfs() {
    require_root();
    let (dir, images) = image_dir("mntns");
    let t = dir.path().join("t");
    fs::create_dir(&t).expect("mkdir t");
    let ready = dir.path().join("ready");
    let script = format!(
        "mount -t tmpfs -o size=1m,mode=700 cowsnap-mntns {t} || exit 1; \
         sleep 1000 & sleep 1000 & : > {ready}; wait",
        t = path_str(&t),
        ready = path_str(&ready)
    );
    let mut tree = Unshared::start(&script, &ready);
    // Mounted here after the tree's copy was made: the tree never saw it,
    // and its restored namespace (a copy of this one) must not either.
    let late = dir.path().join("late");
    fs::create_dir(&late).expect("mkdir late");
    let _late = LateMount::new(&late);
    let original_inside = procfs_pids(&format!("/proc/{}/root/proc", tree.init));
    assert_eq!(
        original_inside.len(),
        3,
        "sh and two sleeps: {original_inside:?}"
    );
    let before = mount_table("self");
    let ours = |m: &String| {
        let mountpoint = m.split(' ').nth(1).unwrap_or_default();
        mountpoint == "/proc" || m.contains(path_str(dir.path()))
    };

    let output = cowsnap(&[
        "dump",
        "--exit",
        "--pid",
        &tree.init.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(
        output.status.success(),
        "dump --exit:\n{}",
        describe(&output)
    );
    wait_status(&mut tree.child, "unshare once its init is gone");
    let tree_json = fs::read_to_string(images.join("tree.json")).expect("tree.json");
    let recorded: serde_json::Value = serde_json::from_str(&tree_json).expect("tree.json");
    assert_eq!(
        recorded["mount_ns"]["kind"], "private_copy",
        "mount_ns of tree.json: {}",
        recorded["mount_ns"]
    );
    let unmounted = recorded["mount_ns"]["unmounted"].to_string();
    assert!(
        unmounted.contains(path_str(&late)),
        "the late mount is not among those to detach: {unmounted}"
    );

    let pidfile = dir.path().join("restored.pid");
    let (restored, output) = restore_ok(&images, &pidfile, &[]);
    let context = "restored from unshare --mount-proc";
    let root = restored.root.to_string();
    assert_eq!(
        ns_pid(restored.root),
        1,
        "{context}: the root is its namespace's init"
    );
    restored.assert_running(3, context);
    let theirs = mnt_ns(&root);
    assert_ne!(
        theirs,
        mnt_ns("self"),
        "{context}: in the caller's mount namespace"
    );
    for pid in restored.pids() {
        assert_eq!(
            mnt_ns(&pid.to_string()),
            theirs,
            "{context}: pid {pid}'s mount namespace"
        );
    }
    // Their /proc is a procfs of the restored pid namespace: its pids, no other.
    let mut inside: Vec<i32> = restored.pids().into_iter().map(ns_pid).collect();
    inside.sort_unstable();
    assert_eq!(
        procfs_pids(&format!("/proc/{root}/root/proc")),
        inside,
        "{context}: the pids its /proc shows"
    );
    assert_eq!(inside, original_inside, "{context}: namespace pids");
    let table = mount_table(&root);
    let tmpfs = format!(
        "/ {} rw,relatime tmpfs cowsnap-mntns rw,size=1024k,mode=700",
        path_str(&t)
    );
    assert!(
        table.contains(&tmpfs),
        "{context}: no {tmpfs:?} in\n{}",
        table.join("\n")
    );
    assert!(
        !table.iter().any(|m| m.contains(path_str(&late))),
        "{context}: {} was mounted after the tree's copy, yet the restored tree has it:\n{}",
        late.display(),
        table.join("\n")
    );
    let last_on_proc = table
        .iter()
        .rev()
        .find(|m| m.split(' ').nth(1) == Some("/proc"));
    assert!(
        last_on_proc.is_some_and(|m| m.contains(" proc proc ")),
        "{context}: the top mount on /proc is {last_on_proc:?}"
    );

    // Nothing of it reached the caller's namespace (other tests on this
    // machine may mount elsewhere meanwhile: /proc and this test's
    // directory are what a leak would touch).
    let after = mount_table("self");
    let before_ours: Vec<&String> = before.iter().filter(|m| ours(m)).collect();
    let after_ours: Vec<&String> = after.iter().filter(|m| ours(m)).collect();
    assert_eq!(
        after_ours, before_ours,
        "{context}: the caller's mounts changed"
    );
    eprintln!(
        "{context}: {}",
        String::from_utf8_lossy(&output.stdout).trim()
    );
}

#[test]
fn dump_refuses_a_mount_namespace_with_a_bind_mount_and_leaves_the_tree_running() {
    require_root();
    let (dir, images) = image_dir("mntns-bind");
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::create_dir(&src).expect("mkdir src");
    fs::create_dir(&dst).expect("mkdir dst");
    let ready = dir.path().join("ready");
    let script = format!(
        "mount --bind {src} {dst} || exit 1; sleep 1000 & : > {ready}; wait",
        src = path_str(&src),
        dst = path_str(&dst),
        ready = path_str(&ready)
    );
    let mut tree = Unshared::start(&script, &ready);
    let pids = descendants(tree.init);
    assert_eq!(pids.len(), 2, "sh and sleep: {pids:?}");

    let output = cowsnap(&[
        "dump",
        "--exit",
        "--pid",
        &tree.init.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(!output.status.success(), "dump of a bind mount succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let why = format!(
        "pid {} lives in a mount namespace of its own whose mounts differ from this one's: {} (",
        tree.init,
        path_str(&dst)
    );
    assert!(
        stderr.contains(&why),
        "no {why:?} in:\n{}",
        describe(&output)
    );
    assert!(
        fs::read_dir(&images).map_or(true, |mut d| d.next().is_none()),
        "an image was left in {}",
        images.display()
    );
    assert!(
        matches!(tree.child.try_wait(), Ok(None)),
        "unshare ended: the tree was not left running"
    );
    assert_eq!(descendants(tree.init), pids, "the tree after the refusal");
    for pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let state = status_field(&status, "State:").unwrap_or_default();
        let tracer = status_field(&status, "TracerPid:").unwrap_or_default();
        assert!(
            state.starts_with('S') && tracer == "0",
            "pid {pid} after the refusal: state {state:?}, tracer {tracer}"
        );
    }
}
