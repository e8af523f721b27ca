//! The relay's HTTP API: JSON over HTTP/1.1 on `--api` (default `127.0.0.1:7780`), for the
//! `job` and `ledger` subcommands and for scripts. Every route is listed in `docs/api.md`.
//!
//! The server never touches the relay core itself: job routes become [`ApiCommand`]s on a
//! bounded channel to the relay driver, which answers on a oneshot. Blobs and the ledger are
//! served directly from [`BlobStore`] and [`Ledger`] (their blocking calls on tokio's blocking
//! pool). Errors are `{"error": "..."}` with a status code from [`ApiError`].
//!
//! ```no_run
//! # async fn example(state: studio_relay::api::ApiState) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7780").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! studio_relay::api::serve(listener, state, shutdown).await
//! # }
//! ```

pub mod types;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::messages::JobId;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::ledger::{Ledger, LedgerError};
use crate::store::{BlobError, BlobStore, BLOB_BYTES_MAX};
use types::{
    AuditView, BalanceView, BlobView, ErrorBody, JobView, MintRequest, MintView, PostJobRequest,
    PostJobResponse, RelayStatusView, TransferView,
};

/// The API address used when neither `--api` nor `AIMATRIX_RELAY_API` is given.
pub const API_ADDR_DEFAULT: &str = "127.0.0.1:7780";

/// Most history entries one request returns.
pub const HISTORY_LIMIT_MAX: usize = 10_000;

/// How long a request waits for room in the driver's command queue.
const COMMAND_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for the driver's answer.
const COMMAND_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `--api ADDR`: where the relay's HTTP API listens (`serve`) or is reached (`job`, `ledger`).
#[derive(Clone, Debug, clap::Args)]
pub struct ApiArg {
    /// Address of the relay's HTTP API, IP:PORT
    #[arg(
        long = "api",
        value_name = "ADDR",
        env = "AIMATRIX_RELAY_API",
        default_value = API_ADDR_DEFAULT,
        global = true
    )]
    pub addr: SocketAddr,
}

/// A request the relay driver answers (it owns the relay core).
#[derive(Debug)]
pub enum ApiCommand {
    /// Post a job; answer its id.
    PostJob {
        /// The job and the account charged (boxed: a spec is large next to the other commands).
        req: Box<PostJobRequest>,
        /// The answer.
        reply: oneshot::Sender<Result<JobId, ApiError>>,
    },
    /// One job's view, if the relay knows it.
    Job {
        /// The job.
        id: JobId,
        /// The answer.
        reply: oneshot::Sender<Option<JobView>>,
    },
    /// Every job, newest first.
    Jobs {
        /// The answer.
        reply: oneshot::Sender<Vec<JobView>>,
    },
    /// Cancel a job: leases are cancelled and the unpaid escrow released.
    CancelJob {
        /// The job.
        id: JobId,
        /// The answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// The relay process's status.
    Status {
        /// The answer.
        reply: oneshot::Sender<RelayStatusView>,
    },
    /// The ledger's audit, cross-checked with the job store between two steps of the relay,
    /// when both books are up to date with each other.
    Audit {
        /// The answer.
        reply: oneshot::Sender<Result<AuditView, ApiError>>,
    },
}

/// Why an API request failed; each maps to an HTTP status. Messages say what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The requester's account cannot pay the escrow (402); nothing was posted.
    #[error("{0}")]
    InsufficientFunds(String),
    /// The request is malformed or refused (400).
    #[error("{0}")]
    Invalid(String),
    /// No such job, blob or route (404).
    #[error("{0}")]
    NotFound(String),
    /// The relay cannot take the request now (503); retry.
    #[error("{0}; retry in a moment")]
    Busy(String),
    /// The relay's ledger cannot record anything now (503): an outage of the relay, not a
    /// refusal of the request; nothing was charged.
    #[error("{0}")]
    LedgerUnavailable(String),
    /// The relay failed (500); see its log.
    #[error("{0} (see the relay's log)")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InsufficientFunds(_) => StatusCode::PAYMENT_REQUIRED,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Busy(_) | Self::LedgerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::Rejected(why) => Self::Invalid(format!("the ledger refused it: {why}")),
            LedgerError::Closed => Self::Busy(err.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(err: BlobError) -> Self {
        match err {
            BlobError::TooLarge { .. } | BlobError::Mismatch { .. } => {
                Self::Invalid(err.to_string())
            }
            BlobError::DiskFull { .. } => Self::Busy(err.to_string()),
            BlobError::Io { .. } => Self::Internal(err.to_string()),
        }
    }
}

/// What the API server needs: the driver's command queue, the ledger and the blobs.
#[derive(Clone)]
pub struct ApiState {
    /// Commands to the relay driver.
    pub commands: mpsc::Sender<ApiCommand>,
    /// The open ledger.
    pub ledger: Arc<Ledger>,
    /// The blob store.
    pub blobs: Arc<BlobStore>,
}

/// Serves the API on `listener` until `shutdown` is cancelled (requests in flight finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The routes, for tests that drive them without a socket.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/blobs", put(put_blob).layer(DefaultBodyLimit::max(BLOB_BYTES_MAX)))
        .route("/v1/blobs/{sha256}", get(get_blob))
        .route("/v1/jobs", post(post_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/ledger/balance/{account}", get(balance))
        .route("/v1/ledger/mint", post(mint))
        .route("/v1/ledger/history/{account}", get(history))
        .route("/v1/ledger/audit", get(audit))
        .route("/v1/ledger/export", get(export))
        .fallback(|| async { ApiError::NotFound("no such route; see docs/api.md".into()) })
        .with_state(state)
}

/// Sends a command to the driver and waits for its answer.
async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiCommand,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    state.commands.send_timeout(make(reply), COMMAND_SEND_TIMEOUT).await.map_err(|e| match e {
        mpsc::error::SendTimeoutError::Timeout(_) => {
            ApiError::Busy("the relay's command queue is full".into())
        }
        mpsc::error::SendTimeoutError::Closed(_) => {
            ApiError::Busy("the relay is shutting down".into())
        }
    })?;
    match tokio::time::timeout(COMMAND_REPLY_TIMEOUT, answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(ApiError::Internal("the relay dropped the request".into())),
        Err(_) => Err(ApiError::Busy("the relay did not answer in time".into())),
    }
}

/// Runs a blocking call (ledger, blob files) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a storage task failed: {e}")))?
}

fn parse_job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(ApiError::Invalid)
}

/// Accepts `<64 hex>` or `sha256:<64 hex>`.
pub fn parse_sha256(text: &str) -> Result<Digest, ApiError> {
    let full = if text.starts_with("sha256:") { text.to_owned() } else { format!("sha256:{text}") };
    full.parse().map_err(|_| {
        ApiError::Invalid(format!("{text:?} is not a SHA-256: expected 64 hex digits"))
    })
}

async fn status(State(state): State<ApiState>) -> Result<Json<RelayStatusView>, ApiError> {
    ask(&state, |reply| ApiCommand::Status { reply }).await.map(Json)
}

async fn put_blob(State(state): State<ApiState>, body: Bytes) -> Result<Json<BlobView>, ApiError> {
    let blobs = state.blobs.clone();
    let len = body.len() as u64;
    let digest = blocking(move || Ok(blobs.put(&body)?)).await?;
    Ok(Json(BlobView { sha256: digest.to_hex(), bytes: len }))
}

async fn get_blob(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let digest = parse_sha256(&sha256)?;
    let blobs = state.blobs.clone();
    match blocking(move || Ok(blobs.get(&digest)?)).await? {
        Some(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        None => Err(ApiError::NotFound(format!("no blob {digest} at this relay"))),
    }
}

async fn post_job(
    State(state): State<ApiState>,
    body: Result<Json<PostJobRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PostJobResponse>), ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError::Invalid(format!("bad job request: {}", e.body_text())))?;
    if !req.spec.is_resolved() {
        return Err(ApiError::Invalid(
            "the job spec still names files by path: upload each (PUT /v1/blobs) and name it by \
             \"sha256:<hex>\" (`studio-relay job post` does this for you)"
                .into(),
        ));
    }
    req.spec
        .validate()
        .map_err(|e| ApiError::Invalid(format!("invalid job spec:\n{}", e.with_source("job"))))?;
    let id = ask(&state, |reply| ApiCommand::PostJob { req: Box::new(req), reply }).await??;
    Ok((StatusCode::CREATED, Json(PostJobResponse { job_id: id.to_string() })))
}

async fn list_jobs(State(state): State<ApiState>) -> Result<Json<Vec<JobView>>, ApiError> {
    ask(&state, |reply| ApiCommand::Jobs { reply }).await.map(Json)
}

async fn get_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_job_id(&id)?;
    ask(&state, |reply| ApiCommand::Job { id, reply }).await?.map(Json).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no job {id} at this relay (`studio-relay job list` shows them)"
        ))
    })
}

async fn cancel_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_job_id(&id)?;
    ask(&state, |reply| ApiCommand::CancelJob { id, reply }).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn balance(
    State(state): State<ApiState>,
    Path(account): Path<String>,
) -> Result<Json<BalanceView>, ApiError> {
    let ledger = state.ledger.clone();
    let a =
        blocking(move || Ok(ledger.balance(&account).map(|a| BalanceView::new(&account, &a))?))
            .await?;
    Ok(Json(a))
}

async fn mint(
    State(state): State<ApiState>,
    body: Result<Json<MintRequest>, JsonRejection>,
) -> Result<Json<MintView>, ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError::Invalid(format!("bad mint request: {}", e.body_text())))?;
    let id = match &req.id {
        Some(text) => text.parse::<u128>().map_err(|_| {
            ApiError::Invalid(format!("mint id {text:?} is not a decimal number below 2^128"))
        })?,
        None => clock_id()?,
    };
    let ledger = state.ledger.clone();
    blocking(move || {
        mint_now(&ledger, id, &req.account, req.amount, &req.memo).map_err(|e| match e {
            LedgerError::Rejected(why) => ApiError::Invalid(format!("mint refused: {why}")),
            other => ApiError::from(other),
        })
    })
    .await
    .map(Json)
}

/// Mints and reads the new balance; shared by the API and the offline `ledger mint`.
pub fn mint_now(
    ledger: &Ledger,
    id: u128,
    account: &str,
    amount: u64,
    memo: &str,
) -> Result<MintView, LedgerError> {
    let applied = ledger.mint(id, account, amount, memo)?;
    let available = ledger.balance(account)?.available();
    Ok(MintView {
        id: id.to_string(),
        seq: applied.seq(),
        already_recorded: matches!(applied, crate::ledger::Applied::Existing(_)),
        account: account.to_owned(),
        amount,
        available,
    })
}

/// A fresh transfer id from the clock (nanoseconds since the Unix epoch).
pub fn clock_id() -> Result<u128, ApiError> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .map_err(|_| ApiError::Internal("the clock is before 1970".into()))
}

/// `?limit=N` of the history route.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
}

async fn history(
    State(state): State<ApiState>,
    Path(account): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<Vec<TransferView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(20).min(HISTORY_LIMIT_MAX);
    let ledger = state.ledger.clone();
    let entries = blocking(move || {
        let entries = ledger.history(&account, limit)?;
        Ok(entries.into_iter().map(|e| TransferView::new(e, Some(&account))).collect())
    })
    .await?;
    Ok(Json(entries))
}

async fn audit(State(state): State<ApiState>) -> Result<Json<AuditView>, ApiError> {
    ask(&state, |reply| ApiCommand::Audit { reply }).await?.map(Json)
}

/// Every transfer, oldest first, as JSON lines (the same objects `ledger export --format json`
/// prints).
async fn export(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let ledger = state.ledger.clone();
    let body = blocking(move || {
        let mut out = Vec::new();
        for entry in ledger.entries() {
            serde_json::to_writer(&mut out, &TransferView::new(entry?, None))
                .map_err(|e| ApiError::Internal(format!("cannot encode a transfer: {e}")))?;
            out.push(b'\n');
        }
        Ok(out)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
