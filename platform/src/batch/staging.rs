//! The staging directory: `<dir>/<tenant>/<file>~<upload>`, with names checked so no request
//! can name a path outside its tenant's folder. Uploads stream to a temporary file
//! (`.<file>.<random>.part`) and are renamed into place only when complete and within
//! limits. Each upload gets a copy of its own, named by its upload id: the file record says
//! which copy it describes, so two racing uploads of one name, or an upload racing an
//! ingestion, can never leave a record naming bytes it did not hash (see `batch::router`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

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
    /// The upload's id: its copy is `<file>~<upload>`.
    pub upload: String,
}

/// What [`Staging::sweep`] found: staged copies old enough to be checked against their
/// records (tenant folder, file name, upload id).
pub struct Sweep {
    pub parts_removed: u64,
    pub copies: Vec<(String, String, String)>,
}

/// The file name and upload id of a staged copy's name, `<file>~<upload>`; a copy staged
/// before uploads had ids is `<file>`, with an empty upload id. `None` for what is not a
/// staged copy (dot files: partial uploads).
fn parse_copy(entry: &str) -> Option<(&str, &str)> {
    if entry.starts_with('.') {
        return None;
    }
    Some(entry.rsplit_once('~').unwrap_or((entry, "")))
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

    /// The path of upload `upload` of a staged file; `name` must have passed
    /// [`check_file_name`] (which allows no `~`), `upload` be a [`Staged::upload`] or empty.
    pub fn path(&self, tenant: &TenantName, name: &str, upload: &str) -> PathBuf {
        if upload.is_empty() {
            self.dir(tenant).join(name)
        } else {
            self.dir(tenant).join(format!("{name}~{upload}"))
        }
    }

    /// The names of a tenant's staged files (completed uploads only; a name with two copies
    /// for a moment, while one replaces the other, is one name).
    pub async fn names(&self, tenant: &TenantName) -> std::io::Result<HashSet<String>> {
        let mut names = HashSet::new();
        let mut rd = match tokio::fs::read_dir(self.dir(tenant)).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e),
        };
        while let Some(e) = rd.next_entry().await? {
            if let Some((name, _)) = parse_copy(&e.file_name().to_string_lossy()) {
                names.insert(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Removes partial uploads not written to for `grace` (an upload in progress, here or
    /// in another replica sharing the directory, writes to its part file all along), and
    /// lists the staged copies older than `grace`, for the caller to remove those no record
    /// names (an upload that died between its rename and its record).
    pub async fn sweep(&self, grace: Duration) -> std::io::Result<Sweep> {
        let mut sweep = Sweep {
            parts_removed: 0,
            copies: Vec::new(),
        };
        let mut tenants = tokio::fs::read_dir(&self.root).await?;
        while let Some(t) = tenants.next_entry().await? {
            if !t.file_type().await?.is_dir() {
                continue;
            }
            let tenant = t.file_name().to_string_lossy().into_owned();
            let mut rd = tokio::fs::read_dir(t.path()).await?;
            while let Some(e) = rd.next_entry().await? {
                let old = e
                    .metadata()
                    .await
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age > grace);
                if !old {
                    continue;
                }
                let entry = e.file_name().to_string_lossy().into_owned();
                match parse_copy(&entry) {
                    None if entry.ends_with(".part") => {
                        match tokio::fs::remove_file(e.path()).await {
                            Ok(()) => sweep.parts_removed += 1,
                            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                            Err(err) => return Err(err),
                        }
                    }
                    None => {}
                    Some((name, upload)) => {
                        sweep
                            .copies
                            .push((tenant.clone(), name.to_owned(), upload.to_owned()))
                    }
                }
            }
        }
        Ok(sweep)
    }

    /// Streams `body` to disk, hashing as it goes; over `max_bytes` it stops, removes what
    /// it wrote, and fails. Nothing appears under `name` unless the whole upload succeeded,
    /// and then as a new copy of its own (`<name>~<upload>`), beside any earlier one.
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
                upload: crate::model::new_id(),
            })
        }
        .await;
        match result {
            Ok(s) => {
                tokio::fs::rename(&tmp, self.path(tenant, name, &s.upload)).await?;
                part.0 = None;
                Ok(s)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Removes one staged copy (gone already is fine).
    pub async fn remove(
        &self,
        tenant: &TenantName,
        name: &str,
        upload: &str,
    ) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(tenant, name, upload)).await {
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
        // A staged copy's name cannot be taken for another file's.
        assert!(check_file_name("a.csv~0123").is_err());
    }

    #[test]
    fn a_copy_name_gives_its_file_and_upload() {
        assert_eq!(parse_copy("a.csv~00ff"), Some(("a.csv", "00ff")));
        assert_eq!(parse_copy("a.csv"), Some(("a.csv", "")));
        assert_eq!(parse_copy(".a.csv.123.part"), None);
    }

    #[tokio::test]
    async fn each_upload_is_a_copy_of_its_own_and_old_parts_are_swept_but_fresh_ones_kept() {
        let root =
            std::env::temp_dir().join(format!("mysimbdp-staging-{}", crate::model::new_id()));
        let staging = Staging::new(root.clone()).expect("dir");
        let t = TenantName::parse("alice").expect("valid");
        let body = |s: &'static str| {
            futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
                s.as_bytes(),
            ))])
        };
        let one = staging
            .write(&t, "a.csv", body("x\n1\n"), 100)
            .await
            .expect("one");
        let two = staging
            .write(&t, "a.csv", body("x\n2\n"), 100)
            .await
            .expect("two");
        assert_ne!(one.upload, two.upload);
        for s in [&one, &two] {
            assert!(staging.path(&t, "a.csv", &s.upload).exists());
        }
        assert_eq!(staging.names(&t).await.expect("names").len(), 1);

        let dir = root.join("alice");
        let stale = dir.join(".a.csv.1.part");
        let fresh = dir.join(".a.csv.2.part");
        std::fs::write(&stale, "partial").expect("part");
        std::fs::write(&fresh, "partial").expect("part");
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for p in [&stale, &staging.path(&t, "a.csv", &one.upload)] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(hour_ago))
                .expect("backdated");
        }
        let sweep = staging
            .sweep(Duration::from_secs(600))
            .await
            .expect("sweep");
        assert_eq!(sweep.parts_removed, 1);
        assert!(!stale.exists() && fresh.exists());
        assert_eq!(
            sweep.copies,
            [("alice".to_owned(), "a.csv".to_owned(), one.upload.clone())],
            "only the old copy is offered for checking"
        );
        let _ = std::fs::remove_dir_all(root);
    }
}
