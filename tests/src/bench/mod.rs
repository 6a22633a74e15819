//! Benchmark sections of `husk-bench` beyond boot time (a module tree of the binary, included with
//! `#[path]` so the harness library stays as it is).

pub mod devices;
pub mod eventfd_hop;
pub mod image;
pub mod util;
