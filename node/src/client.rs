//! A blocking client of the node's control API (`crate::api`), for the `status` and `compute`
//! subcommands.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aimatrix_protocol::messages::JobId;
use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use ureq::http::Response;
use ureq::Body;

use crate::api::views::{OfferView, StatusView};
use crate::api::{AcceptAnswer, ErrorAnswer, OffersAnswer};

/// How long one request may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to one node's control API.
pub(crate) struct Client {
    agent: ureq::Agent,
    addr: SocketAddr,
}

impl Client {
    /// A client of the API at `addr`.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            // The API is local: an HTTP proxy from the environment must not carry it.
            .proxy(None)
            .build();
        Self { agent: config.into(), addr }
    }

    /// `GET /v1/status`.
    pub(crate) fn status(&self) -> anyhow::Result<StatusView> {
        let response = self.send(self.agent.get(self.url("/v1/status")).call())?;
        self.read_ok(response)
    }

    /// `GET /v1/offers`: those the node can take, or with `all` every one.
    pub(crate) fn offers(&self, all: bool) -> anyhow::Result<Vec<OfferView>> {
        let url = self.url(&format!("/v1/offers?all={all}"));
        let response = self.send(self.agent.get(url).call())?;
        Ok(self.read_ok::<OffersAnswer>(response)?.offers)
    }

    /// `POST /v1/offers/{job_id}/accept`: `Ok(Err(reason))` when the node refused the claim.
    pub(crate) fn accept(&self, job_id: JobId) -> anyhow::Result<Result<(), String>> {
        let url = self.url(&format!("/v1/offers/{job_id}/accept"));
        let mut response = self.send(self.agent.post(url).send_empty())?;
        if response.status() == ureq::http::StatusCode::CONFLICT {
            let answer: ErrorAnswer = self.read_json(&mut response)?;
            return Ok(Err(answer.error));
        }
        let answer: AcceptAnswer = self.read_ok(response)?;
        if !answer.claimed {
            bail!("the node answered without claiming job {job_id}");
        }
        Ok(Ok(()))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A transport failure as an error the owner can act on.
    fn send(&self, result: Result<Response<Body>, ureq::Error>) -> anyhow::Result<Response<Body>> {
        result.map_err(|err| match err {
            ureq::Error::Io(e) if is_unreachable(&e) => self.unreachable(),
            ureq::Error::ConnectionFailed => self.unreachable(),
            ureq::Error::Timeout(_) => anyhow!(
                "the node's control API at {} did not answer within {} s",
                self.addr,
                REQUEST_TIMEOUT.as_secs()
            ),
            other => anyhow!("cannot talk to the node's control API at {}: {other}", self.addr),
        })
    }

    fn unreachable(&self) -> anyhow::Error {
        anyhow!(
            "cannot reach the node's control API at {}: is `aimatrix-node join` running? \
             (start it, or pass --api)",
            self.addr
        )
    }

    /// The body of a 2xx answer, or the node's error.
    fn read_ok<T: DeserializeOwned>(&self, mut response: Response<Body>) -> anyhow::Result<T> {
        let status = response.status();
        if !status.is_success() {
            let why = match self.read_json::<ErrorAnswer>(&mut response) {
                Ok(answer) => answer.error,
                Err(_) => format!("HTTP {status}"),
            };
            bail!("the node's control API at {} answered {status}: {why}", self.addr);
        }
        self.read_json(&mut response)
    }

    fn read_json<T: DeserializeOwned>(&self, response: &mut Response<Body>) -> anyhow::Result<T> {
        response.body_mut().read_json().with_context(|| {
            format!(
                "the control API at {} sent an answer this aimatrix-node cannot read; is it an \
                 aimatrix node of the same version?",
                self.addr
            )
        })
    }
}

fn is_unreachable(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}
