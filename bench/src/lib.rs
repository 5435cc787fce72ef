//! The mysimbdp workbench: runs scenarios against the real platform through its public HTTP
//! API and writes latency reports; the raw driver ceiling is measured in the same run.
//!
//! The modules stand in layers, each importing only modules of the layers below it: the
//! order is in `tests/layers.rs`, which checks it, and in ARCHITECTURE.md's codemap.

pub mod accounting;
pub mod ceiling;
pub mod cost;
pub mod dataset;
pub mod deploy;
pub mod faults;
pub mod host;
pub mod load;
pub mod progress;
pub mod replicas;
pub mod report;
pub mod run;
pub mod schema;

pub use accounting::{check, completed};
pub use report::{Report, compare};
pub use run::run;
pub use schema::Scenario;
