//! nginx of the reference image (a master and [`IMAGE_NGINX_WORKERS`]
//! workers sharing one listening socket) in a container of a [`Containerd`]
//! harness: starting it, and asking it for pages through the container's
//! own loopback, from a thread that entered the container's network
//! namespace (the test process itself never changes namespace).
//!
//! Shared by the containerd tests (checkpoint and restore) and the daemon
//! tests (migration between nodes); included by each as
//! `#[path = "common/nginx.rs"] mod nginx;` beside `common` and `harness`.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{ns_pid, ppid, task_state, PATIENCE};
use crate::harness::{
    Containerd, TaskInfo, COWSNAP_RUNTIME, IMAGE_NGINX_CONF, IMAGE_NGINX_PAGE, IMAGE_NGINX_PORT,
    IMAGE_NGINX_WORKERS, NGINX_BIN,
};

/// Runs `f` on a thread that entered the network namespace of `pid`
/// (sockets it creates live there: the container's own loopback).
pub fn in_netns_of<T: Send + 'static>(pid: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
            .unwrap_or_else(|e| panic!("open the netns of {pid}: {e}"));
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into the netns of {pid}: {e}"));
        // A fresh container netns has its loopback down.
        let _ = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        f()
    })
    .join()
    .expect("netns thread")
}

/// `GET path` from nginx inside the container of `pid`, through the
/// container's loopback; the body of the answer.
pub fn container_get(pid: i32, path: &'static str) -> Result<String, String> {
    in_netns_of(pid, move || {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], IMAGE_NGINX_PORT));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
            _ => Err(format!("not a 200 answer: {answer:?}")),
        }
    })
}

/// Runs nginx (cowsnap's runtime, its logs and pid file in /tmp of the
/// writable layer) as container `id` of `image`, and waits until its
/// master and every worker are up and the page is served.
pub fn run_nginx(ctrd: &Containerd, image: &str, id: &str) -> TaskInfo {
    let task = ctrd.run(
        COWSNAP_RUNTIME,
        image,
        id,
        &[
            NGINX_BIN,
            "-e",
            "/tmp/nginx-error.log",
            "-c",
            IMAGE_NGINX_CONF,
        ],
    );
    let deadline = Instant::now() + PATIENCE;
    while ctrd.pids_named(id, "nginx").len() < IMAGE_NGINX_WORKERS + 1
        || container_get(task.pid, "/").is_err()
    {
        assert!(
            Instant::now() < deadline,
            "nginx in {id} did not come up: {:?}; error log: {:?}",
            container_get(task.pid, "/"),
            fs::read_to_string(ctrd.host_path(id, "/tmp/nginx-error.log"))
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        container_get(task.pid, "/").as_deref(),
        Ok(IMAGE_NGINX_PAGE),
        "nginx in {id} serves the page"
    );
    task
}

/// The nginx workers (host pids) of container `id`, and every worker's
/// answer to /pid (its pid inside the container) once each answering
/// worker is stopped in turn: only a worker that accepts can answer.
pub fn nginx_workers_answering(ctrd: &Containerd, id: &str, init: i32) -> (Vec<i32>, Vec<i32>) {
    let workers: Vec<i32> = ctrd
        .pids_named(id, "nginx")
        .into_iter()
        .filter(|&p| p != init && ppid(p) == init)
        .collect();
    let mut answered = Vec::new();
    let mut stopped = Vec::new();
    for _ in 0..workers.len() * 3 {
        if answered.len() == workers.len() {
            break;
        }
        let Ok(body) = container_get(init, "/pid") else {
            break;
        };
        let Ok(ns) = body.trim().parse::<i32>() else {
            break;
        };
        if let Some(&host) = workers.iter().find(|&&w| ns_pid(w) == ns) {
            answered.push(ns);
            let _ = kill(Pid::from_raw(host), Signal::SIGSTOP);
            // Until it is stopped it may still take the next connection.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !task_state(host).starts_with('T') && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            stopped.push(host);
        }
    }
    for host in stopped {
        let _ = kill(Pid::from_raw(host), Signal::SIGCONT);
    }
    answered.sort_unstable();
    (workers, answered)
}

/// Asserts that nginx in container `id` (init `init`) has its
/// [`IMAGE_NGINX_WORKERS`] workers and that every one accepts ("`context`"
/// in the failure messages); their pids inside the container, sorted.
pub fn assert_every_worker_accepts(
    ctrd: &Containerd,
    id: &str,
    init: i32,
    context: &str,
) -> Vec<i32> {
    let (workers, answered) = nginx_workers_answering(ctrd, id, init);
    assert_eq!(
        workers.len(),
        IMAGE_NGINX_WORKERS,
        "nginx workers in {id} {context}"
    );
    let mut ns_workers: Vec<i32> = workers.iter().map(|&w| ns_pid(w)).collect();
    ns_workers.sort_unstable();
    assert_eq!(
        answered, ns_workers,
        "every worker of {id} accepts {context}"
    );
    ns_workers
}
