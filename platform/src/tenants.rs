//! Tenants: names parsed once at the edge, profiles with constraints, API tokens.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{AppLimits, AppLimitsPatch, Format, TenantLimits, check_max_file_bytes};

/// A tenant name that matches `[a-z0-9][a-z0-9_-]{0,31}`; holding one proves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantName(String);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid tenant name `{0}`: names match [a-z0-9][a-z0-9_-]{{0,31}}")]
pub struct InvalidTenantName(pub String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, InvalidTenantName> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
        if first_ok && rest_ok && bytes.len() <= 32 {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidTenantName(s.chars().take(64).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for TenantName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TenantName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A name as the API documents it: a string with the rule's pattern.
impl utoipa::PartialSchema for TenantName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some(TENANT_NAME_PATTERN))
            .max_length(Some(32))
            .into()
    }
}

impl utoipa::ToSchema for TenantName {}

/// [`TenantName::parse`]'s rule as a regular expression (for the API document).
pub const TENANT_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,31}$";

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a tenant may do: set at creation by the admin, changed only by the admin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Constraints {
    pub max_file_bytes: u64,
    pub max_staged_files: u32,
    pub formats: Vec<Format>,
    pub app_limits: AppLimits,
}

impl Constraints {
    pub fn from_defaults(limits: &TenantLimits, apps: &AppLimits) -> Self {
        Self {
            max_file_bytes: limits.max_file_bytes,
            max_staged_files: limits.max_staged_files,
            formats: limits.formats.clone(),
            app_limits: *apps,
        }
    }
}

impl Constraints {
    /// What a profile may hold: sizes that fit its BSON integers, app limits that
    /// [`AppLimits::check`] takes.
    pub fn check(&self) -> Result<(), String> {
        check_max_file_bytes(self.max_file_bytes)?;
        self.app_limits.check()
    }
}

/// The longest description a profile keeps.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

pub fn check_description(d: &str) -> Result<(), String> {
    if d.len() > MAX_DESCRIPTION_BYTES {
        return Err(format!("description exceeds {MAX_DESCRIPTION_BYTES} bytes"));
    }
    Ok(())
}

/// A tenant profile as stored in `customers.customers` (minus the token hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Profile {
    pub name: TenantName,
    pub database: String,
    pub constraints: Constraints,
    /// Ingest every staged file as soon as its upload completes.
    pub auto_ingest: bool,
    /// Free-form contact and description, owned by the tenant.
    #[serde(default)]
    pub description: String,
    pub created_at: String,
}

/// What a tenant may change in its own profile.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_ingest: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the admin may change, in addition to [`ProfilePatch`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminPatch {
    #[serde(flatten)]
    pub tenant: ProfilePatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staged_files: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formats: Option<Vec<Format>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The app limits to change; the others stay as they are.
    pub app_limits: Option<AppLimitsPatch>,
}

/// A freshly minted API token: `msb_<64 hex>`. Only its SHA-256 is stored.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("msb_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_follow_the_rule() {
        for ok in ["a", "alice", "t0", "a-b_c", &"x".repeat(32)] {
            assert!(TenantName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Alice",
            "-a",
            "_a",
            "a.b",
            "a/b",
            "../x",
            &"x".repeat(33),
            "é",
        ] {
            assert!(TenantName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
