//! A TAP interface opened through `/dev/net/tun`, with virtio-net headers and offloads.
//!
//! Plain `libc` ioctls: the TUN API is four ioctls and the `tun`/`tun-tap` crates either lack
//! `IFF_VNET_HDR`/`TUNSETOFFLOAD` or pull in an async runtime, which buys us nothing here.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Size of the virtio-net header the tap prepends/expects: `struct virtio_net_hdr_v1`
/// (with `num_buffers`), the only layout a virtio 1.x driver uses.
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name {0:?}: must be 1 to 15 bytes, without '/', NUL or whitespace")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {name} (TUNSETIFF): {source}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the vnet header size of tap {name}: {source}")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the offloads of tap {name}: {source}")]
    Offload {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the thread that opens the tap in {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread that opens the tap in {0} panicked")]
    ThreadPanicked(PathBuf),
}

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

/// An open, non-blocking tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates, if absent) tap `name` with `IFF_VNET_HDR`, a 12-byte header and no
    /// offloads. With `netns`, the tap is looked up or created in that network namespace: the
    /// open happens on a short-lived thread that enters it, so the caller's namespace is never
    /// touched.
    pub fn open(name: &str, netns: Option<&Path>) -> Result<Self, TapError> {
        validate_name(name)?;
        let Some(ns) = netns else {
            return Self::open_here(name);
        };
        let (ns, name) = (ns.to_path_buf(), name.to_owned());
        let path = ns.clone();
        let thread = std::thread::Builder::new()
            .name("husk-tap-open".into())
            .spawn(move || {
                let f = File::open(&ns).map_err(|source| TapError::OpenNetns {
                    path: ns.clone(),
                    source,
                })?;
                // This thread's namespace only: the thread ends right after the open, and the
                // tap's fd stays bound to the namespace it was created in.
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| TapError::Setns {
                    path: ns.clone(),
                    source,
                })?;
                Self::open_here(&name)
            })
            .map_err(|source| TapError::Thread {
                path: path.clone(),
                source,
            })?;
        thread.join().map_err(|_| TapError::ThreadPanicked(path))?
    }

    fn open_here(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut ifr = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        // validate_name guarantees 1..=15 bytes, so the name stays NUL-terminated.
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a correctly sized and
        // laid out, live, exclusively borrowed one, and the fd is a valid tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let len = ifr
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ifr.name.len());
        let name = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid for the
        // call; the fd is a valid tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdr {
                name,
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self { file, name };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Sets the offloads the tap may hand us (`TUN_F_*`): what the guest can receive.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its vnet header); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (with its vnet header). The tap takes whole frames or fails.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b == b':' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_owned()))
    }
}
