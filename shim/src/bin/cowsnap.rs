//! `cowsnap`: dump, restore, inspect and verify process trees. Parses
//! arguments and calls the library; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cowsnap::engine_error::{EngineError, ErrorKind};

#[derive(Parser)]
#[command(
    name = "cowsnap",
    version,
    about = "Checkpoint/restore of Linux process trees that keeps copy-on-write sharing"
)]
struct Cli {
    /// On failure, also write the error as JSON to this file
    /// (`{"kind": "unsupported", "message": "..."}`; kinds: not_found,
    /// invalid_argument, unsupported, failed_precondition, unavailable,
    /// resource_exhausted, internal). The shim and cowsnapd read it.
    #[arg(long, global = true, value_name = "PATH")]
    error_json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dump a process and all its descendants (every thread) into an image directory.
    Dump {
        /// Root of the tree to dump.
        #[arg(long)]
        pid: i32,
        /// Image directory to create (must not exist, or be empty).
        #[arg(long)]
        images: PathBuf,
        /// Kill the tree once the image is complete.
        #[arg(long)]
        exit: bool,
        /// Carry established TCP connections over (TCP_REPAIR): their packets
        /// are dropped by an nftables table from the dump until the restore
        /// ends, so the peers see neither a reset nor lost bytes. Without it,
        /// dump refuses an established connection.
        #[arg(long)]
        tcp_established: bool,
        /// Reset connections still waiting in a listening socket's accept
        /// queue and drop queued UDP datagrams instead of refusing the dump.
        #[arg(long)]
        skip_in_flight: bool,
        /// Largest file whose contents go into the image: files deleted
        /// while open or mapped, and files on tmpfs (a container's
        /// /dev/shm dies with it). Bytes, or with a K, M or G suffix. A
        /// deleted file over the limit makes dump refuse.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        saved_file_limit: u64,
        /// Freeze this cgroup (v1 freezer directory or v2 cgroup directory) while seizing.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// No progress lines on stderr.
        #[arg(long, short)]
        quiet: bool,
        /// Also write the dump's progress as typed events, one JSON object
        /// a line (`{"stage":"pages","pages_scanned":…}`; stages seized,
        /// pages, scanned, done), to this file (created 0600, truncated).
        #[arg(long, value_name = "PATH")]
        progress_json: Option<PathBuf>,
    },
    /// Restore an image: the tree comes back with its pids, memory (and its
    /// copy-on-write sharing), fds and signal state, and keeps running after
    /// this command exits.
    Restore {
        /// Image directory written by `cowsnap dump`.
        #[arg(long)]
        images: PathBuf,
        /// Write the restored root's pid (as seen from here) to this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// `new`: a fresh pid namespace (default when the dumped root was a
        /// namespace init); `current`: this namespace, every pid must be free.
        #[arg(long, value_parser = ["new", "current"])]
        pid_ns: Option<String>,
        /// An OCI seccomp profile (JSON, a runtime spec's `linux.seccomp`)
        /// every restored process is put under, on top of its own filters.
        #[arg(long)]
        seccomp_profile: Option<PathBuf>,
        /// No progress lines on stderr.
        #[arg(long, short)]
        quiet: bool,
    },
    /// The container restore helper (run by the containerd shim as a
    /// container's pid 1): becomes the restored root of IMAGES, with the
    /// shim's control region on CONTROL_FD.
    #[command(hide = true)]
    RestoreInit {
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        control_fd: i32,
        /// What the container's spec grants (JSON of `restore::limits::Limits`).
        #[arg(long)]
        limits: String,
    },
    /// The controller of a container restore (run by the containerd shim):
    /// waits for the helper, container init INIT_PID, to rebuild the tree,
    /// releases it and removes the helper's mounts.
    #[command(hide = true)]
    RestoreControl {
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        init_pid: i32,
        #[arg(long)]
        control_fd: i32,
        /// The container's spec has a seccomp profile, which every restored
        /// thread must have on top of its image's filters.
        #[arg(long)]
        spec_seccomp: bool,
    },
    /// Summarise an image: the tree, per-process VMAs and pages, sharing and compression totals.
    Inspect {
        dir: PathBuf,
        /// Machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check an image completely (files, checksums, frames, page references).
    Verify { dir: PathBuf },
    /// Talk to cowsnapd (checkpoint, restore, ls, inspect, rm, export,
    /// import, migrate): runs `cowsnap-ctl` from beside this binary or
    /// from PATH.
    #[command(disable_help_flag = true)]
    Ctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `4096`, `64K`, `64M`, `1G` (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number with K, M or G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let error_json = cli.error_json;
    let result: Result<(), EngineError> = match cli.command {
        Command::Dump {
            pid,
            images,
            exit,
            tcp_established,
            skip_in_flight,
            saved_file_limit,
            cgroup,
            quiet,
            progress_json,
        } => {
            let options = cowsnap::dump::DumpOptions {
                pid,
                images,
                exit,
                cgroup,
                progress: !quiet,
                progress_json,
                sockets: cowsnap::dump::sockets::SocketPolicy {
                    tcp_established,
                    skip_in_flight,
                },
                saved_file_limit,
            };
            cowsnap::dump::supervise::dump_supervised(&options)
                .map(|summary| println!("{summary}"))
                .map_err(|e| EngineError::of(&e))
        }
        Command::Restore {
            images,
            pidfile,
            pid_ns,
            seccomp_profile,
            quiet,
        } => {
            let pid_ns = pid_ns.map(|n| {
                if n == "new" {
                    cowsnap::restore::PidNs::New
                } else {
                    cowsnap::restore::PidNs::Current
                }
            });
            let options = cowsnap::restore::RestoreOptions {
                images,
                pidfile,
                pid_ns,
                progress: !quiet,
                seccomp_profile,
            };
            cowsnap::restore::restore(&options)
                .map(|summary| println!("{summary}"))
                .map_err(|e| EngineError::of(&e))
        }
        Command::RestoreInit {
            images,
            control_fd,
            limits,
        } => match (
            cowsnap::sys::ns::owned_fd(control_fd),
            serde_json::from_str::<cowsnap::restore::limits::Limits>(&limits),
        ) {
            (Ok(fd), Ok(limits)) => Err(EngineError::of(&cowsnap::restore::restore_as_init(
                &images, fd, &limits,
            ))),
            (Err(e), _) => Err(invalid(format!("--control-fd {control_fd}: {e}"))),
            (_, Err(e)) => Err(invalid(format!("--limits: {e}"))),
        },
        Command::RestoreControl {
            images,
            init_pid,
            control_fd,
            spec_seccomp,
        } => match cowsnap::sys::ns::owned_fd(control_fd) {
            Ok(fd) => cowsnap::containerd::cr::control_restore(&images, init_pid, fd, spec_seccomp)
                .map(|summary| println!("{summary}"))
                .map_err(|e| EngineError::of(&e)),
            Err(e) => Err(invalid(format!("--control-fd {control_fd}: {e}"))),
        },
        Command::Inspect { dir, json } => cowsnap::image::inspect::inspect(&dir, json)
            .map(|report| print!("{report}"))
            .map_err(|e| EngineError::of(&e)),
        Command::Verify { dir } => cowsnap::image::inspect::verify(&dir)
            .map(|line| println!("{line}"))
            .map_err(|e| EngineError::of(&e)),
        Command::Ctl { args } => Err(EngineError::new(ErrorKind::NotFound, exec_ctl(&args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cowsnap: {error}");
            if let Some(path) = error_json {
                if let Err(e) = error.write_to(&path) {
                    eprintln!("cowsnap: --error-json {}: {e}", path.display());
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::new(ErrorKind::InvalidArgument, message)
}

/// Replaces this process with `cowsnap-ctl ARGS` (the gRPC client lives in
/// its own binary so that this one, the static engine, stays free of an
/// async runtime); returns only why that failed.
fn exec_ctl(args: &[std::ffi::OsString]) -> String {
    use std::os::unix::process::CommandExt;
    const CTL: &str = "cowsnap-ctl";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(CTL)))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(CTL));
    let err = std::process::Command::new(&program).args(args).exec();
    format!("ctl: run {}: {err}", program.display())
}
