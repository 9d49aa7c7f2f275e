//! Real servers checkpointed and restored from the CLI on the host: nginx
//! (Debian's package, a master and 4 workers) and a preforking Python HTTP
//! server (Debian's python3, standard library only), with their listening
//! socket shared by every worker; unix socketpairs and epoll sets; refusals
//! of sockets and other fds that cannot be restored (a FIFO held outside
//! the tree, fanotify), each leaving the tree running.
//!
//! Every test asks the servers real requests before and after and compares
//! the answers, checks that every worker still accepts (each answering
//! worker is stopped in turn, so the next request must reach another one),
//! and compares the tree's PSS before and after.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PYTHON: &str = "/usr/bin/python3";
const NGINX: &str = "/usr/sbin/nginx";

fn workload(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads")
        .join(name)
}

/// Starts `python3 integration/workloads/SCRIPT ARGS` and returns it with
/// the first line it prints (its "ready" line).
fn start_workload(script: &str, args: &[&std::ffi::OsStr]) -> (Child, String) {
    let mut child = Command::new(PYTHON)
        .arg(workload(script))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script} (is python3 installed?): {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{script}: first line: {e}"));
    (child, line.trim().to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP/1.0 GET, the body of a 200 answer, or why not.
fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {answer:?}"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(format!("not a 200 answer: {head:?}"));
    }
    Ok(body.to_string())
}

/// Stops each worker that answers `path` (its body starts with the pid)
/// until every one of `workers` has answered: only a worker that still
/// accepts on the shared socket can. Continues them all afterwards.
fn every_worker_accepts(addr: SocketAddr, path: &str, workers: &[i32], context: &str) {
    let mut answered = BTreeSet::new();
    let mut stopped = Vec::new();
    let mut failure = None;
    for _ in 0..workers.len() * 3 {
        if answered.len() == workers.len() {
            break;
        }
        match get(addr, path) {
            Ok(body) => {
                let pid = pid_in(&body);
                match pid {
                    Some(pid) if workers.contains(&pid) => {
                        answered.insert(pid);
                        stop_and_wait(pid);
                        stopped.push(pid);
                    }
                    _ => {
                        failure = Some(format!("answer {body:?} names no worker of {workers:?}"));
                        break;
                    }
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    for pid in stopped {
        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
    }
    if let Some(f) = failure {
        panic!("{context}: after workers {answered:?} answered: {f}");
    }
    assert_eq!(
        answered.len(),
        workers.len(),
        "{context}: only workers {answered:?} of {workers:?} accepted"
    );
}

/// SIGSTOP, then wait until `pid` is stopped: until then it may still be
/// in epoll_wait and take (and sit on) the next connection.
fn stop_and_wait(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !task_state(pid).starts_with('T') && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
}

fn pid_in(body: &str) -> Option<i32> {
    let t = body.trim();
    t.strip_prefix("pid=")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or(t)
        .parse()
        .ok()
}

/// The pid is in use (a zombie still holds it).
fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn dump_exit(root: i32, images: &Path, extra: &[&str]) -> Output {
    let root = root.to_string();
    let mut args = vec![
        "dump",
        "--exit",
        "--pid",
        &root,
        "--images",
        path_str(images),
    ];
    args.extend_from_slice(extra);
    let out = cowsnap(&args);
    assert!(out.status.success(), "dump failed:\n{}", describe(&out));
    out
}

/// `cowsnap dump` (without --exit) of `root`, which must refuse; its stderr.
fn dump_refused(root: i32, images: &Path, extra: &[&str]) -> String {
    let root = root.to_string();
    let mut args = vec!["dump", "--pid", &root, "--images", path_str(images)];
    args.extend_from_slice(extra);
    let out = cowsnap(&args);
    assert!(
        !out.status.success(),
        "dump should refuse:\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cowsnap restore` with its output in files beside the image (the
/// restored tree keeps the command's stdio, so a pipe would never end).
fn restore(images: &Path) -> Output {
    let out = run_restore(images, &images.with_extension("pid"), &[]);
    assert!(out.status.success(), "restore failed:\n{}", describe(&out));
    out
}

/// Waits until none of `pids` is alive (the dump --exit killed them; our
/// own child is reaped by `child`).
fn wait_gone(pids: &[i32], child: Option<&mut Child>, context: &str) {
    if let Some(c) = child {
        wait_status(c, context);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "{context}: {pids:?} still alive");
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_pss_close(before: u64, after: u64, context: &str) {
    let ratio = after as f64 / before as f64;
    eprintln!(
        "{context}: PSS {:.1} MiB before, {:.1} MiB after (x{ratio:.4})",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(
        (0.99..=1.01).contains(&ratio),
        "{context}: PSS after restore is x{ratio:.4} of before ({before} -> {after} bytes)"
    );
}

/// Asks `pid` for its report (SIGUSR1) and reads `path` once it is
/// written: the JSON the workload wrote.
fn ask_report(pid: i32, path: &Path) -> serde_json::Value {
    let _ = std::fs::remove_file(path);
    let _ = kill(Pid::from_raw(pid), Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no report {} from pid {pid}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(path).expect("report");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report {}: {e}: {text}", path.display()))
}

fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cowsnap-{what}-"))
        .tempdir()
        .expect("tempdir")
}

/// Kills a restored tree at the end of a test (it is nobody's child).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

// ------------------------------------------------------------ Python prefork

struct Prefork {
    child: Child,
    root: i32,
    addr: SocketAddr,
    model: String,
}

fn start_prefork(mib: u32, workers: u32) -> Prefork {
    let port = free_port();
    let args = [port.to_string(), mib.to_string(), workers.to_string()];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let (child, line) = start_workload("prefork_server.py", &args);
    let model = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("model="))
        .unwrap_or_else(|| panic!("prefork server did not start: {line:?}"))
        .to_string();
    Prefork {
        root: child.id() as i32,
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        model,
    }
}

#[test]
fn prefork_python_server_restored_with_its_sharing() {
    require_root();
    let mut server = start_prefork(64, 4);
    let _cleanup = KillOnDrop(vec![server.root]);
    let workers = descendants(server.root)
        .into_iter()
        .filter(|&p| p != server.root)
        .collect::<Vec<_>>();
    assert_eq!(workers.len(), 4, "4 workers");
    every_worker_accepts(server.addr, "/", &workers, "before the dump");
    let body = get(server.addr, "/").expect("request before");
    assert!(body.contains(&format!("model={}", server.model)), "{body}");
    let pids = descendants(server.root);
    let pss_before = pss_total(&pids);

    let (_dir, images) = image_dir("prefork");
    dump_exit(server.root, &images, &[]);
    wait_gone(&pids, Some(&mut server.child), "prefork after dump --exit");
    assert!(
        get(server.addr, "/").is_err(),
        "nothing listens while the tree is down"
    );

    restore(&images);
    let _restored = KillOnDrop(pids.clone());
    let restored = descendants(server.root);
    assert_eq!(restored, pids, "the same pids");
    // The same answer: the model checksum the master computed before forking.
    for _ in 0..8 {
        let body = get(server.addr, "/").expect("request after restore");
        assert!(
            body.contains(&format!("model={}", server.model)),
            "answer after restore: {body}"
        );
    }
    every_worker_accepts(server.addr, "/", &workers, "after the restore");
    // One listening socket, shared: the same inode in every process.
    let inodes: BTreeSet<String> = pids.iter().flat_map(|p| socket_links(*p)).collect();
    assert_eq!(
        inodes.len(),
        1,
        "one listening socket for the whole tree: {inodes:?}"
    );
    assert_pss_close(pss_before, pss_total(&pids), "prefork");
}

fn socket_links(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with("socket:"))
                .collect()
        })
        .unwrap_or_default()
}

// ------------------------------------------------------------ nginx

struct Nginx {
    child: Child,
    root: i32,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

fn start_nginx() -> Nginx {
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-nginx-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    // Workers run as nobody: they must read the tree.
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::create_dir_all(d.join("html")).expect("html");
    std::fs::create_dir_all(d.join("logs")).expect("logs");
    std::fs::write(d.join("html/index.html"), "hello from a restored nginx\n").expect("index");
    let port = free_port();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 4;\npid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/logs/access.log;\n  client_body_temp_path {d}/tmp;\n\
         proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n\
         scgi_temp_path {d}/tmp;\n  server {{\n    listen 127.0.0.1:{port};\n    root {d}/html;\n\
         location /pid {{ return 200 \"$pid\\n\"; }}\n  }}\n}}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("conf");
    let child = Command::new(NGINX)
        .args([
            "-p",
            &d.to_string_lossy(),
            "-c",
            &d.join("nginx.conf").to_string_lossy(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx (is the nginx package installed?)");
    let root = child.id() as i32;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while descendants(root).len() < 5 || get(addr, "/").is_err() {
        assert!(Instant::now() < deadline, "nginx did not come up");
        thread::sleep(Duration::from_millis(50));
    }
    Nginx {
        child,
        root,
        addr,
        dir,
    }
}

#[test]
fn nginx_master_and_workers_restored() {
    require_root();
    let mut nginx = start_nginx();
    let _cleanup = KillOnDrop(vec![nginx.root]);
    let pids = descendants(nginx.root);
    let workers: Vec<i32> = pids.iter().copied().filter(|&p| p != nginx.root).collect();
    assert_eq!(workers.len(), 4);
    let page = get(nginx.addr, "/").expect("index before");
    assert_eq!(page, "hello from a restored nginx\n");
    every_worker_accepts(nginx.addr, "/pid", &workers, "nginx before the dump");
    let pss_before = pss_total(&pids);

    let (_dir, images) = image_dir("nginx");
    dump_exit(nginx.root, &images, &[]);
    wait_gone(&pids, Some(&mut nginx.child), "nginx after dump --exit");
    let out = restore(&images);
    let _restored = KillOnDrop(pids.clone());
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(descendants(nginx.root), pids, "the same pids");
    for _ in 0..5 {
        assert_eq!(get(nginx.addr, "/").expect("index after"), page);
    }
    every_worker_accepts(nginx.addr, "/pid", &workers, "nginx after the restore");
    assert_pss_close(pss_before, pss_total(&pids), "nginx");
    // The master still runs its workers: a graceful reload through its
    // signal handler starts a new generation that serves too.
    let _ = kill(Pid::from_raw(nginx.root), Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: BTreeSet<i32> = descendants(nginx.root).into_iter().collect();
        if now.len() == 5 && workers.iter().all(|w| !now.contains(w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not replace its workers after SIGHUP: {now:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(nginx.addr, "/").expect("index after reload"), page);
    drop(nginx.dir);
}

// ------------------------------------------------------------ unix sockets, epoll

#[test]
fn unix_socketpairs_listeners_and_epoll_restored_with_data_in_flight() {
    sockets_workload_restored(false);
}

/// The same, with an established loopback TCP connection between parent
/// and child (both ends in the tree) carrying data both ways.
#[test]
fn loopback_tcp_connection_inside_the_tree_restored_as_a_pair() {
    sockets_workload_restored(true);
}

fn sockets_workload_restored(tcp: bool) {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-sockets-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    let mut args = vec![d.as_os_str()];
    if tcp {
        args.push("--tcp".as_ref());
    }
    let (mut child, line) = start_workload("sockets.py", &args);
    assert_eq!(line, "ready");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let ports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ports.json")).expect("ports"))
            .expect("ports json");
    let kid = ports["child"].as_i64().expect("child pid") as i32;
    let pids = vec![root, kid];

    let (_img, images) = image_dir("sockets");
    dump_exit(
        root,
        &images,
        if tcp { &["--tcp-established"][..] } else { &[] },
    );
    wait_gone(&pids, Some(&mut child), "sockets.py after dump --exit");
    // The socket file stays behind, as after any crash: restore must cope.
    assert!(d.join("listen.sock").exists());
    restore(&images);
    let _restored = KillOnDrop(pids.clone());

    let report = |pid: i32, role: &str| ask_report(pid, &d.join(format!("report-{role}.json")));
    // Parent first: the epoll set is shared and edge-triggered.
    let parent = report(root, "parent");
    let childr = report(kid, "child");
    for (r, me, peer) in [(&parent, "parent", "child"), (&childr, "child", "parent")] {
        assert_eq!(
            r["stream"].as_str().expect("stream"),
            format!("{peer}-stream-").repeat(1000),
            "{me}: the stream bytes its peer had written"
        );
        let msgs =
            |kind: &str| -> Vec<String> { (0..3).map(|i| format!("{peer}-{kind}-{i}")).collect() };
        assert_eq!(
            r["dgram"],
            serde_json::json!(msgs("dgram")),
            "{me}: datagrams in order"
        );
        assert_eq!(
            r["seqpacket"],
            serde_json::json!(msgs("seq")),
            "{me}: seqpackets in order"
        );
        assert_eq!(r["named_accept"], "ping", "{me}: named listener accepts");
        assert_eq!(r["tcp6"]["v6only"], 1, "{me}: IPV6_V6ONLY");
        assert_eq!(r["tcp6"]["nodelay"], 1, "{me}: TCP_NODELAY");
        assert_eq!(r["tcp6"]["reuseaddr"], 1, "{me}: SO_REUSEADDR");
        assert!(
            r["tcp6"]["defer_accept"].as_i64().unwrap_or(0) > 0,
            "{me}: TCP_DEFER_ACCEPT"
        );
        assert_eq!(r["tcp6"]["port"], ports["tcp6"], "{me}: the same port");
        assert_eq!(r["udp_broadcast"], 1, "{me}: SO_BROADCAST");
        if me == "child" {
            assert_eq!(
                r["fifo"].as_str().expect("fifo"),
                "fifo-data-".repeat(100),
                "child: the named FIFO's buffered data"
            );
        }
        if tcp {
            assert_eq!(
                r["tcp"].as_str().expect("tcp"),
                format!("{peer}-tcp-").repeat(1000),
                "{me}: the TCP bytes its peer had written"
            );
        }
    }
    // The shared epoll set: the parent's stream end and the registration
    // whose fd number was closed both report the queued data; edge
    // triggered, the child then sees nothing new.
    let stream_fd = parent["stream_fd"].as_i64().expect("fd");
    let ghost_fd = parent["ghost_fd"].as_i64().expect("fd");
    assert_eq!(
        parent["epoll"],
        serde_json::json!([stream_fd, ghost_fd]),
        "parent's epoll events"
    );
    assert_eq!(
        childr["epoll"],
        serde_json::json!([]),
        "child's epoll events"
    );
    let mode = std::fs::metadata(d.join("listen.sock")).expect("socket file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o640,
        "socket file mode"
    );
}

#[test]
fn dump_names_every_socket_it_cannot_restore_and_leaves_the_tree_running() {
    require_root();
    // A netlink socket, a packet socket and an established TCP connection
    // (without --tcp-established); a named FIFO held outside the tree too;
    // queued SCM_RIGHTS and a unix peer outside the tree; a POSIX timer on
    // a CPU-time clock,
    // deleted files; and, supported, a signalfd, a timerfd and an inotify fd.
    let fifo_dir = tempfile::Builder::new()
        .prefix("cowsnap-refuse-")
        .tempdir()
        .expect("tempdir");
    let fifo = fifo_dir.path().join("fifo");
    // A unix listener of the test process: outside the dumped tree.
    let outside = fifo_dir.path().join("outside.sock");
    let gone_map = fifo_dir.path().join("mapped-then-deleted");
    let gone_fd = fifo_dir.path().join("opened-then-deleted");
    let _outside = std::os::unix::net::UnixListener::bind(&outside).expect("outside listener");
    let script = format!(
        "import ctypes,os,socket,sys,time\n\
        libc=ctypes.CDLL(None,use_errno=True)\n\
        n=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,0)\n\
        p=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,0)\n\
        l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen(1)\n\
        c=socket.create_connection(l.getsockname()); a,_=l.accept()\n\
        mask=(ctypes.c_ulong*16)(); mask[0]=1<<(10-1)\n\
        sfd=libc.signalfd(-1,mask,0)\n\
        tfd=libc.timerfd_create(1,0)\n\
        ifd=libc.inotify_init1(0)\n\
        os.mkfifo({fifo:?}); ffd=os.open({fifo:?},os.O_RDWR)\n\
        x,y=socket.socketpair(); socket.send_fds(x,[b'fd'],[ffd])\n\
        tid=ctypes.c_long(); libc.timer_create(2,None,ctypes.byref(tid))\n\
        import mmap; m1=open({gone_map:?},'w+b'); m1.write(bytes(4096)); m1.flush(); mm=mmap.mmap(m1.fileno(),4096); m1.close(); os.unlink({gone_map:?})\n\
        g=open({gone_fd:?},'w'); g.write('x'*2000); g.flush(); os.unlink({gone_fd:?})\n\
        o=socket.socket(socket.AF_UNIX); o.connect({outside:?})\n\
        print(n.fileno(),p.fileno(),c.fileno(),a.fileno(),sfd,tfd,ifd,ffd,y.fileno(),o.fileno(),g.fileno(),flush=True)\n\
        time.sleep(600)\n"
    );
    let mut child = Command::new(PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("fds");
    let fds: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fds.len(), 11, "{line}");
    let _accepted = _outside.accept().expect("accept the tree's connection");
    // The FIFO is held outside the tree too (by this test).
    let _fifo_here = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("open the FIFO here too");
    let (_dir, images) = image_dir("refuse-sockets");
    // The deleted files (2000 and 4096 bytes) are over it.
    let err = dump_refused(root, &images, &["--saved-file-limit", "1K"]);
    for (fd, what) in [
        (fds[0], "is socket:[".to_string()),
        (fds[1], "is socket:[".to_string()),
        (fds[2], "is socket:[".to_string()),
        (fds[3], "is socket:[".to_string()),
        (
            fds[7],
            format!(
                "is FIFO {}, which pid {} outside",
                fifo.display(),
                std::process::id()
            ),
        ),
        (fds[8], "is socket:[".to_string()),
        (fds[9], "is socket:[".to_string()),
        (
            fds[10],
            format!(
                "is deleted file {:?} of 2000 bytes, over the saved-file limit of 1024 bytes",
                gone_fd.display().to_string()
            ),
        ),
    ] {
        let needle = format!("pid {root} fd {fd} {what}");
        assert!(err.contains(&needle), "message lacks {needle:?}: {err}");
    }
    for what in [
        "netlink",
        "packet",
        "established TCP connection",
        "SCM_RIGHTS",
        &format!("peer outside the tree ({}", outside.display()),
        &format!(
            "is deleted file {:?} of 4096 bytes, over the saved-file limit of 1024 bytes",
            gone_map.display().to_string()
        ),
    ] {
        assert!(err.contains(what), "message lacks {what:?}: {err}");
    }
    assert!(
        err.contains(&format!("pid {root} has POSIX timer 0 on a CPU-time clock")),
        "names the POSIX timer on a CPU-time clock: {err}"
    );
    // The signalfd, the timerfd and the inotify fd are supported: not in the list.
    assert!(
        // Python's mmap keeps a dup of the mapped file's fd: the deleted
        // mapped file is refused twice, for the fd and for the mapping.
        err.contains("11 fd(s) or other state cannot be restored"),
        "counts them: {err}"
    );
    for fd in [fds[4], fds[5], fds[6]] {
        assert!(
            !err.contains(&format!("pid {root} fd {fd} ")),
            "fd {fd} refused: {err}"
        );
    }
    assert!(err.contains("--tcp-established"), "message says how: {err}");
    assert!(!images.exists(), "no image after a refused dump");
    assert!(
        alive(root) && !task_state(root).starts_with('Z'),
        "tree still runs"
    );
    assert!(!is_traced(root), "tree no longer traced");
    assert!(!task_state(root).starts_with('T'), "tree not stopped");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn dump_refuses_a_fanotify_fd_naming_it_and_the_tree_goes_on_watching() {
    require_root();
    let dir = tempdir("fanotify");
    let watched = dir.path().join("watched");
    std::fs::write(&watched, b"x").expect("watched file");
    // FAN_CLASS_NOTIF (0), FAN_MARK_ADD (1), FAN_OPEN (0x20), AT_FDCWD (-100):
    // one event line per line read from stdin, for each open of `watched`.
    let script = format!(
        "import ctypes,os,sys\n\
        libc=ctypes.CDLL(None,use_errno=True)\n\
        libc.fanotify_mark.argtypes=[ctypes.c_int,ctypes.c_uint,ctypes.c_uint64,ctypes.c_int,ctypes.c_char_p]\n\
        fd=libc.fanotify_init(0,os.O_RDONLY)\n\
        assert fd>=0, os.strerror(ctypes.get_errno())\n\
        assert libc.fanotify_mark(fd,1,0x20,-100,{watched:?}.encode())==0, os.strerror(ctypes.get_errno())\n\
        print(fd,flush=True)\n\
        for line in sys.stdin:\n\
        \x20   print('event',len(os.read(fd,4096))>0,flush=True)\n"
    );
    let mut child = Command::new(PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("fanotify fd");
    let fd: i32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no fanotify fd: {line:?}"));
    let (_dir, images) = image_dir("refuse-fanotify");
    let err = dump_refused(root, &images, &[]);
    let needle = format!("pid {root} fd {fd} is anon_inode:[fanotify]");
    assert!(err.contains(&needle), "message lacks {needle:?}: {err}");
    assert!(
        err.contains("1 fd(s) or other state cannot be restored"),
        "only the fanotify fd is refused: {err}"
    );
    assert!(!images.exists(), "no image after a refused dump");
    assert!(!is_traced(root), "tree no longer traced");
    assert!(!task_state(root).starts_with('T'), "tree not stopped");
    // Still watching: an open of the file reaches it as an event.
    writeln!(stdin, "next").expect("ask for an event");
    std::fs::read(&watched).expect("open the watched file");
    line.clear();
    stdout.read_line(&mut line).expect("event line");
    assert_eq!(
        line.trim(),
        "event True",
        "the fanotify fd after the refused dump"
    );
    drop(stdin);
    wait_status(&mut child, "the fanotify watcher after its stdin closed");
}

#[test]
fn restore_with_the_port_taken_fails_naming_it_and_leaves_nothing() {
    require_root();
    let mut server = start_prefork(8, 2);
    let _cleanup = KillOnDrop(vec![server.root]);
    let pids = descendants(server.root);
    let (_dir, images) = image_dir("port-taken");
    dump_exit(server.root, &images, &[]);
    wait_gone(&pids, Some(&mut server.child), "prefork after dump --exit");
    let squatter = TcpListener::bind(server.addr).expect("take the port");
    let out = run_restore(&images, &images.with_extension("pid"), &[]);
    assert!(
        !out.status.success(),
        "restore should fail:\n{}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("tcp {}", server.addr)) && err.contains("in use"),
        "the error names the address: {err}"
    );
    thread::sleep(Duration::from_millis(300));
    for p in &pids {
        assert!(
            !alive(*p),
            "pid {p} was left running after a failed restore"
        );
    }
    drop(squatter);
    // With the port free again the same image restores.
    restore(&images);
    let _restored = KillOnDrop(pids.clone());
    let body = get(server.addr, "/").expect("request after restore");
    assert!(body.contains(&server.model), "{body}");
}

// ------------------------------------------------------------ established TCP

/// The test's end of the connection: a reader thread that checks the
/// server's counters arrive in order with nothing lost or doubled, and a
/// writer thread that sends the client's own counters.
struct StreamClient {
    /// Counters received in order so far; u64::MAX once something broke.
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl StreamClient {
    fn connect(addr: SocketAddr) -> StreamClient {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let stream = TcpStream::connect(addr).expect("connect to the tree's server");
        let received = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = stream.try_clone().expect("clone");
        reader
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let (r, e, s) = (received.clone(), error.clone(), stop.clone());
        let read_thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut carry: Vec<u8> = Vec::new();
            let mut next = 0u64;
            while !s.load(Ordering::Relaxed) {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("EOF after {next} counters"));
                        return;
                    }
                    Ok(n) => {
                        carry.extend_from_slice(&buf[..n]);
                        let whole = carry.len() / 8 * 8;
                        for c in carry[..whole].chunks(8) {
                            let v = u64::from_be_bytes(c.try_into().unwrap_or_default());
                            if v != next {
                                *e.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("expected counter {next}, got {v}"));
                                return;
                            }
                            next += 1;
                        }
                        carry.drain(..whole);
                        r.store(next, Ordering::Relaxed);
                    }
                    Err(err)
                        if err.kind() == std::io::ErrorKind::WouldBlock
                            || err.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("read after {next} counters: {err}"));
                        return;
                    }
                }
            }
        });
        let mut writer = stream;
        let (w, e, s) = (sent.clone(), error.clone(), stop.clone());
        let write_thread = thread::spawn(move || {
            let mut next = 0u64;
            while !s.load(Ordering::Relaxed) {
                let chunk: Vec<u8> = (next..next + 128).flat_map(|v| v.to_be_bytes()).collect();
                if let Err(err) = writer.write_all(&chunk) {
                    *e.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("write after {next} counters: {err}"));
                    return;
                }
                next += 128;
                w.store(next, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        });
        StreamClient {
            received,
            sent,
            error,
            stop,
            threads: vec![read_thread, write_thread],
        }
    }

    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn wait_for_more(&self, than: u64, context: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.received() <= than + 1000 {
            if let Some(e) = self.error() {
                panic!("{context}: the client's stream broke: {e}");
            }
            assert!(
                Instant::now() < deadline,
                "{context}: the stream did not go on (stuck at {} counters)",
                self.received()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn start_tcp_stream(dir: &Path) -> (Child, SocketAddr) {
    let port = free_port();
    let port_text = port.to_string();
    let (child, line) = start_workload("tcp_stream.py", &[port_text.as_ref(), dir.as_os_str()]);
    assert_eq!(line, "listening");
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The tcp_stream.py server, its client streaming, dumped with --exit
/// --tcp-established: (work dir, server child already reaped, root pid,
/// address, client, image dir holder, image path).
struct DumpedStream {
    dir: tempfile::TempDir,
    root: i32,
    addr: SocketAddr,
    client: StreamClient,
    _img: tempfile::TempDir,
    images: PathBuf,
}

fn dump_a_stream(what: &str) -> DumpedStream {
    let dir = tempdir(what);
    let (mut child, addr) = start_tcp_stream(dir.path());
    let root = child.id() as i32;
    let client = StreamClient::connect(addr);
    client.wait_for_more(0, "before the dump");
    let (_img, images) = image_dir(what);
    dump_exit(root, &images, &["--tcp-established"]);
    wait_gone(&[root], Some(&mut child), "tcp_stream.py after dump --exit");
    DumpedStream {
        dir,
        root,
        addr,
        client,
        _img,
        images,
    }
}

fn nft_table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn connection_lock(images: &Path) -> String {
    let sockets: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(images.join("sockets.json")).expect("sockets.json"),
    )
    .expect("json");
    sockets["connection_lock"]
        .as_str()
        .expect("an image with an established connection names its nft table")
        .to_string()
}

#[test]
fn established_tcp_connection_streams_on_across_dump_exit_and_restore() {
    require_root();
    let DumpedStream {
        dir,
        root,
        client,
        _img,
        images,
        ..
    } = dump_a_stream("tcp-established");
    let _cleanup = KillOnDrop(vec![root]);
    let at_dump = client.received();
    let table = connection_lock(&images);
    assert!(
        nft_table_exists(&table),
        "packets are blocked while the tree is down"
    );
    // The client keeps sending into the void for a while: no reset comes.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(
        client.error(),
        None,
        "the client saw an error while the tree was down"
    );

    restore(&images);
    assert!(!nft_table_exists(&table), "restore removed table {table}");
    client.wait_for_more(at_dump, "after the restore");
    // The server saw every client counter in order, from before the dump
    // through after the restore (asked while the client still runs: its
    // end of file would end the server).
    let r = ask_report(root, &dir.path().join("report.json"));
    let sent = client.stop();
    assert_eq!(r["gap"], serde_json::Value::Null, "server side: {r}");
    let got = r["received"].as_u64().expect("received");
    assert!(
        got > 0 && got <= sent,
        "server received {got} of the {sent} counters the client sent"
    );
}

#[test]
fn failed_restore_of_an_established_connection_removes_the_lock() {
    require_root();
    let DumpedStream {
        root,
        addr,
        client,
        _img,
        images,
        ..
    } = dump_a_stream("tcp-fail");
    let _cleanup = KillOnDrop(vec![root]);
    let table = connection_lock(&images);
    assert!(nft_table_exists(&table));
    // Someone else listens on the server's port now.
    let squatter = TcpListener::bind(addr).expect("take the port");
    let out = run_restore(&images, &images.with_extension("pid"), &[]);
    assert!(
        !out.status.success(),
        "restore should fail:\n{}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("tcp {addr}")),
        "names the address: {err}"
    );
    assert!(
        !nft_table_exists(&table),
        "a failed restore left table {table}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(!alive(root), "a failed restore left pid {root} running");
    drop(squatter);
    client.stop();
}

#[test]
fn dump_without_exit_takes_connections_out_of_repair_mode() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-tcp-live-")
        .tempdir()
        .expect("tempdir");
    let (mut child, addr) = start_tcp_stream(dir.path());
    let root = child.id() as i32;
    let client = StreamClient::connect(addr);
    client.wait_for_more(0, "before the dump");
    let (_img, images) = image_dir("tcp-live");
    let out = cowsnap(&[
        "dump",
        "--tcp-established",
        "--pid",
        &root.to_string(),
        "--images",
        path_str(&images),
    ]);
    assert!(out.status.success(), "dump failed:\n{}", describe(&out));
    let table = connection_lock(&images);
    assert!(
        !nft_table_exists(&table),
        "the tree runs on: no lock may stay"
    );
    // The original goes on streaming both ways.
    client.wait_for_more(client.received(), "after a dump without --exit");
    assert_eq!(client.error(), None);
    client.stop();
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------ Redis

const REDIS: &str = "/usr/bin/redis-server";

/// One RESP command to Redis at `addr`; its reply, raw.
fn redis(addr: SocketAddr, args: &[&str]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to redis {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).expect("send to redis");
    let mut reply = Vec::new();
    let mut buf = [0u8; 65536];
    // Replies used here are one line, or a bulk string that fits one read.
    loop {
        let n = s.read(&mut buf).expect("read from redis");
        reply.extend_from_slice(&buf[..n]);
        if n == 0 || reply.ends_with(b"\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

fn redis_info(addr: SocketAddr, field: &str) -> String {
    let info = redis(addr, &["INFO", "persistence"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Redis with 100k keys, dumped (with --exit) while its background-save
/// child is writing the RDB file: both come back, the keys answer the
/// same, the save finishes and a new save works; PSS within 1%.
#[test]
fn redis_with_a_background_save_in_progress_restored() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-redis-")
        .tempdir()
        .expect("tempdir");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(REDIS)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ])
        .arg(dir.path())
        .args(["--daemonize", "no", "--logfile", "redis.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start redis-server (is the redis-server package installed?)");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "redis did not come up");
        thread::sleep(Duration::from_millis(20));
    }
    let fill = "for i=1,100000 do redis.call('SET','key:'..i,string.rep('v',64)..i) end return redis.call('DBSIZE')";
    assert_eq!(redis(addr, &["EVAL", fill, "0"]), ":100000\r\n");
    let probe = redis(addr, &["GET", "key:4242"]);
    assert!(probe.ends_with("4242\r\n"), "{probe}");
    // A slow background save: 100k keys at 20 us each.
    assert_eq!(
        redis(addr, &["CONFIG", "SET", "rdb-key-save-delay", "20"]),
        "+OK\r\n"
    );
    assert!(redis(addr, &["BGSAVE"]).contains("Background saving started"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while descendants(root).len() < 2 {
        assert!(Instant::now() < deadline, "no background save child");
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(200));
    let pids = descendants(root);
    assert_eq!(pids.len(), 2, "redis and its save child: {pids:?}");
    let pss_before = pss_total(&pids);

    let (_img, images) = image_dir("redis");
    dump_exit(root, &images, &[]);
    wait_gone(&pids, Some(&mut child), "redis after dump --exit");
    restore(&images);
    let _restored = KillOnDrop(pids.clone());
    assert_eq!(descendants(root), pids, "redis and its save child are back");
    assert_pss_close(pss_before, pss_total(&pids), "redis");
    assert_eq!(redis(addr, &["DBSIZE"]), ":100000\r\n");
    assert_eq!(redis(addr, &["GET", "key:4242"]), probe);
    // The restored child finishes its save and the restored parent reaps it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis_info(addr, "rdb_bgsave_in_progress") != "0" {
        assert!(Instant::now() < deadline, "the background save never ended");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(redis_info(addr, "rdb_last_bgsave_status"), "ok");
    assert!(
        dir.path().join("dump.rdb").exists(),
        "the save wrote dump.rdb"
    );
    // And a new one, forked by the restored server.
    assert_eq!(
        redis(addr, &["CONFIG", "SET", "rdb-key-save-delay", "0"]),
        "+OK\r\n"
    );
    assert_eq!(redis(addr, &["SET", "after", "restore"]), "+OK\r\n");
    assert!(redis(addr, &["BGSAVE"]).contains("Background saving started"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis_info(addr, "rdb_bgsave_in_progress") != "0" {
        assert!(Instant::now() < deadline, "the second save never ended");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(redis_info(addr, "rdb_last_bgsave_status"), "ok");
}

// ------------------------------------------------------------ event fds

/// `[time, count]` entries of a workload's log.
fn timeline(v: &serde_json::Value) -> Vec<(f64, u64)> {
    v.as_array()
        .expect("log")
        .iter()
        .filter_map(|e| Some((e[0].as_f64()?, e[1].as_u64()?)))
        .collect()
}

/// Index and length of the longest pause between two entries of a log.
fn longest_pause(log: &[(f64, u64)]) -> (usize, f64) {
    log.windows(2)
        .enumerate()
        .map(|(i, w)| (i, w[1].0 - w[0].0))
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

/// A periodic relative timer's log across the downtime `down`: a pause of
/// at least the downtime, across which the count moved by at most
/// `max_jump` (a tick due, one pending at the dump) plus the periods of the
/// pause beyond the downtime (a loaded machine runs the program late after
/// the release; its overruns count those): the downtime's intervals are
/// not counted. After it, it ticks at its period (none lost or doubled,
/// within a few ticks of a loaded machine's lag).
fn assert_resumes(what: &str, log: &[(f64, u64)], period: f64, down: Duration, max_jump: u64) {
    let (i, gap) = longest_pause(log);
    assert!(
        gap >= down.as_secs_f64(),
        "{what}: the log shows no pause of the downtime: {gap}"
    );
    let jump = log[i + 1].1 - log[i].1;
    let late = ((gap - down.as_secs_f64()) / period).ceil() as u64;
    assert!(
        jump <= max_jump + late,
        "{what} counted {jump} expirations across a {gap:.2} s pause: downtime counted"
    );
    let (t0, n0) = log[i + 1];
    let (t1, n1) = *log.last().expect("entries");
    let expected = (t1 - t0) / period;
    let got = (n1 - n0) as f64;
    assert!(
        expected >= 5.0 && (got - expected).abs() <= 3.0 + expected * 0.1,
        "{what}: {got} expirations in {:.2} s after the restore, {expected:.1} expected",
        t1 - t0
    );
}

/// epoll + eventfd (plain and semaphore) + timerfd (relative periodic,
/// absolute realtime) + signalfd + POSIX timers (SIGEV_SIGNAL, and
/// SIGEV_THREAD_ID to a second thread): the timeline goes on by the rule
/// of README ("File descriptors"): the relative timers do not count the
/// downtime, the absolute one fires at its wall-clock time, counters,
/// masks and timer ids are kept.
#[test]
fn event_fds_keep_their_timeline_across_dump_exit_and_restore() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-events-")
        .tempdir()
        .expect("tempdir");
    let (mut child, line) = start_workload("events.py", &[dir.path().as_os_str()]);
    let start_wall: f64 = line
        .strip_prefix("ready ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("events.py did not start: {line:?}"));
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    thread::sleep(Duration::from_millis(1000));
    let (_img, images) = image_dir("events");
    dump_exit(root, &images, &[]);
    wait_gone(&[root], Some(&mut child), "events.py after dump --exit");
    let down = Duration::from_millis(1500);
    thread::sleep(down);
    restore(&images);
    let _restored = KillOnDrop(vec![root]);
    thread::sleep(Duration::from_millis(300));
    let _ = kill(Pid::from_raw(root), Signal::SIGUSR2);
    std::fs::write(dir.path().join("watched/new-file"), b"x").expect("create in the watched dir");
    // Past the absolute timer's expiry (start + 3 s) by a margin.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    // ... and at least a second of running after the restore (20 ticks).
    let ready_at = (start_wall + 3.8).max(now() + 1.0);
    while now() < ready_at {
        thread::sleep(Duration::from_millis(50));
    }
    // Reports until the signal shows (a loaded machine may take a while to
    // run the program's loop), at most 10 s.
    let report = dir.path().join("report.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    let r: serde_json::Value = loop {
        let _ = std::fs::remove_file(&report);
        let _ = kill(Pid::from_raw(root), Signal::SIGUSR1);
        while !report.exists() {
            assert!(
                Instant::now() < deadline,
                "no report from the restored program"
            );
            thread::sleep(Duration::from_millis(20));
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
        if (r["sigusr2"] == 1 && r["inotify"] == 1) || Instant::now() >= deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(r["eventfd"], 5, "eventfd counter: {r}");
    assert_eq!(r["wd"], 2, "the watch descriptor the program knows");
    assert_eq!(
        (r["inotify"].as_u64(), r["inotify_other"].as_u64()),
        (Some(1), Some(0)),
        "the inotify watch fired once after the restore, under its descriptor: {r}"
    );
    assert_eq!(r["sem_reads"], 3, "semaphore eventfd: {r}");
    assert_eq!(
        r["sigusr2"], 1,
        "signalfd read the signal sent after the restore: {r}"
    );
    let fired = r["abs_fired"].as_f64().expect("the absolute timer fired");
    assert!(
        fired >= start_wall + 3.0 && fired < start_wall + 3.7,
        "absolute timer fired {:.3} s after start, not at 3 s",
        fired - start_wall
    );
    // The periodic timer: across the longest pause in its log (the tree
    // down) the count moved by about what was pending at the dump, not by
    // the downtime's 30 intervals.
    let log = timeline(&r["log"]);
    let (i, gap) = longest_pause(&log);
    assert!(
        gap >= down.as_secs_f64(),
        "the log shows no pause of the downtime: {gap}"
    );
    let jump = log[i + 1].1 - log[i].1;
    assert!(
        jump <= 12,
        "the relative timer counted {jump} expirations across a {gap:.2} s pause: downtime counted"
    );
    let after = log.last().expect("entries").1 - log[i + 1].1;
    assert!(
        after >= 10,
        "the timer goes on after the restore: {after} ticks"
    );

    // POSIX timers: the ids timer_create gave (not the kernel's first, one
    // was deleted), the thread-directed one aimed at the restored thread.
    let ids: Vec<u64> = r["timer_ids"]
        .as_array()
        .expect("timer_ids")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(ids, [1, 2], "timer ids: {r}");
    let proc_timers = r["proc_timers"].as_str().expect("proc_timers");
    for id in &ids {
        assert!(
            proc_timers.contains(&format!("ID: {id}\n")),
            "timer {id} missing after the restore: {proc_timers}"
        );
    }
    let worker = r["worker_tid"].as_u64().expect("worker_tid");
    assert_ne!(worker, root as u64);
    assert!(
        proc_timers.contains(&format!("notify: signal/tid.{worker}\n"))
            && proc_timers.contains("signal: 37/0000000000000052"),
        "the SIGEV_THREAD_ID timer lost its thread or value: {proc_timers}"
    );
    assert_resumes("SIGEV_SIGNAL timer", &timeline(&r["plog"]), 0.040, down, 3);
    assert_resumes(
        "SIGEV_THREAD_ID timer",
        &timeline(&r["tlog"]),
        0.100,
        down,
        3,
    );
}

/// A POSIX timer whose signal was pending (blocked) at the dump: by the
/// rule of README ("File descriptors"), the pending signal comes back once
/// (SI_TIMER), and the timer goes on from the time it had left, at its
/// period: no tick doubled (a second one at once) or lost (a gap).
#[test]
fn a_pending_posix_timer_signal_comes_back_once() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("cowsnap-posix-pending-")
        .tempdir()
        .expect("tempdir");
    let (mut child, line) = start_workload("posix_pending.py", &[dir.path().as_os_str()]);
    assert_eq!(line, "ready");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    // Three expirations: one signal pending, the rest overruns.
    thread::sleep(Duration::from_millis(1000));
    let (_img, images) = image_dir("posix-pending");
    dump_exit(root, &images, &[]);
    wait_gone(
        &[root],
        Some(&mut child),
        "posix_pending.py after dump --exit",
    );
    // The time left at the dump; the restored program starts taking
    // signals right after the release (it finds `go` at once).
    let image: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(images.join(format!("proc-{root}.json"))).expect("proc json"),
    )
    .expect("json");
    let left = &image["posix_timers"][0]["value"];
    let left = left[0].as_f64().expect("sec") + left[1].as_f64().expect("nsec") / 1e9;
    std::fs::write(dir.path().join("go"), b"").expect("go");
    thread::sleep(Duration::from_millis(500));
    restore(&images);
    let _restored = KillOnDrop(vec![root]);
    let out = dir.path().join("out.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.exists() {
        assert!(
            Instant::now() < deadline,
            "no out.json from the restored program"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let got: Vec<(f64, i64, i64)> =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("out.json")).expect("json");
    const SI_TIMER: i64 = -2;
    assert!(
        got.iter().all(|&(_, code, _)| code == SI_TIMER),
        "every signal is the timer's: {got:?}"
    );
    assert!(got[0].0 < 0.1, "the pending signal at once: {got:?}");
    assert!(
        (got[1].0 - left).abs() < 0.15,
        "the next one when the time left ({left:.3} s) ran out: {got:?}"
    );
    if left > 0.2 {
        assert!(got[1].0 > 0.05, "the pending signal doubled: {got:?}");
    }
    for w in got[1..].windows(2) {
        let step = w[1].0 - w[0].0;
        assert!((0.15..0.5).contains(&step), "then every 300 ms: {got:?}");
    }
}

// ------------------------------------------------------------ PostgreSQL

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `psql` kept open on one connection (a client outside the tree): each
/// query is a line in, its unaligned result lines out, then a marker.
struct Psql {
    child: Child,
    out: std::sync::mpsc::Receiver<String>,
}

impl Psql {
    fn connect(port: u16) -> Psql {
        let mut child = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("psql (postgresql-client)");
        let stdout = child.stdout.take().expect("psql stdout");
        let (tx, out) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Psql { child, out }
    }

    /// The result lines of `sql` on this connection.
    fn query(&mut self, sql: &str) -> Result<Vec<String>, String> {
        let stdin = self.child.stdin.as_mut().ok_or("psql has no stdin")?;
        writeln!(stdin, "{sql}\n\\echo ---end---").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        loop {
            match self.out.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l == "---end---" => return Ok(lines),
                Ok(l) => lines.push(l),
                Err(e) => return Err(format!("no answer to {sql:?}: {e} (so far {lines:?})")),
            }
        }
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn as_postgres(args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    assert!(out.status.success(), "{args:?}:\n{}", describe(&out));
    out
}

/// PostgreSQL (Debian's): the postmaster, its background workers and an
/// open client connection (kept across with --tcp-established) are dumped
/// with --exit and restored; the open connection gives the same answer,
/// a new connection works, and writes go on.
#[test]
fn postgresql_with_an_open_client_connection_restored() {
    require_root();
    let dir = tempdir("postgres");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let data = dir.path().join("data");
    let d = path_str(dir.path()).to_string();
    as_postgres(&[
        &format!("{PG_BIN}/initdb"),
        "-D",
        path_str(&data),
        "-A",
        "trust",
        "-U",
        "postgres",
    ]);
    let port = free_port();
    as_postgres(&[
        &format!("{PG_BIN}/pg_ctl"),
        "-D",
        path_str(&data),
        "-l",
        &format!("{d}/log"),
        "-w",
        "-o",
        &format!("-p {port} -k {d} -c listen_addresses=127.0.0.1 -c shared_buffers=64MB"),
        "start",
    ]);
    let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
    let root: i32 = pidfile
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("pid");
    let _cleanup = KillOnDrop(vec![root]);
    let mut client = Psql::connect(port);
    client
        .query("create table t (i int); insert into t select generate_series(1, 100000);")
        .expect("fill");
    let sum = client.query("select sum(i) from t;").expect("sum before");
    assert_eq!(sum, vec!["5000050000"]);
    let pids = descendants(root);
    assert!(pids.len() >= 5, "postmaster and its workers: {pids:?}");
    let pss_before = pss_total(&pids);

    let (_img, images) = image_dir("postgres");
    dump_exit(root, &images, &["--tcp-established"]);
    wait_gone(&pids, None, "postgres after dump --exit");
    restore(&images);
    let _restored = KillOnDrop(pids.clone());
    // Shared buffers that only exited backends had mapped are back in the
    // object but in nobody's page tables, as before.
    assert_pss_close(pss_before, pss_total(&pids), "postgres");
    assert_eq!(
        client
            .query("select sum(i) from t;")
            .expect("the open connection after restore"),
        sum,
        "the same answer on the connection that was open across the dump"
    );
    client
        .query("insert into t values (7);")
        .expect("a write after restore");
    let mut fresh = Psql::connect(port);
    assert_eq!(
        fresh
            .query("select count(*) from t;")
            .expect("a new connection"),
        vec!["100001"]
    );
    drop(fresh);
    drop(client);
    as_postgres(&[
        &format!("{PG_BIN}/pg_ctl"),
        "-D",
        path_str(&data),
        "-m",
        "fast",
        "-w",
        "stop",
    ]);
}

// ------------------------------------------ multiprocessing.Pool, deleted files

/// Every "(deleted)" name the processes' fds and mappings show, sorted.
fn deleted_names(pids: &[i32]) -> Vec<String> {
    let mut out = Vec::new();
    for pid in pids {
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(entry.expect("fd entry").path()) {
                let t = target.to_string_lossy().into_owned();
                if t.ends_with(" (deleted)") {
                    out.push(format!("{pid} fd {t}"));
                }
            }
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        for line in maps.lines().filter(|l| l.ends_with(" (deleted)")) {
            let (range, rest) = line.split_once(' ').unwrap_or_default();
            let path = rest
                .split_whitespace()
                .skip(4)
                .collect::<Vec<_>>()
                .join(" ");
            out.push(format!("{pid} map {range} {path}"));
        }
    }
    out.sort();
    out
}

/// Removes a file at the end of a test.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_pool(dir: &Path) -> (Child, RemoveOnDrop) {
    let (child, line) = start_workload("pool.py", &[dir.as_os_str()]);
    let named = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("pool.py did not start: {line:?}"));
    (child, RemoveOnDrop(PathBuf::from(named)))
}

#[test]
fn multiprocessing_pool_with_deleted_and_tmpfs_files_restored() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let dir = tempdir("pool");
    let (mut child, named) = start_pool(dir.path());
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let report = dir.path().join("report.json");
    let before = ask_report(root, &report);
    assert_eq!(before["bumps"], 50, "{before}");
    let pids = descendants(root);
    assert_eq!(pids.len(), 4, "the parent and 3 workers: {pids:?}");
    let deleted_before = deleted_names(&pids);
    // The semaphores, the counter page, the temporary and the mapped file.
    assert!(
        deleted_before.iter().any(|n| n.contains("/dev/shm/sem."))
            && deleted_before
                .iter()
                .any(|n| n.contains("/dev/shm/cowsnap-pool-"))
            && deleted_before.iter().any(|n| n.contains("private-mapped")),
        "{deleted_before:#?}"
    );
    // Anonymous and shared memory: the pool is small, so the share of the
    // interpreter's file pages, which depends on how many other python3
    // processes run on the machine meanwhile, would swamp a 1% comparison.
    let pss_before = pss_anon_shmem(&pids);
    let (_img, images) = image_dir("pool");
    dump_exit(root, &images, &[]);
    wait_gone(&pids, Some(&mut child), "pool after dump --exit");
    // A tmpfs file dies with its container: gone at restore, the image
    // brings it back with its contents, mode and owner.
    std::fs::remove_file(&named.0).expect("remove the named tmpfs file");
    restore(&images);
    let _restored = KillOnDrop(pids.clone());
    let meta = std::fs::metadata(&named.0).expect("the tmpfs file is back");
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o640, 0));
    assert_pss_close(
        pss_before,
        pss_anon_shmem(&pids),
        "multiprocessing.Pool (Pss_Anon + Pss_Shmem)",
    );
    assert_eq!(
        deleted_names(&pids),
        deleted_before,
        "the same deleted files, under the same names, at the same places"
    );
    let after = ask_report(root, &report);
    assert_eq!(
        (&after["bumps"], &after["named_bumps"]),
        (&serde_json::json!(100), &serde_json::json!(100)),
        "the workers bump the shared counters under the shared lock: {after}"
    );
    for field in ["squares", "workers", "tmp_pos", "tmp_data_ok", "private"] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    assert_eq!(after["private"], "Private-original");
}

#[test]
fn a_deleted_file_over_the_saved_file_limit_is_refused_and_the_tree_keeps_running() {
    require_root();
    let dir = tempdir("pool-limit");
    let (mut child, _named) = start_pool(dir.path());
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    // The temporary file (14000 bytes) is the one over 8 KiB.
    let (fd, path) = std::fs::read_dir(format!("/proc/{root}/fd"))
        .expect("fds")
        .filter_map(|e| {
            let e = e.ok()?;
            let t = std::fs::read_link(e.path())
                .ok()?
                .to_string_lossy()
                .into_owned();
            let path = t.strip_suffix(" (deleted)")?;
            path.starts_with(&dir.path().join("#").to_string_lossy().into_owned())
                .then(|| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        path.to_string(),
                    )
                })
        })
        .next()
        .expect("the temporary file's fd");
    let (_img, images) = image_dir("pool-limit");
    let err = dump_refused(root, &images, &["--saved-file-limit", "8K"]);
    let needle = format!(
        "pid {root} fd {fd} is deleted file {path:?} of 14000 bytes, over the saved-file limit of 8192 bytes (--saved-file-limit)"
    );
    assert!(err.contains(&needle), "message lacks {needle:?}: {err}");
    assert!(
        // The parent's fd and each worker's inherited copy of it.
        err.contains("4 fd(s) or other state cannot be restored"),
        "only that file: {err}"
    );
    assert!(!images.exists(), "no image after a refused dump");
    let r = ask_report(root, &dir.path().join("report.json"));
    assert_eq!(r["bumps"], 50, "the pool still works: {r}");
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------ Node.js

#[test]
fn node_http_server_restored_with_its_timers_and_watch() {
    require_root();
    let dir = tempdir("node");
    let port = free_port();
    let mut child = Command::new("/usr/bin/node")
        .arg(workload("node_server.js"))
        .arg(port.to_string())
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node (is the nodejs package installed?)");
    let root = child.id() as i32;
    let _cleanup = KillOnDrop(vec![root]);
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready", "node did not start");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ask = |context: &str| -> serde_json::Value {
        let body = get(addr, "/").unwrap_or_else(|e| panic!("{context}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{context}: {e}: {body}"))
    };
    let before = ask("before the dump");
    assert_eq!(before["hits"], 1);
    let pids = descendants(root);
    let pss_before = pss_anon_shmem(&pids);
    let (_img, images) = image_dir("node");
    dump_exit(root, &images, &[]);
    wait_gone(&pids, Some(&mut child), "node after dump --exit");
    restore(&images);
    let _restored = KillOnDrop(vec![root]);
    assert_pss_close(
        pss_before,
        pss_anon_shmem(&pids),
        "node (Pss_Anon + Pss_Shmem)",
    );
    let after = ask("after the restore");
    assert_eq!(
        (&after["pid"], &after["hits"], &after["ballast"]),
        (&before["pid"], &serde_json::json!(2), &before["ballast"]),
        "{before} -> {after}"
    );
    // The interval timer runs on: a second more is a few ticks.
    thread::sleep(Duration::from_millis(1000));
    std::fs::write(dir.path().join("new-file"), b"x").expect("touch in the watched dir");
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let r = ask("watching");
        if r["watched"].as_u64().unwrap_or(0) >= 1 || Instant::now() > deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        last["ticks"].as_u64() > after["ticks"].as_u64(),
        "the timer ticks on: {after} -> {last}"
    );
    assert!(
        last["watched"].as_u64().unwrap_or(0) >= 1,
        "the fs.watch (inotify) fires after the restore: {last}"
    );
}
