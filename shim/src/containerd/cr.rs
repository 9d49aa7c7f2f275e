//! Checkpoint and restore of a container with the cowsnap engine, for the
//! shim. Checkpoint runs the `cowsnap` binary's dump on the container's
//! cgroup. Restore is split in two halves around `runc create`/`start`:
//! [`prepare_restore`] checks the image on the host, creates the control
//! region and derives a bundle whose process is the static `cowsnap`
//! binary (`restore-init`, bind-mounted read-only with the image under
//! `/dev/.cowsnap`, which is runc's tmpfs, so nothing lands in the rootfs);
//! [`finish_restore`] runs `cowsnap restore-control`, which waits for that
//! helper, as the container's pid 1, to rebuild the tree, releases it, and
//! removes the helper's mounts ([`control_restore`]). The engine always
//! runs as a child process of the shim, never in it: it ptraces, and the
//! shim's reaper thread (`waitpid(-1)`) would take its ptrace stops.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::restore::ContainerRestore;

#[derive(Debug, thiserror::Error)]
pub enum CrError {
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("{0}")]
    Failed(String),
}

/// Checkpoint options as containerd sent them (decoded by the service from
/// the request's `options` Any: runc's `CheckpointOptions` type urls
/// `containerd.runc.v1.CheckpointOptions` and
/// `containerd.linux.runc.CheckpointOptions`, and absent options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub id: String,
    pub init_pid: i32,
    pub bundle: PathBuf,
    pub path: PathBuf,
    pub exit: bool,
    pub image_path: Option<PathBuf>,
    pub work_path: Option<PathBuf>,
}

/// Where the helper and the image appear inside the container.
const HIDDEN_DIR: &str = "/dev/.cowsnap";
const HELPER_DEST: &str = "/dev/.cowsnap/cowsnap";
const IMAGE_DEST: &str = "/dev/.cowsnap/image";
/// The derived bundle, inside the task's bundle (removed with it).
const DERIVED_BUNDLE: &str = "cowsnap-restore";
/// Env var naming the `cowsnap` binary; default: beside the shim, then PATH.
pub const BIN_ENV: &str = "COWSNAP_BIN";

/// The `cowsnap` binary the shim runs for dumps and uses as restore helper.
pub fn engine_binary() -> Result<PathBuf, CrError> {
    if let Some(path) = std::env::var_os(BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("cowsnap")));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("cowsnap"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CrError::Failed(format!(
                "the cowsnap binary was not found: set {BIN_ENV}, or put it beside the shim or on PATH"
            ))
        })
}

/// Dumps every process of the container's cgroup into the checkpoint
/// directory (`image_path` when containerd gave one, else `path`). The
/// container is left as it was (running, or paused when containerd paused
/// it first), or killed with `exit`. A failed dump leaves it running and
/// writes nothing (the engine removes its partial image).
pub fn checkpoint(req: &CheckpointRequest) -> Result<(), CrError> {
    let images = req.image_path.as_deref().unwrap_or(&req.path);
    let cgroup = crate::sys::cgroup::freezer_dir_of(req.init_pid).map_err(|e| {
        CrError::Failed(format!("task {}: finding its freezer cgroup: {e}", req.id))
    })?;
    let bin = engine_binary()?;
    let mut cmd = Command::new(&bin);
    cmd.arg("dump")
        .arg("--pid")
        .arg(req.init_pid.to_string())
        .arg("--images")
        .arg(images)
        .arg("--cgroup")
        .arg(&cgroup);
    if req.exit {
        cmd.arg("--exit");
    }
    let output = run_engine(cmd, &bin)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Some(work) = &req.work_path {
        // The dump's progress and summary, where runc would leave criu's log.
        let _ = std::fs::create_dir_all(work);
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), stderr);
        let _ = std::fs::write(work.join("dump.log"), log);
    }
    if output.status == 0 {
        return Ok(());
    }
    Err(CrError::Failed(format!(
        "checkpoint of task {} failed, the container keeps running: {}",
        req.id,
        engine_reason(&output)
    )))
}

/// Runs the engine binary to its end under the shim's reaper.
fn run_engine(cmd: Command, bin: &Path) -> Result<super::runc::Reaped, CrError> {
    super::runc::run_reaped(cmd, true).map_err(|e| {
        CrError::Failed(match e {
            super::runc::ReapedError::Spawn(e) => format!("running {}: {e}", bin.display()),
            super::runc::ReapedError::Io { what, detail } => {
                format!("running {}: {what}: {detail}", bin.display())
            }
        })
    })
}

/// The engine's last line is its error ("cowsnap: <reason>").
fn engine_reason(output: &super::runc::Reaped) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("cowsnap: ").to_string())
        .unwrap_or_else(|| format!("cowsnap ended with status {}", output.status))
}

pub struct PreparedRestore {
    pub bundle: PathBuf,
    pub extra_fds: Vec<OwnedFd>,
    /// The shim's copy of the control region's fd, for the controller.
    control: OwnedFd,
    checkpoint: PathBuf,
    id: String,
}

/// Called in Start for a task created from a checkpoint: checks the image,
/// creates the control region (`extra_fds[0]`, fd 3 of the helper) and
/// derives a bundle for `runc create`. `terminal`: whether containerd asked
/// for a terminal for the new task (ctr 1.6 restores with pipes even when
/// the container had one; the restored tree's tty fds then become those).
pub fn prepare_restore(
    id: &str,
    bundle: &Path,
    checkpoint: &Path,
    terminal: bool,
) -> Result<PreparedRestore, CrError> {
    let failed = |what: String| CrError::Failed(format!("restore of task {id}: {what}"));
    let fd = ContainerRestore::prepare(checkpoint).map_err(|e| match e {
        crate::restore::RestoreError::NotSupported(m) => CrError::NotSupported(m),
        e => failed(e.to_string()),
    })?;
    let helper = engine_binary()?;
    if !is_static(&helper).map_err(|e| failed(format!("{}: {e}", helper.display())))? {
        return Err(CrError::NotSupported(format!(
            "restore of task {id}: {} is dynamically linked; the restore helper runs inside the \
             container's rootfs and must be static (see README: the static cowsnap build)",
            helper.display()
        )));
    }
    let config_path = bundle.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| failed(format!("{}: {e}", config_path.display())))?;
    let spec: Value = serde_json::from_str(&text)
        .map_err(|e| failed(format!("{}: {e}", config_path.display())))?;
    let mut derived = derive_spec(spec, bundle, &helper, checkpoint)
        .map_err(|e| failed(format!("{}: {e}", config_path.display())))?;
    if let Some(process) = derived.get_mut("process").and_then(Value::as_object_mut) {
        process.insert("terminal".into(), json!(terminal));
    }
    let dir = bundle.join(DERIVED_BUNDLE);
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let out = dir.join("config.json");
    let bytes = serde_json::to_vec_pretty(&derived).map_err(|e| failed(e.to_string()))?;
    std::fs::write(&out, bytes).map_err(|e| failed(format!("{}: {e}", out.display())))?;
    let control = fd
        .try_clone()
        .map_err(|e| failed(format!("duplicating the control region's fd: {e}")))?;
    Ok(PreparedRestore {
        bundle: dir,
        extra_fds: vec![fd],
        control,
        checkpoint: checkpoint.to_path_buf(),
        id: id.to_string(),
    })
}

/// Called after `runc create` on `prepared.bundle` (with
/// `prepared.extra_fds` passed as fds 3.. via `--preserve-fds N`) and `runc
/// start`; blocks until the restored tree runs. `init_pid` is the container
/// init's pid (from runc's pid file). On failure the container's init has
/// been killed; the caller deletes the container.
pub fn finish_restore(prepared: PreparedRestore, init_pid: i32) -> Result<(), CrError> {
    let PreparedRestore {
        control,
        checkpoint,
        id,
        ..
    } = prepared;
    // The controller runs in its own process: it ptraces the restored
    // tree, and the shim's reaper (waitpid(-1) in another thread) would
    // take the ptrace stops from under it.
    let bin = engine_binary()?;
    let mut cmd = Command::new(&bin);
    cmd.arg("restore-control")
        .arg("--images")
        .arg(&checkpoint)
        .arg("--init-pid")
        .arg(init_pid.to_string())
        .arg("--control-fd")
        .arg("3");
    crate::sys::spawn::pass_fds_from_3(&mut cmd, vec![control]);
    let output = run_engine(cmd, &bin)?;
    if output.status != 0 {
        return Err(CrError::Failed(format!(
            "restore of task {id}: {}",
            engine_reason(&output)
        )));
    }
    Ok(())
}

/// The controller of a container restore (`cowsnap restore-control`, run
/// by the shim): waits for the helper (container init `init_pid`) to
/// rebuild the tree, releases it, then removes the helper's mounts.
pub fn control_restore(images: &Path, init_pid: i32, control: OwnedFd) -> Result<String, CrError> {
    let restore =
        ContainerRestore::attach(images, control).map_err(|e| CrError::Failed(e.to_string()))?;
    let summary = restore
        .control(init_pid)
        .map_err(|e| CrError::Failed(e.to_string()))?;
    crate::sys::ns::detach_mounts(
        init_pid,
        &[HELPER_DEST, IMAGE_DEST],
        &[HELPER_DEST, IMAGE_DEST, HIDDEN_DIR],
    )
    .map_err(|e| CrError::Failed(format!("removing the restore helper's mounts: {e}")))?;
    Ok(summary.to_string())
}

/// The bundle spec for the restore helper: the task's own spec (rootfs,
/// namespaces, cgroup, mounts, rlimits) with the helper as its process,
/// running as root with every capability and no seccomp or LSM profile
/// (each restored process takes back its own), and the helper and the
/// image bind-mounted read-only under [`HIDDEN_DIR`].
fn derive_spec(
    mut spec: Value,
    bundle: &Path,
    helper: &Path,
    image: &Path,
) -> Result<Value, String> {
    let root = spec.pointer_mut("/root/path").ok_or("no root.path")?;
    let root_path = PathBuf::from(root.as_str().ok_or("root.path is not a string")?);
    if root_path.is_relative() {
        *root = json!(bundle.join(root_path).to_string_lossy());
    }
    let process = spec
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or("no process")?;
    process.insert(
        "args".into(),
        json!([
            HELPER_DEST,
            "restore-init",
            "--images",
            IMAGE_DEST,
            "--control-fd",
            "3"
        ]),
    );
    process.insert("cwd".into(), json!("/"));
    process.insert("user".into(), json!({"uid": 0, "gid": 0}));
    process.insert("noNewPrivileges".into(), json!(false));
    let caps = json!(helper_caps(bounding_set()));
    process.insert(
        "capabilities".into(),
        json!({"bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps}),
    );
    process.remove("apparmorProfile");
    process.remove("selinuxLabel");
    if let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("seccomp");
    }
    let mounts = spec
        .as_object_mut()
        .ok_or("spec is not an object")?
        .entry("mounts")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or("mounts is not an array")?;
    mounts.push(json!({
        "destination": HELPER_DEST, "type": "bind",
        "source": helper.to_string_lossy(), "options": ["bind", "ro"]
    }));
    mounts.push(json!({
        "destination": IMAGE_DEST, "type": "bind",
        "source": image.to_string_lossy(), "options": ["rbind", "ro"]
    }));
    Ok(spec)
}

/// The shim's own capability bounding set (runc cannot grant more);
/// every capability when it cannot be read.
fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// The helper's capabilities: every one in `bounding` (bit n = capability n).
fn helper_caps(bounding: u64) -> Vec<&'static str> {
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Whether the ELF file at `path` has no program interpreter (PT_INTERP).
fn is_static(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit ELF file");
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for k in 0..phnum {
        let at = phoff + k * phentsize;
        let p_type = bytes
            .get(at..at + 4)
            .ok_or_else(bad)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
        if p_type == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_spec_runs_the_helper_with_the_image_mounted() {
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/app", "user": {"uid": 1000, "gid": 1000},
                        "noNewPrivileges": true, "apparmorProfile": "x",
                        "capabilities": {"bounding": ["CAP_KILL"]}},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}, "namespaces": [{"type": "pid"}]}
        });
        let out = derive_spec(
            spec,
            Path::new("/b"),
            Path::new("/h/cowsnap"),
            Path::new("/img"),
        )
        .expect("derive");
        assert_eq!(out["root"]["path"], "/b/rootfs");
        assert_eq!(out["process"]["args"][0], HELPER_DEST);
        assert_eq!(out["process"]["args"][5], "3");
        assert_eq!(out["process"]["user"]["uid"], 0);
        assert_eq!(out["process"]["noNewPrivileges"], false);
        assert!(out["process"].get("apparmorProfile").is_none());
        assert!(out["linux"].get("seccomp").is_none());
        assert_eq!(out["linux"]["namespaces"][0]["type"], "pid");
        let caps = out["process"]["capabilities"]["effective"]
            .as_array()
            .expect("caps");
        assert!(
            caps.contains(&json!("CAP_SYS_ADMIN"))
                && caps.contains(&json!("CAP_CHECKPOINT_RESTORE"))
        );
        let mounts = out["mounts"].as_array().expect("mounts");
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1]["source"], "/h/cowsnap");
        assert_eq!(mounts[2]["destination"], IMAGE_DEST);
        assert_eq!(mounts[2]["options"], json!(["rbind", "ro"]));
    }

    #[test]
    fn helper_caps_stay_inside_the_bounding_set() {
        let all = helper_caps(u64::MAX);
        assert_eq!(all.len(), ALL_CAPS.len());
        // This machine's shim: everything but CAP_SYS_RESOURCE (bit 24).
        let some = helper_caps(0x0000_01ff_feff_ffff);
        assert_eq!(some.len(), ALL_CAPS.len() - 1);
        assert!(!some.contains(&"CAP_SYS_RESOURCE"));
        assert!(some.contains(&"CAP_SYS_ADMIN") && some.contains(&"CAP_CHECKPOINT_RESTORE"));
        assert_eq!(helper_caps(1 << 21), vec!["CAP_SYS_ADMIN"]);
    }

    #[test]
    fn derived_spec_refuses_a_spec_without_root() {
        let err = derive_spec(
            json!({"process": {}}),
            Path::new("/b"),
            Path::new("/h"),
            Path::new("/i"),
        )
        .expect_err("no root");
        assert!(err.contains("root.path"), "{err}");
    }

    #[test]
    fn is_static_tells_static_from_dynamic() {
        assert!(!is_static(Path::new("/bin/sh")).expect("read /bin/sh"));
        let err = is_static(Path::new("/proc/self/status")).expect_err("not ELF");
        assert!(err.to_string().contains("ELF"), "{err}");
    }
}
