//! One module per `cargo xtask` command.

pub mod bench;
pub mod build;
pub mod fuzz;
pub mod readme;
pub mod run;
pub mod test;
