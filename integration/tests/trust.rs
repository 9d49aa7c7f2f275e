//! End-to-end tests of promises the README makes about failures, refusals
//! and messages (one per finding of the bug campaign): what cowsnap refuses
//! up front, what a killed or failed command leaves behind, and that its
//! messages name what the user gave. Run as root, one test at a time
//! (`--test-threads=1`).
//!
//! Tests that could seize more than their own processes if cowsnap
//! misbehaved run inside a fresh pid namespace (`unshare --pid --fork
//! --mount-proc --kill-child`), so that a wrong dump can never reach beyond
//! it; every command they start is bounded by a timeout that fails the
//! test instead of hanging it.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long one command of these tests may take before the test fails.
const BOUND: Duration = Duration::from_secs(60);

/// Waits at most `bound` for `child` (whose stdout/stderr are piped),
/// killing it and failing the test on timeout.
fn output_within(mut child: Child, bound: Duration, what: &str) -> Output {
    use std::io::Read;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + bound;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {bound:?}");
            }
            Err(e) => panic!("wait for {what}: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// `sh -c SCRIPT` as pid 1 of a fresh pid namespace with its own /proc,
/// killed with everything in it if it outlives [`BOUND`]. `$COWSNAP` is the
/// binary under test.
fn sh_in_pid_ns(script: &str, env: &[(&str, &str)]) -> Output {
    require_root();
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .args(["sh", "-c", script])
        .env("COWSNAP", cowsnap_bin())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare --pid --fork --mount-proc sh");
    output_within(
        child,
        BOUND,
        &format!("sh -c {script:?} in a pid namespace"),
    )
}

fn assert_no_image(images: &Path, context: &str) {
    let left: Vec<_> = fs::read_dir(images.parent().expect("image parent"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{context}: the refused dump left {left:?}");
}

// ------------------------------------------------------------ the dumper's own tree

/// `dump --pid 1`: the init of the dumper's pid namespace (on the host, the
/// whole machine) is refused before anything is seized. Run as the shell
/// that is pid 1 of a fresh namespace, so a missing refusal stops nothing
/// but that namespace.
#[test]
fn dump_of_pid_1_is_refused_up_front() {
    let (_dir, images) = image_dir("trust-pid1");
    let output = sh_in_pid_ns(
        r#""$COWSNAP" dump --pid 1 --images "$IMAGES"; echo "exit $?""#,
        &[("IMAGES", path_str(&images))],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("exit 1"),
        "dump --pid 1 should fail:\n{}",
        describe(&output)
    );
    assert!(
        stderr.contains("refusing to dump pid 1") && stderr.contains("init"),
        "the error should say pid 1 is refused because it is the namespace's init:\n{}",
        describe(&output)
    );
    assert!(
        !stderr.contains("seized"),
        "pid 1 was seized before the refusal:\n{}",
        describe(&output)
    );
    assert_no_image(&images, "dump --pid 1");
}

/// A shell that runs `cowsnap dump --pid $$`: the tree holds the dumper
/// itself and must be refused before anything is seized. The shell is not
/// pid 1 (a nested `sh` in a fresh pid namespace), so this is the ancestor
/// check, not the pid-1 one.
#[test]
fn dump_of_an_ancestor_of_the_dumper_is_refused_up_front() {
    let (_dir, images) = image_dir("trust-ancestor");
    let output = sh_in_pid_ns(
        r#"sh -c '"$COWSNAP" dump --pid $$ --images "$IMAGES"; echo "exit $? shell $$"'; true"#,
        &[("IMAGES", path_str(&images))],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shell: i32 = stdout
        .split("shell ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no \"shell PID\" line:\n{}", describe(&output)));
    assert_ne!(
        shell, 1,
        "the nested shell should not be the namespace's init"
    );
    assert!(
        stdout.contains("exit 1 "),
        "dump --pid $$ should fail:\n{}",
        describe(&output)
    );
    assert!(
        stderr.contains(&format!("refusing to dump pid {shell}"))
            && stderr.contains("runs inside its tree"),
        "the error should say pid {shell} is refused because the dumper is in its tree:\n{}",
        describe(&output)
    );
    assert!(
        !stderr.contains("seized"),
        "the shell was seized before the refusal:\n{}",
        describe(&output)
    );
    assert_no_image(&images, "dump --pid $$");
}

// ------------------------------------------------------------ messages

/// A tiny tmpfs an image cannot fit in, unmounted on drop.
struct TinyTmpfs(std::path::PathBuf);

impl TinyTmpfs {
    fn new(dir: &Path) -> TinyTmpfs {
        fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", path_str(dir)])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        TinyTmpfs(dir.to_path_buf())
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The dump's messages name what the user gave: the image directory (not
/// the internal `DIR.partial-PID`) and its missing parent; a symlink to a
/// directory is that directory; a full disk is not blamed on a pid.
#[test]
fn dump_messages_name_what_the_user_gave() {
    // Big enough that the disk fills while pages are still being scanned.
    let tree = RefTree::start(TreeSpec {
        mib: 128,
        ..TreeSpec::small("plain")
    });
    let root = tree.root.to_string();
    let scratch = tempfile::Builder::new()
        .prefix("cowsnap-trust-msg-")
        .tempdir()
        .expect("tempdir");
    let dump_to = |images: &Path| cowsnap(&["dump", "--pid", &root, "--images", path_str(images)]);

    let missing = scratch.path().join("no-such-dir");
    let images = missing.join("img");
    let output = dump_to(&images);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        stderr.contains(path_str(&images))
            && stderr.contains(&format!("{missing:?} does not exist"))
            && !stderr.contains(".partial-"),
        "the error should name {} and its missing parent, not a partial directory:\n{}",
        images.display(),
        describe(&output)
    );

    let real = scratch.path().join("real");
    fs::create_dir(&real).expect("mkdir real");
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let output = dump_to(&link);
    assert!(
        output.status.success(),
        "a dump into a symlink to an empty directory should write into it:\n{}",
        describe(&output)
    );
    assert!(
        real.join("manifest.json").exists(),
        "no image in {}",
        real.display()
    );

    let tiny_dir = scratch.path().join("tiny");
    let tiny = TinyTmpfs::new(&tiny_dir);
    let output = dump_to(&tiny_dir.join("img"));
    drop(tiny);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("No space left on device"),
        "{}",
        describe(&output)
    );
    let blamed: Vec<i32> = tree
        .pids()
        .into_iter()
        .filter(|pid| stderr.contains(&format!("pid {pid}")))
        .collect();
    assert!(
        blamed.is_empty(),
        "a full disk is not about pids {blamed:?}:\n{}",
        describe(&output)
    );
    tree.assert_running_untraced("after the dumps");
}

// ------------------------------------------------------------ dump --exit of a namespace init

/// SIGKILLs `pid` and every descendant of it (children first found, all killed).
fn kill_tree(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for p in descendants(pid).into_iter().rev() {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// What each thread of `pid` is blocked in, for a failure message.
fn thread_wchans(pid: i32) -> Vec<String> {
    tids(pid)
        .into_iter()
        .map(|tid| {
            let wchan =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")).unwrap_or_default();
            format!("{tid}: {} in {wchan}", task_state(tid))
        })
        .collect()
}

/// One round: a workload of 3 processes with 4 extra threads each, its
/// root the init of a fresh pid namespace, dumped with `--exit`. The dump
/// must end (and the namespace with it) within [`BOUND`].
fn dump_exit_of_threaded_namespace_init(round: usize) {
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-trust-nsinit-")
        .tempdir()
        .expect("tempdir");
    let (report, ready) = (dir.path().join("report"), dir.path().join("ready"));
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(workload_bin())
        .args(["--mode", "threads", "--threads", "4", "--mib", "4"])
        .args(["--children", "2", "--dirty-pct", "10"])
        .args(["--report", path_str(&report), "--ready", path_str(&ready)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn unshare --pid --fork cowsnap-refworkload");
    let unshare_pid = unshare.id() as i32;
    let deadline = Instant::now() + BOUND;
    while !ready.exists() {
        if Instant::now() > deadline {
            kill_tree(unshare_pid);
            let _ = unshare.kill();
            let _ = unshare.wait();
            panic!("round {round}: threaded tree in its own pid namespace not ready");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let init: i32 = fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
        .expect("children of unshare")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the namespace's init");
    assert_eq!(
        ns_pid(init),
        1,
        "round {round}: the root is not a namespace init"
    );
    assert_eq!(
        tids(init).len(),
        5,
        "round {round}: the init runs 4 extra threads"
    );

    let images = dir.path().join("img");
    let mut dump = Command::new(cowsnap_bin())
        .args(["dump", "--exit", "--quiet", "--pid", &init.to_string()])
        .args(["--images", path_str(&images)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cowsnap dump --exit");
    let dumper = dump.id() as i32;
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = dump.try_wait().expect("wait for cowsnap dump") {
            break status;
        }
        if Instant::now() > deadline {
            let stuck = thread_wchans(init);
            let engines = descendants(dumper);
            // The engine is the tracer: once it is gone the kernel lets go.
            kill_tree(dumper);
            let _ = dump.wait();
            kill_tree(unshare_pid);
            let _ = unshare.kill();
            let _ = unshare.wait();
            panic!(
                "round {round}: dump --exit of namespace init {init} did not end within {BOUND:?} \
                 (cowsnap and its engine {engines:?}); the init's threads: {stuck:?}"
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = dump.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "round {round}: dump --exit failed ({status}): {stderr}"
    );
    let deadline = Instant::now() + BOUND;
    while unshare.try_wait().expect("wait for unshare").is_none() {
        assert!(
            Instant::now() < deadline,
            "round {round}: the namespace did not end after dump --exit: {:?}",
            thread_wchans(init)
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        images.join("manifest.json").exists(),
        "round {round}: no image after a successful dump"
    );
}

/// `dump --exit` of a multi-threaded pid namespace init: the init's last
/// thread to exit waits in the kernel (zap_pid_ns_processes) until every
/// process of its namespace is reaped, and traced zombies are reaped only
/// once the tracer collected them, so the dumper must never block on one
/// thread while others wait for it. Twenty rounds: the hang was a race.
#[test]
fn dump_exit_of_a_multithreaded_namespace_init_never_hangs() {
    require_root();
    for round in 0..20 {
        dump_exit_of_threaded_namespace_init(round);
    }
}

// ------------------------------------------------------------ SIGKILL of the dump command

/// Whatever holds the tree right now: threads with a tracer or in a
/// stopped state.
fn held_threads(pids: &[i32]) -> Vec<String> {
    let mut held = Vec::new();
    for &pid in pids {
        for tid in tids(pid) {
            let status =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            let state = status_field(&status, "State:").unwrap_or_default();
            let tracer = status_field(&status, "TracerPid:").unwrap_or_default();
            if tracer != "0" || state.starts_with('t') || state.starts_with('T') {
                held.push(format!("tid {tid} of {pid}: {state}, tracer {tracer}"));
            }
        }
    }
    held
}

/// SIGKILL of `cowsnap dump` mid-dump: once the killed command has been
/// reaped, its cleanup is done, not merely under way: no thread of the
/// tree is traced or stopped, and no `DIR.partial-*` is left. Checked at
/// once after the reap, with no grace period, over several rounds killed
/// at different moments.
#[test]
fn sigkill_of_the_dump_command_returns_after_its_cleanup() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let tree = RefTree::start(TreeSpec {
        mib: 256,
        ..TreeSpec::small("plain")
    });
    let pids = tree.pids();
    for round in 0..6 {
        let (dir, images) = image_dir("trust-kill");
        let mut dump = Command::new(cowsnap_bin())
            .args(["dump", "--pid", &tree.root.to_string()])
            .args(["--images", path_str(&images)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cowsnap dump");
        // Kill once the tree is seized, a little later each round.
        let deadline = Instant::now() + BOUND;
        while held_threads(&pids).is_empty() {
            assert!(
                dump.try_wait().expect("wait for cowsnap dump").is_none(),
                "round {round}: the dump ended before it seized the tree"
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: the tree was never seized"
            );
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(20 * round as u64));
        kill(Pid::from_raw(dump.id() as i32), Signal::SIGKILL).expect("SIGKILL cowsnap dump");
        let deadline = Instant::now() + BOUND;
        let status = loop {
            if let Some(status) = dump.try_wait().expect("wait for cowsnap dump") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the killed dump was not reaped within {BOUND:?}"
            );
            thread::sleep(Duration::from_millis(1));
        };
        // No grace period: the reap is the promise.
        let held = held_threads(&pids);
        let partial: Vec<String> = fs::read_dir(dir.path())
            .expect("list the image's parent")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".partial-"))
            .collect();
        assert!(
            held.is_empty() && partial.is_empty(),
            "round {round}: the killed dump ({status}) was reaped before its cleanup: \
             held {held:?}, partial images {partial:?}"
        );
        assert!(
            !images.join("manifest.json").exists(),
            "round {round}: a killed dump left a complete image"
        );
    }
    tree.assert_running_untraced("after the killed dumps");
    tree.assert_verifies("after the killed dumps");
}

/// SIGTERM (and SIGSTOP/SIGCONT on the way) to `cowsnap dump` mid-dump:
/// the command, which its engine holds traced, still gets its signals as
/// if untraced, passes the SIGTERM on, and ends with the interruption
/// reported and everything resumed.
#[test]
fn sigterm_of_the_dump_command_interrupts_it_cleanly() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let tree = RefTree::start(TreeSpec {
        mib: 256,
        ..TreeSpec::small("plain")
    });
    let pids = tree.pids();
    let (dir, images) = image_dir("trust-term");
    let child = Command::new(cowsnap_bin())
        .args(["dump", "--pid", &tree.root.to_string()])
        .args(["--images", path_str(&images)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cowsnap dump");
    let dumper = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + BOUND;
    while held_threads(&pids).is_empty() {
        assert!(Instant::now() < deadline, "the tree was never seized");
        thread::sleep(Duration::from_millis(1));
    }
    let stopped = || {
        let state = task_state(dumper.as_raw());
        state.starts_with('T') || state.starts_with('t')
    };
    // A job-control stop holds, and SIGCONT ends it.
    kill(dumper, Signal::SIGSTOP).expect("SIGSTOP cowsnap dump");
    let deadline = Instant::now() + BOUND;
    while !stopped() {
        assert!(
            Instant::now() < deadline,
            "SIGSTOP did not stop cowsnap dump"
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(100));
    assert!(stopped(), "cowsnap dump did not stay stopped");
    kill(dumper, Signal::SIGCONT).expect("SIGCONT cowsnap dump");
    let deadline = Instant::now() + BOUND;
    while stopped() {
        assert!(
            Instant::now() < deadline,
            "SIGCONT did not resume cowsnap dump"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // A SIGCONT right after a SIGSTOP cancels it, as for any process.
    kill(dumper, Signal::SIGSTOP).expect("SIGSTOP cowsnap dump");
    kill(dumper, Signal::SIGCONT).expect("SIGCONT cowsnap dump");
    kill(dumper, Signal::SIGTERM).expect("SIGTERM cowsnap dump");
    let output = output_within(child, BOUND, "cowsnap dump after SIGTERM");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("interrupted"),
        "SIGTERM should interrupt the dump:\n{}",
        describe(&output)
    );
    let held = held_threads(&pids);
    assert!(held.is_empty(), "after the interrupted dump: {held:?}");
    let left: Vec<_> = fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "the interrupted dump left {left:?}");
    tree.assert_verifies("after the interrupted dump");
}

// ------------------------------------------------------------ an interrupted sleep

/// A 3 s sleep dumped (with `--exit`) about 1 s in and restored keeps the
/// time it had left: it must end less than (3 s - the time it had slept
/// before the dump + 0.5 s) after the restore returned, not start its 3 s
/// again, and not end at once either. Both for `sleep` (coreutils, which
/// sleeps again for what `rem` says on EINTR) and `cowsnap-sleeper` (which
/// starts its whole interval again on EINTR, as many programs do).
#[test]
fn restored_sleep_keeps_its_remaining_time() {
    require_root();
    restored_sleep_keeps_remaining("sleep");
    restored_sleep_keeps_remaining(env!("CARGO_BIN_EXE_cowsnap-sleeper"));
}

fn restored_sleep_keeps_remaining(program: &str) {
    const SLEEP: f64 = 3.0;
    let (dir, images) = image_dir("trust-sleep");
    cowsnap_bin(); // built now, not while the sleep runs
    let started = Instant::now();
    let mut sleeper = Command::new(program)
        .arg(SLEEP.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id() as i32;
    thread::sleep(Duration::from_secs(1));
    let slept_before = started.elapsed().as_secs_f64();
    let output = cowsnap(&[
        "dump",
        "--exit",
        "--quiet",
        "--pid",
        &pid.to_string(),
        "--images",
        path_str(&images),
    ]);
    let slept_at_most = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "dump --exit:\n{}",
        describe(&output)
    );
    let status = sleeper.wait().expect("reap the dumped sleep");
    assert!(
        !status.success(),
        "the dumped sleep was killed, not {status}"
    );

    let pidfile = dir.path().join("restored.pid");
    let output = cowsnap(&[
        "restore",
        "--quiet",
        "--images",
        path_str(&images),
        "--pid-ns",
        "current",
        "--pidfile",
        path_str(&pidfile),
    ]);
    let restored = Instant::now();
    assert!(output.status.success(), "restore:\n{}", describe(&output));
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    assert!(
        name.starts_with(&comm(pid)),
        "the restored process runs {name}, not {:?}",
        comm(pid)
    );
    let deadline = restored + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && !task_state(pid).starts_with('Z') {
        assert!(Instant::now() < deadline, "the restored sleep never ended");
        thread::sleep(Duration::from_millis(5));
    }
    let took = restored.elapsed().as_secs_f64();
    let left_at_most = SLEEP - slept_before;
    let left_at_least = SLEEP - slept_at_most;
    eprintln!(
        "{name}: slept {slept_before:.3}..{slept_at_most:.3} s before the dump, {took:.3} s after the restore"
    );
    assert!(
        took < left_at_most + 0.5,
        "{name}: the restored sleep took {took:.3} s: it had at most {left_at_most:.3} s left \
         (the remaining time was lost: it slept its {SLEEP} s again?)"
    );
    assert!(
        took > left_at_least - 0.3,
        "{name}: the restored sleep took {took:.3} s, but had at least {left_at_least:.3} s left"
    );
}

/// A profile allowing everything but `mkdir` and `mkdirat` (EPERM).
const DENY_MKDIR_PROFILE: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW",
  "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
  "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#;

/// `/proc/PID/status` field `key`, or "" when there is none.
fn status_of(pid: i32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, &format!("{key}:")).unwrap_or_default()
}

/// `restore --seccomp-profile` puts every restored process under the
/// profile on top of its own filters (what a container restore does with
/// its spec's profile): a shell loop with no filter that makes a directory
/// each round, dumped with `--exit` and restored under a profile denying
/// `mkdir`/`mkdirat` with EPERM, has one seccomp filter more and its
/// `mkdir`s fail with "Operation not permitted". Once as root (the filter
/// goes in after the creds) and once as uid 1000 without capabilities or
/// no_new_privs (the kernel installs a filter only for CAP_SYS_ADMIN then:
/// it goes in before capset drops the runtime's capabilities).
#[test]
fn restore_with_a_seccomp_profile_denies_what_it_denies() {
    require_root();
    restored_under_profile(None);
    restored_under_profile(Some(1000));
}

fn restored_under_profile(uid: Option<u32>) {
    let (dir, images) = image_dir("trust-seccomp");
    cowsnap_bin();
    let work = dir.path().join("work");
    fs::create_dir(&work).expect("create the loop's directory");
    fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod the loop's directory");
    let profile = dir.path().join("profile.json");
    fs::write(&profile, DENY_MKDIR_PROFILE).expect("write the profile");
    let w = path_str(&work);
    let script = format!(
        "i=0; while :; do i=$((i+1)); \
         if mkdir {w}/d$i 2>{w}/err; then echo made > {w}/last; \
         else echo \"failed $(cat {w}/err)\" > {w}/last; fi; sleep 0.05; done"
    );
    let mut command = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "sh",
                "-c",
                &script,
            ]);
            c
        }
        None => {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
    };
    let mut looped = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the mkdir loop");
    let pid = looped.id() as i32;
    let last = work.join("last");
    let wait_last = |want: &dyn Fn(&str) -> bool, what: &str| {
        let deadline = Instant::now() + BOUND;
        loop {
            let text = fs::read_to_string(&last).unwrap_or_default();
            if want(text.trim()) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the loop's last mkdir says {text:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_last(&|t| t == "made", "before the dump");
    let who = format!("the loop of uid {uid:?} (pid {pid})");
    assert_eq!(status_of(pid, "Seccomp_filters"), "0", "{who}");
    assert_eq!(status_of(pid, "NoNewPrivs"), "0", "{who}");
    let output = cowsnap(&[
        "dump",
        "--exit",
        "--quiet",
        "--pid",
        &pid.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(output.status.success(), "dump:\n{}", describe(&output));
    let _ = looped.wait();
    // Its `sleep` may outlive the dumped shell for a moment: the restore
    // needs every pid of the tree free.
    let tree: serde_json::Value = serde_json::from_slice(
        &fs::read(images.join("tree.json")).expect("read the image's tree.json"),
    )
    .expect("tree.json");
    let tree: Vec<i64> = tree["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .collect();
    let wait_free = || {
        let deadline = Instant::now() + BOUND;
        // A zombie holds its pid too, until whoever inherited it reaps it.
        while tree
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(Instant::now() < deadline, "the tree {tree:?} never ended");
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_free();
    fs::remove_file(&last).expect("remove the loop's last answer");

    let restore = |profile: &Path| {
        cowsnap(&[
            "restore",
            "--quiet",
            "--images",
            path_str(&images),
            "--pid-ns",
            "current",
            "--seccomp-profile",
            path_str(profile),
        ])
    };
    // A profile a restore cannot honour is refused before anything exists.
    let notify = dir.path().join("notify.json");
    fs::write(
        &notify,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}"#,
    )
    .expect("write the notify profile");
    let output = restore(&notify);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("notify.json")
            && stderr.contains("not supported: the spec's seccomp profile uses SCMP_ACT_NOTIFY"),
        "restore under a SCMP_ACT_NOTIFY profile:\n{}",
        describe(&output)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{who} was restored under it"
    );

    let output = restore(&profile);
    assert!(output.status.success(), "restore:\n{}", describe(&output));
    let denied = wait_last(
        &|t| t.starts_with("failed"),
        "after the restore under the profile",
    );
    let report = format!(
        "{who} after the restore: Uid {}, CapEff {}, Seccomp {}, Seccomp_filters {}",
        status_of(pid, "Uid"),
        status_of(pid, "CapEff"),
        status_of(pid, "Seccomp"),
        status_of(pid, "Seccomp_filters")
    );
    kill_tree(pid);
    assert!(
        denied.contains("Operation not permitted"),
        "{report}: its mkdir failed otherwise: {denied:?}"
    );
    assert!(
        report.ends_with("Seccomp 2, Seccomp_filters 1"),
        "{report}: not one filter more than its image's none"
    );
    if let Some(uid) = uid {
        assert!(
            report.contains(&format!(
                "Uid {uid}\t{uid}\t{uid}\t{uid}, CapEff 0000000000000000"
            )),
            "{report}: not back to its own creds"
        );
    }

    // A forged image whose own filter fakes the syscall that would confine
    // it (SECCOMP_RET_ERRNO with errno 0: "success", nothing done): as
    // root, seccomp itself, so the profile would never go in; without
    // no_new_privs, capset, which its filters precede, so the process would
    // keep the restorer's capabilities. Either is refused.
    wait_free();
    let (nr, claim) = match uid {
        None => (libc::SYS_seccomp, "seccomp filters after the restorer"),
        Some(_) => (libc::SYS_capset, "effective capabilities"),
    };
    forge_tree(&images, |process| {
        process["creds"]["seccomp_mode"] = serde_json::json!(2);
        process["creds"]["seccomp_filters"] = serde_json::json!([faking_filter(nr as u32)]);
    });
    let output = restore(&profile);
    assert!(
        !output.status.success() && String::from_utf8_lossy(&output.stderr).contains(claim),
        "restore of an image whose filter fakes syscall {nr} (uid {uid:?}) did not refuse \
         naming {claim:?}:\n{}",
        describe(&output)
    );
    wait_free();
}

/// A classic BPF filter (hex, as images store them) that answers syscall
/// `nr` with SECCOMP_RET_ERRNO | 0 (it returns 0 without running) and
/// allows every other.
fn faking_filter(nr: u32) -> String {
    let insn = |code: u16, jt: u8, jf: u8, k: u32| {
        let mut b = code.to_le_bytes().to_vec();
        b.extend([jt, jf]);
        b.extend(k.to_le_bytes());
        b
    };
    let program = [
        insn(0x20, 0, 0, 0),           // ld [0]: seccomp_data.nr
        insn(0x15, 0, 1, nr),          // jeq nr
        insn(0x06, 0, 0, 0x0005_0000), // ret ERRNO | 0
        insn(0x06, 0, 0, 0x7fff_0000), // ret ALLOW
    ]
    .concat();
    program.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites every process entry of the image's `tree.json` with `edit`,
/// fixes its size and checksum in `manifest.json` and drops `plan.bin`,
/// as a forger would.
fn forge_tree(images: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = images.join("tree.json");
    let mut tree: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read tree.json")).expect("tree.json");
    for p in tree["processes"].as_array_mut().expect("processes") {
        edit(p);
    }
    let bytes = serde_json::to_vec(&tree).expect("json");
    fs::write(&path, &bytes).expect("write tree.json");
    let manifest_path = images.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).expect("read manifest.json"))
            .expect("manifest.json");
    let files = manifest["files"].as_array_mut().expect("files");
    let entry = files
        .iter_mut()
        .find(|f| f["name"] == "tree.json")
        .expect("tree.json in the manifest");
    entry["size"] = bytes.len().into();
    entry["xxh3_128"] = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)).into();
    // The stored plan, bound to the old tree.json, would give the edit
    // away: the forger drops it and restore plans the tree itself.
    files.retain(|f| f["name"] != "plan.bin");
    let _ = fs::remove_file(images.join("plan.bin"));
    fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json"))
        .expect("write manifest.json");
}

/// The typed error of a failed command (`--error-json`): each kind comes
/// from what failed, and the message names the pid or path, as the
/// `cowsnap: ` line on stderr does. The shim and cowsnapd send these kinds
/// as status codes.
#[test]
fn error_json_classifies_each_failure() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("error.json");
    let kind_of = |args: &[&str], names: &str| -> String {
        let _ = fs::remove_file(&report);
        let mut full = vec!["--error-json", path_str(&report)];
        full.extend_from_slice(args);
        let out = cowsnap(&full);
        assert!(
            !out.status.success(),
            "{args:?} must fail:\n{}",
            describe(&out)
        );
        let text = fs::read_to_string(&report)
            .unwrap_or_else(|e| panic!("{args:?} wrote no {}: {e}", report.display()));
        let error: serde_json::Value = serde_json::from_str(&text).expect("error json");
        let message = error["message"].as_str().expect("message");
        assert!(
            message.contains(names),
            "{args:?}: {message:?} does not name {names:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(message),
            "{args:?}: stderr does not hold the message {message:?}:\n{stderr}"
        );
        error["kind"].as_str().expect("kind").to_string()
    };
    let images = dir.path().join("img");
    let images = path_str(&images);
    // A pid that does not exist.
    assert_eq!(
        kind_of(
            &["dump", "--pid", "999999999", "--images", images],
            "999999999"
        ),
        "not_found"
    );
    // A kernel thread (kthreadd) is not a process cowsnap dumps.
    assert_eq!(
        kind_of(&["dump", "--pid", "2", "--images", images], "pid 2"),
        "invalid_argument"
    );
    // An image directory that holds no image.
    fs::create_dir_all(dir.path().join("empty")).expect("mkdir");
    let empty = dir.path().join("empty");
    assert_eq!(
        kind_of(&["verify", path_str(&empty)], "manifest.json"),
        "invalid_argument"
    );
    // A netlink socket: refused at dump, as restore cannot reopen it.
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,0)\nprint(s.fileno(),flush=True)\ntime.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut line).expect("python3's fd");
    }
    let pid = child.id().to_string();
    let kind = kind_of(&["dump", "--pid", &pid, "--images", images], "netlink");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(kind, "unsupported");
    assert!(!Path::new(images).join("manifest.json").exists());
}
