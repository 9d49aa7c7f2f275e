//! A client's connection to cowsnapd: its unix socket, or TCP with mutual
//! TLS (the CLI, tests, and a migration's source agent reaching its
//! target use it; any gRPC client that speaks HTTP/2 works too).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::checkpoint_service_client::CheckpointServiceClient;

/// A channel to the cowsnapd listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    // containerd-client's connector is a plain gRPC-over-unix-socket one.
    containerd_client::connect(socket).await
}

pub async fn checkpoint_client(
    socket: &Path,
) -> Result<CheckpointServiceClient<Channel>, tonic::transport::Error> {
    Ok(CheckpointServiceClient::new(connect(socket).await?))
}

/// The files of a client's mutual TLS: the CA the server's certificate
/// must chain to, and this client's certificate and key.
#[derive(Clone, Debug)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Transport {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// A channel to the cowsnapd at TCP `addr` (`host:port`, or an
/// `https://`/`http://` URL): mutual TLS with `tls`, plain without. The
/// server's certificate must name the host (DNS name or IP address).
pub async fn connect_tcp(
    addr: &str,
    tls: Option<&ClientTlsFiles>,
) -> Result<Channel, ConnectError> {
    let (scheme, rest) = match addr.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => (if tls.is_some() { "https" } else { "http" }, addr),
    };
    let uri = format!("{scheme}://{rest}");
    let transport = |source| ConnectError::Transport {
        addr: addr.to_string(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(transport)?;
    if let Some(files) = tls {
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ConnectError::File {
                what,
                path: path.clone(),
                source,
            })
        };
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--ca", &files.ca)?))
            .identity(Identity::from_pem(
                read("--cert", &files.cert)?,
                read("--key", &files.key)?,
            ));
        endpoint = endpoint.tls_config(config).map_err(transport)?;
    }
    endpoint.connect().await.map_err(transport)
}
