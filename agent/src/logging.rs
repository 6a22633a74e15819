//! Console logging. The console is a serial port in the VM, where every byte
//! costs an exit to the VMM: the default level is `info` and the format is
//! terse (no timestamps, no targets, no colors).
//!
//! The level comes from the kernel command line (`husk.log=debug`) when the
//! agent is PID 1, otherwise (or if absent) from the `HUSK_LOG` environment
//! variable (the kernel passes `HUSK_LOG=debug` on its command line to init
//! as an environment variable).

use tracing::level_filters::LevelFilter;

/// Parses a level name (`error`, `warn`, `info`, `debug`, `trace`, `off`).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::OFF),
        "error" => Some(LevelFilter::ERROR),
        "warn" | "warning" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

/// The value of the last `husk.log=` parameter on a kernel command line.
pub fn cmdline_log_value(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|p| p.strip_prefix("husk.log="))
        .next_back()
}

/// Installs the global subscriber writing to stderr (the console when PID 1).
pub fn init(level: LevelFilter) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .compact()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = "console=ttyS0 reboot=k husk.log=debug quiet\n";
        assert_eq!(cmdline_log_value(c), Some("debug"));
        assert_eq!(
            cmdline_log_value("husk.log=warn husk.log=trace"),
            Some("trace")
        );
        assert_eq!(cmdline_log_value("xhusk.log=trace"), None);
        assert_eq!(cmdline_log_value(""), None);
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level("loud"), None);
    }
}
