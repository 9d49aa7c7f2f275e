//! Live migration of a container to another node's cowsnapd, both sides.
//!
//! Source ([`migrate`]): reach the target first (nothing stops if it
//! cannot be reached), checkpoint the container with its task ending,
//! stream the checkpoint ([`crate::transfer`]'s chunks) to the target's
//! `Receive`, and remove the container only once the target reports it
//! running. A connection that drops is opened again and the stream
//! resumes at the offset the target acknowledged last; if the target
//! stays gone, or fails, the source restores the container from its own
//! checkpoint, on its own rootfs snapshot.
//!
//! Target ([`Receiving`]): imports what comes (an import outlives a
//! dropped connection for [`RESUME_WINDOW`], then is dropped), restores
//! the container, and removes the imported checkpoint once it runs. A
//! failure removes what the target created.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::checkpoint::{self, CheckpointSpec, RestoreSpec};
use crate::client::{self, ClientTlsFiles};
use crate::ctrd::{Containerd, Scope};
use crate::error::ApiError;
use crate::proto::export_checkpoint_response::Item as ExportItem;
use crate::proto::migrate_event::Event as MigrateEventKind;
use crate::proto::migration_service_client::MigrationServiceClient;
use crate::proto::receive_reply::Item as ReplyItem;
use crate::proto::receive_request::Item as ReceiveItem;
use crate::proto::{
    MigrateEvent, MigrateResult, MigrateStage, ReceiveReply, ReceiveRequest, ReceiveStart,
    RestoredTask,
};
use crate::transfer::{self, Import};

/// How long a target keeps an interrupted transfer for the source to
/// resume it.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);
/// How long a source tries to reach its target again after a dropped
/// connection before it gives up and restores the container itself.
pub const RECONNECT_PATIENCE: Duration = Duration::from_secs(8);
/// Chunks queued towards the target besides those on the wire.
const IN_FLIGHT: usize = 2;
/// Pause between reconnections.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

pub struct MigrateSpec {
    pub scope: Scope,
    pub container_id: String,
    pub target: String,
    pub target_namespace: String,
    pub target_container_id: String,
    /// This agent's identity towards the target (mutual TLS); None only
    /// for a plain `http://` target.
    pub tls: Option<ClientTlsFiles>,
}

/// A migration id, unique on this node, that is also a valid tag.
fn transfer_id() -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "m{}-{nanos}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    )
}

/// Moves `spec.container_id` to the target, calling `event` as it goes.
pub async fn migrate(
    ctrd: &Containerd,
    spec: &MigrateSpec,
    mut event: impl FnMut(MigrateEventKind),
) -> Result<MigrateResult, ApiError> {
    let started = Instant::now();
    let id = &spec.container_id;
    let unreachable = |e: client::ConnectError| ApiError::TargetUnavailable {
        target: spec.target.clone(),
        detail: e.to_string(),
    };
    // Reach the target before anything stops.
    let channel = client::connect_tcp(&spec.target, spec.tls.as_ref())
        .await
        .map_err(unreachable)?;
    let transfer = transfer_id();
    let reference = format!("cowsnap.migrate/{id}:{transfer}");
    let frozen_at = Instant::now();
    checkpoint::checkpoint(
        ctrd,
        &CheckpointSpec {
            scope: spec.scope.clone(),
            container_id: id.clone(),
            leave_running: false,
            reference: reference.clone(),
            include_rw_layer: true,
        },
        |step| {
            if let checkpoint::Step::Progress(p) = step {
                event(MigrateEventKind::DumpProgress(p));
            }
        },
    )
    .await?;
    let frozen_ms = frozen_at.elapsed().as_millis() as u64;
    event(MigrateEventKind::Stage(MigrateStage::Checkpointed as i32));
    log::info!("migrate {id:?}: checkpointed as {reference:?} in {frozen_ms} ms");

    let sent = send(ctrd, spec, channel, &transfer, &reference, &mut event).await;
    let (running, figures) = match sent {
        Ok(done) => done,
        Err(e) => {
            log::warn!("migrate {id:?} to {}: {e}", spec.target);
            return Err(put_back(ctrd, spec, &reference, e).await);
        }
    };
    let downtime_ms = frozen_at.elapsed().as_millis() as u64;
    event(MigrateEventKind::Stage(
        MigrateStage::RunningOnTarget as i32,
    ));
    log::info!(
        "migrate {id:?}: running on {} as {:?}, pid {} (downtime {downtime_ms} ms)",
        spec.target,
        running.container_id,
        running.pid
    );
    if let Err(e) = checkpoint::remove_container(ctrd, &spec.scope, id).await {
        log::warn!("migrate {id:?}: removing the source container: {e}");
    }
    if let Err(e) = checkpoint::delete(ctrd, &spec.scope, &reference).await {
        log::warn!("migrate {id:?}: deleting its checkpoint {reference:?}: {e}");
    }
    event(MigrateEventKind::Stage(MigrateStage::SourceRemoved as i32));
    Ok(MigrateResult {
        bytes_sent: figures.bytes_sent,
        frozen_ms,
        downtime_ms,
        total_ms: started.elapsed().as_millis() as u64,
        checkpoint_size: figures.size,
        resumed: figures.resumed,
    })
}

/// The source runs again after a failed migration: restored from its own
/// checkpoint, which is then deleted (kept if the restore fails too).
async fn put_back(
    ctrd: &Containerd,
    spec: &MigrateSpec,
    reference: &str,
    cause: ApiError,
) -> ApiError {
    let id = &spec.container_id;
    match checkpoint::restore_in_place(ctrd, &spec.scope, id, reference).await {
        Ok(restored) => {
            log::info!(
                "migrate {id:?}: failed; restored here from {reference:?}, pid {}",
                restored.pid
            );
            if let Err(e) = checkpoint::delete(ctrd, &spec.scope, reference).await {
                log::warn!("migrate {id:?}: deleting its checkpoint {reference:?}: {e}");
            }
            ApiError::MigrationFailed {
                id: id.clone(),
                target: spec.target.clone(),
                cause: Box::new(cause),
                after: format!("container {id:?} runs here again, restored from its checkpoint"),
            }
        }
        Err(e) => ApiError::MigrationFailed {
            id: id.clone(),
            target: spec.target.clone(),
            cause: Box::new(cause),
            after: format!(
                "and restoring container {id:?} here from checkpoint {reference:?} failed too \
                 ({e}); the checkpoint is kept"
            ),
        },
    }
}

struct Figures {
    bytes_sent: u64,
    size: u64,
    resumed: u32,
}

/// Whether a failed Receive is the connection's loss (worth a new
/// connection) rather than the target's answer: transport failures carry
/// their cause, a target's status does not.
fn is_transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(status.code(), Code::Unavailable | Code::Cancelled)
}

/// Streams checkpoint `reference` to the target until it reports the
/// container running, connecting again and resuming at the acknowledged
/// offset when the connection drops.
async fn send(
    ctrd: &Containerd,
    spec: &MigrateSpec,
    channel: Channel,
    transfer: &str,
    reference: &str,
    event: &mut impl FnMut(MigrateEventKind),
) -> Result<(RestoredTask, Figures), ApiError> {
    let manifest = transfer::plan_export(ctrd, &spec.scope, reference).await?;
    let mut figures = Figures {
        bytes_sent: 0,
        size: manifest.total_size,
        resumed: 0,
    };
    let start = ReceiveStart {
        transfer_id: transfer.to_string(),
        namespace: spec.target_namespace.clone(),
        container_id: spec.target_container_id.clone(),
        checkpoint_ref: reference.to_string(),
    };
    let mut channel = Some(channel);
    let mut last_progress = Instant::now();
    let mut transferred = false;
    loop {
        let attempt = async {
            let channel = match channel.take() {
                Some(c) => c,
                None => client::connect_tcp(&spec.target, spec.tls.as_ref())
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?,
            };
            // Small queues: what is queued when a connection drops is
            // sent again.
            let (tx, rx) = mpsc::channel::<ReceiveRequest>(IN_FLIGHT);
            let _ = tx
                .send(ReceiveRequest {
                    item: Some(ReceiveItem::Start(start.clone())),
                })
                .await;
            let mut replies = MigrationServiceClient::new(channel)
                .receive(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let resume_from = match replies.next().await {
                Some(Ok(ReceiveReply {
                    item: Some(ReplyItem::Acknowledged(offset)),
                })) => offset,
                Some(Ok(other)) => {
                    return Err(Status::internal(format!(
                        "the target answered the start with {other:?}"
                    )))
                }
                Some(Err(s)) => return Err(s),
                None => return Err(Status::unavailable("the target closed the stream")),
            };
            Ok((tx, replies, resume_from))
        }
        .await;
        let (tx, mut replies, resume_from) = match attempt {
            Ok(opened) => opened,
            Err(s) if is_transport_failure(&s) && last_progress.elapsed() < RECONNECT_PATIENCE => {
                log::info!(
                    "migrate: target {} unreachable ({s}); trying again",
                    spec.target
                );
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
            Err(s) => return Err(target_error(spec, s)),
        };
        if figures.bytes_sent > 0 {
            figures.resumed += 1;
            log::info!(
                "migrate: resuming the transfer to {} at offset {resume_from}",
                spec.target
            );
        }
        // The export feeds the connection; what it sent counts once the
        // target has it.
        let (chunks_tx, mut chunks_rx) = mpsc::channel(IN_FLIGHT);
        let exporter = {
            let ctrd = ctrd.clone();
            let scope = spec.scope.clone();
            let manifest = manifest.clone();
            tokio::spawn(async move {
                transfer::export(&ctrd, &scope, &manifest, resume_from, &chunks_tx).await
            })
        };
        let sent = Arc::new(AtomicU64::new(0));
        let forwarder = {
            let sent = sent.clone();
            tokio::spawn(async move {
                while let Some(message) = chunks_rx.recv().await {
                    let item = match message.item {
                        Some(ExportItem::Chunk(c)) => {
                            sent.fetch_add(c.data.len() as u64, Ordering::Relaxed);
                            ReceiveItem::Chunk(c)
                        }
                        Some(ExportItem::Manifest(m)) => ReceiveItem::Manifest(m),
                        None => continue,
                    };
                    if tx.send(ReceiveRequest { item: Some(item) }).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut acknowledged = resume_from;
        let outcome = loop {
            match replies.next().await {
                Some(Ok(ReceiveReply {
                    item: Some(ReplyItem::Acknowledged(offset)),
                })) => {
                    if offset > acknowledged {
                        last_progress = Instant::now();
                    }
                    acknowledged = offset;
                    if offset == manifest.total_size && !transferred {
                        transferred = true;
                        event(MigrateEventKind::Stage(MigrateStage::Transferred as i32));
                    }
                    event(MigrateEventKind::BytesSent(offset));
                }
                Some(Ok(ReceiveReply {
                    item: Some(ReplyItem::Running(task)),
                })) => break Ok(task),
                Some(Ok(_)) => {}
                Some(Err(s)) => break Err(s),
                None => break Err(Status::unavailable("the target closed the stream")),
            }
        };
        exporter.abort();
        let exported = exporter.await;
        forwarder.abort();
        // What left on a dropped connection counts as sent, acknowledged
        // or not.
        figures.bytes_sent += sent.load(Ordering::Relaxed);
        if let Ok(Err(e)) = exported {
            return Err(e);
        }
        match outcome {
            Ok(task) => return Ok((task, figures)),
            Err(s) if is_transport_failure(&s) && last_progress.elapsed() < RECONNECT_PATIENCE => {
                log::info!(
                    "migrate: the connection to {} dropped at offset {acknowledged} ({s}); \
                     connecting again",
                    spec.target
                );
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            Err(s) => return Err(target_error(spec, s)),
        }
    }
}

fn target_error(spec: &MigrateSpec, status: Status) -> ApiError {
    if is_transport_failure(&status) {
        ApiError::TargetUnavailable {
            target: spec.target.clone(),
            detail: format!(
                "{} (gave up after {RECONNECT_PATIENCE:?})",
                status.message()
            ),
        }
    } else {
        ApiError::containerd(format!("target {}", spec.target), status)
    }
}

/// The target's transfers that lost their connection, kept for
/// [`RESUME_WINDOW`] by transfer id.
#[derive(Clone, Default)]
pub struct Receiving {
    parked: Arc<Mutex<HashMap<String, (u64, Import)>>>,
    /// Transfers a connection serves now.
    active: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// How long a new connection of a transfer waits for the transfer's old
/// connection (which the source gave up on) to be seen dropped.
const TAKEOVER_PATIENCE: Duration = Duration::from_secs(10);

impl Receiving {
    /// Serves one connection of a source's `Receive`: replies go to `tx`.
    pub async fn serve(
        &self,
        ctrd: Containerd,
        mut inbound: Streaming<ReceiveRequest>,
        tx: mpsc::Sender<Result<ReceiveReply, Status>>,
    ) {
        let start = match inbound.next().await {
            Some(Ok(ReceiveRequest {
                item: Some(ReceiveItem::Start(start)),
            })) => start,
            _ => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "a Receive stream must start with its start message",
                    )))
                    .await;
                return;
            }
        };
        // The source may come back before this side has seen its old
        // connection drop: wait for that connection to park the import.
        let deadline = Instant::now() + TAKEOVER_PATIENCE;
        while !self.active.lock().await.insert(start.transfer_id.clone()) {
            if Instant::now() > deadline {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "transfer {} is still served on another connection",
                        start.transfer_id
                    ))))
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.serve_transfer(ctrd, start.clone(), inbound, tx).await;
        self.active.lock().await.remove(&start.transfer_id);
    }

    async fn serve_transfer(
        &self,
        ctrd: Containerd,
        start: ReceiveStart,
        mut inbound: Streaming<ReceiveRequest>,
        tx: mpsc::Sender<Result<ReceiveReply, Status>>,
    ) {
        let parked = self.parked.lock().await.remove(&start.transfer_id);
        let mut import = match parked {
            Some((_, import)) => {
                log::info!(
                    "receive {}: resumed at offset {}",
                    start.transfer_id,
                    import.offset()
                );
                import
            }
            None => match begin(&ctrd, &start).await {
                Ok(import) => import,
                Err(e) => {
                    log::warn!("receive {}: {e}", start.transfer_id);
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
        };
        let ack = |offset| ReceiveReply {
            item: Some(ReplyItem::Acknowledged(offset)),
        };
        let _ = tx.send(Ok(ack(import.offset()))).await;
        loop {
            let message = match inbound.next().await {
                Some(Ok(m)) => m,
                // The connection dropped: keep the import for a resume.
                Some(Err(_)) | None => {
                    self.park(start.transfer_id.clone(), import).await;
                    return;
                }
            };
            let result = match message.item {
                Some(ReceiveItem::Chunk(chunk)) => import.chunk(chunk).await.map(|()| None),
                Some(ReceiveItem::Manifest(manifest)) => import.finish(manifest).await.map(Some),
                Some(ReceiveItem::Start(_)) | None => Err(ApiError::BadStream(
                    "a second start in a Receive stream".into(),
                )),
            };
            match result {
                Ok(None) => {
                    if tx.send(Ok(ack(import.offset()))).await.is_err() {
                        self.park(start.transfer_id.clone(), import).await;
                        return;
                    }
                }
                Ok(Some(_imported)) => {
                    let _ = tx.send(Ok(ack(import.offset()))).await;
                    let reply = restore(&ctrd, &start).await;
                    if let Err(e) = &reply {
                        log::warn!("receive {}: {e}", start.transfer_id);
                    }
                    let _ = tx.send(reply.map_err(Status::from)).await;
                    return;
                }
                Err(e) => {
                    log::warn!("receive {}: {e}", start.transfer_id);
                    import.abandon().await;
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }

    /// Keeps `import` for a resume; drops it if none comes in time.
    async fn park(&self, transfer_id: String, import: Import) {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "receive {transfer_id}: connection lost at offset {}; kept {RESUME_WINDOW:?} for a resume",
            import.offset()
        );
        self.parked
            .lock()
            .await
            .insert(transfer_id.clone(), (generation, import));
        let parked = self.parked.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESUME_WINDOW).await;
            let mut map = parked.lock().await;
            if map.get(&transfer_id).is_some_and(|(g, _)| *g == generation) {
                if let Some((_, import)) = map.remove(&transfer_id) {
                    drop(map);
                    log::warn!("receive {transfer_id}: not resumed in {RESUME_WINDOW:?}; dropped");
                    import.abandon().await;
                }
            }
        });
    }
}

/// A new transfer: the container id must be free, then the import starts.
async fn begin(ctrd: &Containerd, start: &ReceiveStart) -> Result<Import, ApiError> {
    crate::reference::check_container_id("container_id", &start.container_id)?;
    let scope = Scope::new(&start.namespace);
    match checkpoint::get_container(ctrd, &scope, &start.container_id).await {
        Ok(_) => {
            return Err(ApiError::AlreadyExists {
                namespace: scope.namespace.clone(),
                what: format!("container {:?}", start.container_id),
            })
        }
        Err(ApiError::ContainerNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    Import::begin(ctrd, &start.namespace, &start.checkpoint_ref).await
}

/// Restores the imported checkpoint as the container, then deletes the
/// checkpoint; a failed restore removes what it made, and the checkpoint.
async fn restore(ctrd: &Containerd, start: &ReceiveStart) -> Result<ReceiveReply, ApiError> {
    let scope = Scope::new(&start.namespace);
    let result = checkpoint::restore(
        ctrd,
        &RestoreSpec {
            scope: scope.clone(),
            reference: start.checkpoint_ref.clone(),
            new_container_id: start.container_id.clone(),
            apply_rw_layer: true,
        },
        |_| {},
    )
    .await;
    if let Err(e) = checkpoint::delete(ctrd, &scope, &start.checkpoint_ref).await {
        log::warn!(
            "receive {}: deleting the imported checkpoint {:?}: {e}",
            start.transfer_id,
            start.checkpoint_ref
        );
    }
    let restored = result?;
    log::info!(
        "receive {}: container {:?} runs, pid {}",
        start.transfer_id,
        start.container_id,
        restored.pid
    );
    Ok(ReceiveReply {
        item: Some(ReplyItem::Running(RestoredTask {
            container_id: start.container_id.clone(),
            pid: restored.pid,
            restore_ms: restored.elapsed_ms,
        })),
    })
}

/// `event` as a MigrateEvent.
pub fn migrate_event(event: MigrateEventKind) -> MigrateEvent {
    MigrateEvent { event: Some(event) }
}
