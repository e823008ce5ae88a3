//! Typed errors. [`ServeError`]: starting the server, loading models and adapters, the HTTP
//! client of the load tool. [`ApiError`]: what a request gets back, as OpenAI's error JSON
//! (`{"error": {"message", "type", "param", "code"}}`) with its HTTP status.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hone_model::ModelError;
use hone_tokenize::TemplateError;

/// Errors of the serving library.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading model {path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },

    #[error("adapter `{name}` ({path}): {source}")]
    Adapter {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<ServeError>,
    },

    #[error("{0}")]
    ModelOp(#[from] ModelError),

    #[error("chat template: {0}")]
    Template(#[from] TemplateError),

    #[error("invalid setting `{key}`: {message}")]
    Config { key: &'static str, message: String },

    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("the model worker stopped: {0}")]
    WorkerGone(String),

    #[error("API error {status}: {message}")]
    Api { status: u16, message: String },
}

impl From<ApiError> for ServeError {
    fn from(e: ApiError) -> Self {
        ServeError::Api {
            status: e.status.as_u16(),
            message: e.message,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ServeError> = std::result::Result<T, E>;

/// An error answered to an API request, in OpenAI's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 for a request that cannot be served as written.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 404 for a `model` that is neither the base nor a known adapter.
    pub fn model_not_found(name: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{name}` does not exist (see GET /v1/models)."),
            )
        }
    }

    /// 404 for an unknown route.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {path}"),
        )
    }

    /// 403 from the adapter endpoints when runtime loading is off.
    pub fn runtime_lora_disabled() -> Self {
        Self {
            code: Some("runtime_lora_disabled"),
            ..Self::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "Loading and unloading adapters at run time is disabled: start the server with \
                 --allow-runtime-lora and --adapters-dir DIR to load adapters from DIR.",
            )
        }
    }

    /// 404 for a `lora_path` that is not an adapter inside the adapters directory; the same
    /// answer whatever the reason, so that it reveals nothing about other paths.
    pub fn adapter_not_in_dir() -> Self {
        Self {
            param: Some("lora_path".into()),
            code: Some("adapter_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "adapter not found in the adapters directory (lora_path must name an adapter \
                 folder inside --adapters-dir, relative to it or absolute)",
            )
        }
    }

    /// 408 for a body that did not arrive in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "The request body did not arrive within {} s.",
                    limit.as_secs_f64()
                ),
            )
        }
    }

    /// 401 for a missing or wrong bearer key.
    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
            )
        }
    }

    /// 413 for a body over the size limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body exceeds the limit of {limit} bytes."),
            )
        }
    }

    /// 429 when the queue is full.
    pub fn overloaded(capacity: usize) -> Self {
        Self {
            code: Some("queue_full"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "The server is at capacity ({capacity} requests running or queued); retry later."
                ),
            )
        }
    }

    /// 503 when the model worker is not running.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// 500 for a failure inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: the connection cannot carry another request.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
