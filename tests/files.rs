//! The files of the embedded SQLite store: a data directory that did not exist is
//! created 0700, and the database with its `-wal` and `-shm` files 0600, so other
//! local users cannot read the token secret (and forge an admin's tokens).

#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{Backend, TestServer};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_data_directory_and_database_files_are_private() {
    let root = tempfile::tempdir().expect("a temp dir");
    // A group- and world-readable default, as a umask of 022 gives.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = root.path().join("data");
    let db = dir.join("roomcast.db");
    let url = format!("sqlite://{}", db.display());
    let server = TestServer::spawn_with(Backend::Sqlite, |s| s.store.url = url).await;
    // A write, so the WAL and its index exist.
    server.sign_up("owner").await;
    assert_eq!(mode(&dir), 0o700, "data directory");
    assert_eq!(mode(&db), 0o600, "database file");
    for suffix in ["-wal", "-shm"] {
        let path = dir.join(format!("roomcast.db{suffix}"));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert!(roomcast::store::exposed_files(&db).is_empty());
}

#[test]
fn files_others_can_read_are_reported_with_the_fix() {
    let root = tempfile::tempdir().expect("a temp dir");
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let db = dir.join("roomcast.db");
    std::fs::write(&db, b"").expect("create");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warnings = roomcast::store::exposed_files(&db);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("data directory") && warnings[0].contains("chmod 700"));
    assert!(warnings[1].contains("mode 644") && warnings[1].contains("chmod 600"));
}
