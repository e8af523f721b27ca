//! The `--api` flag, shared by `join` (which serves the control API) and the subcommands that
//! talk to it, so both find the same address.

use std::net::SocketAddr;

use clap::Args;

/// The control API's default address.
#[cfg(test)]
pub(crate) const API_ADDR_DEFAULT: &str = "127.0.0.1:7781";

/// Where the node's local control API listens.
#[derive(Clone, Debug, Args)]
pub(crate) struct ApiArgs {
    /// The node's control API (HTTP + JSON, no authentication) [env: AIMATRIX_NODE_API]
    /// [default: 127.0.0.1:7781].
    ///
    /// Must be a loopback address unless --api-public is given.
    #[arg(long = "api", value_name = "ADDR", env = "AIMATRIX_NODE_API", hide_env = true)]
    pub(crate) api: Option<SocketAddr>,
    /// Allow a non-loopback --api address. Anyone who can reach it can see the node's state and
    /// claim jobs in its name; use it only on a network you control.
    #[arg(long)]
    pub(crate) api_public: bool,
}

impl ApiArgs {
    /// The address to use: the flag (or its environment variable), else `configured` (the
    /// config file's `api`), else the default; refused when it is not a loopback address and
    /// `--api-public` was not given.
    pub(crate) fn addr(&self, configured: Option<SocketAddr>) -> Result<SocketAddr, String> {
        let addr = self.api.or(configured).unwrap_or_else(default_addr);
        if !addr.ip().is_loopback() && !self.api_public {
            return Err(format!(
                "the control API address {addr} is not a loopback address, so other hosts could \
                 reach it; use 127.0.0.1 or [::1], or pass --api-public if that is intended"
            ));
        }
        Ok(addr)
    }
}

fn default_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7781))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_then_config_then_default() {
        let none = ApiArgs { api: None, api_public: false };
        assert_eq!(none.addr(None).unwrap().to_string(), API_ADDR_DEFAULT);
        let configured: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(none.addr(Some(configured)).unwrap(), configured);
        let flag = ApiArgs { api: Some("[::1]:9001".parse().unwrap()), api_public: false };
        assert_eq!(flag.addr(Some(configured)).unwrap().to_string(), "[::1]:9001");
    }

    #[test]
    fn a_public_address_needs_the_flag() {
        let public = ApiArgs { api: Some("0.0.0.0:7781".parse().unwrap()), api_public: false };
        let err = public.addr(None).unwrap_err();
        assert!(err.contains("0.0.0.0:7781") && err.contains("--api-public"), "{err}");
        let allowed = ApiArgs { api_public: true, ..public };
        assert_eq!(allowed.addr(None).unwrap().to_string(), "0.0.0.0:7781");
        let configured: SocketAddr = "192.0.2.1:7781".parse().unwrap();
        let none = ApiArgs { api: None, api_public: false };
        assert!(none.addr(Some(configured)).is_err(), "the config file is held to the same rule");
    }
}
