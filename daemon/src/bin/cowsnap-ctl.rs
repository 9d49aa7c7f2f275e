//! `cowsnap-ctl` (also `cowsnap ctl`): a person's client of cowsnapd.
//! Shows progress on stderr (a bar on a terminal, else one plain line per
//! event: `cowsnapd::report`); the result goes to stdout, errors to
//! stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cowsnapd::proto::checkpoint_event::Event as CheckpointEventKind;
use cowsnapd::proto::restore_event::Event as RestoreEventKind;
use cowsnapd::proto::*;
use cowsnapd::report::Reporter;
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
    /// Talk to the cowsnapd at this TCP address (`host:port`) instead of
    /// its socket, with mutual TLS when --ca, --cert and --key are given.
    #[arg(long, global = true, value_name = "ADDR")]
    tcp: Option<String>,
    /// PEM CA certificate the server's certificate must chain to.
    #[arg(long, global = true, value_name = "PATH", requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// PEM certificate of this client.
    #[arg(long, global = true, value_name = "PATH", requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, value_name = "PATH", requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
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
    /// Migrate container ID to the cowsnapd at TARGET (https://host:port):
    /// checkpoint, transfer, restore there, remove here.
    Migrate {
        id: String,
        target: String,
        /// Id on the target (default: the same).
        #[arg(long)]
        target_id: Option<String>,
        /// containerd namespace on the target (default: the same).
        #[arg(long)]
        target_namespace: Option<String>,
    },
    /// Write checkpoint REF (its blobs and index, as checksummed chunks)
    /// to FILE, or to stdout with `-`.
    Export { reference: String, file: PathBuf },
    /// Store the checkpoint of an export FILE (`-`: stdin), under its
    /// own name or REF.
    Import {
        file: PathBuf,
        /// Store it under this name instead of the exported one.
        #[arg(long = "as", value_name = "REF")]
        reference: Option<String>,
    },
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
    let channel = match &cli.tcp {
        Some(addr) => {
            let tls = match (&cli.ca, &cli.cert, &cli.key) {
                (Some(ca), Some(cert), Some(key)) => Some(cowsnapd::client::ClientTlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            };
            cowsnapd::client::connect_tcp(addr, tls.as_ref())
                .await
                .map_err(|e| format!("connect to cowsnapd at {e}"))?
        }
        None => cowsnapd::client::connect(&cli.socket)
            .await
            .map_err(|e| format!("connect to cowsnapd at {}: {e}", cli.socket.display()))?,
    };
    let mut client = checkpoint_service_client::CheckpointServiceClient::new(channel.clone());
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
            let mut report = Reporter::for_stderr("written", None);
            let mut done = None;
            while let Some(event) = events.next().await {
                match event.map_err(status_line)?.event {
                    Some(CheckpointEventKind::Stage(stage)) => {
                        let name =
                            CheckpointStage::try_from(stage).map_or("unknown", |s| s.as_str_name());
                        report.stage(&stage_word(name, "CHECKPOINT_STAGE_"));
                    }
                    Some(CheckpointEventKind::Progress(p)) => report.dump(&p),
                    Some(CheckpointEventKind::Done(info)) => done = Some(info),
                    None => {}
                }
            }
            report.finish();
            if let Some(info) = done {
                println!("{}", info_line(&info));
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
            let mut report = Reporter::for_stderr("restored", None);
            report.stage("restoring");
            let mut done = None;
            while let Some(event) = events.next().await {
                match event.map_err(status_line)?.event {
                    Some(RestoreEventKind::Stage(stage)) => {
                        let name =
                            RestoreStage::try_from(stage).map_or("unknown", |s| s.as_str_name());
                        report.stage(&stage_word(name, "RESTORE_STAGE_"));
                    }
                    Some(RestoreEventKind::Done(task)) => done = Some(task),
                    None => {}
                }
            }
            report.finish();
            if let Some(task) = done {
                println!(
                    "{} running, pid {}, restored in {} ms",
                    task.container_id, task.pid, task.restore_ms
                );
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
        Command::Migrate {
            id,
            target,
            target_id,
            target_namespace,
        } => {
            let mut migration = migration_service_client::MigrationServiceClient::new(channel);
            let mut events = migration
                .migrate(MigrateRequest {
                    namespace,
                    container_id: id.clone(),
                    target: target.clone(),
                    options: Some(MigrateOptions {
                        target_container_id: target_id.unwrap_or_default(),
                        target_namespace: target_namespace.unwrap_or_default(),
                    }),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let mut report = Reporter::for_stderr("sent", None);
            report.stage("dumping");
            let mut done = None;
            while let Some(event) = events.next().await {
                match event.map_err(status_line)?.event {
                    Some(migrate_event::Event::Stage(stage)) => {
                        let name =
                            MigrateStage::try_from(stage).map_or("unknown", |s| s.as_str_name());
                        report.stage(&stage_word(name, "MIGRATE_STAGE_"));
                    }
                    Some(migrate_event::Event::DumpProgress(p)) => report.dump(&p),
                    Some(migrate_event::Event::BytesSent(bytes)) => report.bytes(bytes),
                    Some(migrate_event::Event::Done(r)) => done = Some(r),
                    None => {}
                }
            }
            report.finish();
            if let Some(r) = done {
                println!(
                    "{id} migrated to {target}: {} bytes sent ({} bytes checkpoint, resumed {} times), frozen {} ms, downtime {} ms, total {} ms",
                    r.bytes_sent, r.checkpoint_size, r.resumed, r.frozen_ms, r.downtime_ms, r.total_ms
                );
            }
        }
        Command::Export { reference, file } => {
            let mut stream = client
                .export_checkpoint(ExportCheckpointRequest {
                    namespace,
                    checkpoint_ref: reference.clone(),
                    resume_from: 0,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let mut out = export_file::Writer::create(&file)?;
            let mut bytes = 0u64;
            let mut done = None;
            let mut report = Reporter::for_stderr("exported", None);
            while let Some(message) = stream.next().await {
                let message = message.map_err(status_line)?;
                match &message.item {
                    Some(export_checkpoint_response::Item::Chunk(c)) => {
                        bytes += c.data.len() as u64;
                        report.bytes(bytes);
                    }
                    Some(export_checkpoint_response::Item::Manifest(m)) => done = Some(m.clone()),
                    None => {}
                }
                out.write(&message)?;
            }
            out.finish()?;
            report.finish();
            let manifest = done
                .ok_or_else(|| format!("the export of {reference} ended without its manifest"))?;
            eprintln!(
                "{reference}: {} blobs, {bytes} bytes exported to {}",
                manifest.blobs.len(),
                file.display()
            );
        }
        Command::Import { file, reference } => {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let target = ImportCheckpointRequest {
                item: Some(import_checkpoint_request::Item::Target(ImportTarget {
                    namespace,
                    checkpoint_ref: reference.unwrap_or_default(),
                })),
            };
            let _ = tx.send(target).await;
            let reader = export_file::Reader::open(&file)?;
            // The file's size (not stdin's): about the chunks' bytes.
            let total = std::fs::metadata(&file)
                .ok()
                .filter(|m| m.is_file() && file != std::path::Path::new("-"))
                .map(|m| m.len());
            let mut report = Reporter::for_stderr("sent", total);
            let read = std::thread::spawn(move || -> Result<(), String> {
                let mut bytes = 0u64;
                for message in reader {
                    let message = message?;
                    if let Some(export_checkpoint_response::Item::Chunk(c)) = &message.item {
                        bytes += c.data.len() as u64;
                        report.bytes(bytes);
                    }
                    let Some(request) = cowsnapd::transfer::to_import(message) else {
                        continue;
                    };
                    if tx.blocking_send(request).is_err() {
                        break;
                    }
                }
                report.finish();
                Ok(())
            });
            let answer = client
                .import_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let read = read
                .join()
                .map_err(|_| "the file reader thread panicked".to_string())?;
            let answer = answer.map_err(status_line)?.into_inner();
            read?;
            let info = answer.checkpoint.unwrap_or_default();
            println!("{}", info_line(&info));
        }
    }
    Ok(())
}

/// The file `ctl export` writes: a magic line, then the export's
/// messages as they came, each length-delimited (protobuf varint length,
/// then the message).
mod export_file {
    use std::io::{BufReader, BufWriter, Read, Write};
    use std::path::{Path, PathBuf};

    use cowsnapd::proto::ExportCheckpointResponse;
    use prost::Message;

    const MAGIC: &[u8] = b"cowsnap-export v1\n";

    pub struct Writer {
        out: BufWriter<Box<dyn Write>>,
        path: PathBuf,
    }

    impl Writer {
        pub fn create(path: &Path) -> Result<Writer, String> {
            let out: Box<dyn Write> = if path == Path::new("-") {
                Box::new(std::io::stdout())
            } else {
                Box::new(
                    std::fs::File::create(path)
                        .map_err(|e| format!("create {}: {e}", path.display()))?,
                )
            };
            let mut w = Writer {
                out: BufWriter::new(out),
                path: path.to_path_buf(),
            };
            w.put(MAGIC)?;
            Ok(w)
        }

        fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
            self.out
                .write_all(bytes)
                .map_err(|e| format!("write {}: {e}", self.path.display()))
        }

        pub fn write(&mut self, message: &ExportCheckpointResponse) -> Result<(), String> {
            self.put(&message.encode_length_delimited_to_vec())
        }

        pub fn finish(mut self) -> Result<(), String> {
            self.out
                .flush()
                .map_err(|e| format!("write {}: {e}", self.path.display()))
        }
    }

    pub struct Reader {
        input: BufReader<Box<dyn Read + Send>>,
        path: PathBuf,
    }

    impl Reader {
        pub fn open(path: &Path) -> Result<Reader, String> {
            let input: Box<dyn Read + Send> = if path == Path::new("-") {
                Box::new(std::io::stdin())
            } else {
                Box::new(
                    std::fs::File::open(path)
                        .map_err(|e| format!("open {}: {e}", path.display()))?,
                )
            };
            let mut r = Reader {
                input: BufReader::new(input),
                path: path.to_path_buf(),
            };
            let mut magic = vec![0u8; MAGIC.len()];
            r.input
                .read_exact(&mut magic)
                .map_err(|e| format!("read {}: {e}", r.path.display()))?;
            if magic != MAGIC {
                return Err(format!(
                    "{}: not a cowsnap export (it does not start with {:?})",
                    r.path.display(),
                    String::from_utf8_lossy(MAGIC).trim_end()
                ));
            }
            Ok(r)
        }

        /// The next message's length, or None at the end of the file.
        fn length(&mut self) -> Result<Option<usize>, String> {
            let mut value = 0u64;
            for i in 0..10 {
                let mut byte = [0u8];
                match self.input.read(&mut byte) {
                    Ok(0) if i == 0 => return Ok(None),
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("read {}: {e}", self.path.display())),
                }
                value |= u64::from(byte[0] & 0x7f) << (7 * i);
                if byte[0] & 0x80 == 0 {
                    return Ok(Some(value as usize));
                }
            }
            Err(format!(
                "{}: a message length is cut or malformed",
                self.path.display()
            ))
        }
    }

    impl Iterator for Reader {
        type Item = Result<ExportCheckpointResponse, String>;

        fn next(&mut self) -> Option<Self::Item> {
            let len = match self.length() {
                Ok(Some(len)) if len <= 8 << 20 => len,
                Ok(Some(len)) => {
                    return Some(Err(format!(
                        "{}: a message of {len} bytes (a chunk is at most 1 MiB)",
                        self.path.display()
                    )))
                }
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            let mut bytes = vec![0u8; len];
            if let Err(e) = self.input.read_exact(&mut bytes) {
                return Some(Err(format!("read {}: {e}", self.path.display())));
            }
            Some(
                ExportCheckpointResponse::decode(bytes.as_slice()).map_err(|e| {
                    format!("{}: a message does not decode: {e}", self.path.display())
                }),
            )
        }
    }
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
