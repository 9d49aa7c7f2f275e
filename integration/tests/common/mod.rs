//! Helpers of the end-to-end tests: running the reference tree
//! (`cowsnap-refworkload`), locating and running the `cowsnap` binary,
//! measuring what the kernel says about the tree's memory (pagemap PFNs,
//! PSS, /proc/PID/maps), reading an image with the format-v1 types, and
//! temporary cgroups.
//!
//! Everything here reads the live kernel and needs root: PFNs in
//! /proc/PID/pagemap are zero for anyone else, which would make every
//! page look shared.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use cowsnap::image::types::{PageIndex, PageRun, ProcessImage, Tree, Vma, VmaKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const PAGE: u64 = 4096;
/// How long a tree may take to set up, a process to answer SIGUSR1, or a
/// cowsnap command to finish before a test gives up (a timeout, not a measurement).
pub const PATIENCE: Duration = Duration::from_secs(300);

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests read PFNs from /proc/PID/pagemap, seize processes and create cgroups: run them as root"
    );
}

// ------------------------------------------------------------ the binaries

/// Path of the `cowsnap` binary the tests run.
///
/// `COWSNAP_BIN` wins if set. Otherwise the binary is built with the cargo
/// that runs these tests, into the same target directory and profile as
/// the test executable (target/<profile>/deps/dump-HASH →
/// target/<profile>/cowsnap): `cargo test -p cowsnap-integration` alone does
/// not build other packages' binaries, and Cargo has no stable way to
/// depend on one.
pub fn cowsnap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("COWSNAP_BIN") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("path of the test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "cowsnap", "--bin", "cowsnap"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the cowsnap binary");
        assert!(
            status.success(),
            "cargo build -p cowsnap --bin cowsnap failed"
        );
        let bin = profile_dir.join("cowsnap");
        assert!(
            bin.is_file(),
            "cowsnap binary not found at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

pub fn workload_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cowsnap-refworkload")
}

/// Runs `cowsnap ARGS`, failing the test if it does not end within [`PATIENCE`].
pub fn cowsnap(args: &[&str]) -> Output {
    let child = Command::new(cowsnap_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cowsnap");
    wait_output(child, &format!("cowsnap {}", args.join(" ")))
}

/// Waits for a spawned command, killing it and failing the test if it does
/// not end within [`PATIENCE`].
pub fn wait_status(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {PATIENCE:?}");
            }
            Err(e) => panic!("wait for {what}: {e}"),
        }
    }
}

/// A fresh temporary directory named `cowsnap-<what>-*` and the path of an
/// image directory inside it (`<dir>/img`, not created yet).
pub fn image_dir(what: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("cowsnap-{what}-"))
        .tempdir()
        .expect("tempdir");
    let images = dir.path().join("img");
    (dir, images)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// `cowsnap dump --pid ROOT --images IMAGES EXTRA...`, which must succeed.
pub fn dump_ok(tree: &RefTree, images: &Path, extra: &[&str]) -> Output {
    let root = tree.root.to_string();
    let mut args = vec!["dump", "--pid", &root, "--images", path_str(images)];
    args.extend_from_slice(extra);
    let output = cowsnap(&args);
    assert!(
        output.status.success(),
        "cowsnap dump failed:\n{}",
        describe(&output)
    );
    output
}

/// Starts `cowsnap restore -q --images IMAGES --pidfile PIDFILE EXTRA`.
/// Its stdout and stderr go to files beside the pid file, not to pipes: a
/// pipe only reaches end-of-file when every process holding it is gone,
/// and the restored tree outlives the command (see
/// `restore_leaves_callers_stdio_alone` for that property on its own).
pub fn spawn_restore(images: &Path, pidfile: &Path, extra: &[&str]) -> Child {
    let out = std::fs::File::create(pidfile.with_extension("stdout")).expect("restore stdout file");
    let err = std::fs::File::create(pidfile.with_extension("stderr")).expect("restore stderr file");
    Command::new(cowsnap_bin())
        .args([
            "restore",
            "-q",
            "--images",
            path_str(images),
            "--pidfile",
            path_str(pidfile),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn cowsnap restore")
}

/// Waits for a restore started by [`spawn_restore`] (at most [`PATIENCE`]).
pub fn wait_restore(mut child: Child, pidfile: &Path) -> Output {
    let status = wait_status(&mut child, "cowsnap restore");
    Output {
        status,
        stdout: std::fs::read(pidfile.with_extension("stdout")).unwrap_or_default(),
        stderr: std::fs::read(pidfile.with_extension("stderr")).unwrap_or_default(),
    }
}

pub fn run_restore(images: &Path, pidfile: &Path, extra: &[&str]) -> Output {
    let child = spawn_restore(images, pidfile, extra);
    wait_restore(child, pidfile)
}

/// Waits for a spawned command with piped stdout/stderr, failing the test
/// if it does not end within [`PATIENCE`].
pub fn wait_output(mut child: Child, what: &str) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_status(&mut child, what);
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

pub fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ------------------------------------------------------------ the reference tree

/// Options of one reference tree.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    pub mode: &'static str,
    pub mib: u64,
    pub children: u32,
    pub dirty_pct: u32,
}

impl TreeSpec {
    pub fn small(mode: &'static str) -> TreeSpec {
        TreeSpec {
            mode,
            mib: 16,
            children: 3,
            dirty_pct: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLine {
    pub pid: i32,
    pub name: String,
    pub start: u64,
    pub len: u64,
}

/// A running reference tree; dropping it kills the whole tree and removes
/// its SysV segments, whatever state the test left it in.
pub struct RefTree {
    pub spec: TreeSpec,
    root_process: Child,
    pub root: i32,
    pub dir: tempfile::TempDir,
    pub report: PathBuf,
    /// Every pid ever seen in the tree, for the final SIGKILL.
    seen: Mutex<Vec<i32>>,
    /// Set by [`RefTree::wait_exited`]: the tree is gone and its pids may
    /// belong to someone else (a restored tree), so drop signals nothing.
    exited: bool,
}

impl RefTree {
    pub fn start(spec: TreeSpec) -> RefTree {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cowsnap-tree-")
            .tempdir()
            .expect("tempdir");
        let report = dir.path().join("report");
        let ready = dir.path().join("ready");
        let stderr = fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let root_process = Command::new(workload_bin())
            .args(["--mode", spec.mode])
            .args(["--mib", &spec.mib.to_string()])
            .args(["--children", &spec.children.to_string()])
            .args(["--dirty-pct", &spec.dirty_pct.to_string()])
            .arg("--report")
            .arg(&report)
            .arg("--ready")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn cowsnap-refworkload");
        let root = root_process.id() as i32;
        let mut tree = RefTree {
            spec,
            root_process,
            root,
            dir,
            report,
            seen: Mutex::new(Vec::new()),
            exited: false,
        };
        let deadline = Instant::now() + PATIENCE;
        while !ready.exists() {
            if let Ok(Some(status)) = tree.root_process.try_wait() {
                panic!(
                    "reference tree ({:?}) exited during setup with {status}: {}",
                    tree.spec,
                    fs::read_to_string(tree.dir.path().join("stderr")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "reference tree not ready within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        tree.pids();
        tree
    }

    /// Pids of the tree, parents before children (walks
    /// /proc/PID/task/TID/children, so reparented processes are found under the root).
    pub fn pids(&self) -> Vec<i32> {
        descendants_seen(self.root, &self.seen)
    }

    pub fn report_text(&self) -> String {
        fs::read_to_string(&self.report).unwrap_or_default()
    }

    pub fn regions(&self) -> Vec<RegionLine> {
        self.report_text()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    ["REGION", pid, name, start, len] => Some(RegionLine {
                        pid: pid.parse().ok()?,
                        name: name.to_string(),
                        start: u64::from_str_radix(start.trim_start_matches("0x"), 16).ok()?,
                        len: len.parse().ok()?,
                    }),
                    _ => None,
                }
            })
            .collect()
    }

    /// SysV segments the root reported: (shmid, attached, bytes).
    pub fn segments(&self) -> Vec<(i32, bool, u64)> {
        self.report_text()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    ["SHM", id, kind, len] => {
                        Some((id.parse().ok()?, *kind == "attached", len.parse().ok()?))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Sends SIGUSR1 to every process and asserts each one reports that its
    /// memory is exactly what it should be.
    pub fn assert_verifies(&self, context: &str) {
        let targets: Vec<(i32, i32)> = self.pids().into_iter().map(|p| (p, p)).collect();
        assert_processes_verify(&self.report, &targets, context);
    }

    /// Waits until the tree is gone after something killed it (`cowsnap dump
    /// --exit`): reaps the root (this test process is its parent) and waits
    /// until no pid ever seen in the tree is left in /proc (the others are
    /// reaped by init). From then on dropping the tree signals nothing, since
    /// its pids may be reused (e.g. by a restore in this pid namespace).
    pub fn wait_exited(&mut self, context: &str) -> std::process::ExitStatus {
        self.pids();
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            match self.root_process.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("{context}: wait for the root {}: {e}", self.root),
            }
            assert!(
                Instant::now() < deadline,
                "{context}: root {} still alive after {PATIENCE:?} (state {:?})",
                self.root,
                task_state(self.root)
            );
            thread::sleep(Duration::from_millis(10));
        };
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        loop {
            let left: Vec<(i32, String)> = seen
                .iter()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .map(|&p| (p, task_state(p)))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: processes of the tree still exist: {left:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.exited = true;
        status
    }

    /// Every process and thread exists, is not stopped/traced/zombie, and has no tracer.
    pub fn assert_running_untraced(&self, context: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let problems = self.running_problems();
            if problems.is_empty() {
                return;
            }
            // The kernel detaches tracees when their tracer dies; give it a moment.
            assert!(
                Instant::now() < deadline,
                "{context}: tree not running untouched: {problems:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn running_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let pids = self.pids();
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        for pid in seen.iter().filter(|p| !pids.contains(p)) {
            problems.push(format!("pid {pid} left the tree"));
        }
        for &pid in &pids {
            for tid in tids(pid) {
                let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                    .unwrap_or_default();
                let state = status_field(&status, "State:").unwrap_or_default();
                let tracer = status_field(&status, "TracerPid:").unwrap_or_default();
                if state.starts_with('t')
                    || state.starts_with('T')
                    || state.starts_with('Z')
                    || state.is_empty()
                {
                    problems.push(format!("tid {tid} of {pid} in state {state:?}"));
                }
                if tracer != "0" {
                    problems.push(format!("tid {tid} of {pid} traced by {tracer}"));
                }
            }
        }
        problems
    }
}

impl Drop for RefTree {
    fn drop(&mut self) {
        if self.exited {
            for (id, _, _) in self.segments() {
                let _ = Command::new("ipcrm")
                    .args(["-m", &id.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            return;
        }
        let mut pids = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        pids.extend(descendants(self.root));
        let _ = kill(Pid::from_raw(self.root), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.root_process.try_wait() {
                exited = true;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            // Frozen, traced or wedged: SIGKILL everything we ever saw.
            for &pid in &pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.root_process.kill();
            let _ = self.root_process.wait();
        }
        for (id, _, _) in self.segments() {
            let _ = Command::new("ipcrm")
                .args(["-m", &id.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends SIGUSR1 to each `(signalled, reported_as)` pid and asserts that
/// every one answers `OK <reported_as>` in `report` (only lines appended
/// after the signals count). `reported_as` differs from `signalled` for a
/// process in another pid namespace: the workload reports its own getpid().
/// Fails at once if a process is gone or a zombie: it can never answer.
pub fn assert_processes_verify(report: &Path, targets: &[(i32, i32)], context: &str) {
    let offset = fs::metadata(report).map(|m| m.len()).unwrap_or(0) as usize;
    for &(pid, _) in targets {
        kill(Pid::from_raw(pid), Signal::SIGUSR1)
            .unwrap_or_else(|e| panic!("{context}: SIGUSR1 to pid {pid}: {e}"));
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = fs::read_to_string(report).unwrap_or_default();
        let fresh = text.get(offset..).unwrap_or("");
        let mut answers: BTreeMap<i32, String> = BTreeMap::new();
        for line in fresh.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [kind @ ("OK" | "BAD"), pid, ..] = fields.as_slice() {
                let pid = pid.parse().unwrap_or(0);
                if *kind == "BAD" || !answers.contains_key(&pid) {
                    answers.insert(pid, line.to_string());
                }
            }
        }
        let missing: Vec<(i32, i32)> = targets
            .iter()
            .copied()
            .filter(|(_, as_pid)| !answers.contains_key(as_pid))
            .collect();
        if missing.is_empty() {
            let bad: Vec<&String> = answers.values().filter(|l| l.starts_with("BAD")).collect();
            assert!(
                bad.is_empty(),
                "{context}: processes found their memory altered: {bad:?}"
            );
            return;
        }
        let dead: Vec<(i32, String)> = missing
            .iter()
            .map(|&(pid, _)| (pid, task_state(pid)))
            .filter(|(_, state)| state.is_empty() || state.starts_with('Z'))
            .collect();
        assert!(
            dead.is_empty(),
            "{context}: processes died before answering SIGUSR1 (pid, state): {dead:?}"
        );
        assert!(
            Instant::now() < deadline,
            "{context}: no verification answer within {PATIENCE:?} from (pid, reported as) {missing:?} (states: {:?})",
            missing
                .iter()
                .map(|&(p, _)| (p, task_state(p)))
                .collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------ procfs

pub fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// `State:` of /proc/PID/status, e.g. "S (sleeping)"; empty if the pid is gone.
pub fn task_state(pid: i32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "State:").unwrap_or_default()
}

pub fn ppid(pid: i32) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "PPid:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The pid as the process's own (innermost) pid namespace sees it: the
/// last field of `NSpid:`; 0 if the pid is gone.
pub fn ns_pid(pid: i32) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    innermost_nspid(&status)
}

/// [`ns_pid`] for thread `tid` of `pid`.
pub fn ns_tid(pid: i32, tid: i32) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    innermost_nspid(&status)
}

fn innermost_nspid(status: &str) -> i32 {
    status_field(status, "NSpid:")
        .and_then(|v| v.split_whitespace().last().and_then(|p| p.parse().ok()))
        .unwrap_or(0)
}

pub fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default()
}

/// Target of /proc/PID/exe ("" if unreadable).
pub fn exe(pid: i32) -> String {
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// /proc/PID/cmdline with NULs turned into spaces ("" for zombies and kernel threads).
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// (process group, session) of `pid` from /proc/PID/stat; None if it is gone.
pub fn pgid_sid(pid: i32) -> Option<(i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state ppid pgrp session ...
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// Every pid in /proc right now.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn tids(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// `root` and all its descendants, parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        out.push(pid);
        let mut children = Vec::new();
        for tid in tids(pid) {
            let text =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        children.sort_unstable();
        stack.extend(children.into_iter().rev());
    }
    out
}

/// Sum of `Pss_Anon` + `Pss_Shmem` over `pids`, in bytes.
pub fn pss_anon_shmem(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            ["Pss_Anon:", "Pss_Shmem:"]
                .iter()
                .filter_map(|key| status_field(&text, key))
                .filter_map(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .sum::<u64>()
                * 1024
        })
        .sum()
}

/// Sum of `Pss_Anon` over `pids`, in bytes.
pub fn pss_anon(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            status_field(&text, "Pss_Anon:")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        })
        .sum()
}

/// Sum of `Pss` over `pids`, in bytes.
pub fn pss_total(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            status_field(&text, "Pss:")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        })
        .sum()
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
}

impl MapsEntry {
    pub fn prot(&self) -> u32 {
        let b = self.perms.as_bytes();
        let mut prot = 0;
        if b.first() == Some(&b'r') {
            prot |= libc::PROT_READ as u32;
        }
        if b.get(1) == Some(&b'w') {
            prot |= libc::PROT_WRITE as u32;
        }
        if b.get(2) == Some(&b'x') {
            prot |= libc::PROT_EXEC as u32;
        }
        prot
    }
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }
    /// Shared memory whose pages an image stores (shared anonymous, memfd, SysV).
    pub fn is_shmem(&self) -> bool {
        self.path.starts_with("/dev/zero")
            || self.path.starts_with("/memfd:")
            || self.path.starts_with("/SYSV")
    }
    /// Kernel-provided special mappings ([vdso], [vvar], [vvar_vclock], [vsyscall]).
    pub fn is_special(&self) -> bool {
        self.path.starts_with("[v")
    }
}

pub fn maps(pid: i32) -> Vec<MapsEntry> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/maps: {e}"));
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, char::is_whitespace);
            let range = fields.next()?;
            let perms = fields.next()?.to_string();
            let path = fields.nth(3).unwrap_or("").trim().to_string();
            let (start, end) = range.split_once('-')?;
            Some(MapsEntry {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                path,
            })
        })
        .collect()
}

/// What the kernel says about one virtual page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Neither present nor swapped.
    Absent,
    /// Present (or swapped) and all zero, including the kernel zero page.
    Zero,
    /// Present with non-zero contents: its physical identity (PFN, or the
    /// swap entry with bit 63 set).
    Data(u64),
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Raw pagemap entries of [start, start + pages * PAGE) of `pid`.
fn pagemap(pid: i32, start: u64, pages: u64) -> Vec<u64> {
    let file = fs::File::open(format!("/proc/{pid}/pagemap"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/pagemap: {e}"));
    let mut raw = vec![0u8; pages as usize * 8];
    file.read_exact_at(&mut raw, start / PAGE * 8)
        .unwrap_or_else(|e| panic!("read /proc/{pid}/pagemap at {start:#x}: {e}"));
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Classifies every page of a range. Only present pages are read (through
/// /proc/PID/mem), so the scan never faults a page into the tree.
/// `include_file` = false skips file-backed pages (reported Absent).
pub fn scan(pid: i32, start: u64, pages: u64, include_file: bool) -> Vec<PageState> {
    let entries = pagemap(pid, start, pages);
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    let mut buf = vec![0u8; PAGE as usize];
    entries
        .iter()
        .enumerate()
        .map(|(i, &entry)| {
            if entry & (PM_PRESENT | PM_SWAP) == 0
                || (!include_file && entry & PM_FILE_OR_SHARED != 0)
            {
                return PageState::Absent;
            }
            if entry & PM_SWAP != 0 {
                return PageState::Data((1 << 63) | (entry & PM_PFN_MASK));
            }
            let addr = start + i as u64 * PAGE;
            mem.read_exact_at(&mut buf, addr)
                .unwrap_or_else(|e| panic!("read /proc/{pid}/mem at {addr:#x}: {e}"));
            let pfn = entry & PM_PFN_MASK;
            assert!(
                pfn != 0,
                "pid {pid} {addr:#x}: PFN 0 in pagemap (not root?)"
            );
            // Zero: the kernel's zero page. An allocated page that holds
            // zeros is memory like any other (and the dump stores it).
            if buf.iter().all(|&b| b == 0) && is_kernel_zero_frame(pfn) {
                PageState::Zero
            } else {
                PageState::Data(pfn)
            }
        })
        .collect()
}

/// Whether frame `pfn` is a kernel zero page: bit KPF_ZERO_PAGE (24) of its
/// word in /proc/kpageflags, read here rather than through the library
/// under test. An unreadable /proc/kpageflags fails the test.
fn is_kernel_zero_frame(pfn: u64) -> bool {
    const KPF_ZERO_PAGE: u64 = 24;
    static FLAGS: OnceLock<std::fs::File> = OnceLock::new();
    let flags = FLAGS.get_or_init(|| {
        std::fs::File::open("/proc/kpageflags").expect("open /proc/kpageflags (root?)")
    });
    let mut word = [0u8; 8];
    flags
        .read_exact_at(&mut word, pfn * 8)
        .unwrap_or_else(|e| panic!("/proc/kpageflags at pfn {pfn:#x}: {e}"));
    (u64::from_ne_bytes(word) >> KPF_ZERO_PAGE) & 1 == 1
}

/// What the kernel says about the tree's memory, at one moment.
#[derive(Debug, Clone)]
pub struct MemorySnapshot {
    pub pids: Vec<i32>,
    pub tids: BTreeMap<i32, Vec<i32>>,
    pub maps: BTreeMap<i32, Vec<MapsEntry>>,
    /// Every page of the workload's REGION lines: (pid, address) → state.
    pub region_pages: BTreeMap<(i32, u64), PageState>,
    /// Distinct physical pages with non-zero contents over every page an
    /// image stores (private anonymous, COW'ed private file, shmem), all processes.
    pub unique_data_pages: u64,
    /// References to such pages: per process, (non-zero refs, zero refs).
    pub per_process: BTreeMap<i32, (u64, u64)>,
    /// Every such page that is present (zero or not): (pid, address) → state.
    pub stored_pages: BTreeMap<(i32, u64), PageState>,
    pub pss_anon_shmem: u64,
    pub pss: u64,
}

impl MemorySnapshot {
    pub fn take(tree: &RefTree) -> MemorySnapshot {
        let pids = tree.pids();
        let mut snapshot = MemorySnapshot {
            pids: pids.clone(),
            tids: pids.iter().map(|&p| (p, tids(p))).collect(),
            maps: BTreeMap::new(),
            region_pages: BTreeMap::new(),
            unique_data_pages: 0,
            per_process: BTreeMap::new(),
            stored_pages: BTreeMap::new(),
            pss_anon_shmem: pss_anon_shmem(&pids),
            pss: pss_total(&pids),
        };
        for region in tree.regions() {
            assert!(
                pids.contains(&region.pid),
                "REGION of pid {} outside the tree {pids:?}",
                region.pid
            );
            let states = scan(region.pid, region.start, region.len / PAGE, true);
            for (i, state) in states.into_iter().enumerate() {
                snapshot
                    .region_pages
                    .insert((region.pid, region.start + i as u64 * PAGE), state);
            }
        }
        let mut identities = std::collections::HashSet::new();
        for &pid in &pids {
            let entries = maps(pid);
            let mut data = 0;
            let mut zero = 0;
            for entry in entries.iter().filter(|e| !e.is_special()) {
                let pages = (entry.end - entry.start) / PAGE;
                for (i, state) in scan(pid, entry.start, pages, entry.is_shmem())
                    .into_iter()
                    .enumerate()
                {
                    if state != PageState::Absent {
                        snapshot
                            .stored_pages
                            .insert((pid, entry.start + i as u64 * PAGE), state);
                    }
                    match state {
                        PageState::Absent => {}
                        PageState::Zero => zero += 1,
                        PageState::Data(id) => {
                            data += 1;
                            identities.insert(id);
                        }
                    }
                }
            }
            snapshot.per_process.insert(pid, (data, zero));
            snapshot.maps.insert(pid, entries);
        }
        snapshot.unique_data_pages = identities.len() as u64;
        snapshot
    }

    pub fn zero_refs(&self) -> u64 {
        self.per_process.values().map(|&(_, zero)| zero).sum()
    }

    /// The sharing structure of the regions' non-zero pages: which
    /// (pid, address) pairs sit on the same physical page. Independent of
    /// PFN values, so the kernel migrating a page does not change it.
    pub fn region_sharing(&self) -> Vec<Vec<(i32, u64)>> {
        let mut groups: HashMap<u64, Vec<(i32, u64)>> = HashMap::new();
        for (&key, state) in &self.region_pages {
            if let PageState::Data(id) = state {
                groups.entry(*id).or_default().push(key);
            }
        }
        let mut groups: Vec<Vec<(i32, u64)>> = groups.into_values().collect();
        groups.sort();
        groups
    }
}

// ------------------------------------------------------------ images

/// What an image says about one virtual page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePage {
    Stored(u64),
    Zero,
    Absent,
    /// No VMA of the image covers the address.
    Unmapped,
}

/// An image read straight from its files with the format-v1 types (not
/// through `cowsnap::image::Image`, so these tests check the files
/// themselves).
pub struct ImageFiles {
    pub tree: Tree,
    pub processes: BTreeMap<i32, ProcessImage>,
    pub index: PageIndex,
    pub root_pid: i32,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The page runs of `proc-<pid>.runs` (format 1.5: one zstd frame of a
/// 16-byte header, then per run: VMA index u32, kind u32, start, pages,
/// first page id, little-endian) into the process's VMAs. Read here on its
/// own, not through cowsnap's reader: this is the test's view of the file.
fn read_runs(path: &Path, process: &mut ProcessImage) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let raw = zstd::stream::decode_all(&bytes[..])
        .unwrap_or_else(|e| panic!("decompress {}: {e}", path.display()));
    assert_eq!(&raw[..8], b"CSRUNS01", "{}: magic", path.display());
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let count = le(&raw[8..16]) as usize;
    assert_eq!(raw.len(), 16 + 32 * count, "{}: length", path.display());
    for r in raw[16..].chunks_exact(32) {
        let vma = u32::from_le_bytes(r[0..4].try_into().expect("4")) as usize;
        let kind = u32::from_le_bytes(r[4..8].try_into().expect("4"));
        let (start, pages, first) = (le(&r[8..16]), le(&r[16..24]), le(&r[24..32]));
        let run = match kind {
            0 => PageRun::Stored {
                start,
                pages,
                first,
            },
            1 => PageRun::Zero { start, pages },
            2 => PageRun::Absent { start, pages },
            3 => PageRun::Mapped { start, pages },
            k => panic!("{}: run kind {k}", path.display()),
        };
        process.vmas[vma].pages.push(run);
    }
}

impl ImageFiles {
    pub fn read(dir: &Path) -> ImageFiles {
        use cowsnap::image::types::{Manifest, MANIFEST_FILE, PAGE_INDEX_FILE, TREE_FILE};
        let manifest: Manifest = read_json(&dir.join(MANIFEST_FILE));
        let tree: Tree = read_json(&dir.join(TREE_FILE));
        let index: PageIndex = read_json(&dir.join(PAGE_INDEX_FILE));
        let processes = tree
            .processes
            .iter()
            .map(|p| {
                let mut process = read_json::<ProcessImage>(&dir.join(&p.file));
                if let Some(runs) = process.runs_file.clone() {
                    read_runs(&dir.join(runs), &mut process);
                }
                (p.pid, process)
            })
            .collect();
        ImageFiles {
            tree,
            processes,
            index,
            root_pid: manifest.root_pid,
        }
    }

    pub fn vma(&self, pid: i32, addr: u64) -> Option<&Vma> {
        let vmas = &self.processes.get(&pid)?.vmas;
        let i = vmas.partition_point(|v| v.end <= addr);
        vmas.get(i).filter(|v| v.start <= addr)
    }

    pub fn page(&self, pid: i32, addr: u64) -> ImagePage {
        let Some(vma) = self.vma(pid, addr) else {
            return ImagePage::Unmapped;
        };
        for run in &vma.pages {
            let start = run.start();
            if addr >= start && addr < start + run.pages() * PAGE {
                return match *run {
                    PageRun::Stored { first, .. } => {
                        ImagePage::Stored(first + (addr - start) / PAGE)
                    }
                    PageRun::Zero { .. } => ImagePage::Zero,
                    PageRun::Absent { .. } | PageRun::Mapped { .. } => ImagePage::Absent,
                };
            }
        }
        ImagePage::Unmapped
    }
}

pub fn is_special(kind: VmaKind) -> bool {
    matches!(kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::Vsyscall)
}

/// Checks an image against the kernel's view of the tree: `before` was
/// taken just before the dump, `after` just after it.
pub fn check_image(
    tree: &RefTree,
    images: &Path,
    before: &MemorySnapshot,
    after: &MemorySnapshot,
) -> ImageFiles {
    let image = ImageFiles::read(images);
    let mut errors: Vec<String> = Vec::new();

    // The tree: same processes, parents first, same threads.
    assert_eq!(image.root_pid, tree.root, "manifest root_pid");
    let image_pids: Vec<i32> = image.tree.processes.iter().map(|p| p.pid).collect();
    let mut sorted_image = image_pids.clone();
    sorted_image.sort_unstable();
    let mut sorted_tree = before.pids.clone();
    sorted_tree.sort_unstable();
    assert_eq!(sorted_image, sorted_tree, "processes in tree.json");
    assert_eq!(
        image_pids.first(),
        Some(&tree.root),
        "tree.json starts with the root"
    );
    for (i, process) in image.tree.processes.iter().enumerate() {
        if process.pid == tree.root {
            assert_eq!(process.ppid, 0, "ppid of the root in tree.json");
        } else {
            assert_eq!(
                process.ppid,
                ppid(process.pid),
                "ppid of {} in tree.json",
                process.pid
            );
            assert!(
                image_pids[..i].contains(&process.ppid),
                "tree.json lists {} before its parent {}",
                process.pid,
                process.ppid
            );
        }
        let mut image_tids = process.tids.clone();
        image_tids.sort_unstable();
        assert_eq!(
            Some(&image_tids),
            before.tids.get(&process.pid),
            "threads of {}",
            process.pid
        );
        assert_eq!(
            process.tids.first(),
            Some(&process.pid),
            "thread-group leader first for {}",
            process.pid
        );
    }

    // The layout: every VMA of /proc/PID/maps, with its bounds and protection.
    for (&pid, entries) in &before.maps {
        let vmas = &image.processes[&pid].vmas;
        let listed: Vec<&MapsEntry> = entries.iter().filter(|e| e.path != "[vsyscall]").collect();
        let kept: Vec<_> = vmas
            .iter()
            .filter(|v| v.kind != VmaKind::Vsyscall)
            .collect();
        if listed.len() != kept.len() {
            errors.push(format!(
                "pid {pid}: {} VMAs in maps, {} in the image",
                listed.len(),
                kept.len()
            ));
        }
        for entry in listed {
            match image.vma(pid, entry.start) {
                Some(v)
                    if v.start == entry.start
                        && v.end == entry.end
                        && v.prot == entry.prot()
                        && v.shared == entry.shared() => {}
                other => errors.push(format!(
                    "pid {pid}: maps has {:#x}-{:#x} {} {}, image has {:?}",
                    entry.start,
                    entry.end,
                    entry.perms,
                    entry.path,
                    other.map(|v| (v.start, v.end, v.prot, v.shared, v.kind))
                )),
            }
        }
    }

    // The workload's regions, page by page: same classification, and page
    // ids in one-to-one correspondence with physical pages.
    let mut id_of_pfn: HashMap<u64, u64> = HashMap::new();
    let mut pfn_of_id: HashMap<u64, u64> = HashMap::new();
    for (&(pid, addr), &state) in &before.region_pages {
        let page = image.page(pid, addr);
        let consistent = match (state, page) {
            (PageState::Absent, ImagePage::Absent) | (PageState::Zero, ImagePage::Zero) => true,
            (PageState::Data(pfn), ImagePage::Stored(id)) => {
                let same_id = *id_of_pfn.entry(pfn).or_insert(id) == id;
                let same_pfn = *pfn_of_id.entry(id).or_insert(pfn) == pfn;
                if !same_id {
                    errors.push(format!(
                        "pid {pid} {addr:#x}: one physical page stored under two ids"
                    ));
                }
                if !same_pfn {
                    errors.push(format!(
                        "pid {pid} {addr:#x}: page id {id} stands for two physical pages"
                    ));
                }
                true
            }
            _ => false,
        };
        if !consistent {
            errors.push(format!(
                "pid {pid} {addr:#x}: kernel says {state:?}, image says {page:?}"
            ));
        }
    }

    // Whole tree, as the kernel had it after the dump: every present page
    // an image stores is classified alike, again one id per physical page.
    let mut whole_id_of_pfn: HashMap<u64, u64> = HashMap::new();
    let mut whole_pfn_of_id: HashMap<u64, u64> = HashMap::new();
    for (&(pid, addr), &state) in &after.stored_pages {
        let page = image.page(pid, addr);
        match (state, page) {
            (PageState::Zero, ImagePage::Zero) => {}
            (PageState::Data(pfn), ImagePage::Stored(id)) => {
                if *whole_id_of_pfn.entry(pfn).or_insert(id) != id {
                    errors.push(format!(
                        "pid {pid} {addr:#x}: one physical page stored under two ids"
                    ));
                }
                if *whole_pfn_of_id.entry(id).or_insert(pfn) != pfn {
                    errors.push(format!(
                        "pid {pid} {addr:#x}: page id {id} stands for two physical pages"
                    ));
                }
            }
            _ => errors.push(format!(
                "pid {pid} {addr:#x}: kernel says {state:?}, image says {page:?}"
            )),
        }
    }

    // Whole tree: references per process and unique pages.
    let mut image_refs: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for (&pid, process) in &image.processes {
        let (mut stored, mut zero) = (0, 0);
        for vma in process.vmas.iter().filter(|v| !is_special(v.kind)) {
            for run in &vma.pages {
                match *run {
                    PageRun::Stored { pages, first, .. } => {
                        stored += pages;
                        if first + pages > image.index.page_count {
                            errors.push(format!(
                                "pid {pid}: page ids {first}+{pages} beyond the store"
                            ));
                        }
                    }
                    PageRun::Zero { pages, .. } => zero += pages,
                    PageRun::Absent { .. } | PageRun::Mapped { .. } => {}
                }
            }
        }
        image_refs.insert(pid, (stored, zero));
    }
    if image_refs != after.per_process {
        errors.push(format!(
            "(stored, zero) page references per process: image {image_refs:?}, kernel {:?} (before the dump: {:?})",
            after.per_process, before.per_process
        ));
    }
    // A SysV segment nobody attached may be stored or not; nothing else may differ.
    let unattached_pages: u64 = tree
        .segments()
        .iter()
        .filter(|(_, attached, _)| !attached)
        .map(|(_, _, bytes)| bytes / PAGE)
        .sum();
    let stored = image.index.page_count;
    let expected = after.unique_data_pages;
    if stored < expected || stored > expected + unattached_pages {
        errors.push(format!(
            "{stored} unique pages stored; the tree has {expected} distinct non-zero physical pages \
             ({} before the dump){}",
            before.unique_data_pages,
            if unattached_pages > 0 {
                format!(" plus {unattached_pages} in an unattached segment")
            } else {
                String::new()
            }
        ));
    }
    // Target: image ≤ 1.0 × the tree's unique memory. PSS is rounded down to
    // a kB per process and field; allow that.
    let slack = before.pids.len() as u64 * 2 * 1024 + unattached_pages * PAGE;
    if stored * PAGE > before.pss_anon_shmem + slack {
        errors.push(format!(
            "{} bytes of unique pages stored, more than the tree's anonymous+shmem PSS of {} bytes",
            stored * PAGE,
            before.pss_anon_shmem
        ));
    }
    assert!(
        errors.is_empty(),
        "image {} disagrees with the kernel:\n  {}",
        images.display(),
        errors
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    image
}

// ------------------------------------------------------------ cgroups

/// The hierarchy the tests make cgroups in: the v1 freezer or v2
/// hierarchy where this host mounts it (`/sys/fs/cgroup/freezer` and
/// `/sys/fs/cgroup/unified` on a hybrid host; `/sys/fs/cgroup` is v2 on a
/// pure v2 one), else one mounted for the tests under /run and left
/// mounted. Fails the test if there is none and mounting one fails.
pub fn cgroup_hierarchy(v2: bool) -> PathBuf {
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _serial = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let layout = cowsnap::sys::cgroup::CgroupLayout::current().expect("read /proc/self/mountinfo");
    let found = if v2 { &layout.v2 } else { &layout.v1_freezer };
    if let Some(m) = found.as_ref().filter(|m| m.root == "/") {
        return m.point.clone();
    }
    let (point, options) = if v2 {
        ("/run/cowsnap-test-cgroup2", ["-t", "cgroup2"].as_slice())
    } else {
        (
            "/run/cowsnap-test-freezer",
            ["-t", "cgroup", "-o", "freezer"].as_slice(),
        )
    };
    fs::create_dir_all(point).unwrap_or_else(|e| panic!("mkdir {point}: {e}"));
    let status = Command::new("mount")
        .args(options)
        .args(["cowsnap-test", point])
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "the {} cgroup layout has no {} hierarchy and `mount {options:?} cowsnap-test {point}` failed",
        layout.name(),
        if v2 { "v2" } else { "v1 freezer" }
    );
    PathBuf::from(point)
}

/// A cgroup created for one test in [`cgroup_hierarchy`]. Dropping it
/// thaws it, moves its tasks back to the hierarchy's root and removes it.
pub struct TestCgroup {
    pub dir: PathBuf,
    pub v2: bool,
}

impl TestCgroup {
    pub fn create(v2: bool, name: &str) -> TestCgroup {
        let hierarchy = cgroup_hierarchy(v2);
        let dir = hierarchy.join(format!("cowsnap-test-{}-{name}", std::process::id()));
        if dir.exists() {
            let _ = fs::remove_dir(&dir);
        }
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        TestCgroup { dir, v2 }
    }

    pub fn add(&self, pids: &[i32]) {
        let procs = self.dir.join("cgroup.procs");
        for pid in pids {
            fs::write(&procs, pid.to_string())
                .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
        }
    }

    /// "THAWED", "FREEZING" or "FROZEN" (v2 mapped onto the v1 words).
    pub fn state(&self) -> String {
        if self.v2 {
            let events = fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            let freeze = fs::read_to_string(self.dir.join("cgroup.freeze")).unwrap_or_default();
            match (status_field(&events, "frozen").as_deref(), freeze.trim()) {
                (Some("1"), _) => "FROZEN".into(),
                (_, "1") => "FREEZING".into(),
                _ => "THAWED".into(),
            }
        } else {
            fs::read_to_string(self.dir.join("freezer.state"))
                .unwrap_or_default()
                .trim()
                .to_string()
        }
    }

    fn thaw(&self) {
        let (file, value) = if self.v2 {
            ("cgroup.freeze", "0")
        } else {
            ("freezer.state", "THAWED")
        };
        let _ = fs::write(self.dir.join(file), value);
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.thaw();
        let parent_procs = self.dir.parent().map(|p| p.join("cgroup.procs"));
        for _ in 0..100 {
            let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            if let Some(parent) = &parent_procs {
                for pid in procs.split_whitespace() {
                    let _ = fs::write(parent, pid);
                }
            }
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not remove cgroup {}", self.dir.display());
    }
}

// ------------------------------------------------------------ a dump to kill

/// A `cowsnap dump` running in the background, its stderr collected line by line.
pub struct BackgroundDump {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl BackgroundDump {
    pub fn spawn(args: &[&str]) -> BackgroundDump {
        let mut child = Command::new(cowsnap_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cowsnap dump");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let lines = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
        });
        BackgroundDump {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGKILLs the dumper once `in_progress()` has held for a little while
    /// or it printed a progress line. Panics if it ends on its own first:
    /// then the test could not observe what it is about.
    pub fn kill_mid_dump(mut self, in_progress: impl Fn() -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut since: Option<Instant> = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the dump ended ({status}) before it could be killed mid-way; stderr: {:?}",
                    self.stderr_lines()
                );
            }
            let progressed = !self.stderr_lines().is_empty();
            if in_progress() {
                since.get_or_insert_with(Instant::now);
            }
            let held = since.is_some_and(|t| t.elapsed() >= Duration::from_millis(200));
            if progressed || held {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dump made no progress within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.stderr_lines()
    }
}

impl Drop for BackgroundDump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` has a tracer right now.
pub fn is_traced(pid: i32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "TracerPid:").is_some_and(|t| t != "0")
}

/// `REAPED <pid> <status>` lines (the zombie mode's reaping) of `report`
/// after byte `offset`, by pid.
pub fn reaped_after(report: &Path, offset: usize) -> BTreeMap<i32, String> {
    let text = fs::read_to_string(report).unwrap_or_default();
    text.get(offset..)
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("REAPED ")?.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.to_string()))
        })
        .collect()
}

/// [`descendants`] of `root`, also added to `seen` (every pid a tree ever
/// had, for its final SIGKILL).
pub fn descendants_seen(root: i32, seen: &Mutex<Vec<i32>>) -> Vec<i32> {
    let pids = descendants(root);
    if let Ok(mut seen) = seen.lock() {
        for &pid in &pids {
            if !seen.contains(&pid) {
                seen.push(pid);
            }
        }
    }
    pids
}

/// `cowsnap inspect DIR --json`, which must succeed and print JSON.
pub fn inspect_json(images: &Path) -> serde_json::Value {
    let output = cowsnap(&["inspect", path_str(images), "--json"]);
    assert!(
        output.status.success(),
        "cowsnap inspect --json failed:\n{}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("inspect --json is not JSON ({e}):\n{}", describe(&output)))
}
