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

use oci_spec::runtime::{Capability, LinuxCapabilitiesBuilder, MountBuilder, Spec, UserBuilder};

use crate::engine_error::{EngineError, ErrorKind};
use crate::restore::limits::Limits;

use crate::restore::ContainerRestore;

#[derive(Debug, thiserror::Error)]
pub enum CrError {
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("{0}")]
    Failed(String),
    /// The engine failed and said what kind of failure it was (in this
    /// process, or in the engine child that reported it with
    /// `--error-json`); the message has the context.
    #[error("{0}")]
    Engine(EngineError),
}

impl CrError {
    /// `error`, classified, with `context` before its message.
    fn engine(context: impl std::fmt::Display, error: EngineError) -> CrError {
        CrError::Engine(EngineError::new(
            error.kind,
            format!("{context}: {}", error.message),
        ))
    }
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
    /// Where the engine writes its progress events (`--progress-json`):
    /// a `dump::progress::container_log_path`, which cowsnapd reads while
    /// it waits for the checkpoint; removed once the dump ends.
    pub progress_log: Option<PathBuf>,
}

/// Where the helper and the image appear inside the container.
const HIDDEN_DIR: &str = "/dev/.cowsnap";
const HELPER_DEST: &str = "/dev/.cowsnap/cowsnap";
const IMAGE_DEST: &str = "/dev/.cowsnap/image";
/// The derived bundle, inside the task's bundle (removed with it).
const DERIVED_BUNDLE: &str = "cowsnap-restore";
/// Where the engine writes its error (`--error-json`): in the task's
/// bundle for a dump, in the derived bundle for a restore's controller.
const DUMP_ERROR_FILE: &str = "cowsnap-dump-error.json";
const RESTORE_ERROR_FILE: &str = "cowsnap-restore-error.json";
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
            CrError::Engine(EngineError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "the cowsnap binary was not found: set {BIN_ENV}, or put it beside the shim or on PATH"
                ),
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
    let error_json = req.bundle.join(DUMP_ERROR_FILE);
    let _ = std::fs::remove_file(&error_json);
    let mut cmd = Command::new(&bin);
    cmd.arg("--error-json")
        .arg(&error_json)
        .arg("dump")
        .arg("--pid")
        .arg(req.init_pid.to_string())
        .arg("--images")
        .arg(images)
        .arg("--cgroup")
        .arg(&cgroup);
    if req.exit {
        cmd.arg("--exit");
    }
    // Best effort, as the engine's own writes to it: no progress log never
    // fails a checkpoint.
    let progress_log = req.progress_log.as_deref().filter(|path| {
        match crate::dump::progress::create_log_dir(path) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("task {}: progress log {}: {e}", req.id, path.display());
                false
            }
        }
    });
    if let Some(log) = progress_log {
        cmd.arg("--progress-json").arg(log);
    }
    let output = run_engine(cmd, &bin);
    if let Some(log) = progress_log {
        let _ = std::fs::remove_file(log);
    }
    let output = output?;
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
    let reason = engine_reason("dump", &output, &error_json);
    let _ = std::fs::remove_file(&error_json);
    Err(CrError::engine(
        format_args!(
            "checkpoint of task {} failed, the container keeps running",
            req.id
        ),
        reason,
    ))
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

/// Why `cowsnap COMMAND` failed: the signal that killed it (a killed
/// engine reports nothing, and its cleanup is done by then: see
/// `dump::supervise`), else the error it wrote to `error_json`. An engine
/// that ended without writing one (it panicked) is an internal error,
/// told by its last stderr line.
fn engine_reason(command: &str, output: &super::runc::Reaped, error_json: &Path) -> EngineError {
    if let Some(signal) = killed_by(output.status) {
        return EngineError::new(
            ErrorKind::Internal,
            format!(
                "cowsnap {command} (pid {}) was killed by {signal}",
                output.pid
            ),
        );
    }
    if let Some(error) = EngineError::read_from(error_json) {
        return error;
    }
    let last = String::from_utf8_lossy(&output.stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("cowsnap: ").to_string());
    EngineError::new(
        ErrorKind::Internal,
        last.unwrap_or_else(|| format!("cowsnap {command} ended with status {}", output.status)),
    )
}

/// The signal a reaped status (128 + signal for a killed child) names.
/// cowsnap itself exits with 0, 1 or 2, never above 128.
fn killed_by(status: i32) -> Option<String> {
    let number = status.checked_sub(128).filter(|n| *n > 0)?;
    Some(match nix::sys::signal::Signal::try_from(number) {
        Ok(signal) => signal.as_str().to_string(),
        Err(_) => format!("signal {number}"),
    })
}

pub struct PreparedRestore {
    pub bundle: PathBuf,
    pub extra_fds: Vec<OwnedFd>,
    /// The shim's copy of the control region's fd, for the controller.
    control: OwnedFd,
    checkpoint: PathBuf,
    id: String,
    /// The spec has a seccomp profile: the controller checks that every
    /// restored thread has it on top of its own filters.
    spec_seccomp: bool,
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
    let config_path = bundle.join("config.json");
    let spec =
        Spec::load(&config_path).map_err(|e| failed(format!("{}: {e}", config_path.display())))?;
    // The image is checked against what the task's spec grants here,
    // before the container exists, and again by the helper itself.
    let limits = Limits::from_spec(&spec, bounding_set()).map_err(|e| match e {
        e @ (crate::restore::seccomp::SeccompError::NotSupported(_)
        | crate::restore::seccomp::SeccompError::BlocksRestorer { .. }) => {
            let reason = e.to_string();
            let reason = reason.strip_prefix("not supported: ").unwrap_or(&reason);
            CrError::NotSupported(format!("restore of task {id}: {reason}"))
        }
        e => failed(e.to_string()),
    })?;
    let fd = ContainerRestore::prepare(checkpoint, &limits)
        .map_err(|e| CrError::engine(format_args!("restore of task {id}"), EngineError::of(&e)))?;
    let helper = engine_binary()?;
    if !is_static(&helper).map_err(|e| failed(format!("{}: {e}", helper.display())))? {
        return Err(CrError::NotSupported(format!(
            "restore of task {id}: {} is dynamically linked; the restore helper runs inside the \
             container's rootfs and must be static (see README: the static cowsnap build)",
            helper.display()
        )));
    }
    let spec_seccomp = limits.seccomp.is_some();
    let mut derived = derive_spec(spec, bundle, &helper, checkpoint, &limits)
        .map_err(|e| failed(format!("{}: {e}", config_path.display())))?;
    if let Some(process) = derived.process_mut().as_mut() {
        process.set_terminal(Some(terminal));
    }
    let dir = bundle.join(DERIVED_BUNDLE);
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let out = dir.join("config.json");
    derived
        .save(&out)
        .map_err(|e| failed(format!("{}: {e}", out.display())))?;
    let control = fd
        .try_clone()
        .map_err(|e| failed(format!("duplicating the control region's fd: {e}")))?;
    Ok(PreparedRestore {
        bundle: dir,
        extra_fds: vec![fd],
        control,
        checkpoint: checkpoint.to_path_buf(),
        id: id.to_string(),
        spec_seccomp,
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
        spec_seccomp,
        bundle,
        ..
    } = prepared;
    // The controller runs in its own process: it ptraces the restored
    // tree, and the shim's reaper (waitpid(-1) in another thread) would
    // take the ptrace stops from under it.
    let bin = engine_binary()?;
    let error_json = bundle.join(RESTORE_ERROR_FILE);
    let _ = std::fs::remove_file(&error_json);
    let mut cmd = Command::new(&bin);
    cmd.arg("--error-json")
        .arg(&error_json)
        .arg("restore-control")
        .arg("--images")
        .arg(&checkpoint)
        .arg("--init-pid")
        .arg(init_pid.to_string())
        .arg("--control-fd")
        .arg("3");
    if spec_seccomp {
        cmd.arg("--spec-seccomp");
    }
    crate::sys::spawn::pass_fds_from_3(&mut cmd, vec![control]);
    let output = run_engine(cmd, &bin)?;
    if output.status != 0 {
        let reason = engine_reason("restore-control", &output, &error_json);
        let _ = std::fs::remove_file(&error_json);
        return Err(CrError::engine(
            format_args!("restore of task {id}"),
            reason,
        ));
    }
    Ok(())
}

/// The controller of a container restore (`cowsnap restore-control`, run
/// by the shim): waits for the helper (container init `init_pid`) to
/// rebuild the tree, releases it, then removes the helper's mounts.
/// `spec_seccomp`: the task's spec has a seccomp profile.
pub fn control_restore(
    images: &Path,
    init_pid: i32,
    control: OwnedFd,
    spec_seccomp: bool,
) -> Result<String, CrError> {
    let restore = ContainerRestore::attach(images, control)
        .map_err(|e| CrError::Engine(EngineError::of(&e)))?;
    let summary = restore
        .control(init_pid, spec_seccomp)
        .map_err(|e| CrError::Engine(EngineError::of(&e)))?;
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
/// (each restored process takes back its own, within `limits`, which the
/// helper gets on its command line: what the task's spec grants, its
/// seccomp profile compiled, which the restorer installs last on every
/// process: the helper itself must not run under it), and the
/// helper and the image bind-mounted read-only under [`HIDDEN_DIR`].
fn derive_spec(
    mut spec: Spec,
    bundle: &Path,
    helper: &Path,
    image: &Path,
    limits: &Limits,
) -> Result<Spec, String> {
    let root = spec.root_mut().as_mut().ok_or("no root.path")?;
    if root.path().is_relative() {
        let absolute = bundle.join(root.path());
        root.set_path(absolute);
    }
    let limits = serde_json::to_string(limits).map_err(|e| e.to_string())?;
    let caps: oci_spec::runtime::Capabilities = helper_caps(bounding_set()).into_iter().collect();
    let process = spec.process_mut().as_mut().ok_or("no process")?;
    process.set_args(Some(vec![
        HELPER_DEST.into(),
        "restore-init".into(),
        "--images".into(),
        IMAGE_DEST.into(),
        "--control-fd".into(),
        "3".into(),
        "--limits".into(),
        limits,
    ]));
    process.set_cwd("/".into());
    process.set_user(
        UserBuilder::default()
            .uid(0u32)
            .gid(0u32)
            .build()
            .map_err(|e| e.to_string())?,
    );
    process.set_no_new_privileges(Some(false));
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps.clone())
            .inheritable(caps)
            .build()
            .map_err(|e| e.to_string())?,
    ));
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);
    if let Some(linux) = spec.linux_mut().as_mut() {
        linux.set_seccomp(None);
    }
    let bind = |destination: &str, source: &Path, options: &[&str]| {
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
            .map_err(|e| e.to_string())
    };
    let helper_mount = bind(HELPER_DEST, helper, &["bind", "ro"])?;
    let image_mount = bind(IMAGE_DEST, image, &["rbind", "ro"])?;
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    mounts.push(helper_mount);
    mounts.push(image_mount);
    Ok(spec)
}

/// The shim's own capability bounding set (runc cannot grant more);
/// every capability when it cannot be read.
fn bounding_set() -> u64 {
    caps::read(None, caps::CapSet::Bounding)
        .map_or(u64::MAX, |set| crate::restore::limits::cap_bits(&set))
}

/// The helper's capabilities: every one in `bounding` (bit n = capability n).
fn helper_caps(bounding: u64) -> Vec<Capability> {
    crate::restore::limits::cap_names(bounding)
        .iter()
        .filter_map(|name| name.strip_prefix("CAP_")?.parse().ok())
        .collect()
}

/// Whether the ELF file at `path` has no program interpreter (PT_INTERP).
fn is_static(path: &Path) -> std::io::Result<bool> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let bytes = std::fs::read(path)?;
    let bad = |e: object::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a 64-bit ELF file: {e}"),
        )
    };
    let elf = ElfFile64::<object::Endianness>::parse(bytes.as_slice()).map_err(bad)?;
    let endian = elf.endian();
    Ok(!elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![],
            bounding: 1 << 5,
            no_new_privs: true,
            seccomp: Some(
                crate::restore::seccomp::SeccompProgram::from_bytes(vec![
                    0x06, 0, 0, 0, 0, 0, 0xff, 0x7f,
                ])
                .expect("one instruction"),
            ),
        }
    }

    #[test]
    fn derived_spec_runs_the_helper_with_the_image_mounted() {
        let spec: Spec = serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/app", "user": {"uid": 1000, "gid": 1000},
                        "noNewPrivileges": true, "apparmorProfile": "x",
                        "capabilities": {"bounding": ["CAP_KILL"]}},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}, "namespaces": [{"type": "pid"}]}
        }))
        .expect("spec");
        let out = derive_spec(
            spec,
            Path::new("/b"),
            Path::new("/h/cowsnap"),
            Path::new("/img"),
            &limits(),
        )
        .expect("derive");
        let out = serde_json::to_value(&out).expect("json");
        assert_eq!(out["root"]["path"], "/b/rootfs");
        assert_eq!(out["process"]["args"][0], HELPER_DEST);
        assert_eq!(out["process"]["args"][5], "3");
        assert_eq!(out["process"]["args"][6], "--limits");
        let passed: Limits =
            serde_json::from_str(out["process"]["args"][7].as_str().expect("limits"))
                .expect("json");
        assert_eq!(passed, limits());
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
        let every = caps::all().len();
        let all = helper_caps(u64::MAX);
        assert_eq!(all.len(), every);
        // This machine's shim: everything but CAP_SYS_RESOURCE (bit 24).
        let some = helper_caps(!(1u64 << 24));
        assert_eq!(some.len(), every - 1);
        assert!(!some.contains(&Capability::SysResource));
        assert!(
            some.contains(&Capability::SysAdmin) && some.contains(&Capability::CheckpointRestore)
        );
        assert_eq!(helper_caps(1 << 21), vec![Capability::SysAdmin]);
    }

    #[test]
    fn derived_spec_refuses_a_spec_without_root() {
        let spec: Spec = serde_json::from_value(
            json!({"ociVersion": "1.0.2", "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}}}),
        )
        .expect("spec");
        let mut spec = spec;
        spec.set_root(None);
        let err = derive_spec(
            spec,
            Path::new("/b"),
            Path::new("/h"),
            Path::new("/i"),
            &limits(),
        )
        .expect_err("no root");
        assert!(err.contains("root.path"), "{err}");
    }

    #[test]
    fn engine_reason_is_the_signal_the_error_file_or_the_last_line() {
        let reaped = |status: i32, stderr: &str| super::super::runc::Reaped {
            pid: 42,
            status,
            stdout: vec![],
            stderr: stderr.as_bytes().to_vec(),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let none = dir.path().join("none.json");
        let killed = engine_reason("dump", &reaped(137, ""), &none);
        assert_eq!(
            killed.message,
            "cowsnap dump (pid 42) was killed by SIGKILL"
        );
        assert_eq!(killed.kind, ErrorKind::Internal);
        let reported = dir.path().join("error.json");
        EngineError::new(ErrorKind::Unsupported, "pid 7 fd 3 is netlink")
            .write_to(&reported)
            .expect("write");
        let typed = engine_reason(
            "dump",
            &reaped(1, "cowsnap: pid 7 fd 3 is netlink\n"),
            &reported,
        );
        assert_eq!(typed.kind, ErrorKind::Unsupported);
        assert_eq!(typed.message, "pid 7 fd 3 is netlink");
        let untyped = engine_reason(
            "dump",
            &reaped(1, "progress\ncowsnap: pid 7: gone\n"),
            &none,
        );
        assert_eq!(
            (untyped.kind, untyped.message.as_str()),
            (ErrorKind::Internal, "pid 7: gone")
        );
        assert_eq!(
            engine_reason("restore-control", &reaped(2, ""), &none).message,
            "cowsnap restore-control ended with status 2"
        );
    }

    #[test]
    fn is_static_tells_static_from_dynamic() {
        assert!(!is_static(Path::new("/bin/sh")).expect("read /bin/sh"));
        let err = is_static(Path::new("/proc/self/status")).expect_err("not ELF");
        assert!(err.to_string().contains("ELF"), "{err}");
    }
}
