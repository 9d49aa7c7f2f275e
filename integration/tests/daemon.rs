//! End-to-end tests of `cowsnapd` against a private containerd with the
//! cowsnap shim (common/containerd.rs): the gRPC API through generated
//! tonic clients, on the daemon's unix socket.
//!
//! Run one at a time (`--test-threads=1`), like the other containerd tests.

mod common;
#[path = "common/containerd.rs"]
mod harness;
#[path = "common/nginx.rs"]
mod nginx;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use cowsnapd::proto::checkpoint_event::Event as CheckpointEventKind;
use cowsnapd::proto::checkpoint_service_client::CheckpointServiceClient;
use cowsnapd::proto::restore_event::Event as RestoreEventKind;
use cowsnapd::proto::*;
use harness::{Containerd, COUNTER_LOOP, COWSNAP_RUNTIME, IMAGE_NGINX_PAGE, RUNC_RUNTIME};
use nginx::{assert_every_worker_accepts, container_get, run_nginx};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const DAEMON_BIN: &str = "cowsnapd";
const CTL_BIN: &str = "cowsnap-ctl";

/// `cowsnapd` and `cowsnap-ctl` (its directory) built into the test's target directory and profile (cargo
/// builds no other package's binaries for an integration test).
/// `COWSNAPD_BIN_DIR` wins.
fn daemon_bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("COWSNAPD_BIN_DIR") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "cowsnapd", "--bins"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("run cargo build").success(),
            "cargo build -p cowsnapd failed"
        );
        profile_dir
    })
    .clone()
}

/// A running cowsnapd on a socket in the harness's directory, killed
/// when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(ctrd: &Containerd) -> Daemon {
        Daemon::start_with(ctrd, "cowsnapd", &[])
    }

    /// A cowsnapd named `name` (its socket and log in the harness's
    /// directory) with `extra` arguments.
    fn start_with(ctrd: &Containerd, name: &str, extra: &[&std::ffi::OsStr]) -> Daemon {
        Daemon::start_in(ctrd, name, None, extra)
    }

    /// [`Daemon::start_with`] in network namespace `netns` (only that
    /// namespace is entered).
    fn start_in(
        ctrd: &Containerd,
        name: &str,
        netns: Option<&Path>,
        extra: &[&std::ffi::OsStr],
    ) -> Daemon {
        let socket = ctrd.dir().join(format!("{name}/cowsnapd.sock"));
        let log = ctrd.dir().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("cowsnapd log");
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display()))
                    .arg(daemon_bin_dir().join(DAEMON_BIN));
                c
            }
            None => Command::new(daemon_bin_dir().join(DAEMON_BIN)),
        };
        let child = command
            .arg("--socket")
            .arg(&socket)
            .arg("--containerd")
            .arg(&ctrd.address)
            .args(extra)
            .arg("--verbose")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn cowsnapd");
        let mut daemon = Daemon { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("cowsnapd exited with {status}:\n{}", daemon.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "cowsnapd did not listen on {} in 30 s:\n{}",
                daemon.socket.display(),
                daemon.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// `cowsnap-ctl --socket SOCKET -n NAMESPACE ARGS`, which must succeed;
    /// its stdout.
    fn ctl(&self, namespace: &str, args: &[&str]) -> String {
        let output = Command::new(daemon_bin_dir().join(CTL_BIN))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cowsnap-ctl");
        assert!(
            output.status.success(),
            "cowsnap-ctl {args:?} failed:\n{}",
            common::describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        cowsnapd::client::connect(&self.socket)
            .await
            .expect("connect to cowsnapd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- cowsnapd log\n{}", self.log_text());
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Every event of a Checkpoint, or its status.
async fn checkpoint(
    client: &mut CheckpointServiceClient<Channel>,
    namespace: &str,
    id: &str,
    reference: &str,
) -> Result<Vec<CheckpointEventKind>, tonic::Status> {
    let mut stream = client
        .checkpoint(CheckpointRequest {
            namespace: namespace.to_string(),
            container_id: id.to_string(),
            leave_running: true,
            checkpoint_ref: reference.to_string(),
            options: None,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.extend(event?.event);
    }
    Ok(events)
}

async fn restore(
    client: &mut CheckpointServiceClient<Channel>,
    namespace: &str,
    reference: &str,
    id: &str,
) -> Result<Vec<RestoreEventKind>, tonic::Status> {
    let mut stream = client
        .restore(RestoreRequest {
            namespace: namespace.to_string(),
            checkpoint_ref: reference.to_string(),
            new_container_id: id.to_string(),
            options: None,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.extend(event?.event);
    }
    Ok(events)
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, names: &str) {
    let status = result.expect_err("the RPC must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(names),
        "the {code:?} message does not name {names:?}: {}",
        status.message()
    );
}

/// 1. cowsnapd serves on a 0600 unix socket, reports SERVING through the
///    standard health service and lists its services through reflection.
#[test]
fn cowsnapd_health_and_reflection() {
    let ctrd = Containerd::start("daemon-health");
    let daemon = Daemon::start(&ctrd);
    let mode = std::fs::metadata(&daemon.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    runtime().block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let mut health = HealthClient::new(daemon.channel().await);
        for service in [
            "",
            "cowsnap.v1.CheckpointService",
            "cowsnap.v1.MigrationService",
        ] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "health of {service:?}"
            );
        }

        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut reflection = ServerReflectionClient::new(daemon.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let response = responses
            .next()
            .await
            .expect("a reflection answer")
            .expect("reflection answer");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("reflection answered {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for wanted in [
            "cowsnap.v1.CheckpointService",
            "cowsnap.v1.MigrationService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == wanted),
                "reflection lists {names:?}, not {wanted}"
            );
        }
    });
}

/// 2. Through the API: a running counter container is checkpointed (it
///    keeps running), listed and inspected; the container is deleted and
///    restored under a new id, where the counter goes on. Bad requests get
///    precise codes: an unknown container NOT_FOUND, a malformed ref
///    INVALID_ARGUMENT, a container of runc's runtime FAILED_PRECONDITION,
///    a taken ref ALREADY_EXISTS; Migrate without a certificate for mutual
///    TLS INVALID_ARGUMENT, of an unknown container NOT_FOUND, of a runc
///    container FAILED_PRECONDITION, to a target nobody answers at
///    UNAVAILABLE (and the container runs on); a deleted checkpoint is
///    NOT_FOUND.
#[test]
fn cowsnapd_checkpoints_and_restores_a_counter() {
    let ctrd = Containerd::start_cowsnap("daemon");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    let runc_id = ctrd.container_id("runc");
    ctrd.run(RUNC_RUNTIME, image, &runc_id, &["sh", "-c", COUNTER_LOOP]);
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let reference = "cowsnap.test/daemon-counter:1";
    let restored = ctrd.container_id("restored");
    let rt = runtime();
    let mut client = rt.block_on(async { CheckpointServiceClient::new(daemon.channel().await) });

    rt.block_on(async {
        assert_status(
            checkpoint(&mut client, &ns, "no-such-container", reference).await,
            Code::NotFound,
            "no-such-container",
        );
        assert_status(
            checkpoint(&mut client, &ns, &id, "Not A/Ref:").await,
            Code::InvalidArgument,
            "Not A/Ref:",
        );
        assert_status(
            checkpoint(&mut client, &ns, &runc_id, reference).await,
            Code::FailedPrecondition,
            &runc_id,
        );
        assert_status(
            restore(&mut client, &ns, "cowsnap.test/none:1", &restored).await,
            Code::NotFound,
            "cowsnap.test/none:1",
        );
        let mut migration =
            migration_service_client::MigrationServiceClient::new(daemon.channel().await);
        let request = |id: &str, target: &str| MigrateRequest {
            namespace: ns.clone(),
            container_id: id.to_string(),
            target: target.to_string(),
            options: None,
        };
        // No certificate to reach another agent with (no --tls-*).
        assert_status(
            migrate(&mut migration, request(&id, "https://127.0.0.1:1"), |_| {}).await,
            Code::InvalidArgument,
            "mutual TLS",
        );
        assert_status(
            migrate(
                &mut migration,
                request("no-such-container", "http://127.0.0.1:1"),
                |_| {},
            )
            .await,
            Code::NotFound,
            "no-such-container",
        );
        assert_status(
            migrate(
                &mut migration,
                request(&runc_id, "http://127.0.0.1:1"),
                |_| {},
            )
            .await,
            Code::FailedPrecondition,
            &runc_id,
        );
        // A target nobody answers at: refused before the container stops.
        assert_status(
            migrate(&mut migration, request(&id, "http://127.0.0.1:1"), |_| {}).await,
            Code::Unavailable,
            "127.0.0.1:1",
        );
    });

    assert_eq!(ctrd.task(&id).map(|t| t.status).as_deref(), Some("RUNNING"));
    let before = ctrd.wait_counter_above(&id, 10);
    let events = rt
        .block_on(checkpoint(&mut client, &ns, &id, reference))
        .unwrap_or_else(|e| panic!("checkpoint: {e:?}\n--- containerd\n{}", ctrd.log_tail(40)));
    let stages: Vec<i32> = events
        .iter()
        .filter_map(|e| match e {
            CheckpointEventKind::Stage(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(
        stages,
        [
            CheckpointStage::Dumping as i32,
            CheckpointStage::Dumped as i32
        ],
        "stages of {events:?}"
    );
    let Some(CheckpointEventKind::Done(info)) = events.last() else {
        panic!("the checkpoint did not end with done: {events:?}");
    };
    assert_eq!(info.checkpoint_ref, reference);
    assert_eq!(info.runtime, COWSNAP_RUNTIME);
    assert_eq!(info.container_id, id);
    assert!(
        info.blobs
            .iter()
            .any(|b| b.media_type == cowsnapd::layout::MEDIA_TYPE_CHECKPOINT && b.size > 0),
        "no task checkpoint in {info:?}"
    );
    // leave_running: the counter goes on.
    ctrd.wait_counter_above(&id, before);
    assert_eq!(ctrd.task(&id).map(|t| t.status).as_deref(), Some("RUNNING"));
    // ctr sees the checkpoint as an image.
    let images = ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        images.lines().any(|l| l == reference),
        "ctr images ls: {images}"
    );

    rt.block_on(async {
        assert_status(
            checkpoint(&mut client, &ns, &id, reference).await,
            Code::AlreadyExists,
            reference,
        );
        let listed = client
            .list_checkpoints(ListCheckpointsRequest {
                namespace: ns.clone(),
            })
            .await
            .expect("list")
            .into_inner()
            .checkpoints;
        assert!(
            listed.iter().any(|c| c.checkpoint_ref == reference),
            "ListCheckpoints: {listed:?}"
        );
        assert!(
            listed
                .iter()
                .all(|c| c.checkpoint_ref != harness::IMAGE_REF),
            "ListCheckpoints lists the plain image: {listed:?}"
        );
        let inspected = client
            .inspect_checkpoint(InspectCheckpointRequest {
                namespace: ns.clone(),
                checkpoint_ref: reference.to_string(),
            })
            .await
            .expect("inspect")
            .into_inner();
        let report: serde_json::Value =
            serde_json::from_str(&inspected.image_report_json).expect("inspect report json");
        assert!(
            report.to_string().contains("sh"),
            "the report does not show the shell: {report}"
        );
    });

    ctrd.kill_and_delete(&id);
    ctrd.track(&restored);
    let events = rt
        .block_on(restore(&mut client, &ns, reference, &restored))
        .unwrap_or_else(|e| panic!("restore: {e:?}\n--- containerd\n{}", ctrd.log_tail(40)));
    let Some(RestoreEventKind::Done(task)) = events.last() else {
        panic!("the restore did not end with done: {events:?}");
    };
    assert!(task.pid > 0, "{task:?}");
    let running = ctrd.wait_status(&restored, "RUNNING");
    assert_eq!(running.pid as u32, task.pid);
    // The restored loop goes on from its value at the checkpoint.
    ctrd.wait_counter_above(&restored, before);

    // The CLI lists and inspects it; ctr restores what cowsnapd stored.
    let listed = daemon.ctl(&ns, &["ls"]);
    assert!(
        listed.lines().any(|l| l.starts_with(reference)),
        "cowsnap ctl ls:\n{listed}"
    );
    let inspected = daemon.ctl(&ns, &["inspect", "--json", reference]);
    let inspected: serde_json::Value = serde_json::from_str(&inspected).expect("inspect --json");
    assert_eq!(inspected["checkpoint_ref"], reference, "{inspected}");
    let by_ctr = ctrd.container_id("by-ctr");
    let output = ctrd.restore_container(&by_ctr, reference, false);
    assert!(
        output.status.success(),
        "ctr containers restore of cowsnapd's checkpoint failed:\n{}\n--- containerd log (tail)\n{}",
        common::describe(&output),
        ctrd.log_tail(40)
    );
    ctrd.wait_status(&by_ctr, "RUNNING");
    ctrd.wait_counter_above(&by_ctr, before);
    ctrd.kill_and_delete(&by_ctr);

    rt.block_on(async {
        assert_status(
            restore(&mut client, &ns, reference, &restored).await,
            Code::AlreadyExists,
            &restored,
        );
        client
            .delete_checkpoint(DeleteCheckpointRequest {
                namespace: ns.clone(),
                checkpoint_ref: reference.to_string(),
            })
            .await
            .expect("delete");
        let gone = client
            .inspect_checkpoint(InspectCheckpointRequest {
                namespace: ns.clone(),
                checkpoint_ref: reference.to_string(),
            })
            .await;
        assert_status(gone, Code::NotFound, reference);
    });
    ctrd.kill_and_delete(&restored);
    ctrd.kill_and_delete(&runc_id);
}

/// 3. A checkpoint the engine refuses (busybox uevent's netlink socket, an
///    fd restore cannot reopen) is UNIMPLEMENTED, with the engine's message
///    naming the pid, fd and socket: the engine's typed error crosses the
///    shim and containerd with its kind. The container keeps counting and
///    nothing is stored.
#[test]
fn cowsnapd_refused_checkpoint_is_unimplemented() {
    let ctrd = Containerd::start_cowsnap("daemon-refused");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("watcher");
    let script = format!("uevent true & {COUNTER_LOOP}");
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", &script]);
    let before = ctrd.wait_counter_above(&id, 0);
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let reference = "cowsnap.test/refused:1";
    let rt = runtime();
    rt.block_on(async {
        let mut client = CheckpointServiceClient::new(daemon.channel().await);
        let status = checkpoint(&mut client, &ns, &id, reference)
            .await
            .expect_err("the checkpoint must be refused");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        for names in ["netlink", "pid ", " fd "] {
            assert!(
                status.message().contains(names),
                "the message does not name {names:?}: {}",
                status.message()
            );
        }
        let listed = client
            .list_checkpoints(ListCheckpointsRequest {
                namespace: ns.clone(),
            })
            .await
            .expect("list")
            .into_inner()
            .checkpoints;
        assert!(
            listed.is_empty(),
            "a refused checkpoint was stored: {listed:?}"
        );
    });
    ctrd.wait_counter_above(&id, before);
    assert_eq!(ctrd.task(&id).map(|t| t.status).as_deref(), Some("RUNNING"));
    ctrd.kill_and_delete(&id);
}

/// When a Checkpoint's DUMPING stage came and when its stream ended.
async fn checkpoint_span(
    channel: Channel,
    namespace: &str,
    id: &str,
    reference: &str,
) -> (
    Instant,
    Instant,
    Result<Vec<CheckpointEventKind>, tonic::Status>,
) {
    let mut client = CheckpointServiceClient::new(channel);
    let mut stream = match client
        .checkpoint(CheckpointRequest {
            namespace: namespace.to_string(),
            container_id: id.to_string(),
            leave_running: true,
            checkpoint_ref: reference.to_string(),
            options: None,
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return (Instant::now(), Instant::now(), Err(status)),
    };
    let mut dumping = None;
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if event.event == Some(CheckpointEventKind::Stage(CheckpointStage::Dumping as i32))
                {
                    dumping = Some(Instant::now());
                }
                events.extend(event.event);
            }
            Err(status) => return (Instant::now(), Instant::now(), Err(status)),
        }
    }
    let end = Instant::now();
    (dumping.unwrap_or(end), end, Ok(events))
}

/// 3b. Checkpoints of two containers run at once: both dumps are under way
///     together (each one's DUMPING comes before the other's end), both
///     succeed, and a task being checkpointed answers State meanwhile.
#[test]
fn cowsnapd_checkpoints_two_containers_at_once() {
    let ctrd = Containerd::start_cowsnap("daemon-at-once");
    let image = ctrd.import_reference_image();
    let script = format!(
        "{} --mode plain --mib 128 --children 1 --dirty-pct 10 --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD
    );
    let ids = [ctrd.container_id("one"), ctrd.container_id("two")];
    for id in &ids {
        ctrd.run(COWSNAP_RUNTIME, image, id, &["sh", "-c", &script]);
    }
    for id in &ids {
        let deadline = Instant::now() + common::PATIENCE;
        while !ctrd.host_path(id, "/tmp/ready").exists() {
            assert!(Instant::now() < deadline, "the tree in {id} is not ready");
            thread::sleep(Duration::from_millis(50));
        }
    }
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (spans, answered) = thread::scope(|s| {
        let checkpoints = s.spawn(|| {
            let rt = runtime();
            let spans = rt.block_on(async {
                let (a, b) = (daemon.channel().await, daemon.channel().await);
                tokio::join!(
                    checkpoint_span(a, &ns, &ids[0], "cowsnap.test/at-once-one:1"),
                    checkpoint_span(b, &ns, &ids[1], "cowsnap.test/at-once-two:1"),
                )
            });
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            spans
        });
        // State of a task while it is being checkpointed (ctr task ls).
        let log = cowsnap::dump::progress::container_log_path(
            Path::new(cowsnap::dump::progress::CONTAINER_LOG_DIR),
            &ns,
            &ids[0],
        )
        .expect("progress log path");
        let mut answered = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            // The log exists from just before containerd is asked until the dump ends.
            let checkpointing = log.exists();
            if let Some(task) = ctrd.task(&ids[0]) {
                if checkpointing {
                    answered.push(task.status);
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        (checkpoints.join().expect("checkpoints"), answered)
    });
    let ((start_a, end_a, a), (start_b, end_b, b)) = spans;
    let a = a.unwrap_or_else(|e| panic!("checkpoint of {}: {e:?}", ids[0]));
    let b = b.unwrap_or_else(|e| panic!("checkpoint of {}: {e:?}", ids[1]));
    for (id, events) in [(&ids[0], &a), (&ids[1], &b)] {
        assert!(
            matches!(events.last(), Some(CheckpointEventKind::Done(_))),
            "{id}: the checkpoint did not end with done: {events:?}"
        );
    }
    let t0 = start_a.min(start_b);
    eprintln!(
        "checkpoint one {:?}..{:?}, two {:?}..{:?}; State answered {} times meanwhile",
        start_a - t0,
        end_a - t0,
        start_b - t0,
        end_b - t0,
        answered.len()
    );
    assert!(
        start_a < end_b && start_b < end_a,
        "the two checkpoints ran one after the other: one dumped {:?}..{:?}, two {:?}..{:?} (from the first start)",
        start_a.saturating_duration_since(start_a.min(start_b)),
        end_a.saturating_duration_since(start_a.min(start_b)),
        start_b.saturating_duration_since(start_a.min(start_b)),
        end_b.saturating_duration_since(start_a.min(start_b)),
    );
    assert!(
        !answered.is_empty(),
        "State (ctr task ls) never answered while a checkpoint ran"
    );
    for id in &ids {
        ctrd.wait_counter_above(id, ctrd.counter(id).unwrap_or(0));
        assert_eq!(ctrd.task(id).map(|t| t.status).as_deref(), Some("RUNNING"));
    }
}

/// `GET /metrics` of the cowsnapd metrics endpoint at `addr`: the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("send the scrape");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the scrape");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    body.to_string()
}

/// The value of sample `name` (with its labels, as exposed) in `text`;
/// None when it is not exposed.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a sample value"))
        .next()
}

/// The figures of every plain progress line `pages scanned N stored M, B
/// bytes written, frozen F ms` of `cowsnap ctl`'s stderr.
fn dump_lines(stderr: &str) -> Vec<DumpProgress> {
    stderr
        .lines()
        .filter(|l| l.starts_with("pages scanned "))
        .map(|l| {
            let n: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(n.len(), 4, "{l}");
            DumpProgress {
                pages_scanned: n[0],
                pages_stored: n[1],
                bytes_written: n[2],
                frozen_ms: n[3],
            }
        })
        .collect()
}

/// `cowsnap-ctl` against `daemon`, which must succeed; stdout and stderr.
fn ctl_output(daemon: &Daemon, namespace: &str, args: &[&str]) -> (String, String) {
    let output = Command::new(daemon_bin_dir().join(CTL_BIN))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--namespace", namespace])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cowsnap-ctl");
    assert!(
        output.status.success(),
        "cowsnap-ctl {args:?} failed:\n{}",
        common::describe(&output)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// 3b. The engine's progress reaches the Checkpoint stream as typed
///     `DumpProgress` events, between DUMPING and DUMPED, the last with
///     the dump's final figures; the progress log the shim and cowsnapd
///     share is gone afterwards, its directory root-only. `ctl checkpoint`
///     and `ctl restore` off a terminal print plain lines (stages, and the
///     figures), on a terminal a bar instead. The metrics endpoint counts exactly what happened: two
///     checkpoints (their duration, frozen time and image bytes), one
///     restore, and the refusals by gRPC code (an unknown container
///     NOT_FOUND, a malformed ref INVALID_ARGUMENT).
#[test]
fn cowsnapd_streams_dump_progress_and_counts_metrics() {
    let ctrd = Containerd::start_cowsnap("daemon-progress");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with(
        &ctrd,
        "cowsnapd-metrics",
        &["--metrics-addr".as_ref(), metrics_addr.as_ref()],
    );
    let ns = ctrd.namespace.clone();
    let rt = runtime();
    let mut client = rt.block_on(async { CheckpointServiceClient::new(daemon.channel().await) });

    let before = scrape(&metrics_addr);
    assert_eq!(
        sample(&before, "cowsnapd_checkpoints_total"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "cowsnapd_restores_total"),
        Some(0.0),
        "{before}"
    );
    assert!(!before.contains("cowsnapd_failures_total{"), "{before}");

    rt.block_on(async {
        assert_status(
            checkpoint(&mut client, &ns, "no-such-container", "cowsnap.test/p:0").await,
            Code::NotFound,
            "no-such-container",
        );
        assert_status(
            checkpoint(&mut client, &ns, &id, "Not A/Ref:").await,
            Code::InvalidArgument,
            "Not A/Ref:",
        );
    });
    ctrd.wait_counter_above(&id, 5);
    let first = "cowsnap.test/progress:1";
    let events = rt
        .block_on(checkpoint(&mut client, &ns, &id, first))
        .unwrap_or_else(|e| panic!("checkpoint: {e:?}\n--- containerd\n{}", ctrd.log_tail(40)));
    let position = |wanted: CheckpointStage| {
        events
            .iter()
            .position(|e| matches!(e, CheckpointEventKind::Stage(s) if *s == wanted as i32))
            .unwrap_or_else(|| panic!("no {wanted:?} in {events:?}"))
    };
    let (dumping, dumped) = (
        position(CheckpointStage::Dumping),
        position(CheckpointStage::Dumped),
    );
    let progress: Vec<(usize, DumpProgress)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            CheckpointEventKind::Progress(p) => Some((i, *p)),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty(), "no progress in {events:?}");
    assert!(
        progress.iter().all(|(i, _)| (dumping..dumped).contains(i)),
        "progress outside the dump: {events:?}"
    );
    let last = progress.last().expect("one").1;
    assert!(
        last.pages_scanned > 0 && last.pages_stored > 0 && last.bytes_written > 0,
        "{last:?}"
    );
    for pair in progress.windows(2) {
        assert!(
            pair[0].1.pages_scanned <= pair[1].1.pages_scanned
                && pair[0].1.frozen_ms <= pair[1].1.frozen_ms,
            "progress goes back: {progress:?}"
        );
    }
    let Some(CheckpointEventKind::Done(info)) = events.last() else {
        panic!("no done: {events:?}");
    };
    let first_size = info.size;
    let log_dir = Path::new(cowsnap::dump::progress::CONTAINER_LOG_DIR).join(&ns);
    assert!(
        !log_dir.join(format!("{id}.jsonl")).exists(),
        "the progress log is left"
    );
    let mode = std::fs::metadata(&log_dir)
        .expect("the progress log directory")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{}", log_dir.display());

    // The CLI off a terminal: plain lines on stderr, the result on stdout.
    // (The first checkpoint goes first: containerd 1.6 refuses to store
    // the container's spec blob again while it is in the content store.)
    daemon.ctl(&ns, &["rm", first]);
    let second = "cowsnap.test/progress:2";
    let (stdout, stderr) = ctl_output(&daemon, &ns, &["checkpoint", &id, second]);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.first(), Some(&"dumping"), "{stderr}");
    assert_eq!(lines.last(), Some(&"dumped"), "{stderr}");
    let figures = dump_lines(&stderr);
    let final_figures = figures
        .last()
        .unwrap_or_else(|| panic!("no progress line:\n{stderr}"));
    assert!(
        final_figures.pages_scanned > 0 && final_figures.bytes_written > 0,
        "{stderr}"
    );
    assert!(stdout.starts_with(second), "{stdout}");
    let second_size: u64 = stdout
        .split_once(" (")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no size in {stdout}"));
    assert!(
        !stderr.contains('\x1b'),
        "terminal codes off a terminal: {stderr:?}"
    );

    ctrd.kill_and_delete(&id);
    let restored = ctrd.container_id("restored");
    ctrd.track(&restored);
    let (stdout, stderr) = ctl_output(&daemon, &ns, &["restore", second, &restored]);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["restoring", "container created", "task created"],
        "{stderr}"
    );
    assert!(
        stdout.starts_with(&format!("{restored} running, pid ")),
        "{stdout}"
    );
    ctrd.wait_status(&restored, "RUNNING");

    let after = scrape(&metrics_addr);
    let value =
        |name: &str| sample(&after, name).unwrap_or_else(|| panic!("no {name} in\n{after}"));
    assert_eq!(value("cowsnapd_checkpoints_total"), 2.0);
    assert_eq!(value("cowsnapd_checkpoint_duration_seconds_count"), 2.0);
    assert!(value("cowsnapd_checkpoint_duration_seconds_sum") > 0.0);
    assert_eq!(value("cowsnapd_checkpoint_image_bytes_count"), 2.0);
    assert_eq!(
        value("cowsnapd_checkpoint_image_bytes_sum"),
        (first_size + second_size) as f64
    );
    assert_eq!(value("cowsnapd_dump_frozen_seconds_count"), 2.0);
    let frozen = (last.frozen_ms + final_figures.frozen_ms) as f64 / 1000.0;
    assert!(
        (value("cowsnapd_dump_frozen_seconds_sum") - frozen).abs() < 1e-6,
        "frozen {frozen} s:\n{after}"
    );
    assert_eq!(value("cowsnapd_restores_total"), 1.0);
    assert_eq!(value("cowsnapd_restore_duration_seconds_count"), 1.0);
    assert_eq!(
        value(r#"cowsnapd_failures_total{operation="checkpoint",code="NOT_FOUND"}"#),
        1.0
    );
    assert_eq!(
        value(r#"cowsnapd_failures_total{operation="checkpoint",code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert_eq!(
        after.matches("cowsnapd_failures_total{").count(),
        2,
        "other failures counted:\n{after}"
    );
    assert_eq!(value("cowsnapd_migrations_total"), 0.0);

    // On a terminal (a pty of `script`'s): the bar, drawn with terminal
    // codes and cleared, instead of the plain figure lines.
    daemon.ctl(&ns, &["rm", second]);
    let third = "cowsnap.test/progress:3";
    let line: Vec<String> = [
        daemon_bin_dir()
            .join(CTL_BIN)
            .to_string_lossy()
            .into_owned(),
        "--socket".into(),
        daemon.socket.to_string_lossy().into_owned(),
        "--namespace".into(),
        ns.clone(),
        "checkpoint".into(),
        restored.clone(),
        third.into(),
    ]
    .iter()
    .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
    .collect();
    let output = Command::new("script")
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let tty = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", common::describe(&output));
    assert!(tty.contains(third) && tty.contains("dumping"), "{tty:?}");
    assert!(
        tty.contains('\x1b'),
        "no terminal codes on a terminal: {tty:?}"
    );
    assert!(
        !tty.split(['\r', '\n'])
            .any(|l| l.starts_with("pages scanned ")),
        "plain lines on a terminal: {tty:?}"
    );
    ctrd.kill_and_delete(&restored);
}

/// 3c. A failure inside the container restore helper (the engine as the
///     new container's pid 1) keeps its kind on its way through the
///     restore's control region, the controller's `--error-json`, the
///     shim and containerd: a process that held a file of the writable
///     layer open, restored without that layer, is FAILED_PRECONDITION
///     naming the file (it was INTERNAL), and the failed restore leaves no
///     container.
#[test]
fn cowsnapd_restore_helper_failure_keeps_its_code() {
    let ctrd = Containerd::start_cowsnap("daemon-helper-error");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("holder");
    let script = format!("echo held > /held-file; exec 3</held-file; {COUNTER_LOOP}");
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", &script]);
    ctrd.wait_counter_above(&id, 2);
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let reference = "cowsnap.test/helper-error:1";
    let restored = ctrd.container_id("restored");
    ctrd.track(&restored);
    let rt = runtime();
    rt.block_on(async {
        let mut client = CheckpointServiceClient::new(daemon.channel().await);
        checkpoint(&mut client, &ns, &id, reference)
            .await
            .unwrap_or_else(|e| panic!("checkpoint: {e:?}\n{}", ctrd.log_tail(40)));
        let status = restore(&mut client, &ns, reference, &restored)
            .await
            .expect_err("the rootfs has no /held-file");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{status:?}\n--- containerd\n{}",
            ctrd.log_tail(40)
        );
        assert!(status.message().contains("/held-file"), "{status:?}");
    });
    assert!(
        !ctrd.containers().iter().any(|c| c == &restored),
        "the failed restore left {restored}: {:?}",
        ctrd.containers()
    );
    ctrd.kill_and_delete(&id);
}

/// Every message of an ExportCheckpoint.
async fn export(
    client: &mut CheckpointServiceClient<Channel>,
    namespace: &str,
    reference: &str,
) -> Vec<ExportCheckpointResponse> {
    let mut stream = client
        .export_checkpoint(ExportCheckpointRequest {
            namespace: namespace.to_string(),
            checkpoint_ref: reference.to_string(),
            resume_from: 0,
        })
        .await
        .expect("export")
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.next().await {
        messages.push(m.expect("export message"));
    }
    messages
}

/// An ImportCheckpoint of `messages` (an export's) as `reference`.
async fn import(
    client: &mut CheckpointServiceClient<Channel>,
    namespace: &str,
    reference: &str,
    messages: Vec<ExportCheckpointResponse>,
) -> Result<ImportCheckpointResponse, tonic::Status> {
    let target = ImportCheckpointRequest {
        item: Some(import_checkpoint_request::Item::Target(ImportTarget {
            namespace: namespace.to_string(),
            checkpoint_ref: reference.to_string(),
        })),
    };
    let requests: Vec<ImportCheckpointRequest> = std::iter::once(target)
        .chain(
            messages
                .into_iter()
                .filter_map(cowsnapd::transfer::to_import),
        )
        .collect();
    client
        .import_checkpoint(tokio_stream::iter(requests))
        .await
        .map(|r| r.into_inner())
}

fn chunks_mut(
    messages: &mut [ExportCheckpointResponse],
) -> impl Iterator<Item = &mut CheckpointChunk> {
    messages.iter_mut().filter_map(|m| match &mut m.item {
        Some(export_checkpoint_response::Item::Chunk(c)) => Some(c),
        _ => None,
    })
}

/// 4. A checkpoint exported as checksummed chunks (every chunk's xxh3
///    holds, the manifest lists the blobs, the index last), deleted (its
///    blobs leave the content store), imported back (from a `ctl export`
///    file, with `ctl import`) and restored: the counter goes on. An
///    import with a chunk altered in transit is DATA_LOSS naming its stream
///    offset; one whose chunk and checksum were both altered is DATA_LOSS
///    naming the blob's digest; a stream without its manifest is
///    INVALID_ARGUMENT; none leaves an image, a blob or an ingest behind.
#[test]
fn cowsnapd_exports_and_imports_a_checkpoint() {
    let ctrd = Containerd::start_cowsnap("daemon-transfer");
    let image = ctrd.import_reference_image();
    let id = ctrd.container_id("counter");
    ctrd.run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", COUNTER_LOOP]);
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let reference = "cowsnap.test/transfer:1";
    let rt = runtime();
    let mut client = rt.block_on(async { CheckpointServiceClient::new(daemon.channel().await) });
    let before = ctrd.wait_counter_above(&id, 5);
    let content_before = ctrd.content_digests();
    rt.block_on(checkpoint(&mut client, &ns, &id, reference))
        .unwrap_or_else(|e| panic!("checkpoint: {e:?}\n--- containerd\n{}", ctrd.log_tail(40)));
    ctrd.kill_and_delete(&id);

    let messages = rt.block_on(export(&mut client, &ns, reference));
    let Some(export_checkpoint_response::Item::Manifest(manifest)) =
        messages.last().and_then(|m| m.item.clone())
    else {
        panic!("the export does not end with its manifest");
    };
    let mut sent = 0u64;
    for m in &messages[..messages.len() - 1] {
        let Some(export_checkpoint_response::Item::Chunk(c)) = &m.item else {
            panic!("a manifest before the end of the export");
        };
        assert_eq!(c.stream_offset, sent, "chunks out of order");
        assert_eq!(
            c.xxh3,
            xxhash_rust::xxh3::xxh3_64(&c.data),
            "chunk at {sent}"
        );
        assert!(c.data.len() <= cowsnapd::transfer::CHUNK_SIZE);
        sent += c.data.len() as u64;
    }
    assert_eq!(sent, manifest.total_size);
    let tar = manifest
        .blobs
        .iter()
        .find(|b| b.media_type == cowsnapd::layout::MEDIA_TYPE_CHECKPOINT)
        .expect("the task's checkpoint is exported")
        .clone();
    assert_eq!(manifest.blobs.last(), manifest.index.as_ref(), "index last");
    eprintln!(
        "exported {reference}: {} blobs, {} bytes in {} chunks",
        manifest.blobs.len(),
        manifest.total_size,
        messages.len() - 1
    );
    let file = ctrd.dir().join("transfer.export");
    daemon.ctl(
        &ns,
        &["export", reference, file.to_str().expect("utf-8 path")],
    );
    assert!(std::fs::metadata(&file).expect("export file").len() > manifest.total_size);

    daemon.ctl(&ns, &["rm", reference]);
    assert!(
        !ctrd.content_digests().contains(&tar.digest),
        "the deleted checkpoint's tar is still in the content store"
    );
    let assert_nothing_left = |what: &str| {
        let content = ctrd.content_digests();
        assert_eq!(
            content, content_before,
            "{what}: the content store holds other blobs than before the checkpoint"
        );
        let active = ctrd.ctr_ok(&["content", "active"]);
        assert!(
            active.lines().skip(1).all(|l| l.trim().is_empty()),
            "{what}: ingests left: {active}"
        );
        let images = ctrd.ctr_ok(&["images", "ls", "-q"]);
        assert!(!images.lines().any(|l| l == reference), "{what}: {images}");
    };

    rt.block_on(async {
        // A byte of the tar's first chunk altered in transit.
        let mut altered = messages.clone();
        let chunk = chunks_mut(&mut altered)
            .find(|c| c.digest == tar.digest)
            .expect("a chunk of the tar");
        let at = chunk.stream_offset;
        chunk.data[100] ^= 0x40;
        let status = import(&mut client, &ns, reference, altered)
            .await
            .expect_err("a corrupted chunk must be refused");
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        let names = format!("stream offset {at}");
        assert!(
            status.message().contains(&names),
            "{status:?} does not name {names}"
        );
        assert_nothing_left("after a corrupted chunk");

        // The tar's last chunk and its checksum altered: the blob's digest
        // is what catches it.
        let mut altered = messages.clone();
        let chunk = chunks_mut(&mut altered)
            .filter(|c| c.digest == tar.digest)
            .last()
            .expect("a chunk of the tar");
        let last = chunk.data.len() - 1;
        chunk.data[last] ^= 0x01;
        chunk.xxh3 = xxhash_rust::xxh3::xxh3_64(&chunk.data);
        let status = import(&mut client, &ns, reference, altered)
            .await
            .expect_err("an altered blob must be refused");
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        assert!(status.message().contains(&tar.digest), "{status:?}");
        assert_nothing_left("after an altered blob");

        // The stream cut before its manifest.
        let mut cut = messages.clone();
        cut.pop();
        let status = import(&mut client, &ns, reference, cut)
            .await
            .expect_err("a stream without its manifest must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("manifest"), "{status:?}");
        assert_nothing_left("after a stream without its manifest");
    });

    let imported = daemon.ctl(&ns, &["import", file.to_str().expect("utf-8 path")]);
    assert!(imported.starts_with(reference), "ctl import: {imported}");
    assert!(ctrd.content_digests().contains(&tar.digest));
    let restored = ctrd.container_id("imported");
    ctrd.track(&restored);
    rt.block_on(restore(&mut client, &ns, reference, &restored))
        .unwrap_or_else(|e| panic!("restore: {e:?}\n--- containerd\n{}", ctrd.log_tail(40)));
    ctrd.wait_status(&restored, "RUNNING");
    ctrd.wait_counter_above(&restored, before);
    rt.block_on(async {
        assert_status(
            import(&mut client, &ns, reference, messages).await,
            Code::AlreadyExists,
            reference,
        );
    });
    ctrd.kill_and_delete(&restored);
}

/// Certificates made with the `openssl` CLI for the mTLS tests: a CA with
/// a server certificate (for 127.0.0.1 and localhost) and a client
/// certificate, and another CA with a client certificate of its own.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client: cowsnapd::client::ClientTlsFiles,
    stranger: cowsnapd::client::ClientTlsFiles,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}:\n{}",
        common::describe(&output)
    );
}

/// A certificate `name.pem` (key `name.key`) signed by CA `ca` in `dir`,
/// with the extensions `ext` (an openssl extfile's text).
fn openssl_leaf(dir: &Path, name: &str, ca: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The certificate of a node's cowsnapd at `ip` (and 127.0.0.1, for a
/// proxy in front of it): a server certificate for that address that is
/// also the agent's client certificate.
fn node_cert(dir: &Path, name: &str, ip: &str) -> (PathBuf, PathBuf) {
    openssl_leaf(
        dir,
        name,
        "ca",
        &format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:{ip},IP:127.0.0.1\n"
        ),
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).expect("certs dir");
        let ca = |name: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            )
        };
        let leaf = |name: &str, ca: &str, ext: &str| openssl_leaf(dir, name, ca, ext);
        ca("ca");
        ca("other-ca");
        leaf(
            "server",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        let client_ext =
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n";
        leaf("client", "ca", client_ext);
        leaf("stranger", "other-ca", client_ext);
        let files = |name: &str| cowsnapd::client::ClientTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client: files("client"),
            stranger: files("stranger"),
        }
    }

    /// cowsnapd's arguments for mutual TLS on `addr`.
    fn server_args(&self, addr: &str) -> Vec<std::ffi::OsString> {
        vec![
            "--tcp".into(),
            addr.into(),
            "--tls-cert".into(),
            self.server_cert.clone().into(),
            "--tls-key".into(),
            self.server_key.clone().into(),
            "--tls-client-ca".into(),
            self.ca.clone().into(),
        ]
    }
}

/// Whether a failed call was refused by the TLS handshake: the server's
/// `alert`, or (when the client got to send its request before the alert
/// reached it: TLS 1.3 checks the client's certificate after the client
/// finished its handshake) the connection the server closed.
fn refused_in_handshake(error: &str, alert: &str) -> bool {
    error.contains(alert)
        || error.contains("connection closed")
        || error.contains("broken pipe")
        || error.contains("reset by peer")
}

/// A TCP port of 127.0.0.1 that nothing listens on (now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Health of `CheckpointService` through `channel`.
async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "cowsnap.v1.CheckpointService".into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Connects to `addr` with `tls`, retrying while cowsnapd starts; the
/// health answer or why it failed.
async fn health_over_tcp(
    addr: &str,
    tls: Option<&cowsnapd::client::ClientTlsFiles>,
) -> Result<i32, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cowsnapd::client::connect_tcp(addr, tls).await {
            Ok(channel) => return health(channel).await.map_err(|s| format!("{s:?}")),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(e) if e.to_string().contains("refused") => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
}

/// 5. TCP only with mutual TLS: plain TCP without `--insecure`, or half
///    the TLS flags, stops cowsnapd at start with a clear error; with
///    mTLS a client with a certificate of the CA is served (the API and
///    `ctl --tcp`), a client without a certificate, with one of another
///    CA, or without TLS is refused; `--insecure` serves plain TCP and
///    logs a warning.
#[test]
fn cowsnapd_tcp_requires_mutual_tls() {
    let ctrd = Containerd::start("daemon-tls");
    let certs = Certs::make(&ctrd.dir().join("certs"));
    let exits = |args: &[&str], says: &str| {
        let output = Command::new(daemon_bin_dir().join(DAEMON_BIN))
            .arg("--socket")
            .arg(ctrd.dir().join("refused/cowsnapd.sock"))
            .arg("--containerd")
            .arg(&ctrd.address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cowsnapd");
        assert!(!output.status.success(), "cowsnapd {args:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(says),
            "cowsnapd {args:?} does not say {says:?}:\n{stderr}"
        );
    };
    let addr = format!("127.0.0.1:{}", free_port());
    exits(&["--tcp", &addr], "--insecure");
    let cert = certs.server_cert.to_str().expect("utf-8");
    exits(
        &["--tcp", &addr, "--tls-cert", cert],
        "missing --tls-key, --tls-client-ca",
    );

    let args = certs.server_args(&addr);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let daemon = Daemon::start_with(&ctrd, "cowsnapd-tls", &args);
    let rt = runtime();
    rt.block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        let served = health_over_tcp(&addr, Some(&certs.client)).await;
        assert_eq!(served, Ok(ServingStatus::Serving as i32), "a good client");
        let stranger = health_over_tcp(&addr, Some(&certs.stranger))
            .await
            .expect_err("a client of another CA was served");
        assert!(
            refused_in_handshake(&stranger, "UnknownCA"),
            "client of another CA: {stranger}"
        );
        // TLS without a client certificate.
        let anonymous = async {
            let ca = std::fs::read(&certs.ca).expect("ca");
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .expect("uri")
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                )
                .expect("tls")
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            health(channel).await.map_err(|s| format!("{s:?}"))
        }
        .await;
        let anonymous = anonymous.expect_err("a client without a certificate was served");
        assert!(
            refused_in_handshake(&anonymous, "CertificateRequired"),
            "client without a certificate: {anonymous}"
        );
        let plain = health_over_tcp(&format!("http://{addr}"), None).await;
        assert!(
            plain.is_err(),
            "a plain-text client was served on the TLS port"
        );
    });
    // ctl over mTLS.
    let client = &certs.client;
    let output = Command::new(daemon_bin_dir().join(CTL_BIN))
        .args(["--tcp", &addr, "--namespace", &ctrd.namespace])
        .arg("--ca")
        .arg(&client.ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg("ls")
        .output()
        .expect("cowsnap-ctl");
    assert!(
        output.status.success(),
        "ctl ls over mTLS:\n{}\n{}",
        common::describe(&output),
        daemon.log_text()
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("REF"));
    drop(daemon);

    let addr = format!("127.0.0.1:{}", free_port());
    let insecure = Daemon::start_with(
        &ctrd,
        "cowsnapd-insecure",
        &["--tcp".as_ref(), addr.as_ref(), "--insecure".as_ref()],
    );
    rt.block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        let served = health_over_tcp(&addr, None).await;
        assert_eq!(
            served,
            Ok(ServingStatus::Serving as i32),
            "plain TCP with --insecure"
        );
    });
    let log = insecure.log_text();
    assert!(
        log.contains("warning") && log.contains("--insecure"),
        "no warning for --insecure:\n{log}"
    );
}

/// Two network namespaces joined by a veth pair: node A at
/// [`NODE_A_IP`], node B at [`NODE_B_IP`]. Removed when dropped.
struct TwoNodes {
    a: String,
    b: String,
    /// The certificates of both nodes' cowsnapd (one CA).
    certs: PathBuf,
}

const NODE_A_IP: &str = "10.231.7.1";
const NODE_B_IP: &str = "10.231.7.2";

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}:\n{}",
        common::describe(&output)
    );
}

impl TwoNodes {
    fn new() -> TwoNodes {
        let tag = std::process::id() % 100_000;
        let certs = std::env::temp_dir().join(format!("cowsnap-nodes-certs-{tag}"));
        let _ = std::fs::remove_dir_all(&certs);
        Certs::make(&certs);
        let nodes = TwoNodes {
            a: format!("csmig-a-{tag}"),
            b: format!("csmig-b-{tag}"),
            certs,
        };
        let (va, vb) = (format!("csva{tag}"), format!("csvb{tag}"));
        for ns in [&nodes.a, &nodes.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &nodes.a]);
        ip(&["link", "set", &vb, "netns", &nodes.b]);
        ip(&[
            "-n",
            &nodes.a,
            "addr",
            "add",
            &format!("{NODE_A_IP}/24"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &nodes.b,
            "addr",
            "add",
            &format!("{NODE_B_IP}/24"),
            "dev",
            &vb,
        ]);
        ip(&["-n", &nodes.a, "link", "set", &va, "up"]);
        ip(&["-n", &nodes.b, "link", "set", &vb, "up"]);
        nodes
    }

    fn path(name: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{name}"))
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so both.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

/// A node: its containerd and its cowsnapd (unix socket, and TCP with
/// mutual TLS at `ip`:`port`), both in the node's network namespace.
struct Node {
    daemon: Daemon,
    ctrd: Containerd,
    addr: String,
}

impl Node {
    fn start(what: &str, netns: &str, ip: &str, certs_dir: &Path) -> Node {
        let netns = TwoNodes::path(netns);
        let ctrd = Containerd::start_cowsnap_in(what, Some(&netns));
        let (cert, key) = node_cert(certs_dir, what, ip);
        let addr = format!("{ip}:{}", 7000 + std::process::id() % 1000);
        let args: Vec<std::ffi::OsString> = vec![
            "--tcp".into(),
            addr.clone().into(),
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
            "--tls-client-ca".into(),
            certs_dir.join("ca.pem").into(),
        ];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let daemon = Daemon::start_in(&ctrd, "cowsnapd", Some(&netns), &args);
        Node { daemon, ctrd, addr }
    }
}

/// Every event of a Migrate, calling `seen` on each, or its status.
async fn migrate(
    client: &mut migration_service_client::MigrationServiceClient<Channel>,
    request: MigrateRequest,
    mut seen: impl FnMut(&migrate_event::Event),
) -> Result<Vec<migrate_event::Event>, tonic::Status> {
    let mut stream = client.migrate(request).await?.into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        if let Some(e) = event?.event {
            seen(&e);
            events.push(e);
        }
    }
    Ok(events)
}

/// Two nodes (network namespaces joined by a veth pair, each with its own
/// containerd and cowsnapd, certificates of one CA made by the test), and
/// a counter container on A.
fn two_nodes_with_counter(what: &str, script: &str) -> (TwoNodes, Node, Node, String) {
    two_nodes_with_counter_and(what, script, |_| {}, |_| {})
}

/// [`two_nodes_with_counter`], calling `before_import` and `after_import`
/// on B's containerd around its import of the image.
fn two_nodes_with_counter_and(
    what: &str,
    script: &str,
    before_import: impl FnOnce(&Containerd),
    after_import: impl FnOnce(&Containerd),
) -> (TwoNodes, Node, Node, String) {
    let (nodes, a, b, image) = two_nodes_with_image(what, before_import, after_import);
    let id = a.ctrd.container_id("counter");
    a.ctrd
        .run(COWSNAP_RUNTIME, image, &id, &["sh", "-c", script]);
    (nodes, a, b, id)
}

/// Two nodes, both with the reference image (its name returned), calling
/// `before_import` and `after_import` on B's containerd around its import.
fn two_nodes_with_image(
    what: &str,
    before_import: impl FnOnce(&Containerd),
    after_import: impl FnOnce(&Containerd),
) -> (TwoNodes, Node, Node, &'static str) {
    let nodes = TwoNodes::new();
    let a = Node::start(&format!("{what}-a"), &nodes.a, NODE_A_IP, &nodes.certs);
    let b = Node::start(&format!("{what}-b"), &nodes.b, NODE_B_IP, &nodes.certs);
    let image = a.ctrd.import_reference_image();
    before_import(&b.ctrd);
    b.ctrd.import_reference_image();
    after_import(&b.ctrd);
    (nodes, a, b, image)
}

/// Migrates container `id` from node `a` to node `b` (into B's namespace,
/// under the same id) with Migrate on A's socket, over mutual TLS; the
/// result it ends with. Panics with both agents' logs if it fails.
fn migrate_a_to_b(a: &Node, b: &Node, id: &str) -> MigrateResult {
    migrate_a_to_b_seen(a, b, id, |_| {})
}

/// [`migrate_a_to_b`], calling `seen` on every event as it comes.
fn migrate_a_to_b_seen(
    a: &Node,
    b: &Node,
    id: &str,
    seen: impl FnMut(&migrate_event::Event),
) -> MigrateResult {
    let rt = runtime();
    let events = rt.block_on(async {
        let mut client =
            migration_service_client::MigrationServiceClient::new(a.daemon.channel().await);
        let request = MigrateRequest {
            namespace: a.ctrd.namespace.clone(),
            container_id: id.to_string(),
            target: format!("https://{}", b.addr),
            options: Some(MigrateOptions {
                target_container_id: String::new(),
                target_namespace: b.ctrd.namespace.clone(),
            }),
        };
        migrate(&mut client, request, seen).await
    });
    let events = events.unwrap_or_else(|s| {
        panic!(
            "migrate {id}: {s:?}\n--- cowsnapd A\n{}\n--- cowsnapd B\n{}\n--- containerd B\n{}",
            a.daemon.log_text(),
            b.daemon.log_text(),
            b.ctrd.log_tail(40)
        )
    });
    match events.last() {
        Some(migrate_event::Event::Done(result)) => *result,
        _ => panic!("Migrate of {id} did not end with its result: {events:?}"),
    }
}

/// 6. Live migration between two nodes over mutual TLS: a shell counter
///    container on A migrates to B (`ctl migrate` through A's socket); on
///    B it runs and counts on from its value on A, with its writable layer
///    (a file written on A); A no longer has the container nor its
///    checkpoint, B keeps no checkpoint either. The
///    answer gives the bytes sent, the frozen time, the downtime and the
///    total time.
#[test]
fn cowsnapd_migrates_a_counter_between_nodes() {
    let script = format!("echo written-on-a > /marker; {COUNTER_LOOP}");
    let (_nodes, a, b, id) = two_nodes_with_counter("mig", &script);
    let before = a.ctrd.wait_counter_above(&id, 10);
    b.ctrd.track(&id);
    let target = format!("https://{}", b.addr);
    let output = Command::new(daemon_bin_dir().join(CTL_BIN))
        .arg("--socket")
        .arg(&a.daemon.socket)
        .args(["--namespace", &a.ctrd.namespace, "migrate", &id, &target])
        .args(["--target-namespace", &b.ctrd.namespace])
        .stdin(Stdio::null())
        .output()
        .expect("cowsnap-ctl migrate");
    assert!(
        output.status.success(),
        "ctl migrate failed:\n{}\n--- cowsnapd A\n{}\n--- cowsnapd B\n{}\n--- containerd B\n{}",
        common::describe(&output),
        a.daemon.log_text(),
        b.daemon.log_text(),
        b.ctrd.log_tail(40)
    );
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{line}");
    assert!(
        line.contains("bytes sent") && line.contains("downtime"),
        "{line}"
    );
    // Off a terminal, the source's dump figures come as plain lines
    // between "dumping" and "checkpointed".
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let (dump, rest) = stderr
        .split_once(
            "checkpointed
",
        )
        .unwrap_or_else(|| {
            panic!(
                "no checkpointed line:
{stderr}"
            )
        });
    assert!(
        dump.starts_with(
            "dumping
"
        ),
        "{stderr}"
    );
    let figures = dump_lines(dump);
    assert!(
        figures
            .last()
            .is_some_and(|f| f.pages_scanned > 0 && f.bytes_written > 0),
        "no dump figures before checkpointed:
{stderr}"
    );
    assert!(dump_lines(rest).is_empty(), "{stderr}");
    let running = b.ctrd.wait_status(&id, "RUNNING");
    assert!(running.pid > 0);
    b.ctrd.wait_counter_above(&id, before);
    // The writable layer came along.
    let marker = std::fs::read_to_string(b.ctrd.host_path(&id, "/marker")).unwrap_or_default();
    assert_eq!(
        marker, "written-on-a\n",
        "the writable layer did not migrate"
    );
    assert!(
        !a.ctrd.containers().iter().any(|c| c == &id),
        "A still has container {id}: {:?}",
        a.ctrd.containers()
    );
    for node in [&a, &b] {
        let images = node.ctrd.ctr_ok(&["images", "ls", "-q"]);
        assert!(
            !images.contains("cowsnap.migrate/"),
            "a migration checkpoint is left: {images}"
        );
    }
    let figures: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(figures.iter().all(|&f| f < 10_000_000_000), "{line}");
    b.ctrd.kill_and_delete(&id);
}

/// 7. The target agent is killed in the middle of the transfer: the
///    source tries to reach it again, gives up, and restores the
///    container from its own checkpoint: Migrate fails with UNAVAILABLE
///    saying the container runs again, and on A the counter goes on; B
///    has no container.
#[test]
fn cowsnapd_migration_to_a_killed_target_leaves_the_source_running() {
    // 96 MiB of memory: a transfer long enough to be cut.
    let script = format!(
        "{} --mode plain --mib 96 --children 1 --dirty-pct 10 --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD
    );
    let (_nodes, a, mut b, id) = two_nodes_with_counter("migkill", &script);
    let ready = a.ctrd.host_path(&id, "/tmp/ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the reference tree is not ready");
        thread::sleep(Duration::from_millis(50));
    }
    let before = a.ctrd.wait_counter_above(&id, 10);
    let rt = runtime();
    let mut killed_at = None;
    let result = rt.block_on(async {
        let mut client =
            migration_service_client::MigrationServiceClient::new(a.daemon.channel().await);
        let request = MigrateRequest {
            namespace: a.ctrd.namespace.clone(),
            container_id: id.clone(),
            target: format!("https://{}", b.addr),
            options: Some(MigrateOptions {
                target_container_id: String::new(),
                target_namespace: b.ctrd.namespace.clone(),
            }),
        };
        migrate(&mut client, request, |event| {
            if let migrate_event::Event::BytesSent(bytes) = event {
                if killed_at.is_none() {
                    let _ = b.daemon.child.kill();
                    killed_at = Some(*bytes);
                }
            }
        })
        .await
    });
    let killed_at = killed_at.expect("no byte was sent before the end");
    let status = result.expect_err("the migration must fail once its target is gone");
    eprintln!("target killed after {killed_at} bytes: {status:?}");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("runs here again"),
        "{status:?}\n--- cowsnapd A\n{}",
        a.daemon.log_text()
    );
    let _ = b.daemon.child.wait();
    a.ctrd.wait_status(&id, "RUNNING");
    a.ctrd.wait_counter_above(&id, before);
    assert!(
        !b.ctrd.containers().iter().any(|c| c == &id),
        "B has container {id}"
    );
    let images = a.ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        !images.contains("cowsnap.migrate/"),
        "A keeps its checkpoint: {images}"
    );
    a.ctrd.kill_and_delete(&id);
}

/// A TCP proxy in network namespace `netns` on 127.0.0.1, to `upstream`:
/// the first connection is cut (both ways) once `cut_after` bytes went
/// upstream through it; later ones pass whole. Returns its port and the
/// number of connections it cut.
fn cutting_proxy(
    netns: &Path,
    upstream: String,
    cut_after: u64,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Arc;
    let cuts = Arc::new(AtomicU32::new(0));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let netns = netns.to_path_buf();
    let counted = cuts.clone();
    thread::spawn(move || {
        // Threads made from here on are in the namespace too.
        let ns = std::fs::File::open(&netns).expect("open the netns");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        port_tx
            .send(listener.local_addr().expect("addr").port())
            .expect("port");
        let mut first = true;
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let limit = if first { cut_after } else { u64::MAX };
            first = false;
            let up = Arc::new(AtomicU64::new(0));
            let pump = |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                let cuts = counted.clone();
                let (a, b) = (from.try_clone().expect("dup"), to.try_clone().expect("dup"));
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if let Some(count) = &count {
                            if count.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > limit {
                                cuts.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    let _ = a.shutdown(Shutdown::Both);
                    let _ = b.shutdown(Shutdown::Both);
                });
            };
            pump(
                client.try_clone().expect("dup"),
                server.try_clone().expect("dup"),
                Some(up),
            );
            pump(server, client, None);
        }
    });
    (port_rx.recv().expect("proxy port"), cuts)
}

/// 8. The connection between the agents drops in the middle of the
///    transfer (a proxy on A cuts it after 24 MiB): the source connects
///    again and the transfer resumes at the offset the target acknowledged
///    instead of starting over (the bytes sent stay under the checkpoint's
///    size plus half the part before the cut, where a restart would send
///    that part again, less what was in flight), and the container runs on
///    B.
#[test]
fn cowsnapd_migration_resumes_after_a_dropped_connection() {
    let script = format!(
        "{} --mode plain --mib 96 --children 1 --dirty-pct 10 --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD
    );
    let (nodes, a, b, id) = two_nodes_with_counter("migcut", &script);
    let ready = a.ctrd.host_path(&id, "/tmp/ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the reference tree is not ready");
        thread::sleep(Duration::from_millis(50));
    }
    let before = a.ctrd.wait_counter_above(&id, 10);
    const CUT_AFTER: u64 = 24 << 20;
    let (port, cuts) = cutting_proxy(&TwoNodes::path(&nodes.a), b.addr.clone(), CUT_AFTER);
    b.ctrd.track(&id);
    let rt = runtime();
    let events = rt.block_on(async {
        let mut client =
            migration_service_client::MigrationServiceClient::new(a.daemon.channel().await);
        let request = MigrateRequest {
            namespace: a.ctrd.namespace.clone(),
            container_id: id.clone(),
            target: format!("https://127.0.0.1:{port}"),
            options: Some(MigrateOptions {
                target_container_id: String::new(),
                target_namespace: b.ctrd.namespace.clone(),
            }),
        };
        migrate(&mut client, request, |_| {}).await
    });
    let events = events.unwrap_or_else(|s| {
        panic!(
            "migrate: {s:?}\n--- cowsnapd A\n{}\n--- cowsnapd B\n{}",
            a.daemon.log_text(),
            b.daemon.log_text()
        )
    });
    let Some(migrate_event::Event::Done(result)) = events.last() else {
        panic!("Migrate did not end with its result: {events:?}");
    };
    eprintln!("{result:?}");
    assert_eq!(
        cuts.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the proxy never cut"
    );
    assert!(
        result.resumed >= 1,
        "the transfer was not resumed: {result:?}"
    );
    assert!(
        result.checkpoint_size > 2 * CUT_AFTER,
        "the checkpoint is too small to be cut in its middle: {result:?}"
    );
    // Started over, it would have sent the part before the cut twice.
    assert!(
        result.bytes_sent < result.checkpoint_size + CUT_AFTER / 2,
        "the transfer started over: {result:?}"
    );
    let log = b.daemon.log_text();
    let resumed_at: u64 = log
        .split("resumed at offset ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("B did not resume:\n{log}"));
    assert!(
        resumed_at > CUT_AFTER / 2 && resumed_at <= CUT_AFTER,
        "B resumed at {resumed_at}"
    );
    b.ctrd.wait_status(&id, "RUNNING");
    b.ctrd.wait_counter_above(&id, before);
    assert!(!a.ctrd.containers().iter().any(|c| c == &id));
    b.ctrd.kill_and_delete(&id);
}

/// 9. The writable layer: a checkpoint with `include_rw_layer` stores the
///    container's rootfs changes (a stage says so); `Restore` with
///    `apply_rw_layer` and `ctr container restore --rw` both bring back the
///    file written before the checkpoint, and the counter goes on; a
///    checkpoint without the layer asked to apply one is FAILED_PRECONDITION.
#[test]
fn cowsnapd_checkpoints_and_restores_the_writable_layer() {
    let ctrd = Containerd::start_cowsnap("daemon-rw");
    let image = ctrd.import_reference_image();
    let script = format!("echo written-before > /marker; {COUNTER_LOOP}");
    // Two containers: containerd 1.6 stores a second checkpoint of one
    // task only if its content differs (see README).
    let id = ctrd.container_id("rw");
    let plain = ctrd.container_id("plain");
    for id in [&id, &plain] {
        ctrd.run(COWSNAP_RUNTIME, image, id, &["sh", "-c", &script]);
    }
    let daemon = Daemon::start(&ctrd);
    let ns = ctrd.namespace.clone();
    let (with_rw, without_rw) = ("cowsnap.test/rw:1", "cowsnap.test/no-rw:1");
    let rt = runtime();
    let mut client = rt.block_on(async { CheckpointServiceClient::new(daemon.channel().await) });
    let before = ctrd.wait_counter_above(&id, 5);
    ctrd.wait_counter_above(&plain, 5);
    let stages = rt.block_on(async {
        let mut stages = Vec::new();
        for (container, reference, rw) in [(&id, with_rw, true), (&plain, without_rw, false)] {
            let mut stream = client
                .checkpoint(CheckpointRequest {
                    namespace: ns.clone(),
                    container_id: container.clone(),
                    leave_running: true,
                    checkpoint_ref: reference.to_string(),
                    options: Some(CheckpointOptions {
                        include_rw_layer: rw,
                    }),
                })
                .await
                .expect("checkpoint")
                .into_inner();
            while let Some(event) = stream.next().await {
                if let Some(CheckpointEventKind::Stage(s)) = event.expect("checkpoint event").event
                {
                    stages.push((rw, s));
                }
            }
        }
        stages
    });
    let layer_stage = CheckpointStage::RwLayerStored as i32;
    assert!(stages.contains(&(true, layer_stage)), "{stages:?}");
    assert!(!stages.contains(&(false, layer_stage)), "{stages:?}");
    ctrd.kill_and_delete(&id);
    ctrd.kill_and_delete(&plain);

    async fn restore_rw(
        client: &mut CheckpointServiceClient<Channel>,
        namespace: &str,
        reference: &str,
        new_id: &str,
    ) -> Result<(), tonic::Status> {
        let mut stream = client
            .restore(RestoreRequest {
                namespace: namespace.to_string(),
                checkpoint_ref: reference.to_string(),
                new_container_id: new_id.to_string(),
                options: Some(RestoreOptions {
                    apply_rw_layer: true,
                }),
            })
            .await?
            .into_inner();
        while let Some(event) = stream.next().await {
            event?;
        }
        Ok(())
    }
    let restored = ctrd.container_id("restored");
    ctrd.track(&restored);
    rt.block_on(async {
        assert_status(
            restore_rw(&mut client, &ns, without_rw, &restored).await,
            Code::FailedPrecondition,
            without_rw,
        );
        restore_rw(&mut client, &ns, with_rw, &restored)
            .await
            .unwrap_or_else(|s| panic!("restore with the layer: {s:?}"));
    });
    ctrd.wait_status(&restored, "RUNNING");
    ctrd.wait_counter_above(&restored, before);
    let marker =
        |id: &str| std::fs::read_to_string(ctrd.host_path(id, "/marker")).unwrap_or_default();
    assert_eq!(marker(&restored), "written-before\n");
    ctrd.kill_and_delete(&restored);

    let by_ctr = ctrd.container_id("by-ctr");
    let output = ctrd.restore_container(&by_ctr, with_rw, true);
    assert!(
        output.status.success(),
        "ctr containers restore --rw of cowsnapd's checkpoint failed:\n{}\n{}",
        common::describe(&output),
        ctrd.log_tail(30)
    );
    ctrd.wait_status(&by_ctr, "RUNNING");
    assert_eq!(
        marker(&by_ctr),
        "written-before\n",
        "ctr did not apply the layer"
    );
    ctrd.kill_and_delete(&by_ctr);
}

/// 10. The reference tree (a root and 3 children sharing 32 MiB, each
///     with its dirty pages) beside a shell counter migrates from A to B:
///     on B every process verifies its memory, the pids inside the
///     container are the same, the PSS is within 1% of the original's
///     (the sharing came back), the counter goes on; the result gives the
///     bytes sent and the downtime.
#[test]
fn cowsnapd_migrates_the_reference_tree_with_its_sharing() {
    const WORKLOAD_COMM: &str = "cowsnap-refwork";
    let script = format!(
        "{} --mode plain --mib 32 --children 3 --dirty-pct 10 --report /tmp/report \
         --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD
    );
    let (_nodes, a, b, id) = two_nodes_with_counter("migtree", &script);
    let ready = a.ctrd.host_path(&id, "/tmp/ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the reference tree is not ready");
        thread::sleep(Duration::from_millis(50));
    }
    let workers = a.ctrd.pids_named(&id, WORKLOAD_COMM);
    assert_eq!(workers.len(), 4, "reference tree processes: {workers:?}");
    let targets: Vec<(i32, i32)> = workers.iter().map(|&p| (p, common::ns_pid(p))).collect();
    common::assert_processes_verify(
        &a.ctrd.host_path(&id, "/tmp/report"),
        &targets,
        "before the migration",
    );
    let before = a.ctrd.wait_counter_above(&id, 10);
    let pss_original = a.ctrd.paused_pss(&id);
    b.ctrd.track(&id);
    let result = migrate_a_to_b(&a, &b, &id);
    eprintln!(
        "reference tree (32 MiB, 3 children) migrated: {} bytes sent, frozen {} ms, \
         downtime {} ms, total {} ms",
        result.bytes_sent, result.frozen_ms, result.downtime_ms, result.total_ms
    );
    assert!(result.bytes_sent >= result.checkpoint_size && result.downtime_ms > 0);
    assert!(result.downtime_ms >= result.frozen_ms && result.total_ms >= result.downtime_ms);
    b.ctrd.wait_status(&id, "RUNNING");
    b.ctrd.wait_counter_above(&id, before);
    let moved = b.ctrd.pids_named(&id, WORKLOAD_COMM);
    let moved_targets: Vec<(i32, i32)> = moved.iter().map(|&p| (p, common::ns_pid(p))).collect();
    let mut ns_before: Vec<i32> = targets.iter().map(|&(_, ns)| ns).collect();
    let mut ns_after: Vec<i32> = moved_targets.iter().map(|&(_, ns)| ns).collect();
    ns_before.sort_unstable();
    ns_after.sort_unstable();
    assert_eq!(ns_after, ns_before, "pids of the tree inside the container");
    common::assert_processes_verify(
        &b.ctrd.host_path(&id, "/tmp/report"),
        &moved_targets,
        "after the migration",
    );
    let pss_moved = b.ctrd.paused_pss(&id);
    eprintln!("PSS {pss_original} B on A, {pss_moved} B on B");
    assert!(
        pss_moved.abs_diff(pss_original) * 100 <= pss_original,
        "PSS on B {pss_moved} B is not within 1% of the original's {pss_original} B"
    );
    assert!(!a.ctrd.containers().iter().any(|c| c == &id));
    b.ctrd.kill_and_delete(&id);
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {args:?}:\n{}",
        common::describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// 11. The target's disk is full (its content store on a tmpfs with 4 MiB
///     left, a 54 MB checkpoint coming): the import fails, the target
///     drops what it wrote (no ingest, no blob of it left), Migrate fails
///     saying so, and the container runs and counts on the source again;
///     the target has no container.
#[test]
fn cowsnapd_migration_to_a_full_target_leaves_the_source_running() {
    let script = format!(
        "{} --mode plain --mib 96 --children 1 --dirty-pct 10 --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD
    );
    let content_of = |ctrd: &Containerd| ctrd.dir().join("root/io.containerd.content.v1.content");
    let mut content_before = Vec::new();
    let (_nodes, a, b, id) = two_nodes_with_counter_and(
        "migfull",
        &script,
        |b| {
            let content = content_of(b);
            let content = content.to_str().expect("utf-8 path");
            run_ok(
                "mount",
                &["-t", "tmpfs", "-o", "size=512m", "tmpfs", content],
            );
            for dir in ["ingest", "blobs/sha256"] {
                std::fs::create_dir_all(content_of(b).join(dir)).expect("content store dirs");
            }
        },
        |b| {
            let content = content_of(b);
            let content = content.to_str().expect("utf-8 path");
            let used: u64 = run_ok("df", &["--output=used", "-B1", content])
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
                .expect("df used bytes");
            run_ok(
                "mount",
                &[
                    "-o",
                    &format!("remount,size={}k", used / 1024 + 4096),
                    content,
                ],
            );
            content_before = b.content_digests();
        },
    );
    let ready = a.ctrd.host_path(&id, "/tmp/ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the reference tree is not ready");
        thread::sleep(Duration::from_millis(50));
    }
    let before = a.ctrd.wait_counter_above(&id, 10);
    let rt = runtime();
    let result = rt.block_on(async {
        let mut client =
            migration_service_client::MigrationServiceClient::new(a.daemon.channel().await);
        let request = MigrateRequest {
            namespace: a.ctrd.namespace.clone(),
            container_id: id.clone(),
            target: format!("https://{}", b.addr),
            options: Some(MigrateOptions {
                target_container_id: String::new(),
                target_namespace: b.ctrd.namespace.clone(),
            }),
        };
        migrate(&mut client, request, |_| {}).await
    });
    let status = result.expect_err("a migration to a full disk must fail");
    eprintln!("{status:?}");
    for says in ["no space left on device", "runs here again"] {
        assert!(
            status.message().contains(says),
            "{status:?} does not say {says:?}\n--- cowsnapd B\n{}",
            b.daemon.log_text()
        );
    }
    a.ctrd.wait_status(&id, "RUNNING");
    a.ctrd.wait_counter_above(&id, before);
    assert!(!b.ctrd.containers().iter().any(|c| c == &id), "B has {id}");
    assert_eq!(
        b.ctrd.content_digests(),
        content_before,
        "B keeps blobs of the failed import"
    );
    let active = b.ctrd.ctr_ok(&["content", "active"]);
    assert!(
        active.lines().skip(1).all(|l| l.trim().is_empty()),
        "B keeps an ingest: {active}"
    );
    a.ctrd.kill_and_delete(&id);
}

/// 12. nginx (a master and 4 workers sharing one listening socket, each
///     worker with its epoll set) migrates from A to B over mutual TLS: on
///     B it serves the page, with as many workers (the same pids inside the
///     container), every one accepting; A no longer has the container. The
///     result gives a nonzero downtime and at least the checkpoint's bytes.
#[test]
fn cowsnapd_migrates_nginx_between_nodes() {
    let (_nodes, a, b, image) = two_nodes_with_image("mignginx", |_| {}, |_| {});
    let id = a.ctrd.container_id("nginx");
    let task = run_nginx(&a.ctrd, image, &id);
    let workers = assert_every_worker_accepts(&a.ctrd, &id, task.pid, "on A");
    b.ctrd.track(&id);
    let result = migrate_a_to_b(&a, &b, &id);
    eprintln!(
        "nginx migrated: {} bytes sent ({} bytes checkpoint), frozen {} ms, downtime {} ms, \
         total {} ms",
        result.bytes_sent,
        result.checkpoint_size,
        result.frozen_ms,
        result.downtime_ms,
        result.total_ms
    );
    assert!(
        result.checkpoint_size > 0 && result.bytes_sent >= result.checkpoint_size,
        "bytes sent: {result:?}"
    );
    assert!(
        result.frozen_ms > 0
            && result.downtime_ms >= result.frozen_ms
            && result.total_ms >= result.downtime_ms
            && result.total_ms < 600_000,
        "times: {result:?}"
    );
    let moved = b.ctrd.wait_status(&id, "RUNNING");
    for _ in 0..3 {
        assert_eq!(
            container_get(moved.pid, "/").as_deref(),
            Ok(IMAGE_NGINX_PAGE),
            "nginx serves the page on B"
        );
    }
    let moved_workers = assert_every_worker_accepts(&b.ctrd, &id, moved.pid, "on B");
    assert_eq!(moved_workers, workers, "nginx workers on B (pids inside)");
    assert!(
        !a.ctrd.containers().iter().any(|c| c == &id) && a.ctrd.task(&id).is_none(),
        "A still has container {id}: {:?}",
        a.ctrd.containers()
    );
    b.ctrd.kill_and_delete(&id);
}

/// A parameter of [`bench_migrate_reference_tree`]: environment variable
/// `name` if set (as `bench/migrate.sh` passes its options), else `default`.
fn bench_param<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A refworkload mode: a plain word (it goes into the container's shell
/// script).
#[derive(Debug)]
struct WorkloadMode(String);

impl std::str::FromStr for WorkloadMode {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, ()> {
        let plain = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        plain.then(|| WorkloadMode(text.to_string())).ok_or(())
    }
}

/// Benchmark, not a test: `bench/migrate.sh` runs it in release. The
/// reference tree of DESIGN.md "Targets" (a parent with 1 GiB, 8 children
/// each dirtying 10%; COWSNAP_BENCH_MODE, _MIB, _CHILDREN, _DIRTY_PCT
/// change it) beside a shell counter migrates from A to B over mutual TLS.
/// Prints one `migrate-bench:` line: bytes sent, the checkpoint's size,
/// frozen time, downtime, total time, the container's PSS on A (before)
/// and on B (after), and when the stages checkpointed, transferred and
/// running on target reached the client. It asserts no figure, only that the
/// migration happened: the tree runs on B and verifies its memory there.
#[test]
#[ignore = "benchmark: run by bench/migrate.sh, in release"]
fn bench_migrate_reference_tree() {
    const WORKLOAD_COMM: &str = "cowsnap-refwork";
    let mode: WorkloadMode = bench_param("COWSNAP_BENCH_MODE", WorkloadMode("plain".into()));
    let mib: u64 = bench_param("COWSNAP_BENCH_MIB", 1024);
    let children: u32 = bench_param("COWSNAP_BENCH_CHILDREN", 8);
    let dirty: u32 = bench_param("COWSNAP_BENCH_DIRTY_PCT", 10);
    let tree = format!(
        "mode {}, {mib} MiB, {children} children, {dirty}% dirty",
        mode.0
    );
    let script = format!(
        "{} --mode {} --mib {mib} --children {children} --dirty-pct {dirty} \
         --report /tmp/report --ready /tmp/ready & {COUNTER_LOOP}",
        harness::IMAGE_WORKLOAD,
        mode.0
    );
    let (_nodes, a, b, id) = two_nodes_with_counter("migbench", &script);
    let ready = a.ctrd.host_path(&id, "/tmp/ready");
    let deadline = Instant::now() + common::PATIENCE;
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the reference tree ({tree}) is not ready"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let before = a.ctrd.wait_counter_above(&id, 10);
    let pss_a = a.ctrd.paused_pss(&id);
    b.ctrd.track(&id);
    // When each stage reached this client, from the call: the phases of
    // the downtime (checkpoint, transfer, import and restore on B).
    let called = Instant::now();
    let mut stage_ms = std::collections::BTreeMap::new();
    let result = migrate_a_to_b_seen(&a, &b, &id, |event| {
        if let migrate_event::Event::Stage(stage) = event {
            stage_ms.insert(*stage, called.elapsed().as_millis());
        }
    });
    let at = |stage: MigrateStage| stage_ms.get(&(stage as i32)).copied().unwrap_or(0);
    b.ctrd.wait_status(&id, "RUNNING");
    b.ctrd.wait_counter_above(&id, before);
    let pss_b = b.ctrd.paused_pss(&id);
    let moved: Vec<(i32, i32)> = b
        .ctrd
        .pids_named(&id, WORKLOAD_COMM)
        .into_iter()
        .map(|p| (p, common::ns_pid(p)))
        .collect();
    assert!(
        moved.len() > children as usize,
        "reference tree processes on B: {moved:?}"
    );
    common::assert_processes_verify(&b.ctrd.host_path(&id, "/tmp/report"), &moved, "on B");
    assert!(!a.ctrd.containers().iter().any(|c| c == &id));
    eprintln!(
        "migrate-bench: {tree}: bytes_sent {} checkpoint_size {} frozen_ms {} downtime_ms {} \
         total_ms {} resumed {} pss_a {pss_a} pss_b {pss_b} checkpointed_at_ms {} \
         transferred_at_ms {} running_at_ms {}",
        result.bytes_sent,
        result.checkpoint_size,
        result.frozen_ms,
        result.downtime_ms,
        result.total_ms,
        result.resumed,
        at(MigrateStage::Checkpointed),
        at(MigrateStage::Transferred),
        at(MigrateStage::RunningOnTarget)
    );
    b.ctrd.kill_and_delete(&id);
}
