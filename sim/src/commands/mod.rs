//! One module per subcommand.

pub(crate) mod bench;
pub(crate) mod out;
pub(crate) mod run;
pub(crate) mod train;
