//! A process's stdio: the fifos containerd names in Create/Exec, joined to
//! the container process by copy threads.
//!
//! Without a terminal the container gets pipes (never the fifos themselves,
//! so that CloseIO can give the process EOF on stdin, and the shim knows when
//! output is drained). With a terminal runc sends the pty master over a
//! console socket and the threads copy between it and the fifos. Opening a
//! fifo blocks until its other end is open, so each open happens in its copy
//! thread, never in an RPC.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::runc::ProcessStdio;
use crate::sys::console::{recv_fd, set_window_size, ConsoleError};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating a pipe for {stream}: {source}")]
    Pipe {
        stream: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("console socket {path}: no connection from runc within {secs}s")]
    ConsoleTimeout { path: PathBuf, secs: u64 },
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// The stdio paths containerd gave for one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The shim's side of a running process's stdio.
#[derive(Default)]
pub struct ProcessIo {
    /// Where stdin bytes go (a pipe to the process or the pty master);
    /// CloseIO drops it.
    stdin_sink: Arc<Mutex<Option<File>>>,
    console: Option<File>,
    /// Output copiers; they end when the process side is closed.
    output: Vec<JoinHandle<()>>,
}

impl ProcessIo {
    /// Stop forwarding stdin; without a terminal the process reads EOF.
    pub fn close_stdin(&self) {
        if let Ok(mut sink) = self.stdin_sink.lock() {
            sink.take();
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> Result<(), IoError> {
        match &self.console {
            Some(master) => Ok(set_window_size(master.as_fd(), width, height)?),
            // containerd's runc shim ignores a resize without a terminal too
            None => Ok(()),
        }
    }

    /// Wait until all output has been copied to the fifos (the process and
    /// everything that inherited its stdio are gone) or `timeout` passes.
    pub fn wait_output(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.output.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in self.output.drain(..) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        self.close_stdin();
    }
}

/// Stdio being set up: what to hand to runc, and how to finish once runc
/// returned.
pub enum PendingIo {
    Pipes {
        stdio: Option<ProcessStdio>,
        io: ProcessIo,
    },
    Terminal {
        socket: ConsoleSocket,
        paths: StdioPaths,
    },
}

impl PendingIo {
    /// Prepare stdio for `paths`: pipes with copy threads, or a console socket.
    pub fn new(paths: &StdioPaths) -> Result<PendingIo, IoError> {
        if paths.terminal {
            return Ok(PendingIo::Terminal {
                socket: ConsoleSocket::new()?,
                paths: paths.clone(),
            });
        }
        let mut stdio = ProcessStdio::default();
        let mut io = ProcessIo::default();
        if !paths.stdin.is_empty() {
            let (r, w) = std::io::pipe().map_err(|source| IoError::Pipe {
                stream: "stdin",
                source,
            })?;
            stdio.stdin = Some(OwnedFd::from(r));
            *io.stdin_sink.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(File::from(OwnedFd::from(w)));
            spawn_stdin_copy(PathBuf::from(&paths.stdin), io.stdin_sink.clone());
        }
        for (stream, path) in [("stdout", &paths.stdout), ("stderr", &paths.stderr)] {
            if path.is_empty() {
                continue;
            }
            let (r, w) = std::io::pipe().map_err(|source| IoError::Pipe { stream, source })?;
            if stream == "stdout" {
                stdio.stdout = Some(OwnedFd::from(w));
            } else {
                stdio.stderr = Some(OwnedFd::from(w));
            }
            io.output.push(spawn_output_copy(
                File::from(OwnedFd::from(r)),
                PathBuf::from(path),
            ));
        }
        Ok(PendingIo::Pipes {
            stdio: Some(stdio),
            io,
        })
    }

    /// The stdio and console socket to pass to runc.
    pub fn for_runc(&mut self) -> (ProcessStdio, Option<PathBuf>) {
        match self {
            PendingIo::Pipes { stdio, .. } => (stdio.take().unwrap_or_default(), None),
            PendingIo::Terminal { socket, .. } => {
                (ProcessStdio::default(), Some(socket.path.clone()))
            }
        }
    }

    /// After runc succeeded: with a terminal, receive the pty master and
    /// start copying.
    pub fn finish(self) -> Result<ProcessIo, IoError> {
        match self {
            PendingIo::Pipes { io, .. } => Ok(io),
            PendingIo::Terminal { socket, paths } => {
                let master = File::from(socket.receive_master()?);
                let mut io = ProcessIo::default();
                let dup = |what| {
                    master.try_clone().map_err(|source| IoError::Path {
                        what,
                        path: socket.path.clone(),
                        source,
                    })
                };
                if !paths.stdin.is_empty() {
                    *io.stdin_sink.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(dup("dup of the pty master for stdin")?);
                    spawn_stdin_copy(PathBuf::from(&paths.stdin), io.stdin_sink.clone());
                }
                if !paths.stdout.is_empty() {
                    io.output.push(spawn_output_copy(
                        dup("dup of the pty master for stdout")?,
                        PathBuf::from(&paths.stdout),
                    ));
                }
                io.console = Some(master);
                Ok(io)
            }
        }
    }
}

/// fifo -> sink (pipe to the process or pty master) until the fifo's writer
/// closes or CloseIO drops the sink.
fn spawn_stdin_copy(fifo: PathBuf, sink: Arc<Mutex<Option<File>>>) {
    std::thread::spawn(move || {
        let Ok(mut src) = File::open(&fifo) else {
            log::warn!("open stdin fifo {}", fifo.display());
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(mut guard) = sink.lock() else { break };
            let Some(dst) = guard.as_mut() else { break };
            if dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        // EOF on the fifo: the process sees EOF (pipe case) as well.
        if let Ok(mut guard) = sink.lock() {
            guard.take();
        }
    });
}

/// process output -> fifo until the process side is closed (EOF, or EIO on
/// a pty master whose terminal has no more users).
///
/// The first reader (ctr) often goes away while the process runs on (`ctr
/// run -d`, `ctr container restore`); what the process writes while nobody
/// reads is dropped, and a later reader (`ctr task attach`) gets the output
/// from then on.
fn spawn_output_copy(mut src: File, fifo: PathBuf) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let dst = OpenOptions::new().write(true).open(&fifo);
        let mut dst = match dst {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!("open output fifo {}: {e}", fifo.display());
                None
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dst.is_none() {
                dst = reopen_if_read(&fifo);
            }
            // Keep draining even when the reader went away, so the process
            // never blocks on a full pipe.
            if let Some(f) = dst.as_mut() {
                if f.write_all(&buf[..n]).is_err() {
                    dst = None;
                }
            }
        }
    })
}

/// The fifo opened for writing if a reader has it open now, else None
/// (a non-blocking open fails with ENXIO instead of waiting for one).
/// Writes to the returned file block like on the first open.
fn reopen_if_read(fifo: &Path) -> Option<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .ok()?;
    let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).ok()?);
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_SETFL(flags.difference(OFlag::O_NONBLOCK)),
    )
    .ok()?;
    Some(file)
}

/// A unix socket runc connects to with `--console-socket` to send the pty
/// master; lives in a private directory removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    pub path: PathBuf,
}

static CONSOLE_SEQ: AtomicU64 = AtomicU64::new(0);

impl ConsoleSocket {
    pub fn new() -> Result<ConsoleSocket, IoError> {
        let dir = std::env::temp_dir().join(format!(
            "cowsnap-pty-{}-{}",
            std::process::id(),
            CONSOLE_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|source| IoError::Path {
            what: "create console socket directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("pty.sock");
        let listener = UnixListener::bind(&path).map_err(|source| IoError::Path {
            what: "bind console socket",
            path: path.clone(),
            source,
        })?;
        Ok(ConsoleSocket { listener, path })
    }

    /// Accept runc's connection and take the pty master from it. runc has
    /// already connected and sent when `runc create/exec` returned success,
    /// so the wait is bounded instead of trusting that forever.
    pub fn receive_master(&self) -> Result<OwnedFd, IoError> {
        const WAIT: Duration = Duration::from_secs(10);
        let path_err = |what, source| IoError::Path {
            what,
            path: self.path.clone(),
            source,
        };
        self.listener
            .set_nonblocking(true)
            .map_err(|e| path_err("set console socket non-blocking", e))?;
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(IoError::ConsoleTimeout {
                            path: self.path.clone(),
                            secs: WAIT.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(path_err("accept on console socket", e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| path_err("set console stream blocking", e))?;
        Ok(recv_fd(&stream)?)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether `path` names a fifo (containerd's stdio can also be a `file://`
/// or `binary://` URI, which this shim does not support).
pub fn check_stdio_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains("://") {
        return Err(format!("stdio {path}: only fifos are supported"));
    }
    if !Path::new(path).is_absolute() {
        return Err(format!("stdio {path}: not an absolute path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn pipes_copy_between_fifos_and_process() {
        let dir = tempfile::tempdir().unwrap();
        let (sin, sout) = (dir.path().join("in"), dir.path().join("out"));
        mkfifo(&sin);
        mkfifo(&sout);
        let paths = StdioPaths {
            stdin: sin.to_string_lossy().into(),
            stdout: sout.to_string_lossy().into(),
            stderr: String::new(),
            terminal: false,
        };
        let mut pending = PendingIo::new(&paths).unwrap();
        let (stdio, sock) = pending.for_runc();
        assert!(sock.is_none());
        assert!(stdio.stderr.is_none());
        // `cat` plays the container process.
        let mut child = std::process::Command::new("cat")
            .stdin(stdio.stdin.unwrap())
            .stdout(stdio.stdout.unwrap())
            .spawn()
            .unwrap();
        let mut io = pending.finish().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            File::open(&sout).unwrap().read_to_string(&mut s).unwrap();
            s
        });
        let mut w = OpenOptions::new().write(true).open(&sin).unwrap();
        w.write_all(b"through the shim\n").unwrap();
        drop(w); // fifo EOF -> cat's stdin EOF -> cat exits
        assert!(child.wait().unwrap().success());
        io.wait_output(Duration::from_secs(30));
        assert_eq!(reader.join().unwrap(), "through the shim\n");
    }

    /// Waits until exactly `n` fds of this process have `fifo` open.
    fn wait_for_fifo_fds(fifo: &Path, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let open = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target == fifo)
                .count();
            if open == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open} fds on {fifo:?}, waited for {n}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A reader that comes after the first one went away (`ctr task
    /// attach` after `ctr run -d`) gets the output written from then on.
    #[test]
    fn output_reaches_a_reader_that_comes_later() {
        let dir = tempfile::tempdir().unwrap();
        let sout = dir.path().join("out");
        mkfifo(&sout);
        let (r, mut w) = std::io::pipe().unwrap();
        let copier = spawn_output_copy(File::from(OwnedFd::from(r)), sout.clone());
        let first = File::open(&sout).unwrap();
        // The copier's own open of the fifo returns with ours; wait for it.
        wait_for_fifo_fds(&sout, 2);
        drop(first);
        // Written while nobody reads: the copier finds no reader and drops
        // its end (then no fd of this process has the fifo open).
        w.write_all(b"lost\n").unwrap();
        wait_for_fifo_fds(&sout, 0);
        let later = std::thread::spawn({
            let sout = sout.clone();
            move || {
                let mut line = String::new();
                let fifo = File::open(&sout).unwrap();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(fifo), &mut line).unwrap();
                line
            }
        });
        // The copier looks for a reader when it has something to write:
        // write until the later reader got a line.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !later.is_finished() && Instant::now() < deadline {
            w.write_all(b"again\n").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(w);
        copier.join().unwrap();
        if !later.is_finished() {
            // Nothing reached the reader: let it see EOF instead of hanging.
            let _ = OpenOptions::new().write(true).open(&sout);
        }
        assert_eq!(later.join().unwrap(), "again\n");
    }

    #[test]
    fn stdio_uris_other_than_fifos_are_refused() {
        assert!(check_stdio_path("").is_ok());
        assert!(check_stdio_path("/run/x/stdout").is_ok());
        assert!(check_stdio_path("binary:///bin/logger").is_err());
        assert!(check_stdio_path("relative").is_err());
    }
}
