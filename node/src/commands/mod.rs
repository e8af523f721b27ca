//! One module per subcommand.

pub(crate) mod detect;
pub(crate) mod exec;
pub(crate) mod workloads;
