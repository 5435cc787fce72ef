//! The mysimbdp workbench: runs scenarios against the real platform through its public HTTP
//! API and writes latency reports; the raw driver ceiling is measured in the same run.

pub mod faults;
pub mod report;
pub mod scenario;

pub use report::{Report, compare};
pub use scenario::{Scenario, run};
