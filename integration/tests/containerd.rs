//! End-to-end tests with the real containerd, runc and the stock `ctr`:
//! the harness itself against containerd's runc shim, then the flows
//! DESIGN.md "In containerd" requires of `io.containerd.cowsnap.v1`.
//!
//! Each test starts its own private containerd (common/containerd.rs) and
//! imports the reference image; dropping the harness removes everything.
//! Run them one at a time (`--test-threads=1`): they freeze cgroups and
//! build a reference tree of 128 MiB.

mod common;
#[path = "common/containerd.rs"]
mod harness;

use std::fs;
use std::thread;
use std::time::Duration;

use common::{assert_processes_verify, ns_pid};
use harness::{Containerd, COUNTER_LOOP, COWSNAP_RUNTIME, IMAGE_WORKLOAD, RUNC_RUNTIME};

/// Long enough for several iterations of the 0.1 s counter loop: a counter
/// that stays put this long while paused is not advancing.
const PAUSED_WATCH: Duration = Duration::from_millis(700);

/// Media type under which containerd stores the blob a shim's Checkpoint wrote.
const CHECKPOINT_MEDIA_TYPE: &str = "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// comm of the reference workload (the kernel keeps 15 bytes).
const WORKLOAD_COMM: &str = "cowsnap-refwork";

/// The counter container: pause stops the counter, resume restarts it,
/// SIGKILL stops the task, delete removes task and container.
fn pause_resume_kill_delete(ctrd: &Containerd, id: &str) {
    let first = ctrd.wait_counter_above(id, 0);
    let running = ctrd.wait_counter_above(id, first);

    // `ctr task ps` (the shim's Pids) lists the init.
    let init = ctrd.task(id).expect("task listed").pid;
    let ps = ctrd.ctr_ok(&["task", "ps", id]);
    assert!(
        ps.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(init.to_string().as_str())),
        "ctr task ps {id} does not list init {init}:\n{ps}"
    );

    ctrd.ctr_ok(&["task", "pause", id]);
    ctrd.wait_status(id, "PAUSED");
    let paused = ctrd.counter(id).expect("counter while paused");
    assert!(
        paused >= running,
        "counter went back: {running} then {paused}"
    );
    thread::sleep(PAUSED_WATCH);
    assert_eq!(
        ctrd.counter(id),
        Some(paused),
        "counter of {id} advanced while the task was PAUSED"
    );

    ctrd.ctr_ok(&["task", "resume", id]);
    ctrd.wait_status(id, "RUNNING");
    ctrd.wait_counter_above(id, paused);

    ctrd.kill_and_delete(id);
}

/// The archive writer the image is built with, read back by GNU tar (which
/// checks every header checksum) and by the harness's own reader; and the
/// digest helper on a known vector.
#[test]
fn harness_tar_and_digest() {
    let mut tar = harness::TarWriter::default();
    tar.dir("bin", 0o755);
    tar.file("bin/hello", 0o755, b"hello\n");
    tar.symlink("bin/hi", "hello");
    tar.file("etc/long", 0o644, &vec![7u8; 1000]);
    let bytes = tar.finish();
    assert_eq!(bytes.len() % 512, 0, "archive is not whole blocks");
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("t.tar");
    fs::write(&archive, &bytes).expect("write archive");
    let listing = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&archive)
        .output()
        .expect("run tar");
    assert!(
        listing.status.success(),
        "tar refuses the archive:\n{}",
        common::describe(&listing)
    );
    let text = String::from_utf8_lossy(&listing.stdout);
    for wanted in ["bin/", "bin/hello", "bin/hi -> hello", "etc/long"] {
        assert!(
            text.contains(wanted),
            "tar -tv does not show {wanted}:\n{text}"
        );
    }
    assert_eq!(
        harness::tar_file_names(&bytes),
        vec!["bin/hello", "etc/long"]
    );
    assert_eq!(
        harness::sha256_digest(b"abc"),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn harness_runs_stock_runc() {
    let ctrd = Containerd::start("stock");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    let task = ctrd.run(RUNC_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    assert!(task.pid > 0, "task {id} has no pid: {task:?}");
    // The shell is the container's init, in a pid namespace of its own.
    assert_eq!(
        ns_pid(task.pid),
        1,
        "init of {id} is not pid 1 in its namespace"
    );
    assert!(
        ctrd.cgroup_pids(&id).contains(&task.pid),
        "init {} not in its own cgroup",
        task.pid
    );
    // The workload binary and its libraries made it into the image.
    let workload = ctrd.host_path(&id, IMAGE_WORKLOAD);
    assert!(workload.is_file(), "{} missing", workload.display());
    let version = ctrd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        &id,
        IMAGE_WORKLOAD,
        "--help",
    ]);
    assert!(
        version.contains("cowsnap-refworkload"),
        "{IMAGE_WORKLOAD} --help in the container printed:\n{version}"
    );
    pause_resume_kill_delete(&ctrd, &id);
}

/// 1. `ctr run --runtime io.containerd.cowsnap.v1` runs the counter loop;
///    pause, resume, kill and delete work.
#[test]
fn cowsnap_run_pause_resume_kill_delete() {
    let ctrd = Containerd::start_cowsnap("run");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    let task = ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    assert_eq!(
        ns_pid(task.pid),
        1,
        "init of {id} is not pid 1 in its namespace"
    );
    assert!(
        ctrd.cgroup_pids(&id).contains(&task.pid),
        "init {} not in its own cgroup",
        task.pid
    );
    pause_resume_kill_delete(&ctrd, &id);
}

/// The checkpoint blob of checkpoint image `name`: its bytes, read back from
/// the content store through the image's index.
fn checkpoint_blob(ctrd: &Containerd, name: &str) -> Vec<u8> {
    let images = harness::parse_images(&ctrd.ctr_ok(&["images", "ls"]));
    let (_, index_digest) = images
        .iter()
        .find(|(image, _)| image == name)
        .unwrap_or_else(|| panic!("checkpoint {name} not in ctr images ls: {images:?}"));
    let index = ctrd.ctr_ok(&["content", "get", index_digest]);
    let index: serde_json::Value = serde_json::from_str(&index)
        .unwrap_or_else(|e| panic!("index {index_digest} of {name} is not JSON ({e}): {index}"));
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let blob = manifests
        .iter()
        .find(|m| m["mediaType"] == CHECKPOINT_MEDIA_TYPE)
        .unwrap_or_else(|| panic!("index of {name} has no {CHECKPOINT_MEDIA_TYPE} entry: {index}"));
    let digest = blob["digest"].as_str().expect("checkpoint digest");
    let output = ctrd.ctr(&["content", "get", digest]);
    assert!(
        output.status.success(),
        "ctr content get {digest}:\n{}",
        common::describe(&output)
    );
    let size = blob["size"].as_u64().unwrap_or(0);
    assert_eq!(
        output.stdout.len() as u64,
        size,
        "size of checkpoint blob {digest}"
    );
    output.stdout
}

/// 2. `ctr task checkpoint` stores a cowsnap image in the content store;
///    the container keeps running and counting.
#[test]
fn cowsnap_task_checkpoint_keeps_running() {
    let ctrd = Containerd::start_cowsnap("task-ckpt");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    let task = ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    let before = ctrd.wait_counter_above(&id, 5);

    let printed = ctrd.ctr_ok(&["task", "checkpoint", &id]);
    // ctr prints the name containerd gave the checkpoint image
    // (containerd.io/checkpoint/ID:DATE with containerd 1.6).
    let name = printed
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("ctr task checkpoint printed no checkpoint name"))
        .to_string();
    assert!(
        name.contains("checkpoint") && name.contains(&id),
        "ctr task checkpoint printed {printed:?}, not a checkpoint image name"
    );

    let after = ctrd.wait_status(&id, "RUNNING");
    assert_eq!(
        after.pid, task.pid,
        "the checkpointed task has another init"
    );
    ctrd.wait_counter_above(&id, before);

    let blob = checkpoint_blob(&ctrd, &name);
    let files = harness::tar_file_names(&blob);
    for wanted in ["manifest.json", "tree.json"] {
        assert!(
            files
                .iter()
                .any(|f| f.trim_start_matches("./").trim_start_matches('/') == wanted),
            "checkpoint blob of {name} has no {wanted}; it holds {files:?}"
        );
    }
    ctrd.kill_and_delete(&id);
}

/// 3. `ctr container checkpoint --task` + `ctr container restore --live`:
///    the counter goes on from where it was, the reference tree's memory
///    verifies, and the restored container's PSS is within 1% of the original's.
#[test]
fn cowsnap_container_checkpoint_restore_live() {
    let ctrd = Containerd::start_cowsnap("restore");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("tree");
    let script = format!(
        "{IMAGE_WORKLOAD} --mode plain --mib 128 --children 3 --dirty-pct 10 \
         --report /tmp/report --ready /tmp/ready & {COUNTER_LOOP}"
    );
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", &script]);
    let ready = ctrd.host_path(&id, "/tmp/ready");
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "reference tree in {id} not ready within {:?}; cgroup has {:?}",
            common::PATIENCE,
            ctrd.cgroup_pids(&id)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let workers = ctrd.pids_named(&id, WORKLOAD_COMM);
    assert_eq!(
        workers.len(),
        4,
        "reference tree processes in {id}: {workers:?}"
    );
    let targets: Vec<(i32, i32)> = workers.iter().map(|&p| (p, ns_pid(p))).collect();
    assert_processes_verify(
        &ctrd.host_path(&id, "/tmp/report"),
        &targets,
        "before the checkpoint",
    );
    // Enough counting that a loop restarted from zero could not reach it soon.
    ctrd.wait_counter_above(&id, 30);
    let pss_original = ctrd.paused_pss(&id);
    let before = ctrd.counter(&id).expect("counter before the checkpoint");

    let reference = "cowsnap.test/checkpoint:1";
    // --rw: the tree holds /tmp/report open, so the restore needs the
    // container's writable layer back (restore checks every open file exists).
    ctrd.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, reference]);
    // ctr pauses the task for the checkpoint and resumes it afterwards.
    ctrd.wait_status(&id, "RUNNING");
    ctrd.wait_counter_above(&id, before);
    // The original goes away first: it would share the image's file pages
    // with the restored container and halve their PSS.
    ctrd.kill_and_delete(&id);

    let restored = ctrd.container_id("restored");
    ctrd.track(&restored);
    ctrd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "--rw",
        &restored,
        reference,
    ]);
    if ctrd.task(&restored).is_some_and(|t| t.status == "CREATED") {
        ctrd.ctr_ok(&["task", "start", "-d", &restored]);
    }
    ctrd.wait_status(&restored, "RUNNING");

    // The loop goes on from its value in memory: every value written after
    // the restore is at least the one seen before the checkpoint (the file
    // itself came back with the rw layer), and it keeps increasing.
    let readings = ctrd.observe_counter(&restored, 10);
    assert!(
        readings.iter().all(|&v| v >= before) && readings.windows(2).all(|w| w[0] <= w[1]),
        "restored counter does not go on from {before}: read {readings:?}"
    );

    let restored_workers = ctrd.pids_named(&restored, WORKLOAD_COMM);
    let everyone: Vec<(i32, String)> = ctrd
        .cgroup_pids(&restored)
        .into_iter()
        .map(|p| (p, common::comm(p)))
        .collect();
    let mut ns_before: Vec<i32> = targets.iter().map(|&(_, ns)| ns).collect();
    let restored_targets: Vec<(i32, i32)> =
        restored_workers.iter().map(|&p| (p, ns_pid(p))).collect();
    let mut ns_after: Vec<i32> = restored_targets.iter().map(|&(_, ns)| ns).collect();
    ns_before.sort_unstable();
    ns_after.sort_unstable();
    assert_eq!(
        ns_after, ns_before,
        "pids of the reference tree inside the container; the restored cgroup has (pid, comm) {everyone:?}"
    );
    assert_processes_verify(
        &ctrd.host_path(&restored, "/tmp/report"),
        &restored_targets,
        "after the restore",
    );

    let pss_restored = ctrd.paused_pss(&restored);
    let diff = pss_restored.abs_diff(pss_original);
    assert!(
        diff * 100 <= pss_original,
        "restored container's PSS {pss_restored} B is not within 1% of the original's {pss_original} B"
    );
    ctrd.kill_and_delete(&restored);
}

/// After a `ctr task checkpoint` of `id` that must fail with a message
/// containing `reason`: the task runs on with the same init, keeps
/// counting, `survivor` is the same process and untraced, and no
/// checkpoint image was stored.
fn assert_failed_checkpoint_leaves_running(
    ctrd: &Containerd,
    id: &str,
    init: i32,
    survivor: i32,
    reason: &str,
) {
    let before = ctrd.wait_counter_above(id, 0);
    let output = ctrd.ctr(&["task", "checkpoint", id]);
    assert!(
        !output.status.success(),
        "ctr task checkpoint succeeded where it must fail ({reason}):\n{}",
        common::describe(&output)
    );
    let message = String::from_utf8_lossy(&output.stderr).into_owned();
    // A pid must appear as a number of its own, not inside another one.
    let gives_reason = if reason.bytes().all(|b| b.is_ascii_digit()) {
        message
            .split(|c: char| !c.is_ascii_digit())
            .any(|number| number == reason)
    } else {
        message.contains(reason)
    };
    eprintln!("ctr task checkpoint {id} failed as it must:\n{message}");
    assert!(
        gives_reason,
        "ctr's error does not give the reason ({reason:?}) the checkpoint failed:\n{message}"
    );

    let after = ctrd.wait_status(id, "RUNNING");
    assert_eq!(
        after.pid, init,
        "the task has another init after the failed checkpoint"
    );
    ctrd.wait_counter_above(id, before);
    assert!(
        ctrd.cgroup_pids(id).contains(&survivor),
        "process {survivor} is gone after the failed checkpoint"
    );
    assert!(!common::is_traced(survivor), "{survivor} is still traced");
    assert!(!common::is_traced(init), "init {init} is still traced");
    let images = harness::parse_images(&ctrd.ctr_ok(&["images", "ls"]));
    assert!(
        images.iter().all(|(name, _)| !name.contains("checkpoint")),
        "a failed checkpoint left an image: {images:?}"
    );
}

/// The host pid of the one process in `id`'s cgroup named `comm`.
fn only_process_named(ctrd: &Containerd, id: &str, comm: &str) -> i32 {
    let found = ctrd.pids_named(id, comm);
    assert_eq!(
        found.len(),
        1,
        "processes named {comm} in {id}: {found:?} (all: {:?})",
        ctrd.cgroup_pids(id)
    );
    found[0]
}

/// 4. A checkpoint the engine refuses (a process `ctr task exec` started,
///    whose parent is outside the container's tree) fails with the reason
///    in ctr's output, and the container keeps running untouched.
#[test]
fn cowsnap_failed_checkpoint_leaves_container_running() {
    let ctrd = Containerd::start_cowsnap("ckpt-fail");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    let task = ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    let exec_id = ctrd.container_id("tailer");
    ctrd.exec_detached(&id, &exec_id, &["tail", "-f", "/dev/null"]);
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while ctrd.pids_named(&id, "tail").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "exec'd tail never showed up in {id}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let tail = only_process_named(&ctrd, &id, "tail");
    // The engine names the process whose parent is outside the tree.
    assert_failed_checkpoint_leaves_running(&ctrd, &id, task.pid, tail, &tail.to_string());
    ctrd.kill_and_delete(&id);
}

/// 4b. A listening socket, which restore cannot reopen: the dump refuses
///     it (naming the socket), so no image that cannot be restored is stored.
#[test]
fn cowsnap_checkpoint_refuses_socket() {
    let ctrd = Containerd::start_cowsnap("ckpt-socket");
    let image = ctrd.import_reference_image();
    // The id must not contain "socket": ctr's message names the container's paths.
    let id = ctrd.container_id("listener");
    let script = format!("nc -l -p 7777 & {COUNTER_LOOP}");
    let task = ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", &script]);
    ctrd.wait_counter_above(&id, 0);
    let nc = only_process_named(&ctrd, &id, "nc");
    let socket_fds = fs::read_dir(format!("/proc/{nc}/fd"))
        .map(|fds| {
            fds.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0);
    assert!(socket_fds > 0, "nc {nc} holds no socket");
    assert_failed_checkpoint_leaves_running(&ctrd, &id, task.pid, nc, "socket");
    ctrd.kill_and_delete(&id);
}
