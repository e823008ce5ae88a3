//! The HTTP surface: routes, the bearer-key check, bounded body reading with OpenAI-style
//! errors, `/v1/models`, the adapter endpoints (vLLM's `load_lora_adapter` /
//! `unload_lora_adapter`), `/health` and `/metrics`. The generation endpoints live in
//! [`crate::completion`].
//!
//! `/v1/*` needs the API key when one is configured; `/health` and `/metrics` do not (as in
//! vLLM), so that probes and scrapers need no secret.
//!
//! The adapter endpoints are off unless the server was started with runtime loading allowed
//! (403 otherwise, as vLLM without `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and `lora_path` must name
//! an adapter inside the adapters directory (see [`crate::adapters_dir`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hone_tokenize::ChatTemplate;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::adapters_dir::AdaptersDir;
use crate::config::validate_adapter_name;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Engine,
    /// Trimmed; never empty.
    pub api_key: Option<String>,
    pub adapters_dir: Option<AdaptersDir>,
    /// Whether the load / unload endpoints are enabled.
    pub allow_runtime_lora: bool,
    /// Longest wait for a request body.
    pub body_timeout: Duration,
    /// The chat template, or why there is none.
    pub template: Result<Arc<ChatTemplate>, String>,
    /// The retrieval index of `--rag`.
    pub rag: Option<Arc<crate::rag::Rag>>,
    pub metrics: Arc<Metrics>,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Source of response ids.
    pub next_id: AtomicU64,
}

pub(crate) type Shared = Arc<AppState>;

/// The application.
pub(crate) fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(crate::completion::completions))
        .route("/v1/chat/completions", post(crate::completion::chat))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Byte-wise comparison whose time does not depend on where the inputs differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn require_key(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g, key)) {
            state
                .metrics
                .record_request(request.uri().path(), StatusCode::UNAUTHORIZED.as_u16());
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(format!("method not allowed on {}", uri.path()))
    }
}

/// Reads a body of at most the configured size within the body timeout: 413 beyond the size,
/// 408 beyond the time.
pub(crate) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let limit = state.engine.limits().max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let read = tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::body_timeout(state.body_timeout));
    };
    read.map_err(|e| {
        let too_long = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_long {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

/// Parses a request body as a JSON object (400 when it is not one).
pub(crate) fn parse_object(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// Reads a typed view of a request object, naming the field at fault.
pub(crate) fn from_object<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            let param = path.split(['.', '[']).next().unwrap_or(&path).to_string();
            ApiError::bad_param(&param, format!("invalid `{path}`: {inner}"))
        }
    })
}

/// Parses a JSON body into `T`.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    from_object(&parse_object(bytes)?)
}

/// Resolves a request's `model` to (public name, adapter name).
pub(crate) async fn resolve_model(
    state: &AppState,
    requested: Option<&str>,
) -> Result<(String, Option<String>), ApiError> {
    let base = &state.engine.info().name;
    let name = match requested {
        None => return Ok((base.clone(), None)),
        Some(name) if name == base => return Ok((base.clone(), None)),
        Some(name) => name,
    };
    if state.engine.has_adapter(name) {
        return Ok((name.to_string(), Some(name.to_string())));
    }
    if let Some(path) = state.adapters_dir.as_ref().and_then(|d| d.by_name(name)) {
        state
            .engine
            .load_adapter(name.to_string(), path)
            .await
            .map_err(|e| ApiError {
                param: Some("model".into()),
                ..e
            })?;
        return Ok((name.to_string(), Some(name.to_string())));
    }
    Err(ApiError::model_not_found(name))
}

/// Loads every adapter folder of `--adapters-dir` not loaded yet (failures are logged).
async fn scan_adapters_dir(state: &AppState) {
    let Some(dir) = &state.adapters_dir else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir.root()) else {
        tracing::warn!("cannot read adapters directory {}", dir.root().display());
        return;
    };
    let loaded = state.engine.adapters();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().map(str::to_string) else {
            tracing::warn!("adapters directory: skipping {file_name:?}: not a valid adapter name");
            continue;
        };
        if loaded.contains_key(&name) || name == state.engine.info().name {
            continue;
        }
        if let Err(why) = validate_adapter_name(&name) {
            if !name.starts_with('.') {
                tracing::warn!("adapters directory: skipping {name:?}: {why}");
            }
            continue;
        }
        if let Some(path) = dir.by_name(&name) {
            if let Err(e) = state.engine.load_adapter(name.clone(), path).await {
                tracing::warn!("adapters directory: `{name}` not loaded: {}", e.message);
            }
        }
    }
}

async fn models(State(state): State<Shared>) -> Response {
    scan_adapters_dir(&state).await;
    let info = state.engine.info();
    let mut data = vec![json!({
        "id": info.name, "object": "model", "created": state.created, "owned_by": "hone",
        "root": info.source, "parent": null, "max_model_len": info.max_positions,
    })];
    for (name, entry) in state.engine.adapters() {
        data.push(json!({
            "id": name, "object": "model", "created": entry.created, "owned_by": "hone",
            "root": entry.path.display().to_string(), "parent": info.name,
            "max_model_len": info.max_positions,
        }));
    }
    state.metrics.record_request("/v1/models", 200);
    Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Debug, Deserialize)]
struct LoadAdapterBody {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Debug, Deserialize)]
struct UnloadAdapterBody {
    lora_name: String,
}

fn finish(state: &AppState, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state
        .metrics
        .record_request(endpoint, response.status().as_u16());
    response
}

/// The adapters directory when runtime loading is enabled, else 403.
fn runtime_loading(state: &AppState) -> Result<&AdaptersDir, ApiError> {
    match (&state.adapters_dir, state.allow_runtime_lora) {
        (Some(dir), true) => Ok(dir),
        _ => Err(ApiError::runtime_lora_disabled()),
    }
}

async fn load_adapter(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let dir = runtime_loading(&state)?;
        let req: LoadAdapterBody = parse_json(&read_body(&state, &headers, body).await?)?;
        validate_adapter_name(&req.lora_name).map_err(|m| ApiError::bad_param("lora_name", m))?;
        let path = dir
            .resolve(&req.lora_path)
            .ok_or_else(ApiError::adapter_not_in_dir)?;
        state
            .engine
            .load_adapter(req.lora_name.clone(), path)
            .await?;
        Ok(Json(json!({
            "object": "lora_adapter", "lora_name": req.lora_name,
            "lora_path": req.lora_path.display().to_string(), "status": "loaded",
        }))
        .into_response())
    }
    .await;
    finish(&state, "/v1/load_lora_adapter", result)
}

async fn unload_adapter(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        runtime_loading(&state)?;
        let req: UnloadAdapterBody = parse_json(&read_body(&state, &headers, body).await?)?;
        state.engine.unload_adapter(req.lora_name.clone()).await?;
        Ok(Json(json!({
            "object": "lora_adapter", "lora_name": req.lora_name, "status": "unloaded",
        }))
        .into_response())
    }
    .await;
    finish(&state, "/v1/unload_lora_adapter", result)
}

async fn health(State(state): State<Shared>) -> Response {
    if state.engine.is_alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::unavailable("the model worker is not running").into_response()
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
