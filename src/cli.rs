//! Command-line definitions (clap) and nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// bedrock-gate: per-user Amazon Bedrock proxy that routes every call to the caller's own
/// application inference profile, so Bedrock costs land on per-user cost-allocation tags.
#[derive(Debug, Parser)]
#[command(name = "bedrock-gate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Config file (TOML). See config/bedrock-gate.example.toml.
        #[arg(long, short = 'c', env = "BEDROCK_GATE_CONFIG")]
        config: PathBuf,
        /// Address to listen on; overrides `listen` in the config. Port 0 picks a free port.
        #[arg(long, env = "BEDROCK_GATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "BEDROCK_GATE_LOG_FORMAT")]
        log_format: LogFormat,
        /// Seconds to let requests in flight finish after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 30, env = "BEDROCK_GATE_SHUTDOWN_GRACE_SECS")]
        shutdown_grace_secs: u64,
    },
    /// Validate a config file with exactly the checks `serve` runs; exits 1 naming the bad key.
    Check {
        #[arg(long, short = 'c', env = "BEDROCK_GATE_CONFIG")]
        config: PathBuf,
    },
    /// Print a new random API key and the `sha256:` line to put in a user's `keys`.
    Keygen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serve_with_overrides() {
        let cli = Cli::try_parse_from([
            "bedrock-gate",
            "serve",
            "--config",
            "c.toml",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .unwrap();
        match cli.command {
            Command::Serve {
                config,
                listen,
                log_format,
                shutdown_grace_secs,
            } => {
                assert_eq!(config, PathBuf::from("c.toml"));
                assert_eq!(listen, Some("127.0.0.1:0".parse().unwrap()));
                assert_eq!(log_format, LogFormat::Json);
                assert_eq!(shutdown_grace_secs, 30);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_listen_and_missing_config() {
        assert!(
            Cli::try_parse_from(["bedrock-gate", "serve", "--config", "c", "--listen", "nope"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["bedrock-gate", "check"]).is_err());
        assert!(Cli::try_parse_from(["bedrock-gate", "keygen"]).is_ok());
    }
}
