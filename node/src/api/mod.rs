//! The node's local control API: HTTP + JSON on 127.0.0.1, used by `aimatrix-node status` and
//! `aimatrix-node compute available|accept`.
//!
//! The server owns no state. Each request becomes a [`NodeApiCommand`] on a bounded channel to
//! the join driver, which owns the `NodeCore` and answers on the command's oneshot; a driver
//! that is gone or too slow is a 503, never a hang.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/status` | [`StatusView`] |
//! | `GET /v1/offers[?all=true]` | `{ "offers": [OfferView] }`, takeable ones only unless `all` |
//! | `POST /v1/offers/{job_id}/accept` | `{ "job_id", "claimed": true }`, or 409 with the reason |
//!
//! Errors are `{ "error": "..." }`. Requests from web pages (an `Origin` header) and requests
//! naming the node by a host name other than `localhost` (DNS rebinding) are refused, so a
//! browser on the same machine cannot drive the API. This module uses nothing else from the
//! crate, so the tests in `node/tests/` compile it as is.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use aimatrix_protocol::messages::JobId;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub(crate) mod args;
pub(crate) mod views;

use views::{OfferView, StatusView};

/// How long a request waits for the driver to take and answer its command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A request for the join driver, answered on `reply`.
#[derive(Debug)]
pub(crate) enum NodeApiCommand {
    /// The node's status.
    Status {
        /// Where to answer.
        reply: oneshot::Sender<StatusView>,
    },
    /// The offers the node knows: those it can take now, or with `all` every one with the
    /// reasons it cannot ([`OfferView::list`]).
    Offers {
        /// Include the offers the node cannot take.
        all: bool,
        /// Where to answer.
        reply: oneshot::Sender<Vec<OfferView>>,
    },
    /// Claim a job (`NodeCore::accept`); the error is the core's reason, for the owner.
    Accept {
        /// The job.
        job_id: JobId,
        /// Where to answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// `GET /v1/offers` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OffersAnswer {
    /// The offers, best first.
    pub(crate) offers: Vec<OfferView>,
}

/// `POST /v1/offers/{job_id}/accept` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AcceptAnswer {
    /// The job.
    pub(crate) job_id: String,
    /// The claim was sent; the relay answers with a lease or a denial.
    pub(crate) claimed: bool,
}

/// Every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorAnswer {
    /// What went wrong and what to do.
    pub(crate) error: String,
}

/// Serves the control API on `listener` until `shutdown` is cancelled, sending each request's
/// command to the driver on `commands`.
pub(crate) async fn serve(
    listener: TcpListener,
    commands: mpsc::Sender<NodeApiCommand>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    axum::serve(listener, router(commands)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn router(commands: mpsc::Sender<NodeApiCommand>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/offers", get(offers))
        .route("/v1/offers/{job_id}/accept", post(accept))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(local_only))
        .with_state(commands)
}

type Commands = State<mpsc::Sender<NodeApiCommand>>;

async fn status(State(commands): Commands) -> Response {
    match ask(&commands, |reply| NodeApiCommand::Status { reply }).await {
        Ok(view) => Json(view).into_response(),
        Err(err) => err.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct OffersQuery {
    #[serde(default)]
    all: bool,
}

async fn offers(
    State(commands): Commands,
    query: Result<Query<OffersQuery>, QueryRejection>,
) -> Response {
    let all = match query {
        Ok(Query(q)) => q.all,
        Err(rejection) => {
            let why = format!("bad query: {}; use ?all=true or ?all=false", rejection.body_text());
            return ApiError::new(StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    match ask(&commands, |reply| NodeApiCommand::Offers { all, reply }).await {
        Ok(offers) => Json(OffersAnswer { offers }).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn accept(State(commands): Commands, Path(job_id): Path<String>) -> Response {
    let id: JobId = match job_id.parse() {
        Ok(id) => id,
        Err(why) => return ApiError::new(StatusCode::BAD_REQUEST, why).into_response(),
    };
    match ask(&commands, |reply| NodeApiCommand::Accept { job_id: id, reply }).await {
        Ok(Ok(())) => Json(AcceptAnswer { job_id: id.to_string(), claimed: true }).into_response(),
        Ok(Err(reason)) => ApiError::new(StatusCode::CONFLICT, reason).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    let why = format!(
        "no route {method} {}; the routes are GET /v1/status, GET /v1/offers[?all=true] and \
         POST /v1/offers/{{job_id}}/accept",
        uri.path()
    );
    ApiError::new(StatusCode::NOT_FOUND, why).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let why = format!("{} does not take {method}", uri.path());
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, why).into_response()
}

/// Refuses requests a web page could make: any with an `Origin` header, and any whose `Host`
/// is a name other than `localhost` (a rebound DNS name pointing at 127.0.0.1).
async fn local_only(request: Request, next: Next) -> Response {
    if request.headers().contains_key(header::ORIGIN) {
        let why = "requests from web pages are refused; use `aimatrix-node status` or `compute`";
        return ApiError::new(StatusCode::FORBIDDEN, why.to_owned()).into_response();
    }
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host {
        if !is_ip_or_localhost(host) {
            let why = format!("refused Host {host:?}: name the node by IP address or localhost");
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
    }
    next.run(request).await
}

/// Whether a `Host` header value (with or without a port) is an IP literal or `localhost`.
fn is_ip_or_localhost(host: &str) -> bool {
    if host.parse::<std::net::SocketAddr>().is_ok() || host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// Sends a command made by `make` and waits for its answer, both bounded by
/// [`ANSWER_TIMEOUT`].
async fn ask<T>(
    commands: &mpsc::Sender<NodeApiCommand>,
    make: impl FnOnce(oneshot::Sender<T>) -> NodeApiCommand,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    let gone = || ApiError::unavailable("the node is shutting down".to_owned());
    let slow = || {
        let secs = ANSWER_TIMEOUT.as_secs();
        ApiError::unavailable(format!("the node did not answer within {secs} s; try again"))
    };
    within(commands.send(make(reply))).await.ok_or_else(slow)?.map_err(|_| gone())?;
    within(answer).await.ok_or_else(slow)?.map_err(|_| gone())
}

async fn within<F: Future>(future: F) -> Option<F::Output> {
    tokio::time::timeout(ANSWER_TIMEOUT, future).await.ok()
}

/// An error answer: a status and `{ "error": message }`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> Self {
        Self { status, message }
    }

    fn unavailable(message: String) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorAnswer { error: self.message })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_the_node_by_address_pass() {
        for ok in ["127.0.0.1:7781", "127.0.0.1", "[::1]:7781", "localhost:7781", "LOCALHOST"] {
            assert!(is_ip_or_localhost(ok), "{ok}");
        }
        for bad in ["evil.example:7781", "evil.example", "localhost.evil.example:80", ""] {
            assert!(!is_ip_or_localhost(bad), "{bad}");
        }
    }
}
