//! The subcommands, one file per group.

pub(crate) mod ledger;
