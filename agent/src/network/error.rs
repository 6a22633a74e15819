//! Errors of the network set-up, and their gRPC codes.

use std::io;

/// A failed `SetupNetwork` step or stats query. Each names the request field
/// it was working on.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request failed validation.
    #[error("{0}")]
    Invalid(husk_proto::network::NetworkError),
    /// A MAC or device name the guest does not have.
    #[error("{field}: {what}")]
    NotFound {
        /// Request field (`interfaces[0].mac`, `routes[2].device`).
        field: String,
        /// What was missing.
        what: String,
    },
    /// The kernel refused a netlink request.
    #[error("{field}: {step}: {source}")]
    Kernel {
        /// Request field.
        field: String,
        /// The rtnetlink operation (`RTM_NEWROUTE`, ...).
        step: &'static str,
        /// errno (or a decoding failure).
        #[source]
        source: io::Error,
    },
    /// No rtnetlink socket.
    #[error("rtnetlink socket: {0}")]
    Connection(#[source] io::Error),
    /// Writing resolv.conf or hosts failed.
    #[error("{field}: {step} {path}: {source}")]
    File {
        /// `resolv_conf` or `hosts`.
        field: &'static str,
        /// What was being done.
        step: &'static str,
        /// The guest path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl NetworkError {
    /// A refused netlink request.
    pub(super) fn kernel(field: &str, step: &'static str, e: rtnetlink::Error) -> NetworkError {
        let source = match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            e => io::Error::other(e.to_string()),
        };
        NetworkError::Kernel {
            field: field.to_string(),
            step,
            source,
        }
    }
}

impl From<NetworkError> for tonic::Status {
    fn from(e: NetworkError) -> Self {
        let msg = e.to_string();
        match &e {
            NetworkError::Invalid(_) => tonic::Status::invalid_argument(msg),
            NetworkError::NotFound { .. } => tonic::Status::not_found(msg),
            NetworkError::Kernel { source, .. } => match source.raw_os_error() {
                Some(libc::EINVAL | libc::ERANGE | libc::EAFNOSUPPORT | libc::EOPNOTSUPP) => {
                    tonic::Status::invalid_argument(msg)
                }
                Some(libc::ENODEV) => tonic::Status::not_found(msg),
                Some(libc::EEXIST) => tonic::Status::already_exists(msg),
                Some(
                    libc::ENETUNREACH
                    | libc::EHOSTUNREACH
                    | libc::ENETDOWN
                    | libc::EADDRNOTAVAIL
                    | libc::EBUSY,
                ) => tonic::Status::failed_precondition(msg),
                _ => tonic::Status::internal(msg),
            },
            NetworkError::Connection(_) | NetworkError::File { .. } => tonic::Status::internal(msg),
        }
    }
}
