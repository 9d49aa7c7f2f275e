//! End-to-end tests of `cowsnap dump` (and of `inspect`/`verify` on the
//! images it writes) against the real kernel. Run as root, one test at a
//! time (`--test-threads=1`): several tests build trees of hundreds of MiB.
//!
//! Each mode test starts the reference tree (`cowsnap-refworkload`),
//! measures what the kernel says about its memory (PFNs from
//! /proc/PID/pagemap, contents of present pages, PSS, /proc/PID/maps),
//! dumps it, and checks the image against those measurements: the same
//! processes, threads and VMAs; every page of the workload's regions
//! classified like the kernel has it (absent / zero / data) with one page id
//! per physical page and vice versa; as many unique pages stored as the
//! tree has distinct non-zero physical pages; then that the tree still runs
//! untraced and every process finds its memory intact.
//!
//! The `cowsnap` binary is found (and built if needed) by
//! `common::cowsnap_bin`; set `COWSNAP_BIN` to test another one.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use cowsnap::image::types::{PageRun, MANIFEST_FILE};

/// Checks the shape the mode promises, so a workload bug is not taken for a dump bug.
fn check_tree_shape(tree: &RefTree) {
    let pids = tree.pids();
    let spec = &tree.spec;
    match spec.mode {
        "deep-chain" => {
            assert_eq!(pids.len(), 17, "deep-chain: root + 16 levels, got {pids:?}");
            for pair in pids.windows(2) {
                assert_eq!(
                    ppid(pair[1]),
                    pair[0],
                    "deep-chain: {} is not the child of {}",
                    pair[1],
                    pair[0]
                );
            }
        }
        "reparented" => {
            assert_eq!(
                pids.len(),
                spec.children as usize + 1,
                "reparented: {pids:?}"
            );
            for &pid in &pids[1..] {
                assert_eq!(
                    ppid(pid),
                    tree.root,
                    "reparented: {pid} not reparented to the root"
                );
            }
        }
        _ => assert_eq!(
            pids.len(),
            spec.children as usize + 1,
            "{}: {pids:?}",
            spec.mode
        ),
    }
    if spec.mode == "threads" {
        for &pid in &pids {
            assert_eq!(
                tids(pid).len(),
                4,
                "threads: pid {pid} should have 3 extra threads"
            );
        }
    }
    let regions = tree.regions();
    let root_has_private = regions
        .iter()
        .any(|r| r.pid == tree.root && r.name == "private");
    assert_eq!(
        root_has_private,
        spec.mode != "sibling",
        "private region of the root"
    );
}

/// `cowsnap verify` accepts the image and `cowsnap inspect --json` agrees with the files.
fn check_verify_and_inspect(images: &Path, image: &ImageFiles) {
    let output = cowsnap(&["verify", path_str(images)]);
    assert!(
        output.status.success(),
        "cowsnap verify failed:\n{}",
        describe(&output)
    );

    let json = inspect_json(images);
    let totals = &json["totals"];
    assert_eq!(
        totals["unique_pages_stored"].as_u64(),
        Some(image.index.page_count),
        "inspect: unique_pages_stored"
    );
    assert_eq!(
        totals["processes"].as_u64(),
        Some(image.tree.processes.len() as u64),
        "inspect: processes"
    );
    let zero: u64 = image
        .processes
        .values()
        .flat_map(|p| p.vmas.iter())
        .flat_map(|v| v.pages.iter())
        .filter_map(|r| match r {
            PageRun::Zero { pages, .. } => Some(*pages),
            _ => None,
        })
        .sum();
    assert_eq!(
        totals["pages_zero"].as_u64(),
        Some(zero),
        "inspect: pages_zero"
    );

    let output = cowsnap(&["inspect", path_str(images)]);
    assert!(
        output.status.success(),
        "cowsnap inspect failed:\n{}",
        describe(&output)
    );
}

fn dump_mode(mode: &'static str) {
    let tree = RefTree::start(TreeSpec::small(mode));
    check_tree_shape(&tree);
    let before = MemorySnapshot::take(&tree);
    let (_out, images) = image_dir("image");
    dump_ok(&tree, &images, &[]);
    tree.assert_running_untraced("after the dump");
    let after = MemorySnapshot::take(&tree);
    assert_eq!(
        before.region_sharing(),
        after.region_sharing(),
        "the dump changed which pages of the regions the tree shares"
    );
    let image = check_image(&tree, &images, &before, &after);
    check_verify_and_inspect(&images, &image);
    tree.assert_verifies("after the dump");
    tree.assert_running_untraced("after verifying");
}

macro_rules! mode_tests {
    ($($name:ident => $mode:literal,)*) => {$(
        #[test]
        fn $name() {
            dump_mode($mode);
        }
    )*};
}

mode_tests! {
    dump_plain => "plain",
    dump_split_vma => "split-vma",
    dump_moved_vma => "moved-vma",
    dump_parent_dirty => "parent-dirty",
    dump_sibling => "sibling",
    dump_reparented => "reparented",
    dump_deep_chain => "deep-chain",
    dump_threads => "threads",
    dump_shared_anon => "shared-anon",
    dump_memfd => "memfd",
    dump_sysv_shm => "sysv-shm",
}

/// The harness itself: a tree verifies, and a process whose memory was
/// altered behind its back says so (so the OK answers mean something).
#[test]
fn workload_detects_altered_memory() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    tree.assert_verifies("fresh tree");
    let region = tree
        .regions()
        .into_iter()
        .find(|r| r.pid != tree.root && r.name == "private")
        .expect("a child's private region");
    let mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", region.pid))
        .expect("open mem");
    let addr = region.start + 5 * PAGE + 100;
    std::os::unix::fs::FileExt::write_all_at(&mem, &[0xA5, 0x5A, 0xA5, 0x5A], addr)
        .expect("write mem");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tree.assert_verifies("altered")
    }));
    let message = match result {
        Ok(()) => panic!("pid {} did not notice its memory was altered", region.pid),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(
        message.contains(&format!(
            "BAD {} {:#x}",
            region.pid,
            region.start + 5 * PAGE
        )),
        "unexpected report: {message}"
    );
}

// ------------------------------------------------------------ failures

/// A failed dump: non-zero exit, a message naming `needle`, and nothing left
/// in `out` (the directory that would have held the image).
fn assert_failed_cleanly(output: &std::process::Output, needle: &str, out: &Path) {
    assert!(
        !output.status.success(),
        "dump should have failed:\n{}",
        describe(output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(needle),
        "the error should name {needle:?}:\n{}",
        describe(output)
    );
    let left: Vec<_> = fs::read_dir(out)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a failed dump left {left:?} in {}",
        out.display()
    );
}

#[test]
fn dump_of_nonexistent_pid_fails() {
    require_root();
    // A pid that just existed and was reaped: a valid number with no process.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let pid = gone.id() as i32;
    gone.wait().expect("reap true");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} was reused already"
    );
    let (out, images) = image_dir("image");
    let output = cowsnap(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert_failed_cleanly(&output, &pid.to_string(), out.path());
}

#[test]
fn dump_of_zombie_fails() {
    require_root();
    // sh starts `true` in the background and becomes `sleep`, which never
    // reaps it: `true` stays a zombie child of `sleep`.
    let mut parent = Command::new("sh")
        .args(["-c", "true & exec sleep 1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let parent_pid = parent.id() as i32;
    let deadline = std::time::Instant::now() + PATIENCE;
    let zombie = loop {
        let children = descendants(parent_pid);
        let zombie = children
            .iter()
            .copied()
            .find(|&p| p != parent_pid && task_state(p).starts_with('Z'));
        let exec_done = fs::read_to_string(format!("/proc/{parent_pid}/comm"))
            .is_ok_and(|c| c.trim() == "sleep");
        if let (Some(z), true) = (zombie, exec_done) {
            break z;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no zombie appeared under {parent_pid}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let (out, images) = image_dir("image");
    let output = cowsnap(&[
        "dump",
        "--pid",
        &zombie.to_string(),
        "--images",
        path_str(&images),
    ]);
    let _ = parent.kill();
    let _ = parent.wait();
    assert_failed_cleanly(&output, &zombie.to_string(), out.path());
}

/// A read-only bind mount of a directory, unmounted on drop.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(dir: &Path) -> ReadOnlyMount {
        fs::create_dir_all(dir).expect("mount point");
        let d = path_str(dir);
        run_ok("mount", &["--bind", d, d]);
        let mount = ReadOnlyMount(dir.to_path_buf());
        run_ok("mount", &["-o", "remount,bind,ro", d]);
        mount
    }
}

/// A tiny tmpfs that an image cannot fit in, unmounted on drop.
struct TinyTmpfs(PathBuf);

impl TinyTmpfs {
    fn new(dir: &Path) -> TinyTmpfs {
        fs::create_dir_all(dir).expect("mount point");
        run_ok(
            "mount",
            &["-t", "tmpfs", "-o", "size=1m", "tmpfs", path_str(dir)],
        );
        TinyTmpfs(dir.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run_ok(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

#[test]
fn dump_into_unwritable_places_fails_and_leaves_tree_untouched() {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let root = tree.root.to_string();
    let scratch = tempfile::Builder::new()
        .prefix("cowsnap-unwritable-")
        .tempdir()
        .expect("tempdir");
    let base = scratch.path();

    let dump_to = |images: &Path| cowsnap(&["dump", "--pid", &root, "--images", path_str(images)]);
    let check_tree = |context: &str| {
        tree.assert_running_untraced(context);
        tree.assert_verifies(context);
    };

    // Under /proc nothing can be created.
    let output = dump_to(Path::new("/proc/cowsnap-test-image"));
    assert_failed_cleanly(&output, "/proc", Path::new("/nonexistent-never-created"));
    assert!(!Path::new("/proc/cowsnap-test-image").exists());
    check_tree("after dumping under /proc");

    // The image path is an existing regular file: it must stay as it was.
    let file = base.join("a-file");
    fs::write(&file, b"not an image").expect("write file");
    let output = dump_to(&file);
    assert!(
        !output.status.success(),
        "dump onto a regular file:\n{}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(path_str(&file)),
        "{}",
        describe(&output)
    );
    assert_eq!(
        fs::read(&file).expect("read file"),
        b"not an image",
        "the file was changed"
    );
    check_tree("after dumping onto a file");

    // A path below a regular file.
    let below = file.join("img");
    let output = dump_to(&below);
    assert!(
        !output.status.success(),
        "dump below a regular file:\n{}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(path_str(&file)),
        "{}",
        describe(&output)
    );
    check_tree("after dumping below a file");

    // A read-only bind mount (root ignores permission bits, not EROFS).
    let ro_dir = base.join("ro");
    let ro = ReadOnlyMount::new(&ro_dir);
    let output = dump_to(&ro_dir.join("img"));
    assert_failed_cleanly(&output, path_str(&ro_dir), &ro_dir);
    drop(ro);
    check_tree("after dumping into a read-only mount");

    // A file system that fills up mid-dump: the partial image must go.
    let tiny_dir = base.join("tiny");
    let tiny = TinyTmpfs::new(&tiny_dir);
    let output = dump_to(&tiny_dir.join("img"));
    assert_failed_cleanly(&output, path_str(&tiny_dir), &tiny_dir);
    drop(tiny);
    check_tree("after dumping into a full file system");
}

/// Big enough that the dump takes a while and can be killed in the middle.
fn big_tree() -> RefTree {
    RefTree::start(TreeSpec {
        mode: "plain",
        mib: 512,
        children: 3,
        dirty_pct: 10,
    })
}

fn assert_no_complete_image(images: &Path) {
    assert!(
        !images.join(MANIFEST_FILE).exists(),
        "a killed dump left a complete-looking image in {}",
        images.display()
    );
    let output = cowsnap(&["verify", path_str(images)]);
    assert!(
        !output.status.success(),
        "verify accepted the image of a killed dump:\n{}",
        describe(&output)
    );
}

#[test]
fn sigkill_of_the_dumper_leaves_tree_running() {
    let tree = big_tree();
    let (_out, images) = image_dir("image");
    let root = tree.root;
    let dump = BackgroundDump::spawn(&[
        "dump",
        "--pid",
        &root.to_string(),
        "--images",
        path_str(&images),
    ]);
    let stderr = dump.kill_mid_dump(|| is_traced(root));
    eprintln!("dumper killed after: {stderr:?}");
    tree.assert_running_untraced("after SIGKILL of the dumper");
    tree.assert_verifies("after SIGKILL of the dumper");
    assert_no_complete_image(&images);
}

fn dump_in_cgroup(v2: bool) {
    let tree = RefTree::start(TreeSpec::small("plain"));
    let cgroup = TestCgroup::create(v2, "dump");
    cgroup.add(&tree.pids());
    let before = MemorySnapshot::take(&tree);
    let (_out, images) = image_dir("image");
    dump_ok(&tree, &images, &["--cgroup", path_str(&cgroup.dir)]);
    assert_eq!(cgroup.state(), "THAWED", "cgroup state after the dump");
    tree.assert_running_untraced("after a cgroup dump");
    let after = MemorySnapshot::take(&tree);
    let image = check_image(&tree, &images, &before, &after);
    check_verify_and_inspect(&images, &image);
    tree.assert_verifies("after a cgroup dump");
}

fn sigkill_during_cgroup_dump(v2: bool) {
    let tree = big_tree();
    let cgroup = TestCgroup::create(v2, "kill");
    cgroup.add(&tree.pids());
    let (_out, images) = image_dir("image");
    let root = tree.root;
    let dump = BackgroundDump::spawn(&[
        "dump",
        "--pid",
        &root.to_string(),
        "--images",
        path_str(&images),
        "--cgroup",
        path_str(&cgroup.dir),
    ]);
    let stderr = dump.kill_mid_dump(|| cgroup.state() != "THAWED" || is_traced(root));
    eprintln!("dumper killed after: {stderr:?}");
    // Whoever thaws (a guard process of the dumper, the kernel) may take a
    // moment; wait for it, but never give up on the assertion itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cgroup.state() != "THAWED" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        cgroup.state(),
        "THAWED",
        "cgroup left frozen by a killed dumper"
    );
    tree.assert_running_untraced("after SIGKILL of a cgroup dump");
    tree.assert_verifies("after SIGKILL of a cgroup dump");
    assert_no_complete_image(&images);
}

#[test]
fn dump_with_v1_freezer_cgroup() {
    dump_in_cgroup(false);
}

#[test]
fn dump_with_v2_cgroup() {
    dump_in_cgroup(true);
}

#[test]
fn sigkill_during_v1_freezer_dump_thaws() {
    sigkill_during_cgroup_dump(false);
}

#[test]
fn sigkill_during_v2_cgroup_dump_thaws() {
    sigkill_during_cgroup_dump(true);
}

/// `dump --exit` of a pid namespace's init with children (a container's
/// case). A dying init waits until every process of its namespace is
/// reaped, and a traced child is reaped only after its tracer collected its
/// death: the dumper must collect the children before the init, or dumper
/// and init wait for each other forever.
#[test]
fn dump_exit_of_a_namespace_init_ends_its_namespace() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-nsinit-")
        .tempdir()
        .expect("tempdir");
    let report = dir.path().join("report");
    let ready = dir.path().join("ready");
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--"])
        .arg(workload_bin())
        .args(["--mode", "plain", "--mib", "16", "--children", "3"])
        .args(["--dirty-pct", "10", "--report", path_str(&report)])
        .args(["--ready", path_str(&ready)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn unshare --pid --fork cowsnap-refworkload");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "tree in its own pid namespace not ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = unshare.id();
    let root: i32 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("children of unshare")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the namespace's init");
    let status = fs::read_to_string(format!("/proc/{root}/status")).expect("status");
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid");
    assert!(
        nspid.trim().ends_with(" 1") || nspid.trim().ends_with("\t1"),
        "NSpid {nspid}"
    );
    let tree = descendants(root);
    assert_eq!(tree.len(), 4, "the init and its three children: {tree:?}");

    let (_out, images) = image_dir("nsinit");
    let output = cowsnap(&[
        "dump",
        "--exit",
        "--pid",
        &root.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(
        output.status.success(),
        "dump --exit:\n{}",
        describe(&output)
    );
    let status = wait_status(&mut unshare, "unshare once its init is gone");
    assert!(
        !status.success(),
        "the init was killed, unshare says {status}"
    );
    for pid in tree {
        let gone = (0..500).any(|_| {
            let gone = !Path::new(&format!("/proc/{pid}")).exists();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(gone, "pid {pid} of the dumped namespace is still there");
    }
    let output = cowsnap(&["verify", path_str(&images)]);
    assert!(output.status.success(), "verify:\n{}", describe(&output));
}

// ------------------------------------------------------------ zombies

/// `ZOMBIE <pid>` lines of a `zombie`-mode tree: (exited 7, killed by SIGTERM).
fn zombies_of(tree: &RefTree) -> (i32, i32) {
    let pids: Vec<i32> = tree
        .report_text()
        .lines()
        .filter_map(|l| l.strip_prefix("ZOMBIE ")?.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "zombie mode reports two zombies: {pids:?}");
    (pids[0], pids[1])
}

#[test]
fn dump_records_zombies_with_their_exit_status() {
    use cowsnap::image::types::ZombieExit;
    let tree = RefTree::start(TreeSpec::small("zombie"));
    let (exited, killed) = zombies_of(&tree);
    for z in [exited, killed] {
        assert!(task_state(z).starts_with('Z'), "pid {z} is not a zombie");
    }
    let (_out, images) = image_dir("zombies");
    let output = dump_ok(&tree, &images, &[]);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("(2 zombies)"),
        "{}",
        describe(&output)
    );

    let image = cowsnap::image::Image::open(&images).expect("the image opens");
    let live = tree.spec.children as usize + 1;
    assert_eq!(image.tree.processes.len(), live + 2);
    let entry = |pid: i32| {
        image
            .process(pid)
            .unwrap_or_else(|| panic!("pid {pid} is not in the image"))
    };
    for (pid, want) in [
        (exited, ZombieExit::Exited { code: 7 }),
        (
            killed,
            ZombieExit::Killed {
                signal: libc::SIGTERM as u8,
                core_dumped: false,
            },
        ),
    ] {
        let (e, p) = entry(pid);
        assert_eq!(e.zombie, Some(want), "pid {pid}");
        assert_eq!(e.ppid, tree.root, "pid {pid}");
        assert!(e.tids.is_empty() && p.threads.is_empty() && p.vmas.is_empty() && p.fds.is_empty());
        assert_eq!(e.nspid.last(), Some(&pid));
    }
    let live_entries = image.tree.processes.iter().filter(|e| e.zombie.is_none());
    assert_eq!(live_entries.count(), live);
    let text = cowsnap(&["inspect", path_str(&images)]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("<zombie: exited 7>"), "{text}");
    assert!(text.contains("<zombie: killed by signal 15>"), "{text}");
    let verify = cowsnap(&["verify", path_str(&images)]);
    assert!(verify.status.success(), "{}", describe(&verify));

    // Untouched: still zombies of the root, which runs on untraced.
    for z in [exited, killed] {
        assert!(task_state(z).starts_with('Z'), "pid {z} was reaped");
        assert_eq!(ppid(z), tree.root);
    }
    let live_pids: Vec<i32> = tree
        .pids()
        .into_iter()
        .filter(|&p| p != exited && p != killed)
        .collect();
    for &pid in &live_pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert_eq!(status_field(&status, "TracerPid:").as_deref(), Some("0"));
    }

    // A zombie is never the root of a dump.
    let (out, images) = image_dir("zombie-root");
    let output = cowsnap(&[
        "dump",
        "--pid",
        &exited.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert_failed_cleanly(&output, &format!("pid {exited} is a zombie"), out.path());

    // The root reaps them on SIGUSR1, with the statuses the image recorded.
    let offset = fs::metadata(&tree.report).map_or(0, |m| m.len()) as usize;
    let targets: Vec<(i32, i32)> = live_pids.iter().map(|&p| (p, p)).collect();
    assert_processes_verify(&tree.report, &targets, "zombie mode after the dump");
    let reaped = reaped_after(&tree.report, offset);
    let expect = |pid: i32| {
        entry(pid)
            .0
            .zombie
            .map(|z| z.wait_status().to_string())
            .unwrap_or_default()
    };
    assert_eq!(reaped.get(&exited), Some(&expect(exited)), "{reaped:?}");
    assert_eq!(reaped.get(&killed), Some(&expect(killed)), "{reaped:?}");
    assert_eq!(expect(exited), (7 << 8).to_string());
    assert_eq!(expect(killed), libc::SIGTERM.to_string());
}
