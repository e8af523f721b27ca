//! One module per subcommand.

pub(crate) mod exec;
pub(crate) mod workloads;
