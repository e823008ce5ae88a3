//! Starting and running the server: validate the settings, load the chat template, start the
//! model worker (waiting for the model and preloaded adapters), bind, and serve until a
//! shutdown signal. [`Server`] is the async API (tests bind port 0 and read the address);
//! [`serve_blocking`] is what `hone serve` calls.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use hone_tokenize::ChatTemplate;
use tokio::net::TcpListener;

use crate::config::{ModelSource, ServeConfig};
use crate::engine::Engine;
use crate::error::{Result, ServeError};
use crate::http::{router, AppState};
use crate::metrics::Metrics;

/// A bound server, not yet serving.
pub struct Server {
    listener: TcpListener,
    router: axum::Router,
    engine: Engine,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
}

/// The chat template: the configured one (an error if it cannot be loaded), else the model's
/// own; a model without one serves completions only, and chat requests say how to fix it.
fn load_template(config: &ServeConfig) -> Result<std::result::Result<Arc<ChatTemplate>, String>> {
    let dir = match &config.model {
        ModelSource::Dir(dir) => dir,
        ModelSource::Random { tokenizer_dir, .. } => tokenizer_dir,
    };
    match &config.chat_template {
        Some(source) => Ok(Ok(Arc::new(ChatTemplate::load(source, dir)?))),
        None => Ok(ChatTemplate::from_model_dir(dir, None)
            .map(Arc::new)
            .map_err(|e| {
                tracing::warn!("no chat template: /v1/chat/completions will answer 400 ({e})");
                format!(
                    "the model has no chat template ({e}); start the server with \
                     --chat-template chatml|llama3|alpaca"
                )
            })),
    }
}

impl Server {
    /// Loads everything and binds `host:port` (port 0: any free port).
    pub async fn bind(config: ServeConfig) -> Result<Server> {
        config.validate()?;
        let template = load_template(&config)?;
        let metrics = Arc::new(Metrics::default());
        let engine = {
            let (config, metrics) = (config.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Engine::start(&config, metrics))
                .await
                .map_err(|e| ServeError::WorkerGone(format!("model loading panicked: {e}")))??
        };
        let addr = SocketAddr::new(config.host, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            context: "reading the bound address".into(),
            source,
        })?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let state = Arc::new(AppState {
            engine: engine.clone(),
            api_key: config.api_key.clone(),
            adapters_dir: config.adapters_dir.clone(),
            template,
            metrics: metrics.clone(),
            created,
            next_id: AtomicU64::new(0),
        });
        tracing::info!(
            "serving `{}` ({}) on http://{addr}",
            engine.info().name,
            engine.info().source
        );
        Ok(Server {
            listener,
            router: router(state),
            engine,
            metrics,
            addr,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's metrics (also served at `/metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The handle to the model worker.
    pub fn engine(&self) -> Engine {
        self.engine.clone()
    }

    /// Serves until `shutdown` completes, then lets open requests finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Io {
                context: "serving HTTP".into(),
                source,
            })
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server on its own tokio runtime until Ctrl-C or SIGTERM; `on_ready` gets the bound
/// address once the model is loaded.
pub fn serve_blocking(config: ServeConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            context: "starting the async runtime".into(),
            source,
        })?;
    runtime.block_on(async {
        let server = Server::bind(config).await?;
        on_ready(server.local_addr());
        server.run(shutdown_signal()).await
    })
}
