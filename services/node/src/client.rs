//! The CLI's REST client: HTTPS to one node's API, trusting only the cluster
//! CA, with the bearer token. Problem documents become clear error messages.

use std::time::Duration;

use serde_json::Value;

/// A failed API call.
#[derive(Debug)]
pub enum ApiError {
    /// The server answered with a problem document.
    Problem {
        status: u16,
        code: String,
        detail: String,
    },
    /// The server could not be reached (or TLS failed).
    Unreachable { url: String, detail: String },
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Problem {
                status,
                code,
                detail,
            } => write!(f, "{detail} ({code}, HTTP {status})"),
            ApiError::Unreachable { url, detail } => {
                write!(f, "cannot reach the cluster at {url}: {detail}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

pub struct Api {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Api {
    pub fn new(
        endpoint: &str,
        ca_pem: &str,
        token: String,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let tls = cairn_rpc::tls::api_client_config(ca_pem)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(3))
            .timeout(timeout)
            .build();
        let base = if endpoint.starts_with("https://") {
            endpoint.trim_end_matches('/').to_string()
        } else {
            format!("https://{}", endpoint.trim_end_matches('/'))
        };
        Ok(Self { agent, base, token })
    }

    fn finish(&self, url: &str, r: Result<ureq::Response, ureq::Error>) -> Result<Value, ApiError> {
        match r {
            Ok(resp) => {
                if resp.status() == 204 {
                    return Ok(Value::Null);
                }
                resp.into_json::<Value>()
                    .map_err(|e| ApiError::Unreachable {
                        url: url.to_string(),
                        detail: format!("unreadable response: {e}"),
                    })
            }
            Err(ureq::Error::Status(status, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                Err(ApiError::Problem {
                    status,
                    code: body["code"].as_str().unwrap_or("unknown").to_string(),
                    detail: body["detail"]
                        .as_str()
                        .unwrap_or("request failed")
                        .to_string(),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(ApiError::Unreachable {
                url: url.to_string(),
                detail: t.to_string(),
            }),
        }
    }

    fn auth(&self, req: ureq::Request) -> ureq::Request {
        req.set("Authorization", &format!("Bearer {}", self.token))
    }

    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        let url = format!("{}{}", self.base, path);
        let r = self.auth(self.agent.get(&url)).call();
        self.finish(&url, r)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        let url = format!("{}{}", self.base, path);
        let r = self.auth(self.agent.post(&url)).send_json(body.clone());
        self.finish(&url, r)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        let url = format!("{}{}", self.base, path);
        let r = self.auth(self.agent.put(&url)).send_json(body.clone());
        self.finish(&url, r)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        let url = format!("{}{}", self.base, path);
        let r = self.auth(self.agent.delete(&url)).call();
        self.finish(&url, r)
    }
}
