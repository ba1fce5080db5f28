//! `atoma da serve|put|get`: run a local data-availability server speaking the Walrus HTTP API
//! over a blob directory, and put or fetch (hash-checked) blobs on any Walrus-compatible store.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use atoma_da::{BlobRef, BlobStore, DirStore, WalrusClient, WalrusConfig};
use clap::Subcommand;

use crate::home::Home;

#[derive(Debug, Subcommand)]
pub enum DaCommand {
    /// Serve a blob directory over the Walrus HTTP API until Ctrl-C.
    Serve {
        /// Blob directory (default: <home>/da).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4000")]
        bind: SocketAddr,
        /// Largest blob accepted by PUT, in MiB.
        #[arg(long, default_value_t = 16)]
        max_body_mib: usize,
    },
    /// Put FILE on a Walrus-compatible store; prints the blob reference as JSON.
    Put {
        file: PathBuf,
        /// Base URL of the store (publisher and aggregator).
        #[arg(long, default_value = "http://127.0.0.1:4000")]
        url: String,
        /// Storage epochs to ask for.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
    },
    /// Fetch a blob, check its Blake2b-256 and size, and write it to stdout or FILE.
    Get {
        blob_id: String,
        /// Blake2b-256 of the content (64 hex digits).
        #[arg(long)]
        hash: String,
        /// Size of the content in bytes.
        #[arg(long)]
        size: u64,
        /// Base URL of the store (publisher and aggregator).
        #[arg(long, default_value = "http://127.0.0.1:4000")]
        url: String,
        /// Write the content here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

pub fn run(home: &Home, cmd: DaCommand) -> anyhow::Result<()> {
    match cmd {
        DaCommand::Serve {
            dir,
            bind,
            max_body_mib,
        } => serve(
            dir.unwrap_or_else(|| home.root.join("da")),
            bind,
            max_body_mib,
        ),
        DaCommand::Put { file, url, epochs } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let client = WalrusClient::new(WalrusConfig {
                epochs,
                ..WalrusConfig::with_url(url.clone())
            });
            let blob = client
                .put(&bytes)
                .with_context(|| format!("putting {} on {url}", file.display()))?;
            println!("{}", serde_json::to_string(&blob)?);
            Ok(())
        }
        DaCommand::Get {
            blob_id,
            hash,
            size,
            url,
            output,
        } => {
            let blob = BlobRef {
                content_hash: atoma_da::parse_hash_hex(&hash).context("--hash")?,
                blob_id,
                size,
            };
            let bytes = WalrusClient::new(WalrusConfig::with_url(url.clone()))
                .get(&blob)
                .with_context(|| format!("getting blob {} from {url}", blob.blob_id))?;
            match output {
                Some(p) => std::fs::write(&p, &bytes)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)?;
                    out.flush()?;
                }
            }
            Ok(())
        }
    }
}

fn serve(dir: PathBuf, bind: SocketAddr, max_body_mib: usize) -> anyhow::Result<()> {
    let store = DirStore::open(&dir)
        .with_context(|| format!("opening the blob directory {}", dir.display()))?;
    let body_limit = max_body_mib
        .checked_mul(1024 * 1024)
        .context("--max-body-mib is too large")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on {bind}"))?;
        let addr = listener.local_addr().context("no local address")?;
        eprintln!(
            "DA server (Walrus HTTP API) on http://{addr}, blobs in {}",
            dir.display()
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down: finishing requests in flight");
        };
        atoma_da::server::serve_with_limit(listener, store, body_limit, shutdown)
            .await
            .context("the DA server failed")
    })
}
