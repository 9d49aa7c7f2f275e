//! `cowsnapd`: serves cowsnap's gRPC API on a unix socket, and on TCP
//! with mutual TLS when asked.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cowsnapd::ctrd::Containerd;
use cowsnapd::server::{bind_tcp, bind_unix, serve_tcp, serve_unix, TcpSecurity, DEFAULT_SOCKET};
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
    /// Also serve on TCP at this address (`host:port`), with mutual TLS:
    /// --tls-cert, --tls-key and --tls-client-ca are required unless
    /// --insecure is given.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<String>,
    /// PEM certificate (chain) of this server, for TCP; also this agent's
    /// client certificate towards a migration's target (give it both the
    /// serverAuth and clientAuth usages).
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that clients' certificates, and a migration
    /// target's server certificate, must chain to.
    #[arg(long, value_name = "PATH")]
    tls_client_ca: Option<PathBuf>,
    /// Allow --tcp without TLS (logs a warning): for tests on a private
    /// network only.
    #[arg(long)]
    insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (`host:port`,
    /// plain HTTP: give a loopback or otherwise private address).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
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
    // Refused before anything is opened: plain TCP without --insecure.
    let tcp = match &args.tcp {
        Some(addr) => Some((
            addr.clone(),
            TcpSecurity::from_flags(
                addr,
                args.tls_cert.clone(),
                args.tls_key.clone(),
                args.tls_client_ca.clone(),
                args.insecure,
            )?,
        )),
        None => None,
    };
    let ctrd = Containerd::connect(&args.containerd).await?;
    let listener = bind_unix(&args.socket)?;
    let tcp = match tcp {
        Some((addr, security)) => Some((bind_tcp(&addr).await?, security)),
        None => None,
    };
    let metrics_listener = match &args.metrics_addr {
        Some(addr) => Some(cowsnapd::metrics::bind(addr).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let signals = async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                log::warn!("no SIGTERM handler ({e}); stop cowsnapd with SIGINT");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        log::info!("stopping");
        let _ = stop_tx.send(true);
    };
    tokio::spawn(signals);
    // The server's certificate is also this agent's client certificate
    // when it calls another agent (a migration's target), whose server
    // certificate must chain to the same CA.
    let peer_tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(cowsnapd::client::ClientTlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let agent = Agent::new(ctrd).with_peer_tls(peer_tls);
    if let Some(listener) = metrics_listener {
        if let Some(addr) = cowsnapd::metrics::local_addr(&listener) {
            log::info!("metrics on http://{addr}/metrics");
        }
        tokio::spawn(cowsnapd::metrics::serve(
            agent.metrics(),
            listener,
            stopped(stop_rx.clone()),
        ));
    }
    let unix = serve_unix(
        agent.clone(),
        listener,
        &args.socket,
        stopped(stop_rx.clone()),
    );
    let result = match tcp {
        Some((listener, security)) => {
            let tcp = serve_tcp(agent, listener, &security, stopped(stop_rx));
            tokio::try_join!(unix, tcp).map(|_| ())
        }
        None => unix.await,
    };
    let _ = std::fs::remove_file(&args.socket);
    Ok(result?)
}
