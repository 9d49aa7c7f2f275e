//! What cowsnapd counts (checkpoints, restores and migrations: how many,
//! how long, frozen time, image bytes, failures by gRPC code) and the
//! HTTP endpoint that serves it to Prometheus (`--metrics-addr`): `GET
//! /metrics` in the OpenMetrics text format, which Prometheus scrapes as
//! it does its own text format. The server is a few lines over a TCP
//! listener: one request per connection, nothing but that path.
//!
//! The RPC layer records; nothing here talks to containerd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// What a failure label names.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Operation {
    Checkpoint,
    Restore,
    Migrate,
}

impl Operation {
    /// The `operation` label's value.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Checkpoint => "checkpoint",
            Operation::Restore => "restore",
            Operation::Migrate => "migrate",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    operation: &'static str,
    /// The gRPC code in the protocol's words (`NOT_FOUND`).
    code: &'static str,
}

/// Every metric cowsnapd exports (names in README, "cowsnapd").
pub struct Metrics {
    registry: Registry,
    checkpoints: Counter,
    checkpoint_seconds: Histogram,
    frozen_seconds: Histogram,
    image_bytes: Histogram,
    restores: Counter,
    restore_seconds: Histogram,
    migrations: Counter,
    migration_seconds: Histogram,
    downtime_seconds: Histogram,
    migration_bytes: Counter,
    failures: Family<FailureLabels, Counter>,
}

/// 10 ms to about 5.5 min, doubling.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 16)
}

/// 64 KiB to 64 GiB, times four.
fn bytes_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(65536.0, 4.0, 11)
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cowsnapd");
        let m = Metrics {
            checkpoints: Counter::default(),
            checkpoint_seconds: Histogram::new(seconds_buckets()),
            frozen_seconds: Histogram::new(seconds_buckets()),
            image_bytes: Histogram::new(bytes_buckets()),
            restores: Counter::default(),
            restore_seconds: Histogram::new(seconds_buckets()),
            migrations: Counter::default(),
            migration_seconds: Histogram::new(seconds_buckets()),
            downtime_seconds: Histogram::new(seconds_buckets()),
            migration_bytes: Counter::default(),
            failures: Family::default(),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "checkpoints",
            "Checkpoints completed (Checkpoint RPC)",
            m.checkpoints.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Time of a completed Checkpoint RPC, request to image stored",
            m.checkpoint_seconds.clone(),
        );
        registry.register(
            "dump_frozen_seconds",
            "Time a dump kept the container stopped, as the engine reports it \
             (checkpoints and migrations)",
            m.frozen_seconds.clone(),
        );
        registry.register(
            "checkpoint_image_bytes",
            "Size of a completed checkpoint in the content store (sum of its blobs)",
            m.image_bytes.clone(),
        );
        registry.register(
            "restores",
            "Restores completed (Restore RPC)",
            m.restores.clone(),
        );
        registry.register(
            "restore_duration_seconds",
            "Time of a completed Restore RPC, request to task running",
            m.restore_seconds.clone(),
        );
        registry.register(
            "migrations",
            "Migrations completed (the container runs on the target)",
            m.migrations.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "Time of a completed migration, request to source removed",
            m.migration_seconds.clone(),
        );
        registry.register(
            "migration_downtime_seconds",
            "Downtime of a completed migration: dump start to running on the target",
            m.downtime_seconds.clone(),
        );
        registry.register(
            "migration_sent_bytes",
            "Checkpoint bytes sent to migration targets",
            m.migration_bytes.clone(),
        );
        registry.register(
            "failures",
            "Failed checkpoints, restores and migrations, by operation and gRPC code",
            m.failures.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn checkpointed(&self, elapsed: Duration, image_bytes: u64) {
        self.checkpoints.inc();
        self.checkpoint_seconds.observe(elapsed.as_secs_f64());
        self.image_bytes.observe(image_bytes as f64);
    }

    /// A dump's frozen time, from the engine's last progress event.
    pub fn dump_frozen(&self, frozen_ms: u64) {
        self.frozen_seconds.observe(frozen_ms as f64 / 1000.0);
    }

    pub fn restored(&self, elapsed: Duration) {
        self.restores.inc();
        self.restore_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn migrated(&self, elapsed: Duration, downtime_ms: u64, bytes_sent: u64) {
        self.migrations.inc();
        self.migration_seconds.observe(elapsed.as_secs_f64());
        self.downtime_seconds.observe(downtime_ms as f64 / 1000.0);
        self.migration_bytes.inc_by(bytes_sent);
    }

    pub fn failed(&self, operation: Operation, code: Code) {
        self.failures
            .get_or_create(&FailureLabels {
                operation: operation.name(),
                code: code_name(code),
            })
            .inc();
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// A gRPC code as the protocol spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics address {addr}: {source}")]
pub struct BindError {
    pub addr: String,
    pub source: std::io::Error,
}

pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        addr: addr.to_string(),
        source,
    })
}

/// The largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// A client that sends no whole request head in this time is dropped.
const REQUEST_PATIENCE: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `stop` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(&metrics, stream).await {
                        log::info!("metrics request from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn answer(metrics: &Metrics, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_PATIENCE, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    match read {
        Ok(result) => result?,
        Err(_) => return Ok(()),
    }
    let (status, content_type, body) = respond(&head, metrics);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The status line's code and reason, the content type and the body for
/// request head `head`.
fn respond(head: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String) {
    let line = head.split(|b| *b == b'\r' || *b == b'\n').next();
    let line = String::from_utf8_lossy(line.unwrap_or_default());
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", OPENMETRICS, metrics.encode()),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
        _ => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
    }
}

/// Where the metrics are served, for logs.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
    }

    #[test]
    fn counts_and_failures_show_in_the_exposition() {
        let m = Metrics::new();
        let text = m.encode();
        assert_eq!(
            line(&text, "cowsnapd_checkpoints_total"),
            Some("cowsnapd_checkpoints_total 0")
        );
        assert!(!text.contains("cowsnapd_failures_total{"), "{text}");
        m.checkpointed(Duration::from_millis(1500), 3 << 20);
        m.dump_frozen(250);
        m.failed(Operation::Checkpoint, Code::NotFound);
        m.failed(Operation::Checkpoint, Code::NotFound);
        m.failed(Operation::Migrate, Code::Unavailable);
        m.migrated(Duration::from_secs(2), 900, 4096);
        let text = m.encode();
        for expected in [
            "cowsnapd_checkpoints_total 1",
            "cowsnapd_checkpoint_duration_seconds_count 1",
            "cowsnapd_checkpoint_duration_seconds_sum 1.5",
            "cowsnapd_checkpoint_image_bytes_sum 3145728.0",
            "cowsnapd_dump_frozen_seconds_sum 0.25",
            "cowsnapd_migrations_total 1",
            "cowsnapd_migration_downtime_seconds_sum 0.9",
            "cowsnapd_migration_sent_bytes_total 4096",
            "cowsnapd_restores_total 0",
            "cowsnapd_failures_total{operation=\"checkpoint\",code=\"NOT_FOUND\"} 2",
            "cowsnapd_failures_total{operation=\"migrate\",code=\"UNAVAILABLE\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "no {expected:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::new();
        let (status, kind, body) = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m);
        assert_eq!((status, kind), ("200 OK", OPENMETRICS));
        assert!(body.contains("cowsnapd_checkpoints_total"));
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(respond(b"", &m).0, "404 Not Found");
    }

    #[tokio::test]
    async fn a_scrape_over_tcp_gets_the_text() {
        let m = Arc::new(Metrics::new());
        m.failed(Operation::Restore, Code::AlreadyExists);
        let listener = bind("127.0.0.1:0").await.expect("bind");
        let addr = local_addr(&listener).expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(m, listener, async {
            let _ = stop_rx.await;
        }));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.contains(
                "cowsnapd_failures_total{operation=\"restore\",code=\"ALREADY_EXISTS\"} 1"
            ),
            "{reply}"
        );
        let _ = stop_tx.send(());
        server.await.expect("server ends");
    }
}
