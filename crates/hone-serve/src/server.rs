//! Starting and running the server: validate the settings, load the chat template, start the
//! model worker (waiting for the model and preloaded adapters), bind, and serve until a
//! shutdown signal. [`Server`] is the async API (tests bind port 0 and read the address);
//! [`serve_blocking`] is what `hone serve` calls.
//!
//! Connections are served by hyper's HTTP/1 connection builder (not `axum::serve`, which
//! offers neither of the two bounds below): a request head must arrive within
//! [`Timeouts::header_read`] of the connection opening or the previous request ending, else the
//! connection is closed (slowloris, idle keep-alive connections); after the shutdown signal
//! the listener closes, idle connections close, running requests get [`Timeouts::shutdown`] to
//! finish, and the connections still open then are dropped. Bodies are bounded in the handlers
//! ([`Timeouts::body_read`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hone_tokenize::ChatTemplate;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::adapters_dir::AdaptersDir;
use crate::config::{ModelSource, ServeConfig, Timeouts};
use crate::engine::Engine;
use crate::error::{Result, ServeError};
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::rag::Rag;

/// A bound server, not yet serving.
pub struct Server {
    listener: TcpListener,
    router: axum::Router,
    engine: Engine,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    timeouts: Timeouts,
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
        let adapters_dir = config
            .adapters_dir
            .as_deref()
            .map(AdaptersDir::open)
            .transpose()?;
        let template = load_template(&config)?;
        let rag = match config.rag.clone() {
            Some(settings) => Some(Arc::new(
                tokio::task::spawn_blocking(move || Rag::open(settings))
                    .await
                    .map_err(|e| {
                        ServeError::WorkerGone(format!("opening the index panicked: {e}"))
                    })??,
            )),
            None => None,
        };
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
        let created = hone_io::unix_now();
        let state = Arc::new(AppState {
            engine: engine.clone(),
            api_key: config.api_key().map(str::to_string),
            adapters_dir,
            allow_runtime_lora: config.allow_runtime_lora,
            body_timeout: config.timeouts.body_read,
            template,
            rag,
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
            timeouts: config.timeouts.clone(),
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

    /// Serves until `shutdown` completes, then stops accepting, lets running requests finish
    /// for at most the shutdown timeout, and drops the connections still open.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server {
            listener,
            router,
            timeouts,
            ..
        } = self;
        let (closing, closing_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(
                            stream,
                            router.clone(),
                            timeouts.header_read,
                            closing_rx.clone(),
                        ));
                    }
                    Err(e) => {
                        // A connection reset before it was accepted, or no file descriptors
                        // left: go on, pausing so that a lasting error does not spin.
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let _ = closing.send(true);
        if !connections.is_empty() {
            tracing::info!(
                "shutting down: waiting up to {:?} for {} open connections",
                timeouts.shutdown,
                connections.len()
            );
        }
        let drained = tokio::time::timeout(timeouts.shutdown, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "{} connections still open after the shutdown timeout of {:?}: closing them",
                connections.len(),
                timeouts.shutdown
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// Serves one connection until it ends; when `closing` turns true, finishes the running request
/// (if any) and closes.
async fn serve_connection(
    stream: TcpStream,
    router: axum::Router,
    header_timeout: Duration,
    mut closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        _ = closing.wait_for(|closing| *closing) => {}
    }
    connection.as_mut().graceful_shutdown();
    if let Err(e) = connection.await {
        tracing::debug!("connection ended during shutdown: {e}");
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
    let result = runtime.block_on(async {
        let server = Server::bind(config).await?;
        on_ready(server.local_addr());
        server.run(shutdown_signal()).await
    });
    // Connection tasks are gone by now; nothing left may hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
