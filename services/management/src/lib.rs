//! The management service: the HTTPS REST API every node serves (and, in later
//! issues, the console, metrics, alerts and tasks). Every endpoint except
//! `/v1/health` requires the cluster's bearer token; errors are RFC 7807
//! problem documents carrying Cairn's stable error codes. The contract is
//! `api/openapi.yaml`.

mod iscsi;
mod problem;
mod routes;

pub use problem::Problem;
pub use routes::{router, ApiState};
