//! The containerd Task service of a pod: containers and processes, stdio, events, spec rewriting.

pub mod events;
pub mod process;
pub mod service;
pub mod spec;
pub mod stats;
pub mod stdio;

pub use service::TaskService;
