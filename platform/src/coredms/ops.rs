//! coredms' operations, defined once. Each line of [`operations!`] below gives:
//! - a variant of [`Call`], the internal RPC's request (`{"op": "<name>", <args>}`);
//! - a [`CoreDms`] method of that name, which runs the [`MongoStore`] method of that name
//!   in-process, or sends the `Call` through [`Remote`](super::Remote) and decodes its
//!   `Result<Ret, CoreError>`;
//! - the arm of [`Call::serve`], the RPC endpoint's dispatch to the store.
//!
//! Adding an operation is one line here and its `MongoStore` method. An argument is written
//! with the type it travels as; [`Param`] says how the methods take it (`&TenantName`, `&str`,
//! or by value). `remote: method` names a hand-written [`Remote`](super::Remote) method used
//! instead of a plain call (the bulk write, sent in chunks).

use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{CoreDms, CoreError, MongoStore};
use crate::api::{ConsumerTarget, ScalingDecision, StreamCounts};
use crate::model::{AppKind, BulkOutcome, BulkWrite, FileRecord, JobRecords, StoredApp};
use crate::tenants::{AdminPatch, Constraints, Profile, TenantName};

/// How an argument that travels as `Self` is passed to the methods, and taken back.
pub trait Param: Serialize + DeserializeOwned {
    type Arg<'a>;
    /// The value that travels, from the method's argument.
    fn own(arg: Self::Arg<'_>) -> Self;
    /// The method's argument, from a decoded call.
    fn lend(&self) -> Self::Arg<'_>;
}

/// Arguments passed by reference: `Self` is sent, `&Target` is taken.
macro_rules! by_ref {
    ($($t:ty => $target:ty),* $(,)?) => {$(
        impl Param for $t {
            type Arg<'a> = &'a $target;
            fn own(arg: &$target) -> Self {
                arg.to_owned()
            }
            fn lend(&self) -> &$target {
                self
            }
        }
    )*};
}

/// Arguments passed by value.
macro_rules! by_value {
    ($($t:ty),* $(,)?) => {$(
        impl Param for $t {
            type Arg<'a> = $t;
            fn own(arg: $t) -> Self {
                arg
            }
            fn lend(&self) -> $t {
                self.clone()
            }
        }
    )*};
}

by_ref!(TenantName => TenantName, String => str, BulkWrite => BulkWrite, FileRecord => FileRecord, Vec<String> => [String]);
by_value!(
    Constraints,
    AdminPatch,
    AppKind,
    i64,
    u64,
    u32,
    Option<i64>,
    Option<ConsumerTarget>,
    ScalingDecision
);

macro_rules! operations {
    (@remote $r:ident, $name:ident, [], $($arg:ident: $ty:ty),*) => {
        $r.call(Call::$name { $($arg: <$ty as Param>::own($arg)),* }).await
    };
    (@remote $r:ident, $name:ident, [$custom:ident], $($arg:ident: $ty:ty),*) => {
        $r.$custom($($arg),*).await
    };
    ($(
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $(, remote: $custom:ident)?;
    )*) => {
        /// One coredms operation, as sent to `POST /internal/v1/rpc`.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum Call {
            $($name { $($arg: $ty),* },)*
        }

        impl CoreDms {
            $(
                $(#[$doc])*
                pub async fn $name(
                    &self,
                    $($arg: <$ty as Param>::Arg<'_>),*
                ) -> Result<$ret, CoreError> {
                    match self {
                        CoreDms::Local(s) => s.$name($($arg),*).await,
                        CoreDms::Remote(r) => {
                            operations!(@remote r, $name, [$($custom)?], $($arg: $ty),*)
                        }
                    }
                }
            )*
        }

        impl Call {
            /// Runs the call on the store; the answer is its `Result` as JSON.
            pub async fn serve(self, store: &MongoStore) -> Response {
                match self {
                    $(Call::$name { $($arg),* } => {
                        axum::Json(store.$name($(<$ty as Param>::lend(&$arg)),*).await)
                            .into_response()
                    })*
                }
            }
        }
    };
}

operations! {
    /// Creates a tenant: its profile and its token (shown once).
    fn create_tenant(name: TenantName, constraints: Constraints) -> (Profile, String);
    fn tenant(name: TenantName) -> Profile;
    fn update_tenant(name: TenantName, patch: AdminPatch) -> Profile;
    /// The tenant a token belongs to, if any.
    fn authenticate(token: String) -> Option<TenantName>;
    /// Stores the documents of a bulk and one log entry per record; remotely, in chunks.
    fn bulk_write(write: BulkWrite) -> BulkOutcome, remote: bulk_write;
    fn save_app(tenant: TenantName, kind: AppKind, source: String) -> u32;
    fn active_app(tenant: TenantName, kind: AppKind) -> Option<StoredApp>;
    /// Version `version` of a tenant's app, active or not.
    fn app_version(tenant: TenantName, kind: AppKind, version: u32) -> Option<StoredApp>;
    /// Stages a new upload as the next version of its name unless it is being ingested
    /// (`Conflict`); the record it replaced.
    fn stage_file(record: FileRecord) -> Option<FileRecord>;
    /// Starts a job on the version read, under `owner`'s lease; false if that lost a race.
    fn start_file(record: FileRecord, owner: String, lease_ms: u64) -> bool;
    /// A job's progress and its lease renewed, if `owner` still holds it.
    fn checkpoint_file(record: FileRecord, owner: String, lease_ms: u64) -> bool;
    /// A job's end (done or failed), if `owner` still holds it.
    fn finish_file(record: FileRecord, owner: String) -> bool;
    /// Up to `limit` ingesting files whose lease expired, now `owner`'s.
    fn claim_files(owner: String, lease_ms: u64, limit: u64) -> Vec<FileRecord>;
    /// Renews `owner`'s leases of the jobs `files` (`<tenant>/<name>`) it still runs.
    fn renew_leases(owner: String, lease_ms: u64, files: Vec<String>) -> u64;
    fn release_leases(owner: String) -> u64;
    /// What the log says of batch run `job`'s records: counts, and the records settled.
    fn job_records(tenant: TenantName, job: String) -> JobRecords;
    fn file(tenant: TenantName, name: String) -> Option<FileRecord>;
    fn files(tenant: TenantName) -> Vec<FileRecord>;
    /// Removes a file's record unless it is being ingested (`Conflict`); the record removed.
    fn delete_file(tenant: TenantName, name: String) -> Option<FileRecord>;
    fn ping() -> ();
    /// A page of a tenant's documents in id order, as JSON (ids and dates as strings).
    fn documents(tenant: TenantName, collection: String, limit: i64, skip: u64) -> Vec<serde_json::Value>;
    fn count_documents(tenant: TenantName, collection: String) -> u64;
    /// The consumer target of every tenant that has one: what each stream manager runs.
    fn stream_targets() -> Vec<(TenantName, ConsumerTarget)>;
    fn stream_target(tenant: TenantName) -> Option<ConsumerTarget>;
    /// Sets a tenant's consumer target, or with `None` removes it (its consumers stop).
    fn set_stream_target(tenant: TenantName, target: Option<ConsumerTarget>) -> ();
    /// Keeps a stream manager's change of a tenant's consumers (the latest 200 are kept).
    fn record_scaling(tenant: TenantName, decision: ScalingDecision) -> ();
    /// The tenant's latest changes of consumers, oldest first.
    fn scaling(tenant: TenantName) -> Vec<ScalingDecision>;
    /// The tenant's stream log entries by status, those since `since_ms` (ms since the epoch) if given.
    fn stream_counts(tenant: TenantName, since_ms: Option<i64>) -> StreamCounts;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_call_travels_as_its_name_and_arguments() {
        let t = TenantName::parse("alice").expect("valid");
        let call = Call::file {
            tenant: <TenantName as Param>::own(&t),
            name: <String as Param>::own("f.csv"),
        };
        let sent = serde_json::to_value(&call).expect("json");
        assert_eq!(
            sent,
            json!({"op": "file", "tenant": "alice", "name": "f.csv"})
        );
        let Call::file { tenant, name } = serde_json::from_value(sent).expect("decoded") else {
            panic!("decoded as another call");
        };
        assert_eq!((tenant.lend(), name.lend()), (&t, "f.csv"));
        assert_eq!(
            serde_json::to_value(Call::ping {}).expect("json"),
            json!({"op": "ping"})
        );
        assert!(serde_json::from_value::<Call>(json!({"op": "drop_database"})).is_err());
    }
}
