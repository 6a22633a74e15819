//! Command line and log level selection.

use std::ffi::OsString;
use std::path::PathBuf;

use tracing::level_filters::LevelFilter;

use crate::logging;
use crate::server::Listen;

/// Usage text.
pub const USAGE: &str = "usage: husk-agent [--vsock-port PORT | --listen-unix PATH]\n\
  --vsock-port PORT   serve on vsock VMADDR_CID_ANY:PORT (default 1024)\n\
  --listen-unix PATH  serve on a Unix socket instead (testing)\n\
log level: kernel cmdline husk.log=LEVEL (PID 1), else env HUSK_LOG=LEVEL";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve on this listener.
    Run(Listen),
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// Command line errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A value that does not parse.
    #[error("bad value {value:?} for {flag}")]
    BadValue {
        /// The flag.
        flag: &'static str,
        /// The value, lossily converted.
        value: String,
    },
    /// Anything else.
    #[error("unknown argument {0:?}")]
    Unknown(String),
}

/// Parses the arguments (without argv\[0\]).
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, CliError> {
    let mut listen = Listen::Vsock(husk_proto::AGENT_VSOCK_PORT);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(CliError::MissingValue(name))
        };
        match flag.as_str() {
            "--vsock-port" => {
                const F: &str = "--vsock-port";
                let v = value(F)?;
                let port = v
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| CliError::BadValue {
                        flag: F,
                        value: v.to_string_lossy().into_owned(),
                    })?;
                listen = Listen::Vsock(port);
            }
            "--listen-unix" => {
                listen = Listen::Unix(PathBuf::from(value("--listen-unix")?));
            }
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => return Err(CliError::Unknown(arg)),
        }
    }
    Ok(Command::Run(listen))
}

/// The log level (kernel cmdline `husk.log=` when PID 1, else env `HUSK_LOG`,
/// else info) and, if one was given but not understood, that string.
pub fn log_level(pid1: bool) -> (LevelFilter, Option<String>) {
    // As PID 1, /proc/cmdline is the guest kernel's; on a host it is not ours.
    let from_cmdline = pid1
        .then(|| std::fs::read_to_string("/proc/cmdline").ok())
        .flatten()
        .and_then(|c| logging::cmdline_log_value(&c).map(str::to_string));
    let configured = from_cmdline.or_else(|| std::env::var("HUSK_LOG").ok());
    match configured {
        None => (LevelFilter::INFO, None),
        Some(s) => match logging::parse_level(&s) {
            Some(level) => (level, None),
            None => (LevelFilter::INFO, Some(s)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arg_parsing() {
        assert_eq!(
            parse_args(args(&[])).unwrap(),
            Command::Run(Listen::Vsock(1024))
        );
        assert_eq!(
            parse_args(args(&["--vsock-port", "5000"])).unwrap(),
            Command::Run(Listen::Vsock(5000))
        );
        assert_eq!(
            parse_args(args(&["--vsock-port=7"])).unwrap(),
            Command::Run(Listen::Vsock(7))
        );
        assert_eq!(
            parse_args(args(&["--listen-unix", "/tmp/x.sock"])).unwrap(),
            Command::Run(Listen::Unix("/tmp/x.sock".into()))
        );
        assert!(parse_args(args(&["--vsock-port", "-1"])).is_err());
        assert!(parse_args(args(&["--vsock-port"])).is_err());
        assert!(parse_args(args(&["bogus"])).is_err());
        assert_eq!(parse_args(args(&["--help"])).unwrap(), Command::Help);
    }
}
