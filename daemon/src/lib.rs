//! `cowsnapd`, cowsnap's node agent: the gRPC API (`proto/cowsnap/v1`)
//! that orchestrators call to checkpoint, restore, list, inspect and
//! delete checkpoints of containers of the `io.containerd.cowsnap.v1`
//! runtime. It drives containerd through containerd's own gRPC API; the
//! dumps and restores themselves run in the container's shim.
//!
//! - [`proto`]: the generated `cowsnap.v1` types, clients and servers.
//! - [`server`]: the listening socket, health and reflection.
//! - [`service`]: the RPCs.
//! - [`checkpoint`]: checkpoint and restore as containerd operations.
//! - [`progress`]: the engine's progress log, followed during a dump.
//! - [`metrics`]: Prometheus counters and histograms, served on HTTP.
//! - [`report`]: how `cowsnap ctl` shows progress (a bar, or plain lines).
//! - [`migrate`]: live migration, the source's and the target's sides.
//! - [`transfer`]: a checkpoint as checksummed chunks (export, import).
//! - [`layout`]: a checkpoint's index and blobs, as `ctr` stores them.
//! - [`ctrd`]: containerd's client: namespaces, leases, content.
//! - [`reference`]: checks of checkpoint names and container ids.
//! - [`error`]: failures and their gRPC codes.
//!
//! This crate never ptraces, forks inside the async runtime, or runs `ctr`.

pub mod checkpoint;
pub mod client;
pub mod ctrd;
pub mod error;
pub mod layout;
pub mod logger;
pub mod metrics;
pub mod migrate;
pub mod progress;
pub mod reference;
pub mod report;
pub mod server;
pub mod service;
pub mod transfer;

/// The `cowsnap.v1` API, generated at build time from `proto/cowsnap/v1`.
pub mod proto {
    tonic::include_proto!("cowsnap.v1");

    /// Encoded descriptors of `cowsnap.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cowsnap_v1_descriptor");
}
