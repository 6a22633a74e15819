//! Builds Husk's guest images without a registry or root privileges.
//!
//! [`initrd`]: the guest initramfs, a reproducible cpio (newc) archive with the static agent as `/init`.
//! [`oci`]: a busybox OCI image layout archive that `ctr images import` accepts, for tests and the demo.

pub mod initrd;
pub mod oci;
