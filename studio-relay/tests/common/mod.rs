//! `studio-relay serve` as a process for the tests: started on a data directory with its API
//! on a free loopback port, its log in a file, killed when dropped.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use studio_relay::client::RelayClient;

/// A running relay.
pub(crate) struct Serve {
    child: Child,
    /// Its HTTP API.
    pub(crate) api: SocketAddr,
    log: PathBuf,
}

impl Serve {
    /// Starts the relay on `data` (logging at `info` to `log`) and returns once it printed its
    /// address, that is once its API listens.
    pub(crate) fn start(data: &Path, log: &Path) -> Self {
        Self::start_with(data, log, &[])
    }

    /// [`Serve::start`] with more `serve` arguments.
    pub(crate) fn start_with(data: &Path, log: &Path, args: &[&str]) -> Self {
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_studio-relay"))
            .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", &api.to_string()])
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let serve = Self { child, api, log: log.to_owned() };
        let mut address = String::new();
        BufReader::new(stdout).read_line(&mut address).unwrap();
        assert!(address.contains("/p2p/"), "serve printed no address; its log:\n{}", serve.log());
        serve
    }

    /// A client of its API.
    pub(crate) fn client(&self) -> RelayClient {
        RelayClient::new(self.api)
    }

    /// What it logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
