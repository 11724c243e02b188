//! A small HTTP client of the kscope API (hyper, HTTP/1.1, keep-alive pool).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL or a path is not a valid URI.
    #[error("invalid URL {0:?}: use e.g. http://127.0.0.1:8470")]
    Url(String),
    /// The connection or the exchange failed.
    #[error("HTTP exchange with {url} failed: {msg}; is `kscope serve` running there?")]
    Http {
        /// The URL.
        url: String,
        /// The error.
        msg: String,
    },
    /// The exchange took too long.
    #[error("{url} did not answer within {0:?}", .timeout)]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The API answered with an error.
    #[error("{method} {path}: HTTP {status} {code}: {message}")]
    Api {
        /// Method.
        method: Method,
        /// Path.
        path: String,
        /// Status.
        status: StatusCode,
        /// The error code of the JSON body.
        code: String,
        /// The message of the JSON body.
        message: String,
    },
    /// A success answer was not the JSON the spec documents.
    #[error("{path}: unexpected answer: {0}", .what)]
    Unexpected {
        /// Path.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// A raw answer.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl RawResponse {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A client of one kscope API endpoint.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl ApiClient {
    /// A client of `base` (e.g. `http://127.0.0.1:8470`) sending `token`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            timeout: Duration::from_secs(120),
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<String>) -> Self {
        ApiClient {
            token,
            ..self.clone()
        }
    }

    /// Send any request; `content_type` is set when given.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut b = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            b = b.header(
                CONTENT_TYPE,
                HeaderValue::from_str(ct).map_err(|_| ClientError::Url(ct.into()))?,
            );
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| ClientError::Url(url.clone()))?;
        let http_err = |msg: String| ClientError::Http {
            url: url.clone(),
            msg,
        };
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| http_err(format!("{e:?}")))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| http_err(e.to_string()))?
                .to_bytes();
            Ok(RawResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })?
    }

    /// Send JSON (or nothing) and expect a JSON success answer.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (ct, bytes) = match body {
            Some(v) => (Some("application/json"), v.to_string().into_bytes()),
            None => (None, Vec::new()),
        };
        let r = self.send(method.clone(), path, ct, bytes).await?;
        if !r.status.is_success() {
            let j = r.json();
            return Err(ClientError::Api {
                method,
                path: path.into(),
                status: r.status,
                code: j["error"]["code"].as_str().unwrap_or("").into(),
                message: j["error"]["message"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned()),
            });
        }
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Unexpected {
            path: path.into(),
            what: e.to_string(),
        })
    }

    /// Send a workload request to VM `id`: (guest status, VM latency in us, payload).
    pub async fn request(
        &self,
        id: &str,
        payload: &[u8],
    ) -> Result<(u32, u64, Bytes), ClientError> {
        let path = format!("/v1/vms/{id}/requests");
        let r = self
            .send(
                Method::POST,
                &path,
                Some("application/octet-stream"),
                payload.to_vec(),
            )
            .await?;
        if !r.status.is_success() {
            let j = r.json();
            return Err(ClientError::Api {
                method: Method::POST,
                path,
                status: r.status,
                code: j["error"]["code"].as_str().unwrap_or("").into(),
                message: j["error"]["message"].as_str().unwrap_or("").into(),
            });
        }
        let num = |h: &str| {
            r.headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let status = num("x-kscope-status").ok_or_else(|| ClientError::Unexpected {
            path: path.clone(),
            what: "no X-Kscope-Status header".into(),
        })?;
        Ok((
            status as u32,
            num("x-kscope-latency-us").unwrap_or(0),
            r.body,
        ))
    }
}
