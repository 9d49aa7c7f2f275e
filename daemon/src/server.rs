//! Where cowsnapd listens and what it serves there: the `cowsnap.v1`
//! services with the standard gRPC health and reflection services, on a
//! unix socket only root can use (mode 0600), and optionally on TCP with
//! mutual TLS (rustls: a server certificate, and a CA that every client's
//! certificate must chain to). Plain TCP only with `insecure`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
    #[error("refusing to serve plain TCP on {addr}: give --tls-cert, --tls-key and --tls-client-ca (mutual TLS), or --insecure")]
    PlainTcp { addr: String },
    #[error(
        "--tls-cert, --tls-key and --tls-client-ca go together (mutual TLS); missing {missing}"
    )]
    PartialTls { missing: String },
    #[error("{what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("TLS on {addr}: {source}")]
    Tls {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("TCP {addr}: {source}")]
    Tcp { addr: String, source: io::Error },
}

/// The files of a server's mutual TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// How cowsnapd serves TCP: mutual TLS, or plain (only when asked).
#[derive(Clone, Debug)]
pub enum TcpSecurity {
    MutualTls(TlsFiles),
    Insecure,
}

impl TcpSecurity {
    /// From the command line's `--tls-*` and `--insecure`: all three TLS
    /// files, or none and `insecure`. Plain TCP without `insecure` is
    /// refused.
    pub fn from_flags(
        addr: &str,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
        insecure: bool,
    ) -> Result<TcpSecurity, ServeError> {
        match (cert, key, client_ca) {
            (Some(cert), Some(key), Some(client_ca)) => Ok(TcpSecurity::MutualTls(TlsFiles {
                cert,
                key,
                client_ca,
            })),
            (None, None, None) if insecure => Ok(TcpSecurity::Insecure),
            (None, None, None) => Err(ServeError::PlainTcp {
                addr: addr.to_string(),
            }),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                    (ca.is_none(), "--tls-client-ca"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, name)| *name)
                .collect();
                Err(ServeError::PartialTls {
                    missing: missing.join(", "),
                })
            }
        }
    }

    /// The rustls server config: this server's identity, and client
    /// certificates required, checked against the client CA.
    fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, ServeError> {
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServeError::TlsFile {
                what,
                path: path.clone(),
                source,
            })
        };
        let identity = Identity::from_pem(
            read("--tls-cert", &files.cert)?,
            read("--tls-key", &files.key)?,
        );
        let ca = Certificate::from_pem(read("--tls-client-ca", &files.client_ca)?);
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .client_auth_optional(false))
    }
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
    log::info!("cowsnapd listening on {}", path.display());
    routes(Server::builder(), agent)
        .await?
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: path.to_path_buf(),
            source,
        })
}

/// Binds TCP `addr` (before anything is served, so that a taken port
/// fails the start).
pub async fn bind_tcp(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Tcp {
            addr: addr.to_string(),
            source,
        })
}

/// Serves `agent` on TCP `listener` with `security` until `shutdown`.
pub async fn serve_tcp(
    agent: Agent,
    listener: TcpListener,
    security: &TcpSecurity,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let mut builder = Server::builder();
    match security {
        TcpSecurity::MutualTls(files) => {
            builder = builder
                .tls_config(TcpSecurity::server_tls(files)?)
                .map_err(|source| ServeError::Tls {
                    addr: addr.clone(),
                    source,
                })?;
            log::info!("cowsnapd listening on TCP {addr} (mutual TLS)");
        }
        TcpSecurity::Insecure => log::warn!(
            "cowsnapd listening on plain TCP {addr} (--insecure): no TLS, no client \
             authentication; anyone who reaches this port can checkpoint, restore and \
             migrate containers"
        ),
    }
    routes(builder, agent)
        .await?
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: PathBuf::from(addr),
            source,
        })
}

/// The services, health and reflection on `builder`.
async fn routes(mut builder: Server, agent: Agent) -> Result<Router, ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CheckpointServiceServer<Agent>>().await;
    health.set_serving::<MigrationServiceServer<Agent>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    Ok(builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CheckpointServiceServer::new(agent.clone()))
        .add_service(MigrationServiceServer::new(agent)))
}
