//! Requests and answers of the control socket.
//!
//! ```text
//! {"op":"state"}                      -> {"ok":true,"state":"running","vcpus":2,"mem_mib":256,"uptime_ms":1234}
//! {"op":"pause"} / {"op":"resume"}    -> {"ok":true,"state":"paused"} / {"ok":true,"state":"running"}
//! {"op":"stats"}                      -> {"ok":true,"devices":[{"type":"block","slot":0,...},...]}
//! {"op":"vcpus"}  (while paused)      -> {"ok":true,"vcpus":[{"id":0,"mp_state":"runnable","rip":...},...]}
//! {"op":"stop","mode":"graceful","timeout_ms":10000}  -> {"ok":true,"stopping":"graceful"}
//! {"op":"stop","mode":"hard"}         -> {"ok":true,"stopping":"hard"}
//! anything else                       -> {"ok":false,"error":"..."}
//! ```

use serde::Deserialize;

use super::ControlError;

/// Longest request line accepted (the requests are tiny; this bounds what a client can make us buffer).
pub const MAX_REQUEST_LINE: usize = 4096;
/// Default time the guest gets to shut down after a graceful stop request, before a hard stop.
pub const DEFAULT_GRACEFUL_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
// Struct variants (even empty ones): serde applies `deny_unknown_fields` only to those.
pub enum Request {
    State {},
    Pause {},
    Resume {},
    Stats {},
    Vcpus {},
    Stop {
        #[serde(default)]
        mode: StopMode,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Ask the guest to shut down (through the agent); hard stop if it has not after the timeout.
    #[default]
    Graceful,
    /// End the VM now.
    Hard,
}

pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_REQUEST_LINE {
        return Err(ControlError::TooLong(MAX_REQUEST_LINE));
    }
    serde_json::from_slice(line).map_err(|e| ControlError::BadRequest(e.to_string()))
}

pub fn error_reply(msg: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": msg.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_the_rest() {
        assert_eq!(
            parse_request(br#"{"op":"state"}"#).unwrap(),
            Request::State {}
        );
        assert_eq!(
            parse_request(br#"{"op":"vcpus"}"#).unwrap(),
            Request::Vcpus {}
        );
        assert_eq!(
            parse_request(br#"{"op":"stop"}"#).unwrap(),
            Request::Stop {
                mode: StopMode::Graceful,
                timeout_ms: None
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"stop","mode":"hard","timeout_ms":5}"#).unwrap(),
            Request::Stop {
                mode: StopMode::Hard,
                timeout_ms: Some(5)
            }
        );
        for bad in [
            &br#"{"op":"reboot"}"#[..],
            br#"{"op":"state","extra":1}"#,
            br#"{"op":"stop","mode":"soft"}"#,
            b"not json",
            b"",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b' '; MAX_REQUEST_LINE + 1];
        assert!(matches!(
            parse_request(&long),
            Err(ControlError::TooLong(_))
        ));
    }
}
