//! The content-addressed directory store passes the store conformance suite, and a reopened
//! directory still serves what was put before.

use atoma_da::{BlobStore, DirStore, conformance};

#[test]
fn dir_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(&DirStore::open(dir.path().join("blobs")).unwrap());
}

#[test]
fn a_reopened_dir_store_keeps_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let r = DirStore::open(dir.path()).unwrap().put(b"kept").unwrap();
    assert_eq!(r.blob_id.len(), 43);
    assert_eq!(
        DirStore::open(dir.path()).unwrap().get(&r).unwrap(),
        b"kept"
    );
}
