//! Library half of `husk-agent` (the binary is a thin `main.rs` on top), so
//! that the modules can be unit-tested and reused by the coming container
//! engine.

pub mod cli;
pub mod container;
pub mod control_port;
pub mod guest_info;
pub mod init;
pub mod logging;
pub mod network;
pub mod reaper;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod storage;
