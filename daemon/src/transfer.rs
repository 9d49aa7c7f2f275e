//! A checkpoint as a stream of checksummed chunks: what `ExportCheckpoint`
//! sends and `ImportCheckpoint` (and a migration's target) receives.
//!
//! ```text
//! chunk(blob 1, offset 0) … chunk(blob 1, last) … chunk(index, …) … manifest
//!  each chunk: digest, media type, offset in its blob, blob size,
//!              offset in the stream, data, xxh3-64(data)
//!  manifest:   every blob (media type, digest, size) in order, index last
//! ```
//!
//! The blobs come from containerd's content store as `ctr` stored them
//! (the index's blobs, then the index); an import writes them back with
//! containerd's content API under a lease, checks every chunk's xxh3,
//! every blob's sha256 and the manifest against what came, then creates
//! the image record. Any failure aborts the ingest and deletes the lease
//! with a synchronous collection: nothing of a failed import remains.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};
use xxhash_rust::xxh3::xxh3_64;

use containerd_client::services::v1::{CreateImageRequest, GetImageRequest, Image};
use containerd_client::types::Descriptor;

use crate::checkpoint;
use crate::ctrd::{hex_lower, BlobWriter, Containerd, Scope};
use crate::error::ApiError;
use crate::layout::{self, OciIndex};
use crate::proto::export_checkpoint_response::Item as ExportItem;
use crate::proto::import_checkpoint_request::Item as ImportItem;
use crate::proto::{
    CheckpointBlob, CheckpointChunk, CheckpointManifest, ExportCheckpointResponse,
    ImportCheckpointRequest, ImportCheckpointResponse, ImportTarget,
};
use crate::reference::check_reference;

/// Largest chunk data sent (well under gRPC's 4 MiB message limit).
pub const CHUNK_SIZE: usize = 1 << 20;

/// What an export of one checkpoint sends, in order: the index's blobs,
/// then the index.
pub fn manifest_of(image: &Image, index: &OciIndex) -> CheckpointManifest {
    let target = image.target.clone().unwrap_or_default();
    let index_blob = CheckpointBlob {
        media_type: target.media_type,
        digest: target.digest,
        size: target.size.max(0) as u64,
    };
    let mut blobs = crate::checkpoint::index_blobs(index);
    blobs.push(index_blob.clone());
    CheckpointManifest {
        checkpoint_ref: image.name.clone(),
        total_size: blobs.iter().map(|b| b.size).sum(),
        index: Some(index_blob),
        blobs,
    }
}

/// The manifest of checkpoint `reference`, checked to be a checkpoint.
pub async fn plan_export(
    ctrd: &Containerd,
    scope: &Scope,
    reference: &str,
) -> Result<CheckpointManifest, ApiError> {
    let (image, index) = checkpoint::get_checkpoint(ctrd, scope, reference).await?;
    Ok(manifest_of(&image, &index))
}

/// Sends the chunks of `manifest`'s blobs from stream offset
/// `resume_from` on, then the manifest, on `tx`. Returns the bytes of
/// data sent; stops early (Ok) when the receiver is gone.
pub async fn export(
    ctrd: &Containerd,
    scope: &Scope,
    manifest: &CheckpointManifest,
    resume_from: u64,
    tx: &mpsc::Sender<ExportCheckpointResponse>,
) -> Result<u64, ApiError> {
    if resume_from > manifest.total_size {
        return Err(ApiError::InvalidArgument {
            field: "resume_from",
            value: resume_from.to_string(),
            reason: format!(
                "the export of {:?} is {} bytes long",
                manifest.checkpoint_ref, manifest.total_size
            ),
        });
    }
    let mut sent = 0u64;
    let mut blob_start = 0u64;
    for blob in &manifest.blobs {
        let blob_end = blob_start + blob.size;
        if blob_end <= resume_from && !(blob.size == 0 && blob_start == resume_from) {
            blob_start = blob_end;
            continue;
        }
        let mut offset = resume_from.saturating_sub(blob_start);
        let chunk = |offset: u64, data: Vec<u8>| ExportCheckpointResponse {
            item: Some(ExportItem::Chunk(CheckpointChunk {
                digest: blob.digest.clone(),
                media_type: blob.media_type.clone(),
                offset,
                xxh3: xxh3_64(&data),
                data,
                blob_size: blob.size,
                stream_offset: blob_start + offset,
            })),
        };
        if blob.size == 0 {
            if tx.send(chunk(0, Vec::new())).await.is_err() {
                return Ok(sent);
            }
        } else {
            let mut read = ctrd.read_blob_from(scope, &blob.digest, offset).await?;
            let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_SIZE);
            while offset < blob.size {
                let more = read.next().await.transpose().map_err(|s| {
                    ApiError::containerd(format!("read blob {} at {offset}", blob.digest), s)
                })?;
                let last = more.is_none();
                if let Some(r) = more {
                    pending.extend_from_slice(&r.data);
                }
                while pending.len() >= CHUNK_SIZE || (last && !pending.is_empty()) {
                    let take = pending.len().min(CHUNK_SIZE);
                    let data: Vec<u8> = pending.drain(..take).collect();
                    let len = data.len() as u64;
                    if tx.send(chunk(offset, data)).await.is_err() {
                        return Ok(sent);
                    }
                    offset += len;
                    sent += len;
                }
                if last && offset < blob.size {
                    return Err(ApiError::Internal(format!(
                        "blob {} ends at {offset} of its {} bytes in the content store",
                        blob.digest, blob.size
                    )));
                }
            }
        }
        blob_start = blob_end;
    }
    let _ = tx
        .send(ExportCheckpointResponse {
            item: Some(ExportItem::Manifest(manifest.clone())),
        })
        .await;
    Ok(sent)
}

/// An export's message as the matching import message.
pub fn to_import(message: ExportCheckpointResponse) -> Option<ImportCheckpointRequest> {
    let item = match message.item? {
        ExportItem::Chunk(c) => ImportItem::Chunk(c),
        ExportItem::Manifest(m) => ImportItem::Manifest(m),
    };
    Some(ImportCheckpointRequest { item: Some(item) })
}

/// A blob being received.
struct Incoming {
    blob: CheckpointBlob,
    received: u64,
    sha: Sha256,
    /// None when the content store holds the blob already.
    writer: Option<BlobWriter>,
}

/// An import in progress: what came, where it goes. It outlives a
/// connection (a migration's target keeps it for the source to resume).
pub struct Import {
    ctrd: Containerd,
    scope: Scope,
    reference: Option<String>,
    stream_offset: u64,
    received: Vec<CheckpointBlob>,
    incoming: Option<Incoming>,
    /// The bytes of the index while it comes (an index is small).
    index_bytes: Option<Vec<u8>>,
    /// The index, parsed, and its descriptor, once stored.
    index: Option<(OciIndex, Descriptor)>,
}

/// Receives an import stream (target first, then chunks, then the
/// manifest) and stores the checkpoint. Nothing remains of a failed one.
pub async fn import<S>(
    ctrd: &Containerd,
    mut requests: S,
) -> Result<ImportCheckpointResponse, ApiError>
where
    S: Stream<Item = Result<ImportCheckpointRequest, Status>> + Unpin,
{
    let target = match requests.next().await {
        Some(Ok(ImportCheckpointRequest {
            item: Some(ImportItem::Target(t)),
        })) => t,
        Some(Ok(_)) => {
            return Err(ApiError::BadStream(
                "the import's first message must be its target (namespace, checkpoint_ref)".into(),
            ))
        }
        Some(Err(s)) => return Err(stream_error(s, 0)),
        None => return Err(ApiError::BadStream("the import stream was empty".into())),
    };
    let ImportTarget {
        namespace,
        checkpoint_ref,
    } = target;
    if !checkpoint_ref.is_empty() {
        check_reference(&checkpoint_ref)?;
        refuse_taken(ctrd, &Scope::new(&namespace), &checkpoint_ref).await?;
    }
    let mut import = Import::begin(ctrd, &namespace, &checkpoint_ref).await?;
    match import.run(&mut requests).await {
        Ok(response) => Ok(response),
        Err(e) => {
            import.abandon().await;
            Err(e)
        }
    }
}

/// A failed receive: the client's cancel or the connection's loss.
fn stream_error(status: Status, offset: u64) -> ApiError {
    ApiError::containerd(
        format!("receiving the import stream at offset {offset}"),
        status,
    )
}

async fn refuse_taken(ctrd: &Containerd, scope: &Scope, reference: &str) -> Result<(), ApiError> {
    match ctrd
        .images()
        .get(scope.request(GetImageRequest {
            name: reference.to_string(),
        }))
        .await
    {
        Ok(_) => Err(ApiError::AlreadyExists {
            namespace: scope.namespace.clone(),
            what: format!("image {reference:?}"),
        }),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(ApiError::containerd(
            format!("look up image {reference:?}"),
            s,
        )),
    }
}

fn is_digest(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

impl Import {
    /// Starts an import into `namespace` as `reference` (empty: the
    /// manifest's name), refused if that name is taken.
    pub async fn begin(
        ctrd: &Containerd,
        namespace: &str,
        reference: &str,
    ) -> Result<Import, ApiError> {
        if !reference.is_empty() {
            check_reference(reference)?;
            refuse_taken(ctrd, &Scope::new(namespace), reference).await?;
        }
        let scope = ctrd.begin_lease(namespace, "import").await?;
        Ok(Import {
            ctrd: ctrd.clone(),
            scope,
            reference: (!reference.is_empty()).then(|| reference.to_string()),
            stream_offset: 0,
            received: Vec::new(),
            incoming: None,
            index_bytes: None,
            index: None,
        })
    }

    /// Bytes of the stream received and stored so far.
    pub fn offset(&self) -> u64 {
        self.stream_offset
    }

    /// Drops what the import wrote: its ingest, and (collected at once)
    /// every blob only its lease held.
    pub async fn abandon(mut self) {
        if let Some(incoming) = self.incoming.take() {
            if let Some(writer) = incoming.writer {
                let write_ref = writer.write_ref().to_string();
                drop(writer);
                self.ctrd.abort_ingest(&self.scope, &write_ref).await;
            }
        }
        self.ctrd.end_lease_and_collect(&self.scope).await;
    }

    async fn run<S>(&mut self, requests: &mut S) -> Result<ImportCheckpointResponse, ApiError>
    where
        S: Stream<Item = Result<ImportCheckpointRequest, Status>> + Unpin,
    {
        while let Some(request) = requests.next().await {
            let request = request.map_err(|s| stream_error(s, self.stream_offset))?;
            match request.item {
                Some(ImportItem::Chunk(chunk)) => self.chunk(chunk).await?,
                Some(ImportItem::Manifest(manifest)) => return self.finish(manifest).await,
                Some(ImportItem::Target(_)) => {
                    return Err(ApiError::BadStream(format!(
                        "a second target at stream offset {}",
                        self.stream_offset
                    )))
                }
                None => {}
            }
        }
        Err(ApiError::BadStream(format!(
            "the import stream ended at offset {} without its manifest",
            self.stream_offset
        )))
    }

    /// Takes the next chunk of the stream.
    pub async fn chunk(&mut self, chunk: CheckpointChunk) -> Result<(), ApiError> {
        let at = format!(
            "chunk at stream offset {} (offset {} of blob {})",
            chunk.stream_offset, chunk.offset, chunk.digest
        );
        let sum = xxh3_64(&chunk.data);
        if sum != chunk.xxh3 {
            return Err(ApiError::DataLoss(format!(
                "{at}: its data's xxh3 is {sum:016x}, the chunk says {:016x}: corrupted in transit",
                chunk.xxh3
            )));
        }
        if chunk.stream_offset != self.stream_offset {
            return Err(ApiError::BadStream(format!(
                "{at}: expected stream offset {}",
                self.stream_offset
            )));
        }
        if self.incoming.is_none() {
            self.start_blob(&chunk, &at).await?;
        }
        let incoming = self.incoming.as_mut().expect("a blob being received");
        if chunk.digest != incoming.blob.digest {
            return Err(ApiError::BadStream(format!(
                "{at}: blob {} ended at {} of its {} bytes",
                incoming.blob.digest, incoming.received, incoming.blob.size
            )));
        }
        let len = chunk.data.len() as u64;
        if chunk.offset != incoming.received || incoming.received + len > incoming.blob.size {
            return Err(ApiError::BadStream(format!(
                "{at}: {len} bytes do not follow the {} received of {} bytes",
                incoming.received, incoming.blob.size
            )));
        }
        incoming.sha.update(&chunk.data);
        if let Some(bytes) = self.index_bytes.as_mut() {
            bytes.extend_from_slice(&chunk.data);
        }
        if let Some(writer) = incoming.writer.as_mut() {
            writer.write(chunk.data).await?;
        }
        incoming.received += len;
        self.stream_offset += len;
        if incoming.received == incoming.blob.size {
            self.end_blob().await?;
        }
        Ok(())
    }

    async fn start_blob(&mut self, chunk: &CheckpointChunk, at: &str) -> Result<(), ApiError> {
        if !is_digest(&chunk.digest) {
            return Err(ApiError::BadStream(format!(
                "{at}: {:?} is not a sha256 digest",
                chunk.digest
            )));
        }
        if chunk.offset != 0 {
            return Err(ApiError::BadStream(format!(
                "{at}: a blob must start at offset 0"
            )));
        }
        if self.received.iter().any(|b| b.digest == chunk.digest) {
            return Err(ApiError::BadStream(format!("{at}: blob sent twice")));
        }
        let blob = CheckpointBlob {
            media_type: chunk.media_type.clone(),
            digest: chunk.digest.clone(),
            size: chunk.blob_size,
        };
        let exists = self
            .ctrd
            .blob_size(&self.scope, &blob.digest)
            .await
            .is_ok_and(|size| size as u64 == blob.size);
        if exists {
            // Held by this import's lease too: whatever else holds it may
            // let go before the import's image exists.
            self.ctrd.lease_blob(&self.scope, &blob.digest).await?;
        }
        // The index is written with its garbage-collection labels, which
        // are known once it is parsed: always written, at its end.
        let is_index = layout::is_index_media_type(&blob.media_type);
        let writer = if exists || is_index {
            None
        } else {
            let write_ref = format!("cowsnapd-import-{}", &blob.digest[7..]);
            Some(
                self.ctrd
                    .blob_writer(&self.scope, &write_ref, &blob.digest, blob.size)
                    .await,
            )
        };
        self.incoming = Some(Incoming {
            blob,
            received: 0,
            sha: Sha256::new(),
            writer,
        });
        if is_index {
            if self.index.is_some() {
                return Err(ApiError::BadStream(format!("{at}: a second index")));
            }
            if blob_too_large_for_index(chunk.blob_size) {
                return Err(ApiError::BadStream(format!(
                    "{at}: an index of {} bytes",
                    chunk.blob_size
                )));
            }
            self.index_bytes = Some(Vec::new());
        }
        if chunk.blob_size == 0 {
            self.end_blob().await?;
        }
        Ok(())
    }

    /// The current blob is complete: checks its digest and commits it.
    async fn end_blob(&mut self) -> Result<(), ApiError> {
        let Incoming {
            blob, sha, writer, ..
        } = self.incoming.take().expect("a blob being received");
        let digest = format!("sha256:{}", hex_lower(&sha.finalize()));
        if digest != blob.digest {
            if let Some(writer) = writer {
                let write_ref = writer.write_ref().to_string();
                drop(writer);
                self.ctrd.abort_ingest(&self.scope, &write_ref).await;
            }
            return Err(ApiError::DataLoss(format!(
                "blob {} (stream offset {} to {}): its data's digest is {digest}",
                blob.digest,
                self.stream_offset - blob.size,
                self.stream_offset
            )));
        }
        if let Some(writer) = writer {
            writer.commit(HashMap::new()).await?;
        }
        if let Some(bytes) = self.index_bytes.take() {
            let index: OciIndex = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::BadStream(format!("index {}: does not parse: {e}", blob.digest))
            })?;
            if index.by_media_type(layout::MEDIA_TYPE_CHECKPOINT).is_none() {
                return Err(ApiError::BadStream(format!(
                    "index {} is not a checkpoint's: it has no {}",
                    blob.digest,
                    layout::MEDIA_TYPE_CHECKPOINT
                )));
            }
            let stored = self
                .ctrd
                .write_blob(
                    &self.scope,
                    "import-index",
                    &blob.media_type,
                    bytes,
                    index.gc_labels(),
                )
                .await?;
            self.index = Some((index, stored));
        }
        self.received.push(blob);
        Ok(())
    }

    /// The manifest: what came must be what it lists, the index's blobs
    /// all there; then the image is created.
    /// Takes the manifest, the last message, and creates the image; the
    /// import's lease is then deleted (the image holds what it wrote).
    pub async fn finish(
        &mut self,
        manifest: CheckpointManifest,
    ) -> Result<ImportCheckpointResponse, ApiError> {
        if let Some(incoming) = &self.incoming {
            return Err(ApiError::BadStream(format!(
                "the manifest came with blob {} at {} of its {} bytes",
                incoming.blob.digest, incoming.received, incoming.blob.size
            )));
        }
        if manifest.blobs != self.received || manifest.total_size != self.stream_offset {
            return Err(ApiError::BadStream(format!(
                "the manifest lists {} blobs of {} bytes, the stream held {} of {} bytes",
                manifest.blobs.len(),
                manifest.total_size,
                self.received.len(),
                self.stream_offset
            )));
        }
        let Some((index, descriptor)) = self.index.take() else {
            return Err(ApiError::BadStream(
                "the stream held no checkpoint index".into(),
            ));
        };
        if manifest.index.as_ref().map(|b| b.digest.as_str()) != Some(descriptor.digest.as_str()) {
            return Err(ApiError::BadStream(format!(
                "the manifest's index is not the index sent ({})",
                descriptor.digest
            )));
        }
        for m in &index.manifests {
            if !self.received.iter().any(|b| b.digest == m.digest)
                && self.ctrd.blob_size(&self.scope, &m.digest).await.is_err()
            {
                return Err(ApiError::BadStream(format!(
                    "index {} references blob {} ({}), which was not sent",
                    descriptor.digest, m.digest, m.media_type
                )));
            }
        }
        let reference = match self.reference.clone() {
            Some(r) => r,
            None => {
                check_reference(&manifest.checkpoint_ref)?;
                let plain = Scope::new(&self.scope.namespace);
                refuse_taken(&self.ctrd, &plain, &manifest.checkpoint_ref).await?;
                manifest.checkpoint_ref.clone()
            }
        };
        let image = self
            .ctrd
            .images()
            .create(self.scope.request(CreateImageRequest {
                image: Some(Image {
                    name: reference.clone(),
                    labels: HashMap::new(),
                    target: Some(descriptor),
                    created_at: None,
                    updated_at: None,
                }),
                source_date_epoch: None,
            }))
            .await
            .map_err(|s| ApiError::containerd(format!("create checkpoint image {reference:?}"), s))?
            .into_inner()
            .image
            .unwrap_or_default();
        self.ctrd.end_lease(&self.scope).await;
        Ok(ImportCheckpointResponse {
            checkpoint: Some(checkpoint::checkpoint_info(&image, &index)),
            bytes_received: self.stream_offset,
        })
    }
}

/// An index is a few KiB of JSON; anything much larger is not one.
fn blob_too_large_for_index(size: u64) -> bool {
    size > 16 << 20
}
