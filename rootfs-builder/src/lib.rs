//! Builds Husk's guest images without a registry or root privileges.
//!
//! [`initrd`]: the guest initramfs, a reproducible cpio (newc) archive with the static agent as `/init`.

pub mod initrd;
