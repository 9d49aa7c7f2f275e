//! The `runc` command line, called the way containerd's runc shim calls it
//! (`--root`, `--log <bundle>/log.json --log-format json`, pid files in the
//! bundle).
//!
//! The shim is a subreaper whose SIGCHLD thread (in `containerd-shim`) reaps
//! every child with `waitpid(-1)`, so a runc child must never be waited for
//! with `Child::wait` (the reaper may take its status first). Each call
//! subscribes to the shim's exit monitor *before* spawning and takes its
//! status from there.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runc {command} {id}: spawning {binary}: {source}")]
    Spawn {
        command: &'static str,
        id: String,
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runc {command} {id}: exit status {status}: {message}")]
    Failed {
        command: &'static str,
        id: String,
        status: i32,
        message: String,
    },
    #[error("runc {command} {id}: {what}: {detail}")]
    Io {
        command: &'static str,
        id: String,
        what: String,
        detail: String,
    },
}

/// Stdio handed to `runc create`/`runc exec` (the container process
/// inherits it); `None` means /dev/null.
#[derive(Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// How the shim runs runc for one container.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: String,
    /// runc's state directory (`--root`).
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    /// runc's log file (`--log`); its last error line is the error message.
    pub log: PathBuf,
}

/// Arguments of `runc create` beyond the container id.
pub struct CreateArgs<'a> {
    pub bundle: &'a Path,
    pub pid_file: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub no_pivot: bool,
    /// Passed to the container as fds 3.. (`--preserve-fds`).
    pub extra_fds: Vec<OwnedFd>,
}

impl Runc {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd.arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json");
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd
    }

    /// Spawn `cmd`, wait for its exit through the reaper, return its stdout.
    fn run(
        &self,
        command: &'static str,
        id: &str,
        cmd: Command,
        capture: bool,
    ) -> Result<Vec<u8>, RuncError> {
        let io = |what: &str, detail: String| RuncError::Io {
            command,
            id: id.to_string(),
            what: what.to_string(),
            detail,
        };
        let binary = self.binary.clone();
        let Reaped {
            status,
            pid: _,
            stdout,
            stderr,
        } = run_reaped(cmd, capture).map_err(|e| match e {
            ReapedError::Spawn(source) => RuncError::Spawn {
                command,
                id: id.to_string(),
                binary,
                source,
            },
            ReapedError::Io { what, detail } => io(what, detail),
        })?;
        if status != 0 {
            let mut message = last_log_error(&self.log).unwrap_or_default();
            if message.is_empty() {
                message = String::from_utf8_lossy(&stderr).trim().to_string();
            }
            return Err(RuncError::Failed {
                command,
                id: id.to_string(),
                status,
                message,
            });
        }
        Ok(stdout)
    }

    pub fn create(
        &self,
        id: &str,
        args: CreateArgs<'_>,
        stdio: ProcessStdio,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("create").arg("--bundle").arg(args.bundle);
        cmd.arg("--pid-file").arg(args.pid_file);
        if let Some(sock) = args.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        if args.no_pivot {
            cmd.arg("--no-pivot");
        }
        if !args.extra_fds.is_empty() {
            cmd.arg("--preserve-fds")
                .arg(args.extra_fds.len().to_string());
            // runc passes fds 3..3+N on to the container: place ours there in
            // the child (the dup2 before exec lives in sys).
            crate::sys::spawn::pass_fds_from_3(&mut cmd, args.extra_fds);
        }
        cmd.arg(id);
        set_stdio(&mut cmd, stdio);
        self.run("create", id, cmd, false).map(drop)
    }

    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("start").arg(id);
        self.run("start", id, cmd, true).map(drop)
    }

    /// `runc exec --detach` of the process described by `process_json`.
    pub fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("exec").arg("--detach");
        cmd.arg("--process").arg(process_json);
        cmd.arg("--pid-file").arg(pid_file);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        set_stdio(&mut cmd, stdio);
        self.run("exec", id, cmd, false).map(drop)
    }

    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run("kill", id, cmd, true).map(drop)
    }

    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("pause").arg(id);
        self.run("pause", id, cmd, true).map(drop)
    }

    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("resume").arg(id);
        self.run("resume", id, cmd, true).map(drop)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", id, cmd, true).map(drop)
    }

    /// Pids of every process in the container (`runc ps --format json`).
    pub fn ps(&self, id: &str) -> Result<Vec<u32>, RuncError> {
        let mut cmd = self.command();
        cmd.arg("ps").arg("--format").arg("json").arg(id);
        let out = self.run("ps", id, cmd, true)?;
        serde_json::from_slice::<Option<Vec<u32>>>(&out)
            .map(Option::unwrap_or_default)
            .map_err(|e| RuncError::Io {
                command: "ps",
                id: id.to_string(),
                what: "parsing the pid list".into(),
                detail: e.to_string(),
            })
    }

    /// `runc update --resources <file>` with OCI LinuxResources JSON.
    pub fn update(&self, id: &str, resources_json: &Path) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("update")
            .arg("--resources")
            .arg(resources_json)
            .arg(id);
        self.run("update", id, cmd, true).map(drop)
    }

    /// One `runc events --stats` sample, as runc prints it.
    pub fn stats(&self, id: &str) -> Result<serde_json::Value, RuncError> {
        let mut cmd = self.command();
        cmd.arg("events").arg("--stats").arg(id);
        let out = self.run("events", id, cmd, true)?;
        serde_json::from_slice(&out).map_err(|e| RuncError::Io {
            command: "events",
            id: id.to_string(),
            what: "parsing the stats".into(),
            detail: e.to_string(),
        })
    }
}

fn set_stdio(cmd: &mut Command, stdio: ProcessStdio) {
    let f = |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or_else(Stdio::null);
    cmd.stdin(f(stdio.stdin));
    cmd.stdout(f(stdio.stdout));
    cmd.stderr(f(stdio.stderr));
}

/// The message of the last `"level":"error"` line runc wrote to its json log.
pub fn last_log_error(log: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(log).ok()?.read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("level").and_then(|l| l.as_str()) == Some("error"))
        .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
}

/// The pid runc wrote to `pid_file`.
pub fn read_pid_file(pid_file: &Path) -> Result<i32, std::io::Error> {
    let text = std::fs::read_to_string(pid_file)?;
    text.trim().parse::<i32>().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", pid_file.display()),
        )
    })
}

/// How a child run by [`run_reaped`] ended, and what it printed.
pub struct Reaped {
    pub pid: i32,
    /// The exit code, or 128 + the signal that killed it (the reaper's encoding).
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
pub enum ReapedError {
    Spawn(std::io::Error),
    Io { what: &'static str, detail: String },
}

/// Runs `cmd` to its end in the shim: subscribes to the reaper's exit
/// notifications before spawning, reads stdout and stderr when `capture`,
/// and takes the exit status from the reaper (never `Child::wait`).
pub fn run_reaped(mut cmd: Command, capture: bool) -> Result<Reaped, ReapedError> {
    let io = |what: &'static str, detail: String| ReapedError::Io { what, detail };
    let subscription =
        monitor_subscribe(Topic::Pid).map_err(|e| io("exit monitor", e.to_string()))?;
    if capture {
        cmd.stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(ReapedError::Spawn)?;
    // The Command holds our copies of the child's stdio (for runc, the
    // container's): close them now so pipes see EOF when the child is done.
    drop(cmd);
    let pid = child.id() as i32;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if capture {
        let err_pipe = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = err_pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        });
        if let Some(mut p) = child.stdout.take() {
            p.read_to_end(&mut stdout)
                .map_err(|e| io("reading stdout", e.to_string()))?;
        }
        stderr = err_reader.join().unwrap_or_default();
    }
    // `child` is dropped without wait(): the reaper owns its status.
    drop(child);
    let status = loop {
        match subscription.rx.recv() {
            Ok(ev) => {
                if let Subject::Pid(p) = ev.subject {
                    if p == pid {
                        break ev.exit_code;
                    }
                }
            }
            Err(_) => return Err(io("exit monitor", "channel closed".into())),
        }
    };
    Ok(Reaped {
        pid,
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_line_of_the_json_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            concat!(
                "{\"level\":\"error\",\"msg\":\"first\",\"time\":\"t\"}\n",
                "{\"level\":\"warning\",\"msg\":\"warn\",\"time\":\"t\"}\n",
                "{\"level\":\"error\",\"msg\":\"container \\\"c1\\\" does not exist\",\"time\":\"t\"}\n",
                "{\"level\":\"info\",\"msg\":\"later\",\"time\":\"t\"}\n",
            ),
        )
        .unwrap();
        assert_eq!(
            last_log_error(&log).as_deref(),
            Some("container \"c1\" does not exist")
        );
        assert_eq!(last_log_error(&dir.path().join("absent")), None);
    }

    #[test]
    fn pid_file_parses_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("init.pid");
        std::fs::write(&p, "4242").unwrap();
        assert_eq!(read_pid_file(&p).unwrap(), 4242);
        std::fs::write(&p, "x").unwrap();
        assert!(read_pid_file(&p).is_err());
    }
}
