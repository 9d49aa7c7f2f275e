//! `cowsnapd`: serves cowsnap's gRPC API on a unix socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cowsnapd::ctrd::Containerd;
use cowsnapd::server::{bind_unix, serve_unix, DEFAULT_SOCKET};
use cowsnapd::service::Agent;

/// cowsnap's node agent: checkpoint, restore, list, inspect and delete
/// checkpoints of io.containerd.cowsnap.v1 containers over gRPC.
#[derive(Parser)]
#[command(name = "cowsnapd", version)]
struct Args {
    /// The unix socket to serve on (mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// Log each request (info); warnings and errors are always logged.
    #[arg(long, short)]
    verbose: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cowsnapd::logger::init(args.verbose);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ctrd = Containerd::connect(&args.containerd).await?;
    let listener = bind_unix(&args.socket)?;
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("no SIGTERM handler ({e}); stop cowsnapd with SIGINT");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("stopping");
    };
    let result = serve_unix(Agent::new(ctrd), listener, &args.socket, shutdown).await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(result?)
}
