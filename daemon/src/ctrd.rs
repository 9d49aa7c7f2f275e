//! cowsnapd's side of containerd's gRPC API (the `containerd-client`
//! crate): one channel, requests tagged with the namespace and the lease
//! they belong to, the content store read and written in chunks, and
//! leases that keep what a checkpoint or restore writes from being
//! collected before the image or container that references it exists.
//!
//! Never shells out to `ctr`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient,
    snapshots::snapshots_client::SnapshotsClient, tasks_client::TasksClient, WriteAction,
};
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, InfoRequest, ReadContentRequest, Resource,
    WriteContentRequest,
};
use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::error::ApiError;

/// The namespace a request without one works in, as for `ctr`.
pub const DEFAULT_NAMESPACE: &str = "default";
/// How long containerd keeps a lease cowsnapd did not delete (it crashed).
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// Size of the chunks blobs are written in.
const WRITE_CHUNK: usize = 1 << 20;

/// A connection to one containerd.
#[derive(Clone)]
pub struct Containerd {
    address: PathBuf,
    channel: Channel,
}

/// Where a request runs: a namespace, and the lease that holds what it
/// writes.
#[derive(Clone, Debug)]
pub struct Scope {
    pub namespace: String,
    pub lease: Option<String>,
}

impl Scope {
    pub fn new(namespace: &str) -> Scope {
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        Scope {
            namespace: namespace.to_string(),
            lease: None,
        }
    }

    /// `message` with containerd's namespace and lease headers.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        // Namespaces and lease ids are checked ASCII names; a value that is
        // not one fails in containerd, not here.
        if let Ok(ns) = MetadataValue::try_from(self.namespace.as_str()) {
            metadata.insert("containerd-namespace", ns);
        }
        if let Some(lease) = &self.lease {
            if let Ok(lease) = MetadataValue::try_from(lease.as_str()) {
                metadata.insert("containerd-lease", lease);
            }
        }
        request
    }
}

impl Containerd {
    /// Connects to containerd's socket. The channel connects lazily: an
    /// absent containerd fails the first request with UNAVAILABLE.
    pub async fn connect(address: &Path) -> Result<Containerd, ApiError> {
        let channel = containerd_client::connect(address).await.map_err(|e| {
            ApiError::ContainerdUnavailable {
                address: address.display().to_string(),
                detail: e.to_string(),
            }
        })?;
        Ok(Containerd {
            address: address.to_path_buf(),
            channel,
        })
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// A scope of `namespace` holding a new lease, which expires on its
    /// own if [`Containerd::end_lease`] is never called.
    pub async fn begin_lease(&self, namespace: &str, what: &str) -> Result<Scope, ApiError> {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let mut scope = Scope::new(namespace);
        let id = format!(
            "cowsnapd-{what}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let expiry = rfc3339(SystemTime::now() + LEASE_EXPIRY);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expiry)]);
        self.leases()
            .create(scope.request(CreateLeaseRequest { id, labels }))
            .await
            .map_err(|s| ApiError::containerd(format!("create a lease for {what}"), s))
            .map(|r| {
                scope.lease = r.into_inner().lease.map(|l| l.id);
                scope
            })
    }

    /// Deletes the scope's lease: what it held is now referenced by the
    /// image or container made, or free to be collected.
    pub async fn end_lease(&self, scope: &Scope) {
        self.delete_lease(scope, false).await
    }

    /// Deletes the scope's lease and has containerd collect at once what
    /// only it held: a failed import leaves no blob behind.
    pub async fn end_lease_and_collect(&self, scope: &Scope) {
        self.delete_lease(scope, true).await
    }

    async fn delete_lease(&self, scope: &Scope, sync: bool) {
        let Some(id) = scope.lease.clone() else {
            return;
        };
        let plain = Scope::new(&scope.namespace);
        if let Err(e) = self
            .leases()
            .delete(plain.request(DeleteLeaseRequest {
                id: id.clone(),
                sync,
            }))
            .await
        {
            log::warn!(
                "delete lease {id} in namespace {}: {}",
                scope.namespace,
                e.message()
            );
        }
    }

    /// The whole blob `digest` from the content store.
    pub async fn read_blob(&self, scope: &Scope, digest: &str) -> Result<Vec<u8>, ApiError> {
        let action = || format!("read blob {digest} from the content store");
        let mut stream = self
            .content()
            .read(scope.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| ApiError::containerd(action(), s))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| ApiError::containerd(action(), s))?;
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Blob `digest` from byte `offset` on, as containerd streams it.
    pub async fn read_blob_from(
        &self,
        scope: &Scope,
        digest: &str,
        offset: u64,
    ) -> Result<tonic::Streaming<containerd_client::services::v1::ReadContentResponse>, ApiError>
    {
        self.content()
            .read(scope.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: offset as i64,
                size: 0,
            }))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                ApiError::containerd(format!("read blob {digest} from the content store"), s)
            })
    }

    /// Starts writing blob `digest` of `total` bytes into the content
    /// store under ingest ref `write_ref` (a stale ingest of that ref is
    /// dropped first).
    pub async fn blob_writer(
        &self,
        scope: &Scope,
        write_ref: &str,
        digest: &str,
        total: u64,
    ) -> BlobWriter {
        let _ = self
            .content()
            .abort(scope.request(AbortRequest {
                r#ref: write_ref.to_string(),
            }))
            .await;
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let mut content = self.content();
        let request = scope.request(ReceiverStream::new(rx));
        // containerd answers each request; the answers are read here so
        // that the stream never stalls on them.
        let answers = tokio::spawn(async move {
            let mut responses = content.write(request).await?.into_inner();
            while let Some(r) = responses.next().await {
                r?;
            }
            Ok(())
        });
        BlobWriter {
            tx,
            answers,
            write_ref: write_ref.to_string(),
            digest: digest.to_string(),
            total: total as i64,
            written: 0,
        }
    }

    /// Adds blob `digest`, already in the content store, to the scope's
    /// lease, so that it stays while the lease does whoever else held it.
    pub async fn lease_blob(&self, scope: &Scope, digest: &str) -> Result<(), ApiError> {
        let Some(lease) = scope.lease.clone() else {
            return Ok(());
        };
        let plain = Scope::new(&scope.namespace);
        self.leases()
            .add_resource(plain.request(AddResourceRequest {
                id: lease.clone(),
                resource: Some(Resource {
                    id: digest.to_string(),
                    r#type: "content".to_string(),
                }),
            }))
            .await
            .map(|_| ())
            .map_err(|s| ApiError::containerd(format!("add blob {digest} to lease {lease}"), s))
    }

    /// Drops the ingest `write_ref` (what a failed write had sent).
    pub async fn abort_ingest(&self, scope: &Scope, write_ref: &str) {
        let _ = self
            .content()
            .abort(scope.request(AbortRequest {
                r#ref: write_ref.to_string(),
            }))
            .await;
    }

    /// Size of blob `digest`, or NOT_FOUND as containerd says it.
    pub async fn blob_size(&self, scope: &Scope, digest: &str) -> Result<i64, Status> {
        let info = self
            .content()
            .info(scope.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await?
            .into_inner();
        Ok(info.info.map_or(0, |i| i.size))
    }

    /// Writes `data` to the content store under `media_type` (a blob
    /// already there is not written again) and returns its descriptor.
    /// `labels` are set on commit (garbage collection references).
    pub async fn write_blob(
        &self,
        scope: &Scope,
        write_ref: &str,
        media_type: &str,
        data: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<Descriptor, ApiError> {
        let digest = format!("sha256:{}", hex_lower(&Sha256::digest(&data)));
        let total = data.len() as i64;
        let descriptor = Descriptor {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size: total,
            annotations: HashMap::new(),
        };
        if labels.is_empty() && self.blob_size(scope, &digest).await.is_ok() {
            return Ok(descriptor);
        }
        let (tx, rx) = mpsc::channel(4);
        let write_ref = format!("cowsnapd-{write_ref}-{}", &digest[7..19]);
        let feeder = {
            let write_ref = write_ref.clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                let mut offset = 0usize;
                for chunk in data.chunks(WRITE_CHUNK) {
                    let request = WriteContentRequest {
                        action: WriteAction::Write as i32,
                        r#ref: write_ref.clone(),
                        total,
                        expected: digest.clone(),
                        offset: offset as i64,
                        data: chunk.to_vec(),
                        labels: HashMap::new(),
                    };
                    offset += chunk.len();
                    if tx.send(request).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(WriteContentRequest {
                        action: WriteAction::Commit as i32,
                        r#ref: write_ref,
                        total,
                        expected: digest,
                        offset: offset as i64,
                        data: Vec::new(),
                        labels,
                    })
                    .await;
            })
        };
        let action = || format!("write blob {digest} ({media_type}) to the content store");
        let result = self
            .content()
            .write(scope.request(ReceiverStream::new(rx)))
            .await;
        let outcome = match result {
            Ok(response) => {
                let mut responses = response.into_inner();
                let mut failure = None;
                while let Some(r) = responses.next().await {
                    if let Err(s) = r {
                        failure = Some(s);
                        break;
                    }
                }
                failure
            }
            Err(s) => Some(s),
        };
        feeder.abort();
        match outcome {
            None => Ok(descriptor),
            // Another writer committed the same content first.
            Some(s) if s.code() == tonic::Code::AlreadyExists => Ok(descriptor),
            Some(s) => Err(ApiError::containerd(action(), s)),
        }
    }
}

/// A blob being written into the content store, chunk by chunk.
pub struct BlobWriter {
    tx: mpsc::Sender<WriteContentRequest>,
    answers: tokio::task::JoinHandle<Result<(), Status>>,
    write_ref: String,
    digest: String,
    total: i64,
    written: i64,
}

impl BlobWriter {
    pub fn write_ref(&self) -> &str {
        &self.write_ref
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), ApiError> {
        let len = data.len() as i64;
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.write_ref.clone(),
            total: self.total,
            expected: self.digest.clone(),
            offset: self.written,
            data,
            labels: HashMap::new(),
        };
        if self.tx.send(request).await.is_err() {
            return Err(self.failure().await);
        }
        self.written += len;
        Ok(())
    }

    /// Commits the blob with `labels`; containerd checks its digest. A
    /// blob some other writer committed first is as good.
    pub async fn commit(self, labels: HashMap<String, String>) -> Result<(), ApiError> {
        let request = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.write_ref.clone(),
            total: self.total,
            expected: self.digest.clone(),
            offset: self.written,
            data: Vec::new(),
            labels,
        };
        let sent = self.tx.send(request).await.is_ok();
        let BlobWriter {
            tx,
            answers,
            digest,
            ..
        } = self;
        drop(tx);
        let outcome = answers
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("content writer task: {e}"))));
        match outcome {
            Ok(()) if sent => Ok(()),
            Ok(()) => Err(ApiError::Internal(format!(
                "write blob {digest}: containerd closed the stream before the commit"
            ))),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(ApiError::containerd(
                format!("write blob {digest} to the content store"),
                s,
            )),
        }
    }

    /// Why the write stream closed under us.
    async fn failure(&mut self) -> ApiError {
        let digest = self.digest.clone();
        match (&mut self.answers).await {
            Ok(Err(s)) => {
                ApiError::containerd(format!("write blob {digest} to the content store"), s)
            }
            _ => ApiError::Internal(format!("write blob {digest}: containerd closed the stream")),
        }
    }
}

pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `time` as RFC 3339 in UTC (`2006-01-02T15:04:05Z`), the format of
/// containerd's `gc.expire` label.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_136_214_245)), "2006-01-02T15:04:05Z");
    }
}
