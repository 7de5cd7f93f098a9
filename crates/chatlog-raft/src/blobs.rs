//! File attachments' bytes: a content-addressed store (`<dir>/<sha[0..2]>/<sha>`, the same
//! bytes stored once), kept by every node, and the messages that copy blobs between nodes.
//!
//! A file's metadata goes through the Raft log like every write; its bytes do not (up to
//! 25 MiB each, they would stall the log). Instead, [`crate::node::ClusterNode::replicate_blob`]
//! copies an upload to the other nodes before its metadata is proposed, and answers only once
//! a majority of the voters holds it, so an acknowledged upload survives the loss of any
//! minority, as a message does. A node that lacks a blob (down during the upload, wiped,
//! added later) fetches it from a peer when it is first read
//! ([`crate::node::ClusterNode::fetch_blob`]). Blobs travel on a connection of their own,
//! never behind Raft's messages.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Hex digits of a SHA-256.
const SHA_HEX_DIGITS: usize = 64;

/// A blob sent to a peer ([`crate::wire::Route::BlobPut`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct BlobPut<'a> {
    /// The SHA-256 of `bytes`, lowercase hex.
    pub sha: &'a str,
    /// The content.
    #[serde(with = "serde_bytes", borrow)]
    pub bytes: &'a [u8],
}

/// The answer to [`crate::wire::Route::BlobGet`]: the content, if the peer holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlobGot(#[serde(with = "serde_bytes")] pub Option<Vec<u8>>);

/// Whether `sha` is a SHA-256 in lowercase hex (checked before it names a path).
pub fn valid_sha(sha: &str) -> bool {
    sha.len() == SHA_HEX_DIGITS
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A content-addressed blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> BlobStore {
        BlobStore { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `sha` lives (`sha` must be [`valid_sha`]).
    pub fn path(&self, sha: &str) -> PathBuf {
        debug_assert!(valid_sha(sha), "blob name {sha:?}");
        self.dir.join(&sha[..2]).join(sha)
    }

    /// A new temporary file name in the store, for a blob being written.
    pub async fn temp_path(&self) -> std::io::Result<PathBuf> {
        let tmp = self.dir.join("tmp");
        tokio::fs::create_dir_all(&tmp).await?;
        Ok(tmp.join(format!("blob-{:032x}", rand::random::<u128>())))
    }

    /// Makes `tmp` (written and synced) blob `sha`, durably; drops it if the blob is there
    /// already.
    pub async fn adopt(&self, tmp: &Path, sha: &str) -> std::io::Result<()> {
        let target = self.path(sha);
        let parent = target
            .parent()
            .expect("blob paths have a parent")
            .to_owned();
        tokio::fs::create_dir_all(&parent).await?;
        if tokio::fs::try_exists(&target).await? {
            return tokio::fs::remove_file(tmp).await;
        }
        tokio::fs::rename(tmp, &target).await?;
        tokio::task::spawn_blocking(move || std::fs::File::open(&parent)?.sync_all())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Stores `bytes` as blob `sha`, durably, after checking that they hash to it.
    pub async fn put(&self, sha: &str, bytes: &[u8]) -> std::io::Result<()> {
        if !valid_sha(sha) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("blob name {sha:?} is not a SHA-256 in lowercase hex"),
            ));
        }
        let actual = sha256_hex(bytes);
        if actual != sha {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("blob {sha}: its {} bytes hash to {actual}", bytes.len()),
            ));
        }
        if self.contains(sha).await {
            return Ok(());
        }
        let tmp = self.temp_path().await?;
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
            file.sync_all().await
        }
        .await;
        match written {
            Ok(()) => self.adopt(&tmp, sha).await,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Whether blob `sha` is here.
    pub async fn contains(&self, sha: &str) -> bool {
        valid_sha(sha) && tokio::fs::try_exists(self.path(sha)).await.unwrap_or(false)
    }

    /// Blob `sha`'s bytes, if it is here.
    pub async fn read(&self, sha: &str) -> std::io::Result<Option<Vec<u8>>> {
        if !valid_sha(sha) {
            return Ok(None);
        }
        match tokio::fs::read(self.path(sha)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_are_stored_once_under_their_hash_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("files"));
        let bytes = b"attachment bytes".as_slice();
        let sha = sha256_hex(bytes);
        assert!(!store.contains(&sha).await);
        assert_eq!(store.read(&sha).await.unwrap(), None);
        store.put(&sha, bytes).await.unwrap();
        store.put(&sha, bytes).await.unwrap();
        assert_eq!(store.read(&sha).await.unwrap().as_deref(), Some(bytes));
        assert!(
            store
                .path(&sha)
                .starts_with(dir.path().join("files").join(&sha[..2]))
        );

        let wrong = sha256_hex(b"other bytes");
        let err = store.put(&wrong, bytes).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        assert!(!store.contains(&wrong).await);
        for bad in ["../../etc/passwd", "", &sha[..63], &sha.to_uppercase()] {
            assert!(store.put(bad, bytes).await.is_err(), "{bad:?}");
            assert_eq!(store.read(bad).await.unwrap(), None, "{bad:?}");
        }
        // Only the blob is left: no temporary files.
        let tmp = std::fs::read_dir(store.dir().join("tmp")).unwrap().count();
        assert_eq!(tmp, 0);
    }

    #[test]
    fn blob_messages_round_trip() {
        let put = BlobPut {
            sha: "ab",
            bytes: &[1, 2, 3],
        };
        let wire = postcard::to_allocvec(&put).unwrap();
        // Bytes go as one run, not element by element.
        assert_eq!(wire.len(), 1 + 2 + 1 + 3);
        let back: BlobPut<'_> = postcard::from_bytes(&wire).unwrap();
        assert_eq!((back.sha, back.bytes), ("ab", &[1u8, 2, 3][..]));
        let got = postcard::to_allocvec(&BlobGot(Some(vec![9; 4]))).unwrap();
        let back: BlobGot = postcard::from_bytes(&got).unwrap();
        assert_eq!(back.0, Some(vec![9; 4]));
    }
}
