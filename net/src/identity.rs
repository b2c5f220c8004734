//! Long-lived ed25519 identities (a node's `node.key`, the tracker's `tracker.key`): generated on first
//! start, kept as the 32-byte seed in a file only the owner can read.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key {path} is damaged (expected 32 bytes, found {len}); move it away to start with a new identity")]
    Damaged { path: String, len: usize },
    #[error("cannot write a new key to {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// The key in the file at `path`, created there if there is none.
pub fn load_or_create(path: &Path) -> Result<SigningKey, IdentityError> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let seed: [u8; 32] =
                bytes.as_slice().try_into().map_err(|_| IdentityError::Damaged { path: shown, len: bytes.len() })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let write = |source| IdentityError::Write { path: shown.clone(), source };
            let tmp = path.with_extension("tmp");
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp).map_err(write)?;
            f.write_all(&key.to_bytes()).map_err(write)?;
            f.sync_all().map_err(write)?;
            std::fs::rename(&tmp, path).map_err(write)?;
            Ok(key)
        }
        Err(source) => Err(IdentityError::Read { path: shown, source }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        let a = super::load_or_create(&path).expect("create");
        let b = super::load_or_create(&path).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::write(&path, b"short").expect("write");
        assert!(super::load_or_create(&path).is_err());
    }
}
