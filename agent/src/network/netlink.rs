//! One rtnetlink connection per request: no state survives between calls.

use super::NetworkError;

/// An rtnetlink handle whose connection task ends when this is dropped.
pub(super) struct Netlink {
    pub(super) handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network
    /// namespace and drives it on the current tokio runtime.
    pub(super) fn connect() -> Result<Netlink, NetworkError> {
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(NetworkError::Connection)?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // The connection would otherwise live as long as its unsolicited
        // message channel, which nobody reads.
        self.task.abort();
    }
}
