//! The API's errors: every one becomes a status code and a JSON body
//! `{"error": {"code": "...", "message": "..."}}` whose message says what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kscope_vmm::VmError;

/// An error answered to an API client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// Malformed input (JSON, sizes, names).
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code (`invalid_json`, `unknown_workload`, ...).
        code: &'static str,
        /// What was wrong and what to do.
        message: String,
    },
    /// The content type is not the one the route takes.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No such VM, snapshot or route.
    #[error("{0}")]
    NotFound(String),
    /// No route has this path.
    #[error("{0}")]
    NoRoute(String),
    /// The route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The VM is in a state that does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// A limit on VMs, clones or guest memory would be exceeded.
    #[error("{0}")]
    Limit(String),
    /// The VM failed (panicked, unresponsive, stopped).
    #[error("{0}")]
    VmFailed(String),
    /// The VM was deleted while the request was in flight.
    #[error("{0}")]
    Gone(String),
    /// The host cannot take more VMs now (open files, memory); no VM failed.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a host failure.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A [`ApiError::BadRequest`].
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::VmFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::BadRequest { code, .. } => code,
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::NotFound(_) => "not_found",
            ApiError::NoRoute(_) => "no_route",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Conflict(_) => "conflict",
            ApiError::Limit(_) => "limit_exceeded",
            ApiError::VmFailed(_) => "vm_failed",
            ApiError::Gone(_) => "vm_deleted",
            ApiError::Unavailable(_) => "host_limit",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Map a VMM error of an operation on VM `id`.
    pub fn from_vm(id: &str, e: VmError) -> Self {
        match e {
            VmError::BadState { .. } => ApiError::Conflict(format!(
                "VM {id}: {e}; check its state with GET /v1/vms/{id}"
            )),
            VmError::BadConfig(_) | VmError::RequestTooLarge { .. } => {
                ApiError::bad("bad_request", format!("VM {id}: {e}"))
            }
            VmError::Kvm { .. } | VmError::Internal(_) => {
                ApiError::Internal(format!("VM {id}: {e}"))
            }
            _ => ApiError::VmFailed(format!(
                "VM {id} failed: {e}; delete it with DELETE /v1/vms/{id} and create a new one"
            )),
        }
    }

    /// Map a VMM error of creating VMs (clones of `parent`, a boot, a restore) when `parent`
    /// itself is fine: a host limit (open files, memory, threads) is 503 with the reason, any
    /// other error 500; neither blames the parent.
    pub fn creating(what: &str, e: VmError) -> Self {
        let text = e.to_string();
        let host_limit = match &e {
            VmError::Kvm { source, .. } => {
                matches!(
                    source.errno(),
                    libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN
                )
            }
            _ => [
                "Too many open files",
                "Cannot allocate memory",
                "Resource temporarily unavailable",
            ]
            .iter()
            .any(|m| text.contains(m)),
        };
        if host_limit {
            ApiError::Unavailable(format!(
                "{what}: the host ran out of a resource: {text}. No existing VM failed; delete VMs or raise the host limit (ulimit -n, memory) and retry"
            ))
        } else {
            ApiError::Internal(format!(
                "{what} failed: {text}; no existing VM was affected"
            ))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut r = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::PayloadTooLarge(_)) {
            // The rest of the body was not read: the connection cannot be reused.
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        r.extensions_mut().insert(ErrorCode(self.code()));
        r
    }
}

/// Response extension carrying the error code, counted by the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
