//! `containerd-shim-husk-v2`: containerd's shim v2 for Husk. One shim process and one microVM per pod; every
//! container of the pod runs in that VM, created by the in-guest agent.
//!
//! * [`bootstrap`]: the `start` and `delete` actions containerd runs before and after a shim's life.
//! * [`server`]: the long-running shim: TTRPC Task service (`containerd.task.v2.Task` and `.v3`), logging.
//! * [`task`]: the Task API forwarded to the agent.
//! * [`sandbox`]: the pod VM (virtiofsd + husk-vmm + the agent client) and cleanup of leftovers.
//! * [`config`]: `/etc/husk/config.toml` and the annotations that may override it.
//! * [`host_mount`]: container root filesystems and volumes mounted into the pod's share.

pub mod bootstrap;
pub mod config;
pub mod host_mount;
pub mod logging;
pub mod sandbox;
pub mod server;
pub mod task;
