//! A client's connection to cowsnapd's unix socket (the CLI and tests use
//! it; any gRPC client that speaks HTTP/2 over a unix socket works too).

use std::path::Path;

use tonic::transport::Channel;

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
