//! A small blocking client for the relay's HTTP API ([`crate::api`]), used by the `job` and
//! `ledger` subcommands.
//!
//! ```no_run
//! use studio_relay::client::RelayClient;
//! let relay = RelayClient::new("127.0.0.1:7780");
//! let balance = relay.balance("studio")?;
//! println!("{} credits available", balance.available);
//! # Ok::<(), studio_relay::client::ClientError>(())
//! ```

use std::io;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::Response;
use ureq::Body;

use crate::api::types::{
    AuditView, BalanceView, BlobView, ErrorBody, JobView, MintRequest, MintView, PostJobRequest,
    PostJobResponse, RelayStatusView, TransferView,
};
use crate::store::BLOB_BYTES_MAX;

/// The largest JSON answer read (a job list, an export).
const JSON_BYTES_MAX: u64 = 256 << 20;

/// Why a request to the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the relay API at {addr}: is `studio-relay serve` running? (start it, or pass \
         --api)"
    )]
    Unreachable {
        /// The API address.
        addr: String,
    },
    /// The relay answered with an error status; `message` is its explanation.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The relay's error message.
        message: String,
    },
    /// The request failed on the way.
    #[error("request to the relay API at {addr} failed: {detail}")]
    Transport {
        /// The API address.
        addr: String,
        /// What failed.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status, when the relay answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one relay's HTTP API.
#[derive(Clone, Debug)]
pub struct RelayClient {
    addr: String,
    agent: ureq::Agent,
}

impl RelayClient {
    /// A client of the API at `addr` (`IP:PORT`).
    pub fn new(addr: impl ToString) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(300)))
            .build();
        Self { addr: addr.to_string(), agent: ureq::Agent::new_with_config(config) }
    }

    /// The API address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<RelayStatusView, ClientError> {
        self.get_json("/v1/status")
    }

    /// `PUT /v1/blobs`: uploads `bytes`, returns their digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<BlobView, ClientError> {
        let res = self.agent.put(self.url("/v1/blobs")).send(bytes);
        self.json(res)
    }

    /// `GET /v1/blobs/{sha256}`.
    pub fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        let res = self.agent.get(self.url(&format!("/v1/blobs/{}", segment(sha256)))).call();
        let mut res = self.check(res)?;
        res.body_mut()
            .with_config()
            .limit(BLOB_BYTES_MAX as u64)
            .read_to_vec()
            .map_err(|e| self.transport(e))
    }

    /// `POST /v1/jobs`.
    pub fn post_job(&self, req: &PostJobRequest) -> Result<PostJobResponse, ClientError> {
        self.post_json("/v1/jobs", req)
    }

    /// `GET /v1/jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<JobView, ClientError> {
        self.get_json(&format!("/v1/jobs/{}", segment(id)))
    }

    /// `GET /v1/jobs`.
    pub fn jobs(&self) -> Result<Vec<JobView>, ClientError> {
        self.get_json("/v1/jobs")
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub fn cancel_job(&self, id: &str) -> Result<(), ClientError> {
        let res =
            self.agent.post(self.url(&format!("/v1/jobs/{}/cancel", segment(id)))).send_empty();
        self.check(res).map(drop)
    }

    /// `GET /v1/ledger/balance/{account}`.
    pub fn balance(&self, account: &str) -> Result<BalanceView, ClientError> {
        self.get_json(&format!("/v1/ledger/balance/{}", segment(account)))
    }

    /// `POST /v1/ledger/mint`.
    pub fn mint(&self, req: &MintRequest) -> Result<MintView, ClientError> {
        self.post_json("/v1/ledger/mint", req)
    }

    /// `GET /v1/ledger/history/{account}?limit=N`.
    pub fn history(&self, account: &str, limit: usize) -> Result<Vec<TransferView>, ClientError> {
        self.get_json(&format!("/v1/ledger/history/{}?limit={limit}", segment(account)))
    }

    /// `GET /v1/ledger/audit`.
    pub fn audit(&self) -> Result<AuditView, ClientError> {
        self.get_json("/v1/ledger/audit")
    }

    /// `GET /v1/ledger/export`: every transfer, oldest first.
    pub fn export(&self) -> Result<Vec<TransferView>, ClientError> {
        let res = self.agent.get(self.url("/v1/ledger/export")).call();
        let mut res = self.check(res)?;
        let body = res
            .body_mut()
            .with_config()
            .limit(JSON_BYTES_MAX)
            .read_to_vec()
            .map_err(|e| self.transport(e))?;
        body.split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).map_err(|e| self.transport(e)))
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let res = self.agent.get(self.url(path)).call();
        self.json(res)
    }

    fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let res = self.agent.post(self.url(path)).send_json(body);
        self.json(res)
    }

    fn json<T: DeserializeOwned>(
        &self,
        res: Result<Response<Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut res = self.check(res)?;
        res.body_mut()
            .with_config()
            .limit(JSON_BYTES_MAX)
            .read_json()
            .map_err(|e| self.transport(format!("unexpected answer: {e}")))
    }

    /// Turns a transport failure or an error status into a [`ClientError`].
    fn check(
        &self,
        res: Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>, ClientError> {
        let mut res = res.map_err(|e| match e {
            ureq::Error::Io(io) if is_unreachable(&io) => {
                ClientError::Unreachable { addr: self.addr.clone() }
            }
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::Unreachable { addr: self.addr.clone() }
            }
            other => self.transport(other),
        })?;
        let status = res.status().as_u16();
        if status < 400 {
            return Ok(res);
        }
        let text = res.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => body.error,
            Err(_) if text.trim().is_empty() => format!("the relay answered HTTP {status}"),
            Err(_) => format!("the relay answered HTTP {status}: {}", text.trim()),
        };
        Err(ClientError::Api { status, message })
    }

    fn transport(&self, detail: impl ToString) -> ClientError {
        ClientError::Transport { addr: self.addr.clone(), detail: detail.to_string() }
    }
}

fn is_unreachable(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut
    )
}

/// Percent-encodes one path segment (account names may hold `/`, `?`, `#` or `%`).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("alice"), "alice");
        assert_eq!(segment("a/b?c#d%e f"), "a%2Fb%3Fc%23d%25e%20f");
        assert_eq!(segment("sha256:ab"), "sha256:ab");
    }
}
