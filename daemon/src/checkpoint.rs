//! Checkpoint and restore of containers through containerd: what the
//! `Checkpoint`, `Restore`, `ListCheckpoints`, `InspectCheckpoint` and
//! `DeleteCheckpoint` RPCs do, step by step, in containerd's own terms
//! (containers, tasks, images, content, snapshots). The RPC layer
//! ([`crate::service`]) only validates and streams.
//!
//! The dump itself runs in the container's shim (`io.containerd.cowsnap.v1`),
//! which containerd asks through `Tasks.Checkpoint`; this module never
//! ptraces or execs the engine for a dump.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    ViewSnapshotRequest,
};
use containerd_client::services::v1::{ApplyRequest, DiffRequest};
use containerd_client::services::v1::{
    CheckpointTaskRequest, Container, CreateContainerRequest, CreateImageRequest,
    CreateTaskRequest, DeleteContainerRequest, DeleteImageRequest, DeleteTaskRequest,
    GetContainerRequest, GetImageRequest, GetRequest, Image, KillRequest, ListImagesRequest,
    StartRequest, WaitRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::Descriptor;
use prost::Message;
use prost_types::Any;
use tonic::Code;

use crate::ctrd::{Containerd, Scope};
use crate::error::ApiError;
use crate::layout::{self, OciDescriptor, OciIndex, Platform};
use crate::progress::{self, ProgressTail};
use crate::proto::{CheckpointBlob, CheckpointInfo, DumpProgress};

/// The runtime whose containers cowsnapd checkpoints.
pub const RUNTIME_NAME: &str = "io.containerd.cowsnap.v1";

/// runc's `CheckpointOptions` (containerd.runc.v1), which the shim
/// accepts; only the fields cowsnapd sets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuncCheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
}
/// How long a task the checkpoint ended may take to be reported stopped.
const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
const RUNC_CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

pub struct CheckpointSpec {
    pub scope: Scope,
    pub container_id: String,
    pub leave_running: bool,
    pub reference: String,
    /// Also store the container's writable layer (as `ctr container
    /// checkpoint --rw`).
    pub include_rw_layer: bool,
}

/// A step of a checkpoint or restore, reported as it ends.
pub enum Step {
    Dumping,
    /// The engine's figures while it dumps (between `Dumping` and
    /// `Dumped`).
    Progress(DumpProgress),
    Dumped,
    RwLayerStored,
    TaskStopped,
    ContainerCreated,
    TaskCreated,
}

/// Checkpoints `spec.container_id` into image `spec.reference`, calling
/// `step` as it goes.
pub async fn checkpoint(
    ctrd: &Containerd,
    spec: &CheckpointSpec,
    mut step: impl FnMut(Step),
) -> Result<CheckpointInfo, ApiError> {
    let scope = &spec.scope;
    let id = &spec.container_id;
    let container = check_checkpointable(ctrd, scope, id).await?;
    match ctrd
        .images()
        .get(scope.request(GetImageRequest {
            name: spec.reference.clone(),
        }))
        .await
    {
        Ok(_) => {
            return Err(ApiError::AlreadyExists {
                namespace: scope.namespace.clone(),
                what: format!("image {:?}", spec.reference),
            })
        }
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => {
            return Err(ApiError::containerd(
                format!("look up image {:?}", spec.reference),
                s,
            ))
        }
    }

    let leased = ctrd.begin_lease(&scope.namespace, "checkpoint").await?;
    let result = store_checkpoint(ctrd, &leased, spec, &container, &mut step).await;
    ctrd.end_lease(&leased).await;
    let info = result?;
    if !spec.leave_running {
        stop_task(ctrd, scope, id).await?;
        step(Step::TaskStopped);
    }
    Ok(info)
}

/// Container `id`, checked to be of this runtime with a running (or
/// paused) task: FAILED_PRECONDITION otherwise, NOT_FOUND if absent.
pub async fn check_checkpointable(
    ctrd: &Containerd,
    scope: &Scope,
    id: &str,
) -> Result<Container, ApiError> {
    let container = get_container(ctrd, scope, id).await?;
    let id = &container.id;
    let runtime = container.runtime.clone().unwrap_or_default();
    if runtime.name != RUNTIME_NAME {
        return Err(ApiError::OtherRuntime {
            id: id.clone(),
            runtime: runtime.name,
            expected: RUNTIME_NAME,
        });
    }
    let task = ctrd
        .tasks()
        .get(scope.request(GetRequest {
            container_id: id.clone(),
            exec_id: String::new(),
        }))
        .await;
    match task {
        Ok(t) => {
            let status = t.into_inner().process.map_or(0, |p| p.status);
            if status != TaskStatus::Running as i32 && status != TaskStatus::Paused as i32 {
                let name = TaskStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
                return Err(ApiError::NoRunningTask {
                    id: id.clone(),
                    detail: format!(" (its task is {name})"),
                });
            }
        }
        Err(s) if s.code() == Code::NotFound => {
            return Err(ApiError::NoRunningTask {
                id: id.clone(),
                detail: String::new(),
            })
        }
        Err(s) => {
            return Err(ApiError::containerd(
                format!("get the task of container {id:?}"),
                s,
            ))
        }
    }
    Ok(container)
}

async fn store_checkpoint(
    ctrd: &Containerd,
    scope: &Scope,
    spec: &CheckpointSpec,
    container: &Container,
    step: &mut impl FnMut(Step),
) -> Result<CheckpointInfo, ApiError> {
    let id = &spec.container_id;
    let platform = Platform::host();
    let mut index = OciIndex::new();
    let runtime = container.runtime.clone().unwrap_or_default();
    index.annotations.extend([
        (
            layout::ANNOTATION_IMAGE.to_string(),
            container.image.clone(),
        ),
        (layout::ANNOTATION_RUNTIME.to_string(), runtime.name.clone()),
        (
            layout::ANNOTATION_SNAPSHOTTER.to_string(),
            container.snapshotter.clone(),
        ),
        (layout::ANNOTATION_CONTAINER.to_string(), id.clone()),
    ]);
    let with_platform = |d: Descriptor| OciDescriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
        platform: Some(platform.clone()),
    };
    if let Some(options) = &runtime.options {
        let blob = ctrd
            .write_blob(
                scope,
                &format!("{id}-runtime-options"),
                layout::MEDIA_TYPE_RUNTIME_OPTIONS,
                options.encode_to_vec(),
                HashMap::new(),
            )
            .await?;
        index.manifests.push(with_platform(blob));
    }

    let options = Any {
        type_url: RUNC_CHECKPOINT_OPTIONS_TYPE.to_string(),
        value: RuncCheckpointOptions {
            exit: !spec.leave_running,
            file_locks: true,
        }
        .encode_to_vec(),
    };
    step(Step::Dumping);
    let tail = ProgressTail::create(
        Path::new(cowsnap::dump::progress::CONTAINER_LOG_DIR),
        &scope.namespace,
        id,
    )
    .await;
    let mut tasks = ctrd.tasks();
    let call = tasks.checkpoint(scope.request(CheckpointTaskRequest {
        container_id: id.clone(),
        parent_checkpoint: String::new(),
        options: Some(options.clone()),
    }));
    let dumped = progress::follow(call, tail, |p| step(Step::Progress(p)))
        .await
        .map_err(|s| ApiError::containerd(format!("checkpoint container {id:?}"), s))?
        .into_inner();
    if dumped.descriptors.is_empty() {
        return Err(ApiError::Internal(format!(
            "containerd stored no checkpoint of container {id:?}"
        )));
    }
    index
        .manifests
        .extend(dumped.descriptors.into_iter().map(with_platform));
    step(Step::Dumped);
    if spec.include_rw_layer {
        // After the dump: the files are as the processes left them.
        let layer = rw_layer_diff(ctrd, scope, container).await?;
        index.manifests.push(with_platform(layer));
        step(Step::RwLayerStored);
    }
    let blob = ctrd
        .write_blob(
            scope,
            &format!("{id}-checkpoint-options"),
            layout::MEDIA_TYPE_OPTIONS,
            options.encode_to_vec(),
            HashMap::new(),
        )
        .await?;
    index.manifests.push(with_platform(blob));

    let json = serde_json::to_vec(&index)
        .map_err(|e| ApiError::Internal(format!("encode the checkpoint index: {e}")))?;
    let target = ctrd
        .write_blob(
            scope,
            &format!("{id}-index"),
            layout::MEDIA_TYPE_INDEX,
            json,
            index.gc_labels(),
        )
        .await?;
    let image = ctrd
        .images()
        .create(scope.request(CreateImageRequest {
            image: Some(Image {
                name: spec.reference.clone(),
                labels: HashMap::new(),
                target: Some(target),
                created_at: None,
                updated_at: None,
            }),
            source_date_epoch: None,
        }))
        .await
        .map_err(|s| {
            ApiError::containerd(format!("create checkpoint image {:?}", spec.reference), s)
        })?
        .into_inner()
        .image
        .unwrap_or_default();
    Ok(checkpoint_info(&image, &index))
}

/// The container's writable layer as a gzip tar diff in the content store
/// (what containerd's `rootfs.CreateDiff` makes for `ctr container
/// checkpoint --rw`): its snapshot against a view of its parent.
async fn rw_layer_diff(
    ctrd: &Containerd,
    scope: &Scope,
    container: &Container,
) -> Result<Descriptor, ApiError> {
    let id = &container.id;
    let snapshotter = &container.snapshotter;
    let key = &container.snapshot_key;
    let info = ctrd
        .snapshots()
        .stat(scope.request(StatSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: key.clone(),
        }))
        .await
        .map_err(|s| ApiError::containerd(format!("stat snapshot {key:?}"), s))?
        .into_inner()
        .info
        .unwrap_or_default();
    let view = format!("{key}-cowsnapd-rw-view-{}", std::process::id());
    let lower = ctrd
        .snapshots()
        .view(scope.request(ViewSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: view.clone(),
            parent: info.parent.clone(),
            labels: HashMap::new(),
        }))
        .await
        .map_err(|s| ApiError::containerd(format!("view snapshot {:?}", info.parent), s))?
        .into_inner()
        .mounts;
    let upper = ctrd
        .snapshots()
        .mounts(scope.request(MountsRequest {
            snapshotter: snapshotter.clone(),
            key: key.clone(),
        }))
        .await
        .map_err(|s| ApiError::containerd(format!("mounts of snapshot {key:?}"), s));
    let diff = match upper {
        Ok(upper) => ctrd
            .diff()
            .diff(scope.request(DiffRequest {
                left: lower,
                right: upper.into_inner().mounts,
                media_type: layout::MEDIA_TYPE_RW_LAYER.to_string(),
                r#ref: format!("checkpoint-rw-{key}"),
                labels: HashMap::new(),
                source_date_epoch: None,
            }))
            .await
            .map_err(|s| {
                ApiError::containerd(format!("diff the writable layer of container {id:?}"), s)
            }),
        Err(e) => Err(e),
    };
    let _ = ctrd
        .snapshots()
        .remove(scope.request(RemoveSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: view,
        }))
        .await;
    diff?.into_inner().diff.ok_or_else(|| {
        ApiError::Internal(format!(
            "containerd's diff of container {id:?} returned no descriptor"
        ))
    })
}

/// Ends the task the checkpoint left to exit and deletes it (the
/// container stays, as after `ctr task checkpoint --exit`).
async fn stop_task(ctrd: &Containerd, scope: &Scope, id: &str) -> Result<(), ApiError> {
    // The engine kills the tree once the image is complete; SIGKILL in
    // case the task outlived it (an error: it is gone already).
    let _ = ctrd
        .tasks()
        .kill(scope.request(KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: libc::SIGKILL as u32,
            all: true,
        }))
        .await;
    let mut tasks = ctrd.tasks();
    let wait = tasks.wait(scope.request(WaitRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
    }));
    if tokio::time::timeout(STOP_PATIENCE, wait).await.is_err() {
        log::warn!("task of container {id:?} did not end within {STOP_PATIENCE:?} of SIGKILL");
    }
    ctrd.tasks()
        .delete(scope.request(DeleteTaskRequest {
            container_id: id.to_string(),
        }))
        .await
        .map_err(|s| ApiError::containerd(format!("delete the task of container {id:?}"), s))?;
    Ok(())
}

pub struct RestoreSpec {
    pub scope: Scope,
    pub reference: String,
    pub new_container_id: String,
    /// Apply the checkpoint's writable layer to the new rootfs (as `ctr
    /// container restore --rw`); FAILED_PRECONDITION if it has none.
    pub apply_rw_layer: bool,
}

/// What was restored.
pub struct Restored {
    pub pid: u32,
    pub elapsed_ms: u64,
}

/// Creates container `spec.new_container_id` from checkpoint
/// `spec.reference` and starts its task from the checkpoint. A failure
/// removes what was created.
pub async fn restore(
    ctrd: &Containerd,
    spec: &RestoreSpec,
    mut step: impl FnMut(Step),
) -> Result<Restored, ApiError> {
    let started = Instant::now();
    let scope = &spec.scope;
    let id = &spec.new_container_id;
    let (_image, index) = get_checkpoint(ctrd, scope, &spec.reference).await?;
    if let Some(reason) = index.not_restorable() {
        return Err(ApiError::NotACheckpoint {
            reference: spec.reference.clone(),
            reason,
        });
    }
    match ctrd
        .containers()
        .get(scope.request(GetContainerRequest { id: id.clone() }))
        .await
    {
        Ok(_) => {
            return Err(ApiError::AlreadyExists {
                namespace: scope.namespace.clone(),
                what: format!("container {id:?}"),
            })
        }
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(ApiError::containerd(format!("look up container {id:?}"), s)),
    }
    let annotation = |key: &str| index.annotations.get(key).cloned().unwrap_or_default();
    let image_name = annotation(layout::ANNOTATION_IMAGE);
    let snapshotter = annotation(layout::ANNOTATION_SNAPSHOTTER);
    let runtime_name = annotation(layout::ANNOTATION_RUNTIME);
    let blob = |media_type: &str| index.by_media_type(media_type).cloned();
    let config = blob(layout::MEDIA_TYPE_CONFIG).expect("checked by not_restorable");
    let criu = blob(layout::MEDIA_TYPE_CHECKPOINT).expect("checked by not_restorable");
    let spec_any = decode_any(ctrd, scope, &config, &spec.reference).await?;
    let runtime_options = match blob(layout::MEDIA_TYPE_RUNTIME_OPTIONS) {
        Some(d) => Some(decode_any(ctrd, scope, &d, &spec.reference).await?),
        None => None,
    };
    let parent = rootfs_chain_id(ctrd, scope, &spec.reference, &image_name).await?;
    let rw_layer = match (spec.apply_rw_layer, index.rw_layer()) {
        (false, _) => None,
        (true, Some(layer)) => Some(layer.clone()),
        (true, None) => {
            return Err(ApiError::NoRwLayer {
                reference: spec.reference.clone(),
            })
        }
    };

    let leased = ctrd.begin_lease(&scope.namespace, "restore").await?;
    let mut created = Created::default();
    let result = async {
        ctrd.snapshots()
            .prepare(leased.request(PrepareSnapshotRequest {
                snapshotter: snapshotter.clone(),
                key: id.clone(),
                parent: parent.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(|s| {
                ApiError::containerd(
                    format!("prepare snapshot {id:?} on {parent} ({snapshotter})"),
                    s,
                )
            })?;
        created.snapshot = Some(snapshotter.clone());
        ctrd.containers()
            .create(leased.request(CreateContainerRequest {
                container: Some(Container {
                    id: id.clone(),
                    image: image_name.clone(),
                    runtime: Some(Runtime {
                        name: runtime_name.clone(),
                        options: runtime_options.clone(),
                    }),
                    spec: Some(spec_any.clone()),
                    snapshotter: snapshotter.clone(),
                    snapshot_key: id.clone(),
                    ..Default::default()
                }),
            }))
            .await
            .map_err(|s| ApiError::containerd(format!("create container {id:?}"), s))?;
        created.container = true;
        step(Step::ContainerCreated);
        let mounts = ctrd
            .snapshots()
            .mounts(leased.request(MountsRequest {
                snapshotter: snapshotter.clone(),
                key: id.clone(),
            }))
            .await
            .map_err(|s| ApiError::containerd(format!("mounts of snapshot {id:?}"), s))?
            .into_inner()
            .mounts;
        if let Some(layer) = &rw_layer {
            ctrd.diff()
                .apply(leased.request(ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                        annotations: HashMap::new(),
                    }),
                    mounts: mounts.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(|s| {
                    ApiError::containerd(
                        format!("apply the writable layer {} to {id:?}", layer.digest),
                        s,
                    )
                })?;
        }
        ctrd.tasks()
            .create(leased.request(task_from_checkpoint(id, mounts, &criu)))
            .await
            .map_err(|s| {
                ApiError::containerd(
                    format!(
                        "create the task of container {id:?} from {:?}",
                        spec.reference
                    ),
                    s,
                )
            })?;
        created.task = true;
        step(Step::TaskCreated);
        let started = ctrd
            .tasks()
            .start(leased.request(StartRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| {
                ApiError::containerd(
                    format!("restore container {id:?} from {:?}", spec.reference),
                    s,
                )
            })?
            .into_inner();
        Ok(started.pid)
    }
    .await;
    if result.is_err() {
        created.remove(ctrd, scope, id).await;
    }
    ctrd.end_lease(&leased).await;
    Ok(Restored {
        pid: result?,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Restores the task of the existing container `id` (whose task a
/// checkpoint ended) from checkpoint `reference`, on the container's own
/// rootfs snapshot: how a failed migration puts the source back.
/// A task of container `id` on `rootfs`, created from task checkpoint `criu`.
fn task_from_checkpoint(
    id: &str,
    rootfs: Vec<containerd_client::types::Mount>,
    criu: &OciDescriptor,
) -> CreateTaskRequest {
    CreateTaskRequest {
        container_id: id.to_string(),
        rootfs,
        checkpoint: Some(Descriptor {
            media_type: criu.media_type.clone(),
            digest: criu.digest.clone(),
            size: criu.size,
            annotations: HashMap::new(),
        }),
        ..Default::default()
    }
}

pub async fn restore_in_place(
    ctrd: &Containerd,
    scope: &Scope,
    id: &str,
    reference: &str,
) -> Result<Restored, ApiError> {
    let started = Instant::now();
    let (_image, index) = get_checkpoint(ctrd, scope, reference).await?;
    let criu = index
        .by_media_type(layout::MEDIA_TYPE_CHECKPOINT)
        .cloned()
        .expect("a checkpoint's index has a task checkpoint");
    let container = get_container(ctrd, scope, id).await?;
    let mounts = ctrd
        .snapshots()
        .mounts(scope.request(MountsRequest {
            snapshotter: container.snapshotter.clone(),
            key: container.snapshot_key.clone(),
        }))
        .await
        .map_err(|s| {
            ApiError::containerd(
                format!("mounts of snapshot {:?}", container.snapshot_key),
                s,
            )
        })?
        .into_inner()
        .mounts;
    ctrd.tasks()
        .create(scope.request(task_from_checkpoint(id, mounts, &criu)))
        .await
        .map_err(|s| {
            ApiError::containerd(
                format!("create the task of container {id:?} from {reference:?}"),
                s,
            )
        })?;
    let task = Created {
        snapshot: None,
        container: false,
        task: true,
    };
    match ctrd
        .tasks()
        .start(scope.request(StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
    {
        Ok(started_task) => Ok(Restored {
            pid: started_task.into_inner().pid,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }),
        Err(s) => {
            task.remove(ctrd, scope, id).await;
            Err(ApiError::containerd(
                format!("restore container {id:?} from {reference:?}"),
                s,
            ))
        }
    }
}

/// Deletes container `id` (its task is gone) and its rootfs snapshot.
pub async fn remove_container(ctrd: &Containerd, scope: &Scope, id: &str) -> Result<(), ApiError> {
    let container = get_container(ctrd, scope, id).await?;
    ctrd.containers()
        .delete(scope.request(DeleteContainerRequest { id: id.to_string() }))
        .await
        .map_err(|s| ApiError::containerd(format!("delete container {id:?}"), s))?;
    if !container.snapshot_key.is_empty() {
        ctrd.snapshots()
            .remove(scope.request(RemoveSnapshotRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            }))
            .await
            .map_err(|s| {
                ApiError::containerd(
                    format!(
                        "remove snapshot {:?} of container {id:?}",
                        container.snapshot_key
                    ),
                    s,
                )
            })?;
    }
    Ok(())
}

/// What a failed restore had created, removed in reverse order.
#[derive(Default)]
struct Created {
    snapshot: Option<String>,
    container: bool,
    task: bool,
}

impl Created {
    async fn remove(&self, ctrd: &Containerd, scope: &Scope, id: &str) {
        if self.task {
            let _ = ctrd
                .tasks()
                .kill(scope.request(KillRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                    signal: libc::SIGKILL as u32,
                    all: true,
                }))
                .await;
            if let Err(s) = ctrd
                .tasks()
                .delete(scope.request(DeleteTaskRequest {
                    container_id: id.to_string(),
                }))
                .await
            {
                log::warn!("failed restore: delete task {id:?}: {}", s.message());
            }
        }
        if self.container {
            if let Err(s) = ctrd
                .containers()
                .delete(scope.request(DeleteContainerRequest { id: id.to_string() }))
                .await
            {
                log::warn!("failed restore: delete container {id:?}: {}", s.message());
            }
        }
        if let Some(snapshotter) = &self.snapshot {
            if let Err(s) = ctrd
                .snapshots()
                .remove(scope.request(RemoveSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: id.to_string(),
                }))
                .await
            {
                log::warn!("failed restore: remove snapshot {id:?}: {}", s.message());
            }
        }
    }
}

pub async fn get_container(
    ctrd: &Containerd,
    scope: &Scope,
    id: &str,
) -> Result<Container, ApiError> {
    match ctrd
        .containers()
        .get(scope.request(GetContainerRequest { id: id.to_string() }))
        .await
    {
        Ok(r) => r.into_inner().container.ok_or_else(|| {
            ApiError::Internal(format!(
                "containerd returned no record for container {id:?}"
            ))
        }),
        Err(s) if s.code() == Code::NotFound => Err(ApiError::ContainerNotFound {
            namespace: scope.namespace.clone(),
            id: id.to_string(),
        }),
        Err(s) => Err(ApiError::containerd(format!("get container {id:?}"), s)),
    }
}

/// The image `reference` and its index, or NOT_FOUND / INVALID_ARGUMENT
/// (not an index).
pub async fn get_checkpoint(
    ctrd: &Containerd,
    scope: &Scope,
    reference: &str,
) -> Result<(Image, OciIndex), ApiError> {
    let image = match ctrd
        .images()
        .get(scope.request(GetImageRequest {
            name: reference.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().image.unwrap_or_default(),
        Err(s) if s.code() == Code::NotFound => {
            return Err(ApiError::CheckpointNotFound {
                namespace: scope.namespace.clone(),
                reference: reference.to_string(),
            })
        }
        Err(s) => return Err(ApiError::containerd(format!("get image {reference:?}"), s)),
    };
    let index = read_checkpoint_index(ctrd, scope, &image)
        .await?
        .map_err(|reason| ApiError::NotACheckpoint {
            reference: reference.to_string(),
            reason,
        })?;
    Ok((image, index))
}

/// The index of `image` if it is a checkpoint (an index with a task
/// checkpoint in it), else why not.
async fn read_checkpoint_index(
    ctrd: &Containerd,
    scope: &Scope,
    image: &Image,
) -> Result<Result<OciIndex, String>, ApiError> {
    let target = image.target.clone().unwrap_or_default();
    if !layout::is_index_media_type(&target.media_type) {
        return Ok(Err(format!(
            "its target is a {}, not an index",
            target.media_type
        )));
    }
    let bytes = ctrd.read_blob(scope, &target.digest).await?;
    let index: OciIndex = match serde_json::from_slice(&bytes) {
        Ok(i) => i,
        Err(e) => {
            return Ok(Err(format!(
                "its index {} does not parse: {e}",
                target.digest
            )))
        }
    };
    if index.by_media_type(layout::MEDIA_TYPE_CHECKPOINT).is_none() {
        return Ok(Err(format!(
            "its index has no {}",
            layout::MEDIA_TYPE_CHECKPOINT
        )));
    }
    Ok(Ok(index))
}

async fn decode_any(
    ctrd: &Containerd,
    scope: &Scope,
    blob: &OciDescriptor,
    reference: &str,
) -> Result<Any, ApiError> {
    let bytes = ctrd.read_blob(scope, &blob.digest).await?;
    Any::decode(bytes.as_slice()).map_err(|e| ApiError::NotACheckpoint {
        reference: reference.to_string(),
        reason: format!(
            "its {} blob {} does not decode: {e}",
            blob.media_type, blob.digest
        ),
    })
}

/// The snapshot parent of a container made from `image_name`: the chain
/// id of the image's layers for this platform.
async fn rootfs_chain_id(
    ctrd: &Containerd,
    scope: &Scope,
    reference: &str,
    image_name: &str,
) -> Result<String, ApiError> {
    let missing = || ApiError::MissingImage {
        namespace: scope.namespace.clone(),
        reference: reference.to_string(),
        image: image_name.to_string(),
    };
    let image = match ctrd
        .images()
        .get(scope.request(GetImageRequest {
            name: image_name.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().image.unwrap_or_default(),
        Err(s) if s.code() == Code::NotFound => return Err(missing()),
        Err(s) => return Err(ApiError::containerd(format!("get image {image_name:?}"), s)),
    };
    let mut target = image.target.unwrap_or_default();
    let bad = |what: String| ApiError::Internal(format!("image {image_name:?}: {what}"));
    if layout::is_index_media_type(&target.media_type) {
        let bytes = ctrd.read_blob(scope, &target.digest).await?;
        let index: OciIndex = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("index {}: {e}", target.digest)))?;
        let host = Platform::host();
        let manifest = index
            .manifests
            .iter()
            .find(|m| m.platform.as_ref() == Some(&host))
            .or_else(|| index.manifests.first())
            .ok_or_else(|| bad("its index lists no manifest".to_string()))?;
        target.digest = manifest.digest.clone();
    }
    let bytes = ctrd.read_blob(scope, &target.digest).await?;
    let manifest: layout::OciManifest = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("manifest {}: {e}", target.digest)))?;
    let bytes = ctrd.read_blob(scope, &manifest.config.digest).await?;
    let config: layout::ImageConfig = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("config {}: {e}", manifest.config.digest)))?;
    layout::chain_id(&config.rootfs.diff_ids).ok_or_else(|| bad("it has no layers".to_string()))
}

/// Every checkpoint of the namespace: images whose target is an index
/// with a task checkpoint in it.
pub async fn list(ctrd: &Containerd, scope: &Scope) -> Result<Vec<CheckpointInfo>, ApiError> {
    let images = ctrd
        .images()
        .list(scope.request(ListImagesRequest {
            filters: Vec::new(),
        }))
        .await
        .map_err(|s| ApiError::containerd("list images", s))?
        .into_inner()
        .images;
    let mut checkpoints = Vec::new();
    for image in images {
        if let Ok(index) = read_checkpoint_index(ctrd, scope, &image).await? {
            checkpoints.push(checkpoint_info(&image, &index));
        }
    }
    Ok(checkpoints)
}

pub async fn delete(ctrd: &Containerd, scope: &Scope, reference: &str) -> Result<(), ApiError> {
    // Only checkpoints are deleted through this API, never other images.
    get_checkpoint(ctrd, scope, reference).await?;
    ctrd.images()
        .delete(scope.request(DeleteImageRequest {
            name: reference.to_string(),
            // Collect its blobs now, not at containerd's next collection.
            sync: true,
            target: None,
        }))
        .await
        .map_err(|s| ApiError::containerd(format!("delete checkpoint {reference:?}"), s))?;
    Ok(())
}

/// The blobs checkpoint index `index` references, as the API lists them.
pub fn index_blobs(index: &OciIndex) -> Vec<CheckpointBlob> {
    index
        .manifests
        .iter()
        .map(|m| CheckpointBlob {
            media_type: m.media_type.clone(),
            digest: m.digest.clone(),
            size: m.size.max(0) as u64,
        })
        .collect()
}

pub fn checkpoint_info(image: &Image, index: &OciIndex) -> CheckpointInfo {
    let annotation = |key: &str| index.annotations.get(key).cloned().unwrap_or_default();
    let blobs = index_blobs(index);
    CheckpointInfo {
        checkpoint_ref: image.name.clone(),
        digest: image
            .target
            .as_ref()
            .map(|t| t.digest.clone())
            .unwrap_or_default(),
        created_at: image.created_at,
        image: annotation(layout::ANNOTATION_IMAGE),
        runtime: annotation(layout::ANNOTATION_RUNTIME),
        snapshotter: annotation(layout::ANNOTATION_SNAPSHOTTER),
        container_id: annotation(layout::ANNOTATION_CONTAINER),
        size: blobs.iter().map(|b| b.size).sum(),
        blobs,
    }
}
