//! A private containerd for the end-to-end tests of the shim: started on a
//! temporary root, state directory and socket, driven with the stock `ctr`,
//! and torn down completely when the [`Containerd`] value is dropped, even
//! when the test panics.
//!
//! Installs nothing: containerd, ctr, runc and busybox-static are Debian
//! packages that `.ci/install` provides. No registry is reachable and `ctr
//! container checkpoint` refuses a container that was not created from an
//! image, so [`Containerd::import_reference_image`] writes an OCI image
//! archive itself (static busybox, the reference workload and nginx with
//! their shared libraries) and loads it with `ctr images import`;
//! [`Containerd::import_postgres_image`] does the same for Debian's
//! PostgreSQL 15.
//!
//! What a harness leaves behind is cleaned by name: each harness has its own
//! namespace (`cowsnap-<what>-<pid>-<n>`), and every cgroup, runc state
//! directory and shim it may have caused is found under that name or under
//! its socket path, never by a broad pattern.
#![allow(dead_code)] // each test uses a different subset

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{describe, require_root, workload_bin, PATIENCE};

/// The runtime name of containerd's own runc shim (containerd-shim-runc-v2).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The runtime name of cowsnap's shim; containerd runs the binary
/// `containerd-shim-cowsnap-v1` found on its PATH.
pub const COWSNAP_RUNTIME: &str = "io.containerd.cowsnap.v1";
pub const SHIM_BIN_NAME: &str = "containerd-shim-cowsnap-v1";
/// The name [`Containerd::import_reference_image`] gives the test image.
pub const IMAGE_REF: &str = "cowsnap.test/ref:1";
/// nginx in the reference image: Debian's binary at the same path, a
/// configuration with a master and IMAGE_NGINX_WORKERS workers on port
/// IMAGE_NGINX_PORT of every address, and the page it serves at /.
pub const NGINX_BIN: &str = "/usr/sbin/nginx";
pub const IMAGE_NGINX_CONF: &str = "/etc/nginx/cowsnap.conf";
pub const IMAGE_NGINX_PORT: u16 = 8080;
pub const IMAGE_NGINX_WORKERS: usize = 4;
pub const IMAGE_NGINX_PAGE: &str = "hello from nginx in a container\n";
/// The name [`Containerd::import_postgres_image`] gives the PostgreSQL image.
pub const POSTGRES_IMAGE_REF: &str = "cowsnap.test/postgres:15";
/// PostgreSQL 15 in its image: Debian's server and initdb at the same
/// paths, with the share files initdb reads, and the user it runs as.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
const PG_LIB_DIR: &str = "/usr/lib/postgresql/15/lib";
const PG_SHARE_DIR: &str = "/usr/share/postgresql/15";
pub const PG_USER: &str = "postgres";
pub const PG_UID: u32 = 999;
/// Where the reference workload lives in the image.
pub const IMAGE_WORKLOAD: &str = "/bin/cowsnap-refworkload";
/// Shell loop that writes an increasing counter to /tmp/count ten times a second.
pub const COUNTER_LOOP: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done";

/// The image's user that is not root, its uid (= its gid) and the
/// supplementary group it is a member of.
pub const APP_USER: &str = "app";
pub const APP_UID: u32 = 1000;
pub const APP_EXTRA_GID: u32 = 2000;

/// How long one cleanup command may take in `Drop` before it is killed:
/// cleanup must end even when containerd or a shim hangs.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ the shim binary

/// A statically linked `cowsnap` (the container restore helper runs it
/// inside the container's rootfs), built with `crt-static` for the host
/// target into the test's target directory:
/// target/x86_64-unknown-linux-gnu/<profile>/cowsnap. `COWSNAP_STATIC_BIN` wins.
pub fn static_cowsnap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("COWSNAP_STATIC_BIN") {
            return PathBuf::from(path);
        }
        let profile_dir = profile_dir();
        let profile = profile_dir.file_name().expect("profile").to_owned();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let triple = "x86_64-unknown-linux-gnu";
        let mut build = Command::new(env!("CARGO"));
        build
            .args([
                "build", "--quiet", "-p", "cowsnap", "--bin", "cowsnap", "--target", triple,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        if profile == "release" {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the static cowsnap");
        assert!(status.success(), "cargo build of the static cowsnap failed");
        let bin = target_dir.join(triple).join(profile).join("cowsnap");
        assert!(
            bin.is_file(),
            "static cowsnap not found at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Path of `containerd-shim-cowsnap-v1`, built like `cowsnap_bin()`: into
/// the target directory and profile of the test executable (cargo does not
/// build another package's binaries for an integration test). `COWSNAP_SHIM_BIN`
/// wins if set. An error says why there is none (not written yet, does not
/// build), for the tests to fail with.
pub fn shim_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("COWSNAP_SHIM_BIN") {
            let path = PathBuf::from(path);
            if path.file_name().is_some_and(|n| n == SHIM_BIN_NAME) && path.is_file() {
                return Ok(path);
            }
            return Err(format!(
                "COWSNAP_SHIM_BIN={} is not an existing file named {SHIM_BIN_NAME} (containerd looks the shim up by that name)",
                path.display()
            ));
        }
        let profile_dir = profile_dir();
        let target_dir = profile_dir.parent().ok_or("target dir")?.to_path_buf();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "cowsnap", "--bin", SHIM_BIN_NAME])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let output = build
            .output()
            .map_err(|e| format!("run cargo build for {SHIM_BIN_NAME}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "cargo build -p cowsnap --bin {SHIM_BIN_NAME} failed, so runtime {COWSNAP_RUNTIME} cannot run:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let bin = profile_dir.join(SHIM_BIN_NAME);
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("{SHIM_BIN_NAME} not found at {} after building it", bin.display()))
        }
    })
    .clone()
}

/// target/<profile> of the running test executable (target/<profile>/deps/NAME-HASH).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

// ------------------------------------------------------------ containerd

/// A private containerd; see the module doc. Dropping it kills and deletes
/// every task and container of its namespace, stops containerd and the
/// shims it started, unmounts what is mounted under its directory and
/// removes that directory.
pub struct Containerd {
    dir: PathBuf,
    pub address: PathBuf,
    pub namespace: String,
    log: PathBuf,
    daemon: Option<Child>,
    /// How the daemon is started, kept for [`Containerd::restart`].
    launch: Launch,
    /// Container ids created through this harness, for the cleanup.
    containers: Mutex<Vec<String>>,
    /// Exec ids of processes started with `ctr task exec -d`, whose IO
    /// fifos ctr leaves behind.
    execs: Mutex<Vec<String>>,
    /// Ids used for unique container names.
    serial: AtomicU32,
}

/// containerd's command line and environment, the same at every start.
struct Launch {
    config: PathBuf,
    path: String,
    engine: Option<PathBuf>,
    /// A network namespace (`/run/netns/NAME`) containerd runs in: a node
    /// of a two-node test.
    netns: Option<PathBuf>,
}

/// One task as `ctr task ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub pid: i32,
    pub status: String,
}

impl Containerd {
    /// Starts containerd without requiring cowsnap's shim (the stock runc
    /// runtime works; `io.containerd.cowsnap.v1` only if the shim binary is
    /// already in the target directory). `what` names the test.
    pub fn start(what: &str) -> Containerd {
        Self::start_with_path(what, profile_dir(), None, None)
    }

    /// Builds `containerd-shim-cowsnap-v1` and the `cowsnap` binary it runs
    /// for dumps and restores (the shim looks beside itself, then on PATH,
    /// unless `COWSNAP_BIN` is set, which containerd passes on to it), and
    /// starts containerd with the shim's directory first on PATH. Fails the
    /// test, saying why, if there is no shim binary.
    pub fn start_cowsnap(what: &str) -> Containerd {
        Self::start_cowsnap_in(what, None)
    }

    /// [`Containerd::start_cowsnap`] with containerd (and so its shims) in
    /// network namespace `netns` (a path such as `/run/netns/NAME`; only
    /// the network namespace is entered, the mounts stay the host's).
    pub fn start_cowsnap_in(what: &str, netns: Option<&Path>) -> Containerd {
        let shim = shim_bin()
            .unwrap_or_else(|why| panic!("runtime {COWSNAP_RUNTIME} is not usable: {why}"));
        // The restore helper runs inside the container's rootfs: static.
        let engine = static_cowsnap_bin();
        let dir = shim
            .parent()
            .expect("shim binary has a directory")
            .to_path_buf();
        Self::start_with_path(what, dir, Some(engine), netns)
    }

    fn start_with_path(
        what: &str,
        shim_dir: PathBuf,
        engine: Option<PathBuf>,
        netns: Option<&Path>,
    ) -> Containerd {
        require_root();
        for tool in ["/usr/bin/containerd", "/usr/bin/ctr"] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} missing: install the Debian packages containerd and runc (.ci/install does)"
            );
        }
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::SeqCst);
        let namespace = format!("cowsnap-{what}-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("cowsnap-ctrd-")
            .tempdir()
            .expect("tempdir for containerd")
            .keep();
        // From here on a panic drops the harness, which removes the directory.
        let path = format!(
            "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut ctrd = Containerd {
            address: dir.join("containerd.sock"),
            log: dir.join("containerd.log"),
            launch: Launch {
                config: dir.join("config.toml"),
                path,
                engine,
                netns: netns.map(Path::to_path_buf),
            },
            dir,
            namespace,
            daemon: None,
            containers: Mutex::new(Vec::new()),
            execs: Mutex::new(Vec::new()),
            serial: AtomicU32::new(0),
        };
        let dir = &ctrd.dir;
        // Overlayfs works on this ext4 root; the CRI plugin would want a CNI
        // setup and is not needed by ctr.
        let text = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{debug}\"\n  level = \"debug\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = ctrd.address.display(),
            debug = dir.join("debug.sock").display(),
        );
        fs::write(&ctrd.launch.config, text).expect("write containerd config");
        fs::create_dir(ctrd.scratch_dir()).expect("containerd's TMPDIR");
        ctrd.spawn_daemon();
        ctrd.wait_ready();
        ctrd
    }

    /// Starts the containerd process (appending to its log).
    fn spawn_daemon(&mut self) {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("containerd log file");
        let mut daemon = match &self.launch.netns {
            // nsenter execs containerd in the namespace: the child is it.
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display()))
                    .arg("/usr/bin/containerd");
                c
            }
            None => Command::new("/usr/bin/containerd"),
        };
        if let Some(engine) = &self.launch.engine {
            // containerd passes its environment on to the shims it starts.
            daemon.env("COWSNAP_BIN", engine);
        }
        let daemon = daemon
            .arg("--config")
            .arg(&self.launch.config)
            .env("PATH", &self.launch.path)
            // containerd's task service makes the directory a shim's
            // checkpoint goes into (ctd-checkpointNNN) under TMPDIR: a
            // private one, so a test sees what is left there.
            .env("TMPDIR", self.scratch_dir())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn containerd");
        self.daemon = Some(daemon);
    }

    /// containerd's TMPDIR, where its task service makes the directory
    /// each checkpoint is written to before it goes into the content store.
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// SIGKILLs containerd (the shims stay, as they do when containerd
    /// crashes) and starts it again with the same configuration; returns
    /// once it answers. `while_down` runs in between.
    pub fn restart(&mut self, while_down: impl FnOnce()) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        while_down();
        self.spawn_daemon();
        self.wait_ready();
    }

    /// Digests in the content store (`ctr content ls -q`), sorted.
    pub fn content_digests(&self) -> Vec<String> {
        let mut digests: Vec<String> = self
            .ctr_ok(&["content", "ls", "-q"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        digests.sort();
        digests
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(daemon) = self.daemon.as_mut() {
                if let Ok(Some(status)) = daemon.try_wait() {
                    panic!(
                        "containerd exited with {status} at start:\n{}",
                        self.log_text()
                    );
                }
            }
            if self.address.exists() {
                let version = self.ctr_global(&["version"]);
                if version.status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within {PATIENCE:?}:\n{}",
                self.address.display(),
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of containerd's log after its start-up
    /// messages (plugin loading says nothing about a test).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let booted = all
            .iter()
            .position(|l| l.contains("containerd successfully booted"))
            .map_or(0, |i| i + 1);
        let after_boot = &all[booted..];
        after_boot[after_boot.len().saturating_sub(lines)..].join("\n")
    }

    // -------------------------------------------------------- ctr

    fn ctr_command(&self, with_namespace: bool, args: &[&str]) -> Command {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("--address").arg(&self.address);
        if with_namespace {
            cmd.args(["--namespace", &self.namespace]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn ctr_global(&self, args: &[&str]) -> Output {
        let child = self.ctr_command(false, args).spawn().expect("spawn ctr");
        crate::common::wait_output(child, &format!("ctr {}", args.join(" ")))
    }

    /// `ctr --address SOCK --namespace NS ARGS`, failing the test if it does
    /// not end within [`PATIENCE`] (its exit status is the caller's business).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let child = self.ctr_command(true, args).spawn().expect("spawn ctr");
        crate::common::wait_output(child, &format!("ctr {}", args.join(" ")))
    }

    /// [`Containerd::ctr`] that must succeed; returns its stdout. On failure
    /// the panic shows ctr's output and the end of containerd's log.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(
            output.status.success(),
            "ctr {} failed:\n{}\n--- containerd log (tail)\n{}",
            args.join(" "),
            describe(&output),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Bounded ctr for cleanup: never panics, gives up after [`CLEANUP_PATIENCE`].
    fn ctr_quiet(&self, args: &[&str]) -> Option<Output> {
        let mut child = self.ctr_command(true, args).spawn().ok()?;
        let deadline = Instant::now() + CLEANUP_PATIENCE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return child.wait_with_output().ok(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    eprintln!("cleanup: ctr {} did not end, killed", args.join(" "));
                    return None;
                }
            }
        }
    }

    // -------------------------------------------------------- containers and tasks

    /// An id unique to this harness and test process, `<name>-<pid>-<n>`, for
    /// a container or an exec (ctr names IO fifos after it, and the cleanup
    /// removes fifos by that name).
    pub fn container_id(&self, name: &str) -> String {
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        format!("{name}-{}-{n}", std::process::id())
    }

    /// Records `id` for the cleanup (for containers made by a raw ctr call,
    /// e.g. `ctr container restore`).
    pub fn track(&self, id: &str) {
        if let Ok(mut ids) = self.containers.lock() {
            if !ids.iter().any(|known| known == id) {
                ids.push(id.to_string());
            }
        }
    }

    /// `ctr run -d --null-io --runtime RUNTIME IMAGE ID ARGS...`, which must succeed.
    pub fn run(&self, runtime: &str, image: &str, id: &str, args: &[&str]) -> TaskInfo {
        self.run_with(runtime, &["--null-io"], image, id, args)
    }

    /// `ctr run -d --runtime RUNTIME FLAGS... IMAGE ID ARGS...`, which must
    /// succeed (without `--null-io` in FLAGS the task's stdio are fifos ctr
    /// leaves behind when it returns).
    pub fn run_with(
        &self,
        runtime: &str,
        flags: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> TaskInfo {
        self.track(id);
        let mut full = vec!["run", "-d", "--runtime", runtime];
        full.extend_from_slice(flags);
        full.extend_from_slice(&[image, id]);
        full.extend_from_slice(args);
        self.ctr_ok(&full);
        self.wait_status(id, "RUNNING")
    }

    /// `ctr containers checkpoint --task [--rw] ID REFERENCE`, which must
    /// succeed; the task is RUNNING again afterwards (ctr pauses and resumes it).
    pub fn checkpoint_container(&self, id: &str, reference: &str, rw: bool) {
        let mut args = vec!["containers", "checkpoint", "--task"];
        if rw {
            args.push("--rw");
        }
        args.extend_from_slice(&[id, reference]);
        self.ctr_ok(&args);
        self.wait_status(id, "RUNNING");
    }

    /// `ctr containers restore --live [--rw] ID REFERENCE` (its output is the
    /// caller's business), and `ctr task start -d` when ctr left the task
    /// CREATED. `id` is tracked for the cleanup.
    pub fn restore_container(&self, id: &str, reference: &str, rw: bool) -> Output {
        self.track(id);
        let mut args = vec!["containers", "restore", "--live"];
        if rw {
            args.push("--rw");
        }
        args.extend_from_slice(&[id, reference]);
        let output = self.ctr(&args);
        if output.status.success() && self.task(id).is_some_and(|t| t.status == "CREATED") {
            self.ctr_ok(&["task", "start", "-d", id]);
        }
        output
    }

    /// `ctr ARGS` run by `script` on a pty of its own, for commands that
    /// want a terminal (`ctr run -t`): its output, the pty's, is on stdout.
    pub fn ctr_on_pty(&self, args: &[&str]) -> Output {
        let mut line = vec![
            "/usr/bin/ctr".to_string(),
            "--address".to_string(),
            self.address.to_string_lossy().into_owned(),
            "--namespace".to_string(),
            self.namespace.clone(),
        ];
        line.extend(args.iter().map(|a| a.to_string()));
        let quoted: Vec<String> = line
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        let child = Command::new("script")
            .args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn script");
        crate::common::wait_output(child, &format!("script -c ctr {}", args.join(" ")))
    }

    /// Spawns `ctr ARGS` with stdout and stderr piped (e.g. `ctr task
    /// attach`, which runs until the task exits); the caller waits for it.
    pub fn spawn_ctr(&self, args: &[&str]) -> Child {
        self.ctr_command(true, args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ctr {}: {e}", args.join(" ")))
    }

    /// `ctr task exec -d --exec-id EXEC_ID ID ARGS...`, which must succeed:
    /// a process the shim starts in the running container (its parent is
    /// outside the container's tree).
    pub fn exec_detached(&self, id: &str, exec_id: &str, args: &[&str]) {
        if let Ok(mut execs) = self.execs.lock() {
            execs.push(exec_id.to_string());
        }
        let mut full = vec!["task", "exec", "-d", "--exec-id", exec_id, id];
        full.extend_from_slice(args);
        self.ctr_ok(&full);
    }

    /// Every task of the namespace, from `ctr task ls` (TASK PID STATUS).
    pub fn tasks(&self) -> Vec<(String, TaskInfo)> {
        let text = self.ctr_ok(&["task", "ls"]);
        text.lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [id, pid, status, ..] => Some((
                        id.to_string(),
                        TaskInfo {
                            pid: pid.parse().ok()?,
                            status: status.to_string(),
                        },
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    pub fn task(&self, id: &str) -> Option<TaskInfo> {
        self.tasks()
            .into_iter()
            .find(|(task, _)| task == id)
            .map(|(_, info)| info)
    }

    /// Waits until `ctr task ls` shows `id` in `status` (RUNNING, PAUSED, STOPPED, CREATED).
    pub fn wait_status(&self, id: &str, status: &str) -> TaskInfo {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let task = self.task(id);
            if let Some(info) = &task {
                if info.status == status {
                    return info.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not {status} within {PATIENCE:?}: {task:?}\n--- containerd log (tail)\n{}",
                self.log_tail(40)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Container ids of the namespace (`ctr containers ls -q`).
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["containers", "ls", "-q"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// SIGKILL, wait until STOPPED, `ctr task delete`, `ctr containers
    /// delete`: each must succeed, and afterwards neither the task nor the
    /// container is listed and the init process is gone.
    pub fn kill_and_delete(&self, id: &str) {
        let init = self.task(id).map(|t| t.pid);
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        self.wait_status(id, "STOPPED");
        self.ctr_ok(&["task", "delete", id]);
        assert!(
            self.task(id).is_none(),
            "task {id} still listed after delete"
        );
        self.ctr_ok(&["containers", "delete", id]);
        assert!(
            !self.containers().iter().any(|c| c == id),
            "container {id} still listed after delete"
        );
        if let Some(pid) = init {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists()
                    || crate::common::task_state(pid).starts_with('Z'),
                "init {pid} of {id} still alive after delete"
            );
        }
        if let Ok(mut ids) = self.containers.lock() {
            ids.retain(|known| known != id);
        }
    }

    // -------------------------------------------------------- the image

    /// Writes the reference OCI image archive (see [`write_reference_image`])
    /// into this harness's directory, imports it into the namespace as
    /// [`IMAGE_REF`], checks that `ctr images ls` lists it and returns its name.
    pub fn import_reference_image(&self) -> &'static str {
        let archive = self.dir.join("ref-image.tar");
        write_reference_image(&archive, IMAGE_REF);
        self.import_image(&archive, IMAGE_REF)
    }

    /// The reference image as `name`, whose config runs its process as `user`.
    pub fn import_reference_image_as(&self, name: &'static str, user: &str) -> &'static str {
        let archive = self.dir.join("ref-image-user.tar");
        write_image_as(&archive, name, &reference_layer(), Some(user));
        self.import_image(&archive, name)
    }

    /// Imports the PostgreSQL image ([`postgres_layer`]) as
    /// [`POSTGRES_IMAGE_REF`] and returns its name.
    pub fn import_postgres_image(&self) -> &'static str {
        let archive = self.dir.join("postgres-image.tar");
        write_image(&archive, POSTGRES_IMAGE_REF, &postgres_layer());
        self.import_image(&archive, POSTGRES_IMAGE_REF)
    }

    /// `ctr images import ARCHIVE`, checked to list `name` afterwards.
    fn import_image(&self, archive: &Path, name: &'static str) -> &'static str {
        let archive_str = archive.to_str().expect("utf-8 temp path");
        self.ctr_ok(&["images", "import", archive_str]);
        let listed = self.ctr_ok(&["images", "ls", "-q"]);
        assert!(
            listed.lines().any(|l| l.trim() == name),
            "ctr images import did not create {name}; ctr images ls -q shows:\n{listed}"
        );
        name
    }

    // -------------------------------------------------------- the container's processes

    /// Host path of `path` (absolute, inside the container) through the
    /// root of the task's init: /proc/PID/root/PATH.
    pub fn host_path(&self, id: &str, path: &str) -> PathBuf {
        let task = self
            .task(id)
            .unwrap_or_else(|| panic!("no task {id} to find {path} in"));
        PathBuf::from(format!("/proc/{}/root{path}", task.pid))
    }

    /// The counter the shell loop wrote last, or None before its first write.
    pub fn counter(&self, id: &str) -> Option<u64> {
        fs::read_to_string(self.host_path(id, "/tmp/count"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the counter exceeds `above` and returns it.
    pub fn wait_counter_above(&self, id: &str, above: u64) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = self.counter(id);
            if let Some(v) = value {
                if v > above {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "counter of {id} did not pass {above} within {PATIENCE:?} (last {value:?}, task {:?})",
                self.task(id)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every reading of the counter (polled every 10 ms, each value lasts
    /// about 100 ms) until `distinct` different values were seen: enough to
    /// catch a loop that restarted from zero, which [`Self::wait_counter_above`]
    /// would just wait through.
    pub fn observe_counter(&self, id: &str, distinct: usize) -> Vec<u64> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen: Vec<u64> = Vec::new();
        let mut values = 0;
        while values < distinct {
            if let Some(v) = self.counter(id) {
                if seen.last() != Some(&v) {
                    values += 1;
                }
                seen.push(v);
            }
            assert!(
                Instant::now() < deadline,
                "counter of {id} took {distinct} values not within {PATIENCE:?}: {seen:?} (task {:?})",
                self.task(id)
            );
            thread::sleep(Duration::from_millis(10));
        }
        seen
    }

    /// Host pids of every process in the task's cgroup (the v1 freezer
    /// hierarchy runc uses here, else the v2 one), sorted.
    pub fn cgroup_pids(&self, id: &str) -> Vec<i32> {
        let task = self
            .task(id)
            .unwrap_or_else(|| panic!("no task {id} to list the processes of"));
        let dir =
            cgroup_dir(task.pid).unwrap_or_else(|| panic!("no cgroup of {id}'s init {}", task.pid));
        let procs = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("read {}/cgroup.procs: {e}", dir.display()));
        let mut pids: Vec<i32> = procs
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Host pids of the container's processes whose comm is `comm`
    /// (15 characters at most, as the kernel truncates it).
    pub fn pids_named(&self, id: &str, comm: &str) -> Vec<i32> {
        self.cgroup_pids(id)
            .into_iter()
            .filter(|&pid| crate::common::comm(pid) == comm)
            .collect()
    }

    /// Total PSS of the container's processes, in bytes, measured while
    /// the task is paused so that no process comes or goes meanwhile (the
    /// counter loop forks a `sleep` ten times a second).
    pub fn paused_pss(&self, id: &str) -> u64 {
        self.ctr_ok(&["task", "pause", id]);
        self.wait_status(id, "PAUSED");
        let pss = crate::common::pss_total(&self.cgroup_pids(id));
        self.ctr_ok(&["task", "resume", id]);
        self.wait_status(id, "RUNNING");
        pss
    }

    // -------------------------------------------------------- cleanup

    fn cleanup(&mut self) {
        // Tasks and containers, through containerd while it still runs.
        let mut ids: Vec<String> = self
            .containers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        if let Some(out) = self.ctr_quiet(&["containers", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
                if !id.is_empty() && !ids.iter().any(|k| k == id) {
                    ids.push(id.to_string());
                }
            }
        }
        for id in &ids {
            let _ = self.ctr_quiet(&["task", "resume", id]);
            let _ = self.ctr_quiet(&["task", "kill", "-a", "-s", "SIGKILL", id]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let stopped = self
                    .ctr_quiet(&["task", "ls"])
                    .map(|o| {
                        !String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            f.first() == Some(&id.as_str()) && f.get(2) != Some(&"STOPPED")
                        })
                    })
                    .unwrap_or(true);
                if stopped {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = self.ctr_quiet(&["task", "delete", "-f", id]);
            let _ = self.ctr_quiet(&["containers", "delete", id]);
        }

        // containerd itself, then whatever shim it started (they outlive it
        // by design), then container processes that outlived their shim.
        if let Some(mut daemon) = self.daemon.take() {
            let _ = kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = daemon.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let address = self.address.to_string_lossy().into_owned();
        for pid in crate::common::all_pids() {
            let cmdline = crate::common::cmdline(pid);
            if cmdline.contains("containerd-shim") && cmdline.contains(&address) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // A killed shim leaves its socket, /run/containerd/s/<sha256 of
        // ADDRESS/NAMESPACE/ID> (containerd's and the Rust shim crate's scheme).
        for id in &ids {
            let digest = sha256_digest(format!("{address}/{}/{id}", self.namespace).as_bytes());
            let socket = Path::new("/run/containerd/s").join(digest.trim_start_matches("sha256:"));
            if socket.exists() {
                let _ = fs::remove_file(&socket);
            }
        }
        kill_namespace_cgroups(&self.namespace);
        // runc's state for the namespace (the runc shim's default root).
        let runc_root = Path::new("/run/containerd/runc").join(&self.namespace);
        if runc_root.exists() {
            let _ = fs::remove_dir_all(&runc_root);
        }
        let mut fifo_owners = ids.clone();
        fifo_owners.extend(self.execs.lock().map(|e| e.clone()).unwrap_or_default());
        remove_fifos(&fifo_owners);

        unmount_under(&self.dir);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: remove {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- containerd log ({}), tail:\n{}",
                self.log.display(),
                self.log_tail(100)
            );
        }
        self.cleanup();
    }
}

/// The /proc/PID/status fields that make a process's identity and
/// confinement, which a restore must give back to each process as it was.
pub const IDENTITY_FIELDS: [&str; 11] = [
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

/// `pid`'s identity: [`IDENTITY_FIELDS`] of its status, its comm, cmdline,
/// and the targets of its cwd and root links (as the host reads them, so
/// the same way before a checkpoint and after a restore); None once it is gone.
pub fn process_identity(pid: i32) -> Option<BTreeMap<String, String>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = BTreeMap::new();
    for key in IDENTITY_FIELDS {
        let value = crate::common::status_field(&status, &format!("{key}:"))
            .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}:\n{status}"));
        // Whitespace between the values (real/effective/saved/fs) varies.
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        out.insert(key.to_string(), value);
    }
    out.insert("comm".into(), crate::common::comm(pid));
    out.insert("cmdline".into(), crate::common::cmdline(pid));
    for link in ["cwd", "root"] {
        let target = fs::read_link(format!("/proc/{pid}/{link}")).ok()?;
        out.insert(link.into(), target.to_string_lossy().into_owned());
    }
    Some(out)
}

/// The cgroup directory of `pid`: its v1 freezer cgroup (runc's on a
/// hybrid layout), else its v2 cgroup, wherever this host mounts them.
pub fn cgroup_dir(pid: i32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let layout = cowsnap::sys::cgroup::CgroupLayout::current().ok()?;
    let under = |point: &Path, path: &str| point.join(path.trim_start_matches('/'));
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "freezer") {
            if let Some(m) = &layout.v1_freezer {
                return Some(under(&m.point, path));
            }
        }
        if controllers.is_empty() {
            unified = layout.v2.as_ref().map(|m| under(&m.point, path));
        }
    }
    unified
}

/// SIGKILLs every process left in the cgroups ctr made for `namespace`
/// (`/<namespace>/<id>` in each hierarchy) and removes those cgroups.
fn kill_namespace_cgroups(namespace: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    // Each hierarchy under /sys/fs/cgroup, or /sys/fs/cgroup itself (v2 only).
    let dirs: Vec<PathBuf> = hierarchies
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .chain([PathBuf::from("/sys/fs/cgroup")])
        .map(|h| h.join(namespace))
        .filter(|p| p.is_dir())
        .collect();
    for dir in &dirs {
        for cgroup in cgroup_tree(dir) {
            if cgroup.join("freezer.state").exists() {
                let _ = fs::write(cgroup.join("freezer.state"), "THAWED");
            }
            let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    for dir in &dirs {
        // Deepest first; a cgroup with a dying process refuses rmdir for a moment.
        let mut tree = cgroup_tree(dir);
        tree.reverse();
        for cgroup in tree {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&cgroup).is_err() && cgroup.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if cgroup.exists() {
                eprintln!("cleanup: could not remove cgroup {}", cgroup.display());
            }
        }
    }
}

/// `dir` and every cgroup below it, parents first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(entry.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Removes ctr's IO fifo directories (/run/containerd/fifo/RANDOM/ID-stdin...)
/// of the containers and execs in `ids`, which ctr leaves when it exits
/// before the process.
fn remove_fifos(ids: &[String]) {
    let Ok(dirs) = fs::read_dir("/run/containerd/fifo") else {
        return;
    };
    for dir in dirs.filter_map(|e| e.ok()).map(|e| e.path()) {
        let ours = fs::read_dir(&dir).is_ok_and(|files| {
            files.filter_map(|e| e.ok()).any(|f| {
                let name = f.file_name().to_string_lossy().into_owned();
                ids.iter().any(|id| {
                    ["-stdin", "-stdout", "-stderr"]
                        .iter()
                        .any(|s| name == format!("{id}{s}"))
                })
            })
        });
        if ours {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Mount points under `dir` from /proc/self/mountinfo (octal escapes decoded).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything mounted under `dir`, deepest first, until
/// nothing is left (bounded).
fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for mount in mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mount)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!("cleanup: still mounted under {}: {left:?}", dir.display());
    }
}

// ------------------------------------------------------------ the OCI image

/// A ustar archive written in memory: directories, regular files and
/// symlinks, owned by root, mtime 0 (the layer's digest depends on the
/// inputs only).
#[derive(Default)]
pub struct TarWriter {
    bytes: Vec<u8>,
}

impl TarWriter {
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(
            &format!("{}/", path.trim_end_matches('/')),
            b'5',
            mode,
            "",
            &[],
        );
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, b'0', mode, "", data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, b'2', 0o777, target, &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0u8; 1024]);
        self.bytes
    }

    fn entry(&mut self, path: &str, kind: u8, mode: u32, link: &str, data: &[u8]) {
        assert!(path.len() < 100, "tar path too long for ustar name: {path}");
        assert!(link.len() < 100, "tar link too long: {link}");
        let mut header = [0u8; 512];
        let put = |header: &mut [u8; 512], at: usize, value: &[u8]| {
            header[at..at + value.len()].copy_from_slice(value);
        };
        put(&mut header, 0, path.as_bytes());
        put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
        put(&mut header, 108, b"0000000\0");
        put(&mut header, 116, b"0000000\0");
        put(
            &mut header,
            124,
            format!("{:011o}\0", data.len()).as_bytes(),
        );
        put(&mut header, 136, b"00000000000\0");
        put(&mut header, 148, b"        ");
        header[156] = kind;
        put(&mut header, 157, link.as_bytes());
        put(&mut header, 257, b"ustar\0");
        put(&mut header, 263, b"00");
        put(&mut header, 265, b"root");
        put(&mut header, 297, b"root");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
    }
}

/// Names of the regular files in a ustar archive (enough for checking
/// what a checkpoint blob holds).
pub fn tar_file_names(bytes: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let header = &bytes[at..at + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |from: usize, len: usize| {
            let raw = &header[from..from + len];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(len);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let prefix = field(345, 155);
        let name = field(0, 100);
        let size_field = field(124, 12);
        let size = u64::from_str_radix(size_field.trim(), 8).unwrap_or(0) as usize;
        if matches!(header[156], b'0' | 0) {
            names.push(if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            });
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    names
}

/// `sha256:HEX` of `bytes`, by coreutils' sha256sum (no hashing crate needed).
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sha256sum");
    let mut stdin = child.stdin.take().expect("sha256sum stdin");
    let data = bytes.to_vec();
    let writer = thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&data);
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("sha256sum stdout")
        .read_to_string(&mut out)
        .expect("read sha256sum output");
    let _ = writer.join();
    let status = child.wait().expect("wait for sha256sum");
    assert!(status.success(), "sha256sum failed: {status}");
    let hex = out.split_whitespace().next().unwrap_or("");
    assert_eq!(hex.len(), 64, "sha256sum printed {out:?}");
    format!("sha256:{hex}")
}

/// Absolute paths of the shared libraries and loader `ldd BINARY` lists.
fn shared_libraries(binary: &str) -> Vec<String> {
    let output = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .expect("run ldd");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut libs: Vec<String> = text
        .lines()
        .flat_map(|line| line.split_whitespace())
        .filter(|word| word.starts_with('/'))
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// Adds the shared libraries `binary` needs at the paths ldd gives, with
/// their directories (each directory once, remembered in `made_dirs`).
fn add_libraries(tar: &mut TarWriter, made_dirs: &mut Vec<String>, binary: &str) {
    for lib in shared_libraries(binary) {
        add_host_file(tar, made_dirs, &lib, 0o755);
    }
}

/// Adds the directories above `rel` (a path inside the archive) that are
/// not in `made_dirs` yet.
fn add_parents(tar: &mut TarWriter, made_dirs: &mut Vec<String>, rel: &str) {
    let mut parent = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        parent = if parent.is_empty() {
            part.to_string()
        } else {
            format!("{parent}/{part}")
        };
        if !made_dirs.contains(&parent) {
            tar.dir(&parent, 0o755);
            made_dirs.push(parent.clone());
        }
    }
}

/// Adds the host's file `path` at the same path, with its directories
/// (each entry once: `made_dirs` remembers files too).
fn add_host_file(tar: &mut TarWriter, made_dirs: &mut Vec<String>, path: &str, mode: u32) {
    let rel = path.trim_start_matches('/');
    add_parents(tar, made_dirs, rel);
    if made_dirs.iter().any(|d| d == rel) {
        return;
    }
    made_dirs.push(rel.to_string());
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    tar.file(rel, mode, &bytes);
}

/// Adds the host's directory `dir` at the same path, recursively (regular
/// files, directories and symlinks), leaving out the subdirectories named
/// in `skip`.
fn add_host_tree(tar: &mut TarWriter, made_dirs: &mut Vec<String>, dir: &str, skip: &[&str]) {
    let rel = dir.trim_start_matches('/');
    add_parents(tar, made_dirs, rel);
    if !made_dirs.iter().any(|d| d == rel) {
        tar.dir(rel, 0o755);
        made_dirs.push(rel.to_string());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let path_str = path.to_str().expect("utf-8 host path");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {path_str}: {e}"));
        if meta.is_dir() {
            if !skip.contains(&name) {
                add_host_tree(tar, made_dirs, path_str, skip);
            }
        } else if meta.file_type().is_symlink() {
            let target =
                fs::read_link(&path).unwrap_or_else(|e| panic!("readlink {path_str}: {e}"));
            tar.symlink(
                path_str.trim_start_matches('/'),
                target.to_str().expect("utf-8 link"),
            );
        } else if meta.is_file() {
            add_host_file(tar, made_dirs, path_str, 0o644);
        }
    }
}

/// The directories every image has, static busybox with a link per applet
/// in /bin.
fn add_busybox(tar: &mut TarWriter) {
    let busybox = "/bin/busybox";
    let busybox_bytes = fs::read(busybox).unwrap_or_else(|e| {
        panic!("read {busybox}: {e} (install busybox-static: .ci/install does)")
    });
    let applets = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for dir in ["bin", "dev", "etc", "proc", "sys", "run", "root"] {
        tar.dir(dir, 0o755);
    }
    tar.dir("tmp", 0o1777);
    tar.file("bin/busybox", 0o755, &busybox_bytes);
    for applet in String::from_utf8_lossy(&applets.stdout)
        .lines()
        .map(str::trim)
    {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            tar.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
}

/// The image layer: static busybox with a link per applet in /bin, the
/// reference workload at [`IMAGE_WORKLOAD`] with the libraries it needs at
/// the paths ldd gives, the usual mount-point directories and /etc/passwd.
pub fn reference_layer() -> Vec<u8> {
    let workload = workload_bin();
    let workload_bytes = fs::read(workload).unwrap_or_else(|e| panic!("read {workload}: {e}"));

    let mut tar = TarWriter::default();
    add_busybox(&mut tar);
    tar.file(
        IMAGE_WORKLOAD.trim_start_matches('/'),
        0o755,
        &workload_bytes,
    );
    let mut made_dirs: Vec<String> = Vec::new();
    add_libraries(&mut tar, &mut made_dirs, workload);
    // nginx (Debian's), for the socket tests: the binary, its libraries,
    // a configuration of its own and a page to serve.
    let nginx_bytes = fs::read(NGINX_BIN)
        .unwrap_or_else(|e| panic!("read {NGINX_BIN}: {e} (install nginx: .ci/install does)"));
    add_libraries(&mut tar, &mut made_dirs, NGINX_BIN);
    for dir in ["usr/sbin", "etc/nginx", "var", "var/www"] {
        if !made_dirs.iter().any(|d| d == dir) {
            tar.dir(dir, 0o755);
            made_dirs.push(dir.to_string());
        }
    }
    tar.file(NGINX_BIN.trim_start_matches('/'), 0o755, &nginx_bytes);
    tar.file(
        IMAGE_NGINX_CONF.trim_start_matches('/'),
        0o644,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes {IMAGE_NGINX_WORKERS};\n\
             pid /tmp/nginx.pid;\n\
             error_log /tmp/nginx-error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log /tmp/nginx-access.log;\n  client_body_temp_path /tmp;\n\
             proxy_temp_path /tmp;\n  fastcgi_temp_path /tmp;\n  uwsgi_temp_path /tmp;\n\
             scgi_temp_path /tmp;\n  server {{\n    listen 0.0.0.0:{IMAGE_NGINX_PORT};\n\
             root /var/www;\n    location /pid {{ return 200 \"$pid\\n\"; }}\n  }}\n}}\n"
        )
        .as_bytes(),
    );
    tar.file("var/www/index.html", 0o644, IMAGE_NGINX_PAGE.as_bytes());
    // A user of its own for processes that are not root, with a
    // supplementary group (both show in /proc/PID/status).
    tar.file(
        "etc/passwd",
        0o644,
        format!(
            "root:x:0:0:root:/root:/bin/sh\n{APP_USER}:x:{APP_UID}:{APP_UID}::/tmp:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        .as_bytes(),
    );
    tar.file(
        "etc/group",
        0o644,
        format!(
            "root:x:0:\n{APP_USER}:x:{APP_UID}:\nextra:x:{APP_EXTRA_GID}:{APP_USER}\nnogroup:x:65534:\n"
        )
        .as_bytes(),
    );
    tar.finish()
}

/// The PostgreSQL image's layer: static busybox, Debian's PostgreSQL 15
/// `postgres` and `initdb` with their libraries, the two modules initdb
/// loads (snowball dictionaries, PL/pgSQL), the share files it reads (no
/// manual pages, contrib or extensions but PL/pgSQL's), and a user
/// [`PG_USER`] for the server, which refuses to run as root.
pub fn postgres_layer() -> Vec<u8> {
    let mut tar = TarWriter::default();
    add_busybox(&mut tar);
    let mut made_dirs: Vec<String> = Vec::new();
    for binary in ["postgres", "initdb"] {
        let path = format!("{PG_BIN_DIR}/{binary}");
        if !Path::new(&path).exists() {
            panic!("{path} is missing (install postgresql: .ci/install does)");
        }
        add_libraries(&mut tar, &mut made_dirs, &path);
        add_host_file(&mut tar, &mut made_dirs, &path, 0o755);
    }
    for module in ["dict_snowball.so", "plpgsql.so"] {
        add_host_file(
            &mut tar,
            &mut made_dirs,
            &format!("{PG_LIB_DIR}/{module}"),
            0o755,
        );
    }
    add_host_tree(
        &mut tar,
        &mut made_dirs,
        PG_SHARE_DIR,
        &["man", "contrib", "extension"],
    );
    for file in ["plpgsql.control", "plpgsql--1.0.sql"] {
        add_host_file(
            &mut tar,
            &mut made_dirs,
            &format!("{PG_SHARE_DIR}/extension/{file}"),
            0o644,
        );
    }
    tar.file(
        "etc/passwd",
        0o644,
        format!(
            "root:x:0:0:root:/root:/bin/sh
{PG_USER}:x:{PG_UID}:{PG_UID}::/tmp:/bin/sh
"
        )
        .as_bytes(),
    );
    tar.file(
        "etc/group",
        0o644,
        format!(
            "root:x:0:
{PG_USER}:x:{PG_UID}:
"
        )
        .as_bytes(),
    );
    tar.finish()
}

/// Writes an OCI image archive (oci-layout, index.json, blobs) holding
/// [`reference_layer`] to `archive`, named `name` (`repo:tag`).
pub fn write_reference_image(archive: &Path, name: &str) {
    write_image(archive, name, &reference_layer());
}

/// Writes an OCI image archive (oci-layout, index.json, blobs) with the one
/// layer `layer` to `archive`, named `name` (`repo:tag`) through both
/// annotations containerd's importer reads.
pub fn write_image(archive: &Path, name: &str, layer: &[u8]) {
    write_image_as(archive, name, layer, None)
}

/// [`write_image`] with the image config's `User` (e.g. `1000:1000`),
/// which ctr puts in the container's spec.
pub fn write_image_as(archive: &Path, name: &str, layer: &[u8], user: Option<&str>) {
    let layer_digest = sha256_digest(layer);
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    if let Some(user) = user {
        config["config"]["User"] = serde_json::json!(user);
    }
    let config = serde_json::to_vec(&config).expect("config json");
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = sha256_digest(&manifest);
    let tag = name
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let index = serde_json::to_vec(&index).expect("index json");

    let mut tar = TarWriter::default();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    tar.file("index.json", 0o644, &index);
    tar.dir("blobs", 0o755);
    tar.dir("blobs/sha256", 0o755);
    for (digest, bytes) in [
        (&config_digest, &config[..]),
        (&manifest_digest, &manifest[..]),
        (&layer_digest, layer),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, bytes);
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(archive)
        .unwrap_or_else(|e| panic!("create {}: {e}", archive.display()));
    std::io::Write::write_all(&mut file, &tar.finish())
        .unwrap_or_else(|e| panic!("write {}: {e}", archive.display()));
}

/// Parses `ctr images ls` (REF TYPE DIGEST ...) into (ref, digest).
pub fn parse_images(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [name, _kind, digest, ..] if digest.starts_with("sha256:") => {
                    Some((name.to_string(), digest.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}
