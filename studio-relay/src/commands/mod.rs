//! The subcommands, one file per group.

pub(crate) mod job;
pub(crate) mod ledger;
pub(crate) mod status;
