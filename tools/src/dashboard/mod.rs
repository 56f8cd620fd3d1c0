//! `chalk dashboard`: a web app, served by the `chalk` binary itself, to
//! browse, preview, upload and download the files of any version and to
//! compare versions.
//!
//! Security model:
//! - The server binds to 127.0.0.1 unless `--listen` names another address.
//! - A random 256-bit access token is made at start and printed with the
//!   URL. Every request must carry it: as `?token=` (which sets a cookie and
//!   redirects to the same page without it), as that cookie, or as
//!   `Authorization: Bearer TOKEN`. See [`auth`].
//! - Every response carries a content security policy, `nosniff` and
//!   `no-referrer`. File content is sent only as an attachment, as a raster
//!   image whose bytes match its type, or inside JSON previews that the app
//!   renders as text, so no file is ever rendered as active HTML.
//! - Request bodies are limited: uploads to `--max-upload-bytes`, every
//!   other request to [`OTHER_BODY_MAX_BYTES`].
//!
//! The engine is synchronous: handlers run its calls in
//! `tokio::task::spawn_blocking` and stream file data through bounded channels.

mod api;
mod auth;
mod error;
mod files;
mod preview;
mod upload;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chalk_engine::Store;
use prometheus_client::metrics::counter::Counter;

/// Body limit of every request other than an upload; the API takes no other bodies.
pub const OTHER_BODY_MAX_BYTES: usize = 64 * 1024;

/// Settings of `chalk dashboard`.
pub struct DashboardOptions {
    pub listen: SocketAddr,
    pub max_upload_bytes: u64,
}

/// The dashboard's own counters, registered in the store's metrics registry
/// beside the engine's and served with them at `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: Counter,
    pub rejected_requests: Counter,
    pub downloaded_bytes: Counter,
    pub uploaded_bytes: Counter,
    pub uploads: Counter,
}

impl Metrics {
    /// Makes the counters and registers them in `registry`.
    fn registered(registry: &chalk_engine::Metrics) -> Self {
        let metrics = Metrics::default();
        registry.register("chalk_dashboard_requests", "Requests that carried a valid token", metrics.requests.clone());
        registry.register(
            "chalk_dashboard_rejected_requests",
            "Requests rejected for a missing or invalid token",
            metrics.rejected_requests.clone(),
        );
        registry.register("chalk_dashboard_downloaded_bytes", "File bytes sent by downloads and raw reads", metrics.downloaded_bytes.clone());
        registry.register("chalk_dashboard_uploaded_bytes", "File bytes received by uploads", metrics.uploaded_bytes.clone());
        registry.register("chalk_dashboard_uploads", "Uploads that published a version", metrics.uploads.clone());
        metrics
    }
}

/// State shared by every handler.
pub struct AppState {
    pub store: Arc<Store>,
    pub token: String,
    /// Cookie that carries the token; it names the port because browsers
    /// share cookies between ports of one host.
    pub cookie_name: String,
    pub max_upload_bytes: u64,
    pub metrics: Metrics,
}

pub type SharedState = Arc<AppState>;

/// Serves the dashboard until the process is stopped.
pub fn run(store: Arc<Store>, options: DashboardOptions) -> anyhow::Result<()> {
    // A browser that closes its connection must not end the dashboard.
    chalk_engine::block_sigpipe_on_this_thread();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(chalk_engine::block_sigpipe_on_this_thread)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(serve(store, options))
}

async fn serve(store: Arc<Store>, options: DashboardOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("failed to listen on {}; pick another address with --listen", options.listen))?;
    let address = listener.local_addr().context("failed to read the listening address")?;
    if !address.ip().is_loopback() {
        eprintln!(
            "warning: the dashboard listens on {address}, which other hosts may reach; \
             anyone with the token can read and change every volume of this store"
        );
    }
    let state = Arc::new(AppState {
        token: auth::generate_token(),
        cookie_name: format!("chalk_dashboard_{}", address.port()),
        max_upload_bytes: options.max_upload_bytes,
        metrics: Metrics::registered(store.metrics()),
        store,
    });
    let url_host = if address.ip().is_unspecified() { format!("127.0.0.1:{}", address.port()) } else { address.to_string() };
    let token = state.token.clone();
    let store_description = format!("{} ({})", state.store.local_root().display(), state.store.config().object_store_url);
    let app = router(state);
    tracing::info!(%address, "dashboard started");
    println!("chalk dashboard is serving the store; open this URL (the token is required):");
    println!("    http://{url_host}/?token={token}");
    println!("store: {store_description}; stop with Ctrl-C");
    std::io::stdout().flush().context("failed to write to standard output")?;
    axum::serve(listener, app).await.context("the dashboard server failed")?;
    Ok(())
}

fn router(state: SharedState) -> Router {
    let upload_limit = usize::try_from(state.max_upload_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/metrics", get(metrics))
        .route("/api/volumes", get(api::volumes))
        .route("/api/volumes/{volume}/lineages", get(api::lineages))
        .route("/api/volumes/{volume}/versions", get(api::versions))
        .route("/api/volumes/{volume}/tree", get(api::tree))
        .route("/api/volumes/{volume}/diff", get(api::diff))
        .route("/api/volumes/{volume}/diff/text", get(api::text_diff))
        .route("/api/volumes/{volume}/preview", get(preview::preview))
        .route("/api/volumes/{volume}/raw", get(files::raw))
        .route("/api/volumes/{volume}/download", get(files::download))
        .route(
            "/api/volumes/{volume}/upload",
            post(upload::upload).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(DefaultBodyLimit::max(OTHER_BODY_MAX_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(axum::middleware::map_response(auth::security_headers))
        .with_state(state)
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
}

async fn app_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS).into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

async fn not_found() -> error::ApiError {
    error::ApiError::not_found("no such page or API endpoint")
}

/// Serves the store's metrics registry: the engine's metrics of every
/// session this process opened, and the dashboard's counters.
async fn metrics(State(state): State<SharedState>) -> Response {
    let text = state.store.metrics().encode();
    ([(header::CONTENT_TYPE, chalk_engine::metrics::CONTENT_TYPE)], text).into_response()
}
