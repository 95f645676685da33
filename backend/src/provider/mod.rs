//! Where nodes come from. A provider turns a node record of the control
//! plane into a machine running a corral-agent for it, and takes the machine
//! away once the node is gone. The local provider (the default) makes each
//! node a state directory and a loopback address on this machine.

pub mod local;
pub mod reaper;

pub use local::{LocalConfig, LocalProvider};
pub use reaper::Reaper;
