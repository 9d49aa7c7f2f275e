//! The tonic services of `cowsnap.v1`: each RPC checks its arguments,
//! runs the step functions of [`crate::checkpoint`] and streams their
//! progress. Failures become gRPC statuses through [`ApiError`].

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint::{self, CheckpointSpec, RestoreSpec, Step};
use crate::client::ClientTlsFiles;
use crate::ctrd::{Containerd, Scope};
use crate::error::ApiError;
use crate::layout;
use crate::metrics::{Metrics, Operation};
use crate::migrate::{self, MigrateSpec, Receiving};
use crate::proto::checkpoint_event::Event as CheckpointEventKind;
use crate::proto::checkpoint_service_server::CheckpointService;
use crate::proto::migration_service_server::MigrationService;
use crate::proto::restore_event::Event as RestoreEventKind;
use crate::proto::*;
use crate::reference::{check_container_id, check_existing_reference, check_reference};
use crate::transfer;

/// Events a streaming RPC has produced and not yet sent.
const EVENT_BACKLOG: usize = 16;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The state every RPC shares: the containerd it drives, this agent's
/// identity towards other agents, the transfers it receives.
#[derive(Clone)]
pub struct Agent {
    ctrd: Containerd,
    peer_tls: Option<ClientTlsFiles>,
    receiving: Receiving,
    metrics: Arc<Metrics>,
}

impl Agent {
    pub fn new(ctrd: Containerd) -> Agent {
        Agent {
            ctrd,
            peer_tls: None,
            receiving: Receiving::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// What the RPCs count, for the metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// `status`, counted as a failure of `operation`.
    fn refuse(&self, operation: Operation, status: impl Into<Status>) -> Status {
        let status = status.into();
        self.metrics.failed(operation, status.code());
        status
    }

    /// The certificate, key and CA this agent uses when it calls another
    /// agent (a migration's target) over mutual TLS.
    pub fn with_peer_tls(mut self, tls: Option<ClientTlsFiles>) -> Agent {
        self.peer_tls = tls;
        self
    }
}

/// Runs `work` in a task of its own and streams what it sends on the
/// channel it is given, then its error if it fails: the RPC answers at
/// once and a client that goes away does not stop a half-done checkpoint.
fn stream_events<T, F, Fut>(work: F) -> EventStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::UnboundedSender<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(EVENT_BACKLOG);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<T>();
    let forward = tx.clone();
    tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            if forward.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let result = work(events_tx).await;
        if let Err(e) = result {
            log::warn!("{e}");
            let _ = tx.send(Err(e.into())).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl CheckpointService for Agent {
    type CheckpointStream = EventStream<CheckpointEvent>;
    type RestoreStream = EventStream<RestoreEvent>;
    type ExportCheckpointStream = EventStream<ExportCheckpointResponse>;

    async fn checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<Self::CheckpointStream>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let refuse = |e: ApiError| self.refuse(Operation::Checkpoint, e);
        check_container_id("container_id", &r.container_id).map_err(refuse)?;
        check_reference(&r.checkpoint_ref).map_err(refuse)?;
        let spec = CheckpointSpec {
            include_rw_layer: r.options.as_ref().is_some_and(|o| o.include_rw_layer),
            scope: Scope::new(&r.namespace),
            container_id: r.container_id,
            leave_running: r.leave_running,
            reference: r.checkpoint_ref,
        };
        log::info!(
            "checkpoint container {:?} of namespace {:?} as {:?}",
            spec.container_id,
            spec.scope.namespace,
            spec.reference
        );
        let ctrd = self.ctrd.clone();
        let metrics = self.metrics.clone();
        Ok(Response::new(stream_events(move |events| async move {
            let send = |event| {
                let _ = events.send(CheckpointEvent { event: Some(event) });
            };
            let mut frozen_ms = None;
            let result = checkpoint::checkpoint(&ctrd, &spec, |step| {
                let stage = match step {
                    Step::Dumping => CheckpointStage::Dumping,
                    Step::Progress(p) => {
                        frozen_ms = Some(p.frozen_ms);
                        return send(CheckpointEventKind::Progress(p));
                    }
                    Step::Dumped => CheckpointStage::Dumped,
                    Step::RwLayerStored => CheckpointStage::RwLayerStored,
                    Step::TaskStopped => CheckpointStage::TaskStopped,
                    Step::ContainerCreated | Step::TaskCreated => return,
                };
                send(CheckpointEventKind::Stage(stage as i32));
            })
            .await;
            let info = result.inspect_err(|e| metrics.failed(Operation::Checkpoint, e.code()))?;
            if let Some(ms) = frozen_ms {
                metrics.dump_frozen(ms);
            }
            metrics.checkpointed(started.elapsed(), info.size);
            send(CheckpointEventKind::Done(info));
            Ok(())
        })))
    }

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let refuse = |e: ApiError| self.refuse(Operation::Restore, e);
        check_existing_reference(&r.checkpoint_ref).map_err(refuse)?;
        check_container_id("new_container_id", &r.new_container_id).map_err(refuse)?;
        let spec = RestoreSpec {
            apply_rw_layer: r.options.as_ref().is_some_and(|o| o.apply_rw_layer),
            scope: Scope::new(&r.namespace),
            reference: r.checkpoint_ref,
            new_container_id: r.new_container_id,
        };
        log::info!(
            "restore {:?} as container {:?} of namespace {:?}",
            spec.reference,
            spec.new_container_id,
            spec.scope.namespace
        );
        let ctrd = self.ctrd.clone();
        let metrics = self.metrics.clone();
        Ok(Response::new(stream_events(move |events| async move {
            let send = |event| {
                let _ = events.send(RestoreEvent { event: Some(event) });
            };
            let restored = checkpoint::restore(&ctrd, &spec, |step| {
                let stage = match step {
                    Step::ContainerCreated => RestoreStage::ContainerCreated,
                    Step::TaskCreated => RestoreStage::TaskCreated,
                    Step::Dumping
                    | Step::Progress(_)
                    | Step::Dumped
                    | Step::RwLayerStored
                    | Step::TaskStopped => return,
                };
                send(RestoreEventKind::Stage(stage as i32));
            })
            .await
            .inspect_err(|e| metrics.failed(Operation::Restore, e.code()))?;
            metrics.restored(started.elapsed());
            send(RestoreEventKind::Done(RestoredTask {
                container_id: spec.new_container_id.clone(),
                pid: restored.pid,
                restore_ms: restored.elapsed_ms,
            }));
            Ok(())
        })))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let scope = Scope::new(&request.into_inner().namespace);
        let checkpoints = checkpoint::list(&self.ctrd, &scope).await?;
        Ok(Response::new(ListCheckpointsResponse { checkpoints }))
    }

    async fn inspect_checkpoint(
        &self,
        request: Request<InspectCheckpointRequest>,
    ) -> Result<Response<InspectCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_existing_reference(&r.checkpoint_ref)?;
        let scope = Scope::new(&r.namespace);
        let (image, index) =
            checkpoint::get_checkpoint(&self.ctrd, &scope, &r.checkpoint_ref).await?;
        let blob = index
            .by_media_type(layout::MEDIA_TYPE_CHECKPOINT)
            .expect("a checkpoint's index has a task checkpoint");
        let tar = self.ctrd.read_blob(&scope, &blob.digest).await?;
        let reference = r.checkpoint_ref.clone();
        let report = tokio::task::spawn_blocking(move || inspect_tar(&tar, &reference))
            .await
            .map_err(|e| ApiError::Internal(format!("inspect {:?}: {e}", r.checkpoint_ref)))??;
        Ok(Response::new(InspectCheckpointResponse {
            checkpoint: Some(checkpoint::checkpoint_info(&image, &index)),
            image_report_json: report,
        }))
    }

    async fn delete_checkpoint(
        &self,
        request: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_existing_reference(&r.checkpoint_ref)?;
        checkpoint::delete(&self.ctrd, &Scope::new(&r.namespace), &r.checkpoint_ref).await?;
        log::info!("deleted checkpoint {:?}", r.checkpoint_ref);
        Ok(Response::new(DeleteCheckpointResponse {}))
    }

    async fn export_checkpoint(
        &self,
        request: Request<ExportCheckpointRequest>,
    ) -> Result<Response<Self::ExportCheckpointStream>, Status> {
        let r = request.into_inner();
        check_existing_reference(&r.checkpoint_ref)?;
        let scope = Scope::new(&r.namespace);
        let manifest = transfer::plan_export(&self.ctrd, &scope, &r.checkpoint_ref).await?;
        log::info!(
            "export {:?} of namespace {:?} from offset {} ({} blobs, {} bytes)",
            r.checkpoint_ref,
            scope.namespace,
            r.resume_from,
            manifest.blobs.len(),
            manifest.total_size
        );
        let ctrd = self.ctrd.clone();
        let (tx, rx) = mpsc::channel::<Result<ExportCheckpointResponse, Status>>(EVENT_BACKLOG);
        tokio::spawn(async move {
            let (chunks_tx, mut chunks_rx) = mpsc::channel(EVENT_BACKLOG);
            let forward = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(message) = chunks_rx.recv().await {
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let result =
                transfer::export(&ctrd, &scope, &manifest, r.resume_from, &chunks_tx).await;
            drop(chunks_tx);
            let _ = forward.await;
            if let Err(e) = result {
                log::warn!("{e}");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import_checkpoint(
        &self,
        request: Request<Streaming<ImportCheckpointRequest>>,
    ) -> Result<Response<ImportCheckpointResponse>, Status> {
        let stream = request.into_inner();
        let response = transfer::import(&self.ctrd, stream).await.map_err(|e| {
            log::warn!("import: {e}");
            Status::from(e)
        })?;
        if let Some(info) = &response.checkpoint {
            log::info!(
                "imported {:?} ({} bytes)",
                info.checkpoint_ref,
                response.bytes_received
            );
        }
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl MigrationService for Agent {
    type MigrateStream = EventStream<MigrateEvent>;
    type ReceiveStream = EventStream<ReceiveReply>;

    async fn migrate(
        &self,
        request: Request<MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let refuse = |e: ApiError| self.refuse(Operation::Migrate, e);
        check_container_id("container_id", &r.container_id).map_err(refuse)?;
        if r.target.is_empty() {
            return Err(refuse(ApiError::InvalidArgument {
                field: "target",
                value: String::new(),
                reason: "the target agent's address is required (https://host:port)".into(),
            }));
        }
        let options = r.options.unwrap_or_default();
        let target_container_id = if options.target_container_id.is_empty() {
            r.container_id.clone()
        } else {
            check_container_id("options.target_container_id", &options.target_container_id)
                .map_err(refuse)?;
            options.target_container_id
        };
        let scope = Scope::new(&r.namespace);
        let target_namespace = if options.target_namespace.is_empty() {
            scope.namespace.clone()
        } else {
            options.target_namespace
        };
        if self.peer_tls.is_none() && !r.target.starts_with("http://") {
            return Err(refuse(ApiError::InvalidArgument {
                field: "target",
                value: r.target,
                reason: "this cowsnapd has no certificate for mutual TLS with another agent \
                         (start it with --tls-cert, --tls-key and --tls-client-ca), and the \
                         target is not a plain http:// one"
                    .into(),
            }));
        }
        let spec = MigrateSpec {
            scope,
            container_id: r.container_id,
            target: r.target,
            target_namespace,
            target_container_id,
            tls: self.peer_tls.clone(),
        };
        // Checked here, before the stream: the container must be this
        // runtime's and run.
        checkpoint::check_checkpointable(&self.ctrd, &spec.scope, &spec.container_id)
            .await
            .map_err(refuse)?;
        log::info!(
            "migrate container {:?} of namespace {:?} to {} as {:?} of namespace {:?}",
            spec.container_id,
            spec.scope.namespace,
            spec.target,
            spec.target_container_id,
            spec.target_namespace
        );
        let ctrd = self.ctrd.clone();
        let metrics = self.metrics.clone();
        Ok(Response::new(stream_events(move |events| async move {
            let mut frozen_ms = None;
            let result = migrate::migrate(&ctrd, &spec, |event| {
                if let migrate_event::Event::DumpProgress(p) = &event {
                    frozen_ms = Some(p.frozen_ms);
                }
                let _ = events.send(migrate::migrate_event(event));
            })
            .await;
            // The dump's frozen time counts whether or not the rest worked.
            if let Some(ms) = frozen_ms {
                metrics.dump_frozen(ms);
            }
            let result = result.inspect_err(|e| metrics.failed(Operation::Migrate, e.code()))?;
            metrics.migrated(started.elapsed(), result.downtime_ms, result.bytes_sent);
            let _ = events.send(migrate::migrate_event(
                crate::proto::migrate_event::Event::Done(result),
            ));
            Ok(())
        })))
    }

    async fn receive(
        &self,
        request: Request<Streaming<ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(EVENT_BACKLOG);
        let receiving = self.receiving.clone();
        let ctrd = self.ctrd.clone();
        tokio::spawn(async move { receiving.serve(ctrd, inbound, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// `cowsnap inspect --json` of the cowsnap image in checkpoint tar `tar`.
fn inspect_tar(tar: &[u8], reference: &str) -> Result<String, ApiError> {
    let fail =
        |what: String| ApiError::Internal(format!("inspect checkpoint {reference:?}: {what}"));
    let dir = tempfile::Builder::new()
        .prefix("cowsnapd-inspect-")
        .tempdir()
        .map_err(|e| fail(format!("temporary directory: {e}")))?;
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(false);
    archive.unpack(dir.path()).map_err(|e| {
        fail(format!(
            "unpack its checkpoint tar into {}: {e}",
            dir.path().display()
        ))
    })?;
    let image_dir = find_image_dir(dir.path())
        .ok_or_else(|| fail("its checkpoint tar holds no manifest.json".to_string()))?;
    cowsnap::image::inspect::inspect(&image_dir, true).map_err(|e| fail(e.to_string()))
}

/// The directory holding manifest.json: the tar's top or one level down.
fn find_image_dir(top: &Path) -> Option<PathBuf> {
    if top.join("manifest.json").is_file() {
        return Some(top.to_path_buf());
    }
    std::fs::read_dir(top)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").is_file())
}
