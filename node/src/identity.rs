//! The node's ed25519 identity: generated on first start, kept in `node.key` in the data directory.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the node key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("node key {path} is damaged (expected 32 bytes, found {len}); move it away to start as a new node")]
    Damaged { path: String, len: usize },
    #[error("cannot write a new node key to {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, IdentityError> {
    let path = data_dir.join("node.key");
    let shown = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] =
                bytes.as_slice().try_into().map_err(|_| IdentityError::Damaged { path: shown, len: bytes.len() })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let write = |source| IdentityError::Write { path: shown.clone(), source };
            let tmp = data_dir.join("node.key.tmp");
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp).map_err(write)?;
            f.write_all(&key.to_bytes()).map_err(write)?;
            f.sync_all().map_err(write)?;
            std::fs::rename(&tmp, &path).map_err(write)?;
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
        let a = super::load_or_create(dir.path()).expect("create");
        let b = super::load_or_create(dir.path()).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::write(dir.path().join("node.key"), b"short").expect("write");
        assert!(super::load_or_create(dir.path()).is_err());
    }
}
