//! The `atoma` command: the composition root. It reads flags and environment, sets up tracing
//! and the compute threads, and dispatches to one subcommand module per verb. Errors end as one
//! line on stderr and a non-zero exit code; nothing here panics on bad input.

// Printing to stdout/stderr is this crate's job (user output); libraries use tracing.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cmd;
mod home;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Atoma node: verifiable, paid AI inference on your own hardware.
#[derive(Debug, Parser)]
#[command(name = "atoma", version, about, long_about = None)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "ATOMA_THREADS")]
    threads: Option<usize>,
    /// Directory of the model cache.
    #[arg(long, global = true, env = "ATOMA_MODEL_CACHE")]
    model_cache: Option<std::path::PathBuf>,
    /// Data directory: keys, local ledger, node state, config (default ~/.local/share/atoma).
    #[arg(long, global = true, env = "ATOMA_HOME")]
    home: Option<std::path::PathBuf>,
    /// Log filter (e.g. `info`, `atoma_engine=debug`); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// CPU kernel of the quantized matmuls: auto (the best this CPU has), avx512-vnni, avx2 or
    /// scalar. Every kernel gives the same bits; only speed differs.
    #[arg(
        long,
        global = true,
        env = "ATOMA_KERNEL",
        default_value = "auto",
        value_parser = kernel_parser()
    )]
    kernel: atoma_engine::KernelChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd::generate::Args),
    /// Manage the model cache: pull, list, path.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Measure prompt-processing and decode speed, next to llama.cpp's llama-bench if present.
    Bench(cmd::bench::Args),
    /// Set up a local ledger, keys, a node and a funded stack, then run the node.
    Up(cmd::up::UpArgs),
    /// Run a node.
    #[command(subcommand)]
    Node(cmd::node::NodeCommand),
    /// Act on the local ledger: register-node, create-task, subscribe-node-to-task, acquire-stack, …
    Db(cmd::db::DbArgs),
    /// Request logs of settled stacks: show them, prove a request's inclusion, check a proof offline.
    #[command(subcommand)]
    Log(cmd::log::LogCommand),
    /// Manage named keys (Sui ed25519 keystores).
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Print a signed request for a stack (headers and body, or a curl command).
    Sign(cmd::client::SignArgs),
    /// Send a chat message to a node as the stack's owner and stream the answer.
    Chat(cmd::client::ChatArgs),
    /// Serving benchmark against an OpenAI-compatible endpoint (an atoma node or llama-server):
    /// TTFT, inter-token latency, TPOT and throughput over a concurrency sweep.
    Loadgen(cmd::loadgen::Args),
    /// Data-availability store: run a local Walrus-compatible server, put and get blobs.
    #[command(subcommand)]
    Da(cmd::da::DaCommand),
    /// Serve a Sui test double (sui.rpc.v2 over gRPC on loopback) running the Atoma contract,
    /// for trying `[ledger] backend = "sui"` without a Sui network.
    SuiFake(cmd::sui_fake::SuiFakeArgs),
    /// The users' OpenAI front door with API keys: `serve`, and `keys` to manage them.
    #[command(subcommand)]
    Gateway(cmd::gateway::GatewayCommand),
    /// A local network: one ledger, one DA server and N nodes on loopback (`up`, `status`).
    #[command(subcommand)]
    Devnet(cmd::devnet::DevnetCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(msg) = check_cpu() {
        eprintln!("error: {msg}");
        return ExitCode::FAILURE;
    }
    let threads = cli
        .threads
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: called before any other thread exists; candle reads these once when it builds its
    // thread pool.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let filter = std::env::var("RUST_LOG").unwrap_or(cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    if cli.kernel != atoma_engine::KernelChoice::Auto
        && let Err(e) = atoma_engine::select_kernel(cli.kernel)
    {
        eprintln!("error: --kernel {}: {e}", cli.kernel);
        return ExitCode::FAILURE;
    }
    let store = atoma_models::ModelStore::new(
        cli.model_cache
            .clone()
            .unwrap_or_else(atoma_models::ModelStore::default_root),
    );
    let home = home::Home::new(cli.home.clone());
    let res = match cli.command {
        Command::Generate(a) => cmd::generate::run(&store, &a, threads),
        Command::Model(c) => cmd::model::run(&store, c),
        Command::Bench(a) => cmd::bench::run(&store, &a, threads),
        Command::Up(a) => cmd::up::run(&home, &store, &a),
        Command::Node(c) => cmd::node::run(&home, &store, c),
        Command::Db(a) => cmd::db::run(&home, a),
        Command::Log(c) => cmd::log::run(&home, c),
        Command::Keys(c) => cmd::keys::run(&home, c),
        Command::Sign(a) => cmd::client::sign(&home, &a),
        Command::Chat(a) => cmd::client::chat(&home, &a),
        Command::Loadgen(a) => cmd::loadgen::run(&home, &store, &a),
        Command::Da(c) => cmd::da::run(&home, c),
        Command::SuiFake(a) => cmd::sui_fake::run(&home, &a),
        Command::Gateway(c) => cmd::gateway::run(&home, c),
        Command::Devnet(c) => {
            // Without --home the devnet gets its own directory beside `atoma up`'s files.
            let dir = if cli.home.is_some() {
                home.clone()
            } else {
                home::Home::new(Some(home.root.join("devnet")))
            };
            cmd::devnet::run(&dir, &store, c)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: causes joined by ": ", inner newlines (e.g. TOML errors) collapsed.
            let chain: Vec<String> = e
                .chain()
                .map(|c| {
                    c.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let mut line = String::new();
            for part in chain {
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}

/// `--kernel`: one of the engine's kernel names, listed in the help and in the error.
fn kernel_parser() -> impl clap::builder::TypedValueParser<Value = atoma_engine::KernelChoice> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(
        atoma_engine::KernelChoice::ALL.map(atoma_engine::KernelChoice::as_str),
    )
    .try_map(|s| s.parse::<atoma_engine::KernelChoice>())
}

/// The binary is built for x86-64-v3; say so instead of dying with SIGILL on an older CPU.
fn check_cpu() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return Err(
                "this build needs a CPU with AVX2 and FMA (x86-64-v3); rebuild without \
                        `-C target-cpu=x86-64-v3` in .cargo/config.toml for older CPUs"
                    .into(),
            );
        }
    }
    Ok(())
}
