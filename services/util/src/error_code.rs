//! Stable error codes. Every error a client, log or alert can see maps to a
//! code such as `CAIRN:META:Conflict`; codes never change meaning once
//! released, so automation can match on them across versions.

use serde::Serialize;

/// A stable error code with the HTTP status the REST API maps it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCode {
    /// The code, e.g. `CAIRN:META:NotFound`.
    pub code: &'static str,
    /// The HTTP status used for it by the REST API.
    pub http_status: u16,
}

impl ErrorCode {
    /// Declares a code.
    pub const fn new(code: &'static str, http_status: u16) -> Self {
        Self { code, http_status }
    }
}

/// Implemented by every error enum that can reach a client.
pub trait HasErrorCode {
    /// The stable code of this error.
    fn error_code(&self) -> ErrorCode;
}

/// Codes shared by several services.
pub mod codes {
    use super::ErrorCode;
    pub const BAD_REQUEST: ErrorCode = ErrorCode::new("CAIRN:API:BadRequest", 400);
    pub const UNAUTHORIZED: ErrorCode = ErrorCode::new("CAIRN:API:Unauthorized", 401);
    pub const NOT_FOUND: ErrorCode = ErrorCode::new("CAIRN:META:NotFound", 404);
    pub const CONFLICT: ErrorCode = ErrorCode::new("CAIRN:META:Conflict", 409);
    pub const INVALID: ErrorCode = ErrorCode::new("CAIRN:META:Invalid", 422);
    pub const NO_LEADER: ErrorCode = ErrorCode::new("CAIRN:META:NoLeader", 503);
    pub const TIMEOUT: ErrorCode = ErrorCode::new("CAIRN:META:Timeout", 503);
    pub const STOPPED: ErrorCode = ErrorCode::new("CAIRN:META:Stopped", 503);
    pub const STORAGE: ErrorCode = ErrorCode::new("CAIRN:META:Storage", 500);
    pub const INTERNAL: ErrorCode = ErrorCode::new("CAIRN:INTERNAL", 500);

    /// Looks a code up by its string (for codes carried inside raft results).
    pub fn by_name(code: &str) -> ErrorCode {
        [
            BAD_REQUEST,
            UNAUTHORIZED,
            NOT_FOUND,
            CONFLICT,
            INVALID,
            NO_LEADER,
            TIMEOUT,
            STOPPED,
            STORAGE,
        ]
        .into_iter()
        .find(|c| c.code == code)
        .unwrap_or(INTERNAL)
    }
}
