//! `cowsnap-ctl` (also `cowsnap ctl`): a person's client of cowsnapd.
//! Prints one plain line per progress event; the result goes to stdout,
//! progress and errors to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cowsnapd::proto::checkpoint_event::Event as CheckpointEventKind;
use cowsnapd::proto::restore_event::Event as RestoreEventKind;
use cowsnapd::proto::*;
use cowsnapd::server::DEFAULT_SOCKET;
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(
    name = "cowsnap ctl",
    bin_name = "cowsnap ctl",
    version,
    about = "Talk to cowsnapd"
)]
struct Cli {
    /// cowsnapd's socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// containerd namespace.
    #[arg(long, short, global = true, default_value = "default")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint container ID into the content store as REF.
    Checkpoint {
        id: String,
        reference: String,
        /// End the task once the image is complete.
        #[arg(long)]
        exit: bool,
    },
    /// Create container NEW_ID from checkpoint REF and restore its task.
    Restore { reference: String, new_id: String },
    /// List the namespace's checkpoints.
    Ls,
    /// Show a checkpoint: its blobs and `cowsnap inspect` of its image.
    Inspect {
        reference: String,
        /// The whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint.
    Rm { reference: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowsnap ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A status as `CODE: message`, the code in gRPC's words.
fn status_line(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut client = cowsnapd::client::checkpoint_client(&cli.socket)
        .await
        .map_err(|e| format!("connect to cowsnapd at {}: {e}", cli.socket.display()))?;
    let namespace = cli.namespace;
    match cli.command {
        Command::Checkpoint {
            id,
            reference,
            exit,
        } => {
            let mut events = client
                .checkpoint(CheckpointRequest {
                    namespace,
                    container_id: id,
                    leave_running: !exit,
                    checkpoint_ref: reference,
                    options: None,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            while let Some(event) = events.next().await {
                match event.map_err(status_line)?.event {
                    Some(CheckpointEventKind::Stage(stage)) => {
                        let name =
                            CheckpointStage::try_from(stage).map_or("unknown", |s| s.as_str_name());
                        eprintln!("{}", stage_word(name, "CHECKPOINT_STAGE_"));
                    }
                    Some(CheckpointEventKind::Progress(p)) => eprintln!(
                        "pages scanned {} stored {}, {} bytes written, frozen {} ms",
                        p.pages_scanned, p.pages_stored, p.bytes_written, p.frozen_ms
                    ),
                    Some(CheckpointEventKind::Done(info)) => println!("{}", info_line(&info)),
                    None => {}
                }
            }
        }
        Command::Restore { reference, new_id } => {
            let mut events = client
                .restore(RestoreRequest {
                    namespace,
                    checkpoint_ref: reference,
                    new_container_id: new_id,
                    options: None,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            while let Some(event) = events.next().await {
                match event.map_err(status_line)?.event {
                    Some(RestoreEventKind::Stage(stage)) => {
                        let name =
                            RestoreStage::try_from(stage).map_or("unknown", |s| s.as_str_name());
                        eprintln!("{}", stage_word(name, "RESTORE_STAGE_"));
                    }
                    Some(RestoreEventKind::Done(task)) => println!(
                        "{} running, pid {}, restored in {} ms",
                        task.container_id, task.pid, task.restore_ms
                    ),
                    None => {}
                }
            }
        }
        Command::Ls => {
            let list = client
                .list_checkpoints(ListCheckpointsRequest { namespace })
                .await
                .map_err(status_line)?
                .into_inner();
            println!("{:<48} {:<24} {:>12}  RUNTIME", "REF", "CONTAINER", "SIZE");
            for c in list.checkpoints {
                println!(
                    "{:<48} {:<24} {:>12}  {}",
                    c.checkpoint_ref,
                    if c.container_id.is_empty() {
                        "-"
                    } else {
                        &c.container_id
                    },
                    c.size,
                    c.runtime
                );
            }
        }
        Command::Inspect { reference, json } => {
            let answer = client
                .inspect_checkpoint(InspectCheckpointRequest {
                    namespace,
                    checkpoint_ref: reference,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let info = answer.checkpoint.unwrap_or_default();
            if json {
                let report: serde_json::Value = serde_json::from_str(&answer.image_report_json)
                    .map_err(|e| format!("cowsnapd sent an image report that is not JSON: {e}"))?;
                let blobs: Vec<serde_json::Value> = info
                    .blobs
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "media_type": b.media_type, "digest": b.digest, "size": b.size
                        })
                    })
                    .collect();
                let all = serde_json::json!({
                    "checkpoint_ref": info.checkpoint_ref,
                    "digest": info.digest,
                    "image": info.image,
                    "runtime": info.runtime,
                    "snapshotter": info.snapshotter,
                    "container_id": info.container_id,
                    "size": info.size,
                    "blobs": blobs,
                    "image_report": report,
                });
                println!("{all:#}");
            } else {
                println!("{}", info_line(&info));
                for b in &info.blobs {
                    println!("  {:>12}  {}  {}", b.size, b.digest, b.media_type);
                }
                println!("{}", answer.image_report_json.trim_end());
            }
        }
        Command::Rm { reference } => {
            client
                .delete_checkpoint(DeleteCheckpointRequest {
                    namespace,
                    checkpoint_ref: reference.clone(),
                })
                .await
                .map_err(status_line)?;
            println!("{reference} deleted");
        }
    }
    Ok(())
}

/// `CHECKPOINT_STAGE_RW_LAYER_STORED` as `rw layer stored`.
fn stage_word(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix)
        .replace('_', " ")
        .to_lowercase()
}

fn info_line(info: &CheckpointInfo) -> String {
    format!(
        "{} {} ({} bytes, container {}, image {}, runtime {})",
        info.checkpoint_ref,
        info.digest,
        info.size,
        if info.container_id.is_empty() {
            "-"
        } else {
            &info.container_id
        },
        info.image,
        info.runtime
    )
}
