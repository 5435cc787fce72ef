//! The remote coredms: the same operations as [`super::MongoStore`], over HTTP to a coredms
//! service, for components running in their own processes.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{BulkOutcome, BulkWrite, CoreError};
use crate::apps::{AppKind, StoredApp};
use crate::batch::{FileRecord, FileState};
use crate::tenants::{AdminPatch, Constraints, Profile, TenantName};

/// One coredms operation, as sent to `POST /internal/v1/rpc`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    CreateTenant {
        name: TenantName,
        constraints: Constraints,
    },
    Tenant {
        name: TenantName,
    },
    UpdateTenant {
        name: TenantName,
        patch: AdminPatch,
    },
    Authenticate {
        token: String,
    },
    BulkWrite {
        write: BulkWrite,
    },
    SaveApp {
        tenant: TenantName,
        kind: AppKind,
        source: String,
    },
    ActiveApp {
        tenant: TenantName,
        kind: AppKind,
    },
    PutFile {
        record: FileRecord,
    },
    File {
        tenant: TenantName,
        name: String,
    },
    Files {
        tenant: TenantName,
    },
    FilesInState {
        state: FileState,
    },
    DeleteFile {
        tenant: TenantName,
        name: String,
    },
    Ping,
}

pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(base_url: &str, internal_token: &str) -> Result<Self, CoreError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| CoreError::Invalid(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            token: internal_token.to_owned(),
            http,
        })
    }

    async fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T, CoreError> {
        self.send(&call).await
    }

    async fn send<T: DeserializeOwned, B: Serialize>(&self, call: &B) -> Result<T, CoreError> {
        let resp = self
            .http
            .post(format!("{}/internal/v1/rpc", self.base))
            .bearer_auth(&self.token)
            .json(call)
            .send()
            .await
            .map_err(|e| CoreError::Unavailable(format!("coredms service: {e}")))?;
        let status = resp.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Err(CoreError::Unavailable("coredms service unavailable".into()));
        }
        if !status.is_success() {
            return Err(CoreError::Database(format!(
                "coredms service answered {status}"
            )));
        }
        resp.json::<Result<T, CoreError>>()
            .await
            .map_err(|e| CoreError::Unavailable(format!("coredms service: {e}")))?
    }

    pub async fn create_tenant(
        &self,
        name: &TenantName,
        constraints: Constraints,
    ) -> Result<(Profile, String), CoreError> {
        self.call(Call::CreateTenant {
            name: name.clone(),
            constraints,
        })
        .await
    }

    pub async fn tenant(&self, name: &TenantName) -> Result<Profile, CoreError> {
        self.call(Call::Tenant { name: name.clone() }).await
    }

    pub async fn update_tenant(
        &self,
        name: &TenantName,
        patch: AdminPatch,
    ) -> Result<Profile, CoreError> {
        self.call(Call::UpdateTenant {
            name: name.clone(),
            patch,
        })
        .await
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<TenantName>, CoreError> {
        self.call(Call::Authenticate {
            token: token.to_owned(),
        })
        .await
    }

    pub async fn bulk_write(&self, write: &BulkWrite) -> Result<BulkOutcome, CoreError> {
        // Borrowed, so a retried write is not copied: the same shape as `Call::BulkWrite`.
        self.send(&serde_json::json!({"op": "bulk_write", "write": write}))
            .await
    }

    pub async fn save_app(
        &self,
        tenant: &TenantName,
        kind: AppKind,
        source: &str,
    ) -> Result<u32, CoreError> {
        self.call(Call::SaveApp {
            tenant: tenant.clone(),
            kind,
            source: source.to_owned(),
        })
        .await
    }

    pub async fn active_app(
        &self,
        tenant: &TenantName,
        kind: AppKind,
    ) -> Result<Option<StoredApp>, CoreError> {
        self.call(Call::ActiveApp {
            tenant: tenant.clone(),
            kind,
        })
        .await
    }

    pub async fn put_file(&self, record: &FileRecord) -> Result<(), CoreError> {
        self.call(Call::PutFile {
            record: record.clone(),
        })
        .await
    }

    pub async fn file(
        &self,
        tenant: &TenantName,
        name: &str,
    ) -> Result<Option<FileRecord>, CoreError> {
        self.call(Call::File {
            tenant: tenant.clone(),
            name: name.to_owned(),
        })
        .await
    }

    pub async fn files(&self, tenant: &TenantName) -> Result<Vec<FileRecord>, CoreError> {
        self.call(Call::Files {
            tenant: tenant.clone(),
        })
        .await
    }

    pub async fn files_in_state(&self, state: FileState) -> Result<Vec<FileRecord>, CoreError> {
        self.call(Call::FilesInState { state }).await
    }

    pub async fn delete_file(&self, tenant: &TenantName, name: &str) -> Result<(), CoreError> {
        self.call(Call::DeleteFile {
            tenant: tenant.clone(),
            name: name.to_owned(),
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), CoreError> {
        self.call(Call::Ping).await
    }
}
