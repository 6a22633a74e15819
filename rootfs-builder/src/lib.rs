//! Builds Husk's guest images without a registry.
//!
//! [`tree`]: what the guest image holds (the static agent as `/init`, mount points, `/dev/console`).
//! [`initrd`]: that tree as a reproducible cpio (newc) initramfs.
//! [`erofs`]: the same tree as a reproducible read-only erofs root for a virtio-blk disk (the default).
//! [`oci`]: a busybox OCI image layout archive that `ctr images import` accepts, for tests and the demo.

pub mod erofs;
pub mod initrd;
pub mod oci;
pub mod tree;
