//! RFC 7807 problem documents and the JSON body extractor that produces them
//! for malformed input.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_metadata::MetaError;
use cairn_util::error_code::{codes, ErrorCode, HasErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An error answer of the REST API.
#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
}

impl Problem {
    pub fn new(code: ErrorCode, status: u16, detail: impl Into<String>) -> Self {
        let title = code
            .code
            .rsplit(':')
            .next()
            .unwrap_or(code.code)
            .to_string();
        Self {
            kind: format!(
                "urn:cairn:problem:{}",
                code.code.trim_start_matches("CAIRN:")
            ),
            title,
            status,
            detail: detail.into(),
            code: code.code,
        }
    }

    pub fn from_code(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::new(code, code.http_status, detail)
    }
}

impl From<MetaError> for Problem {
    fn from(e: MetaError) -> Self {
        let code = e.error_code();
        if code.http_status >= 500 {
            tracing::warn!(error = %e, code = code.code, "request failed");
        }
        Problem::from_code(code, e.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"cairn\""),
            );
        }
        resp
    }
}

/// `axum::Json`, but malformed bodies become problem documents.
pub struct ApiJson<T>(pub T);

#[axum::async_trait]
impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                let status = rej.status().as_u16();
                let detail = match &rej {
                    JsonRejection::JsonSyntaxError(_) => {
                        format!("malformed JSON: {}", rej.body_text())
                    }
                    JsonRejection::JsonDataError(_) => {
                        format!("invalid request body: {}", rej.body_text())
                    }
                    JsonRejection::MissingJsonContentType(_) => {
                        "expected a JSON body with Content-Type: application/json".to_string()
                    }
                    _ => rej.body_text(),
                };
                Err(Problem::new(codes::BAD_REQUEST, status, detail))
            }
        }
    }
}
