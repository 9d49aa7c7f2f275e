//! The containerd runtime v2 shim `io.containerd.cowsnap.v1` (binary
//! `containerd-shim-cowsnap-v1`): the shim v2 Task service over ttrpc, built
//! on the `containerd-shim` crate, running containers through the `runc`
//! binary like containerd's runc shim, and checkpoint/restore through
//! [`cr`].
//!
//! - [`state`]: the process state machine every RPC consults.
//! - [`service`]: the Task service (containers, processes, events, exits).
//! - [`runc`]: the runc command line, waited for through the shim's reaper.
//! - [`io`]: fifos, pipes and the console socket.
//! - [`options`]: decoding containerd's `Any` options.
//! - [`stats`]: runc stats as containerd metrics.
//! - [`cr`]: checkpoint and restore hooks into the cowsnap engine.
//!
//! This module never forks or ptraces containers itself: runc creates them
//! and the engine (through `cr`) dumps and restores them.

pub mod cr;
pub mod io;
pub mod options;
pub mod runc;
pub mod service;
pub mod state;
pub mod stats;

use std::sync::Arc;

use containerd_shim::{
    api, publisher::RemotePublisher, Config, DeleteResponse, ExitSignal, Flags, StartOpts,
};

use service::{RuncConfig, TaskService, INIT_PID_FILE, RUNC_CONFIG_FILE};

/// The runtime name containerd knows the shim by.
pub const RUNTIME_NAME: &str = "io.containerd.cowsnap.v1";

/// How long the serving shim waits for its ttrpc server to stop after
/// Shutdown before it exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The shim process's side of the containerd-shim lifecycle: `start`
/// (spawn the serving shim), `delete` (clean up after a dead shim), serve.
pub struct Shim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

impl containerd_shim::Shim for Shim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// `shim delete`: containerd's cleanup when the serving shim is gone.
    /// Runs in the bundle directory.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("shim delete: current dir: {e}")))?;
        let config = std::fs::read(bundle.join(RUNC_CONFIG_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<RuncConfig>(&b).ok())
            .unwrap_or_else(|| RuncConfig::default_for(&self.namespace));
        let runc = config.runc(&bundle);
        if let Err(e) = runc.delete(&self.id, true) {
            log::warn!("shim delete: {e}");
        }
        service::unmount_rootfs(&bundle);
        let pid = runc::read_pid_file(&bundle.join(INIT_PID_FILE)).unwrap_or(0);
        Ok(api::DeleteResponse {
            pid: pid as u32,
            // the container was killed (SIGKILL) if it still ran
            exit_status: 128 + 9,
            exited_at: containerd_shim_protos::protobuf::MessageField::some(
                containerd_shim::util::timestamp()?,
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The ttrpc server's shutdown joins its handler threads; one still
        // blocked (a Wait whose process containerd abandoned, a request in
        // flight) must not keep the shim alive after containerd said goodbye.
        std::thread::spawn(|| {
            std::thread::sleep(SHUTDOWN_GRACE);
            log::warn!("ttrpc server did not stop within {SHUTDOWN_GRACE:?}; exiting");
            std::process::exit(0);
        });
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(&self.namespace, self.exit.clone(), publisher)
    }
}

/// Entry point of the shim binary.
pub fn run() {
    containerd_shim::run::<Shim>(RUNTIME_NAME, None);
}
