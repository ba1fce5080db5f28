//! [`DirStore`]: a content-addressed directory of blobs, the storage behind the local
//! Walrus-compatible server and a [`BlobStore`] of its own. A blob's id is
//! [`content_blob_id`] of its bytes (URL-safe base64 of the Blake2b-256, 43 characters) and its
//! file name is that id. Writes are atomic (a temp file in the same directory, fsync, rename,
//! directory fsync) and idempotent (a blob already present is not rewritten). Ids used as file
//! names are validated ([`validate_blob_id`]) so that no request escapes the directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    BlobRef, BlobStore, DaError, Result, check_content, content_blob_id, validate_blob_id,
};

/// A content-addressed blob directory. Cheap to clone (shares the path).
#[derive(Debug, Clone)]
pub struct DirStore {
    root: Arc<PathBuf>,
}

/// Distinguishes temp files of concurrent writers in one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn io_err(what: &str, path: &Path, e: std::io::Error) -> DaError {
    DaError::Io(format!("{what} {}: {e}", path.display()))
}

impl DirStore {
    /// Opens the store at `path`, creating the directory if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let root = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(|e| io_err("creating", &root, e))?;
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// The directory of the store.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, blob_id: &str) -> Result<PathBuf> {
        validate_blob_id(blob_id)?;
        Ok(self.root.join(blob_id))
    }

    /// The stored bytes of `blob_id` unchecked, `None` if absent; an invalid id is an error.
    pub fn read_raw(&self, blob_id: &str) -> Result<Option<Vec<u8>>> {
        let p = self.blob_path(blob_id)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &p, e)),
        }
    }

    /// Stores `bytes` under their content id; `true` if the blob was not there before.
    pub fn write_raw(&self, bytes: &[u8]) -> Result<(String, bool)> {
        let id = content_blob_id(bytes);
        let dest = self.blob_path(&id)?;
        if let Ok(m) = std::fs::metadata(&dest)
            && m.is_file()
            && m.len() == bytes.len() as u64
        {
            return Ok((id, false));
        }
        // A leading dot: never a valid blob id, so never served or confused with a blob.
        let tmp = self.root.join(format!(
            ".tmp-{id}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let res = write_synced(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &dest).map_err(|e| io_err("renaming", &tmp, e)));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        // Make the rename durable; some platforms cannot open a directory, which is harmless.
        if let Ok(d) = std::fs::File::open(&*self.root) {
            let _ = d.sync_all();
        }
        tracing::debug!(blob_id = %id, size = bytes.len(), "blob stored");
        Ok((id, true))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err("creating", path, e))?;
    f.write_all(bytes).map_err(|e| io_err("writing", path, e))?;
    f.sync_all().map_err(|e| io_err("syncing", path, e))
}

impl BlobStore for DirStore {
    fn put(&self, bytes: &[u8]) -> Result<BlobRef> {
        let (blob_id, _) = self.write_raw(bytes)?;
        Ok(BlobRef {
            blob_id,
            content_hash: atoma_crypto::blake2b256(bytes),
            size: bytes.len() as u64,
        })
    }

    fn get(&self, blob: &BlobRef) -> Result<Vec<u8>> {
        let bytes = self
            .read_raw(&blob.blob_id)?
            .ok_or_else(|| DaError::NotFound {
                blob_id: blob.blob_id.clone(),
            })?;
        check_content(blob, &bytes)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path().join("blobs")).unwrap();
        let (id, new) = s.write_raw(b"abc").unwrap();
        assert!(new);
        assert_eq!(id, content_blob_id(b"abc"));
        let (id2, new2) = s.write_raw(b"abc").unwrap();
        assert_eq!((id2.as_str(), new2), (id.as_str(), false));
        assert_eq!(s.read_raw(&id).unwrap().unwrap(), b"abc");
        assert_eq!(s.read_raw(&content_blob_id(b"x")).unwrap(), None);
        // Only the blob itself is left in the directory: no temp files.
        let names: Vec<_> = std::fs::read_dir(s.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn ids_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        let s = DirStore::open(dir.path().join("blobs")).unwrap();
        for bad in ["../secret", "..", "", "a/../../secret"] {
            assert!(
                matches!(s.read_raw(bad), Err(DaError::InvalidBlobId { .. })),
                "{bad:?}"
            );
        }
    }
}
