//! The staging directory: `<dir>/<tenant>/<file>`, with names checked so no request can
//! name a path outside its tenant's folder. Uploads stream to a temporary file and are
//! renamed into place only when complete and within limits.

use std::path::PathBuf;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::tenants::TenantName;

/// A file name tenants may not stage (its first 80 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid file name `{0}`: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit, without `..`"
)]
pub struct InvalidFileName(pub String);

/// A file name tenants may stage: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, with no `..`.
pub fn check_file_name(name: &str) -> Result<(), InvalidFileName> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(InvalidFileName(name.chars().take(80).collect()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("file exceeds the {0} bytes limit")]
    TooLarge(u64),
    #[error("file is empty")]
    Empty,
    #[error("upload interrupted: {0}")]
    Body(String),
    #[error("cannot write staged file: {0}")]
    Io(#[from] std::io::Error),
}

/// A partial upload, removed when dropped unless disarmed (set to `None`) once in place.
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub struct Staged {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct Staging {
    root: PathBuf,
}

impl Staging {
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn dir(&self, tenant: &TenantName) -> PathBuf {
        self.root.join(tenant.as_str())
    }

    /// The path of a staged file; `name` must have passed [`check_file_name`].
    pub fn path(&self, tenant: &TenantName, name: &str) -> PathBuf {
        self.dir(tenant).join(name)
    }

    /// Staged files of a tenant (completed uploads only).
    pub async fn count(&self, tenant: &TenantName) -> std::io::Result<u32> {
        let mut n = 0;
        let mut rd = match tokio::fs::read_dir(self.dir(tenant)).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        while let Some(e) = rd.next_entry().await? {
            if !e.file_name().to_string_lossy().starts_with('.') {
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn exists(&self, tenant: &TenantName, name: &str) -> bool {
        tokio::fs::try_exists(self.path(tenant, name))
            .await
            .unwrap_or(false)
    }

    /// Streams `body` to disk, hashing as it goes; over `max_bytes` it stops, removes what
    /// it wrote, and fails. Nothing appears under `name` unless the whole upload succeeded.
    pub async fn write<S, E>(
        &self,
        tenant: &TenantName,
        name: &str,
        mut body: S,
        max_bytes: u64,
    ) -> Result<Staged, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dir = self.dir(tenant);
        tokio::fs::create_dir_all(&dir).await?;
        let tmp = dir.join(format!(".{name}.{}.part", rand::random::<u64>()));
        // Removes the partial file however the upload ends early, including the request
        // being dropped mid-read (a request timeout), where no code after an await runs.
        let mut part = PartFile(Some(tmp.clone()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            let mut hash = Sha256::new();
            let mut total = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
                total += chunk.len() as u64;
                if total > max_bytes {
                    return Err(UploadError::TooLarge(max_bytes));
                }
                hash.update(&chunk);
                f.write_all(&chunk).await?;
            }
            if total == 0 {
                return Err(UploadError::Empty);
            }
            f.sync_all().await?;
            Ok(Staged {
                bytes: total,
                sha256: hex::encode(hash.finalize()),
            })
        }
        .await;
        match result {
            Ok(s) => {
                tokio::fs::rename(&tmp, self.path(tenant, name)).await?;
                part.0 = None;
                Ok(s)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    pub async fn remove(&self, tenant: &TenantName, name: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(tenant, name)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_names_are_quoted_cut_to_80_characters_in_the_tenants_words() {
        assert_eq!(
            check_file_name("../x").expect_err("dots").to_string(),
            "invalid file name `../x`: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit, without `..`"
        );
        let long = "é".repeat(200);
        assert_eq!(
            check_file_name(&long).expect_err("long"),
            InvalidFileName("é".repeat(80))
        );
        assert_eq!(
            crate::model::check_collection("system.users")
                .expect_err("reserved")
                .to_string(),
            "invalid collection name `system.users`: use 1-64 of [A-Za-z0-9_.-], not starting with `system.`"
        );
    }

    #[test]
    fn hostile_names_are_rejected() {
        for ok in ["a.csv", "Water-Quality_10k.csv", "x"] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../b",
            "/etc/passwd",
            ".hidden",
            "a\\b",
            "a b",
            "..",
            "a..b",
            "é.csv",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }
}
