//! Where cowsnapd listens and what it serves there: the `cowsnap.v1`
//! services with the standard gRPC health and reflection services, on a
//! unix socket only root can use (mode 0600).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::proto::checkpoint_service_server::CheckpointServiceServer;
use crate::proto::migration_service_server::MigrationServiceServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::service::Agent;

pub const DEFAULT_SOCKET: &str = "/run/cowsnap/cowsnapd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: {action}: {source}")]
    Socket {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{path}: another cowsnapd answers there")]
    InUse { path: PathBuf },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("serving on {path}: {source}")]
    Transport {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Binds `path` with mode 0600 (its directory 0700 if created), replacing
/// a stale socket that nothing answers on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |action, source| ServeError::Socket {
        path: path.to_path_buf(),
        action,
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err("create its directory", e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err("chmod its directory", e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|e| err("remove the stale socket", e))?;
    }
    // The socket is created 0600 (umask), so no one else can connect
    // between bind and chmod.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod 0600", e))?;
    Ok(listener)
}

/// Serves `agent` on `listener` until `shutdown` resolves.
pub async fn serve_unix(
    agent: Agent,
    listener: UnixListener,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CheckpointServiceServer<Agent>>().await;
    health.set_serving::<MigrationServiceServer<Agent>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    log::info!("cowsnapd listening on {}", path.display());
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CheckpointServiceServer::new(agent.clone()))
        .add_service(MigrationServiceServer::new(agent))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: path.to_path_buf(),
            source,
        })
}
