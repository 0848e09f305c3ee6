//! Command-line definitions (clap) and nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::meter::report::{Format, GroupBy};

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
    #[command(args_override_self = true)]
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
        /// Do not watch the config file for changes (SIGHUP still reloads it).
        #[arg(long)]
        no_watch: bool,
        /// Let a reload swap in a config with no users while users are being served (by default
        /// that is refused: it is what a file truncated by an editor mid-write parses to).
        #[arg(long)]
        allow_empty_reload: bool,
        /// Address of the Prometheus /metrics listener; overrides `admin_listen`.
        #[arg(long, env = "BEDROCK_GATE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Ledger database; overrides `ledger.path` (the Docker image points it at its volume).
        #[arg(long, env = "BEDROCK_GATE_LEDGER")]
        ledger: Option<PathBuf>,
        /// Threads that serve connections (each connection stays on one, with its own pool of
        /// connections to Bedrock). Default: one per CPU the process may use.
        #[arg(long, env = "BEDROCK_GATE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Report tokens and estimated cost from the ledger.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        /// First day to include (YYYY-MM-DD, UTC). Default: the first of this month.
        #[arg(long)]
        since: Option<String>,
        /// Last day to include (YYYY-MM-DD, UTC). Default: today.
        #[arg(long)]
        until: Option<String>,
        /// Group rows by.
        #[arg(long, value_enum, default_value_t = GroupBy::User)]
        by: GroupBy,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Ledger database; overrides `ledger.path`.
        #[arg(long, env = "BEDROCK_GATE_LEDGER")]
        ledger: Option<PathBuf>,
    },
    /// Validate a config file with exactly the checks `serve` runs; exits 1 naming the bad key.
    Check {
        #[arg(long, short = 'c', env = "BEDROCK_GATE_CONFIG")]
        config: PathBuf,
    },
    /// Print a new random API key and the `sha256:` line to put in a user's `keys`.
    Keygen,
    /// Exit 0 if a running bedrock-gate answers GET /healthz with 200 (for Docker HEALTHCHECK;
    /// the distroless image has no curl).
    Healthcheck {
        /// Plain-HTTP URL to probe: the admin listener's /healthz by default.
        #[arg(
            long,
            default_value = "http://127.0.0.1:9464/healthz",
            env = "BEDROCK_GATE_HEALTHCHECK_URL"
        )]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Print the IAM policies that make the gateway the only way to Bedrock, for this config.
    Iam {
        #[command(subcommand)]
        command: IamCommand,
    },
    /// List or revoke SSO sign-in sessions (bearers Claude Code got through /login). A running
    /// `serve` refuses a revoked bearer within a second.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Add or remove users in the config (edits it in place, keeping comments).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The PostgreSQL store (`[store] url`): create or upgrade its schema, move a SQLite ledger
    /// in.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Issue or revoke a user's API keys (only hashes are stored).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Create and tag application inference profiles for models mapped to "auto", and check them.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Compare the ledger's estimate with what Cost Explorer billed, per day and user; exits 1
    /// when a final day differs by more than the tolerance.
    Reconcile {
        #[command(flatten)]
        config: ConfigArg,
        /// First day (YYYY-MM-DD, UTC). Default: the first of this month.
        #[arg(long)]
        since: Option<String>,
        /// Last day, included (YYYY-MM-DD, UTC). Default: yesterday.
        #[arg(long)]
        until: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Largest difference (percent of the bill) on a final day that still passes; a
        /// difference must also exceed $0.01 to fail.
        #[arg(long, default_value_t = 5.0)]
        tolerance: f64,
        /// Ledger database; overrides `ledger.path`.
        #[arg(long, env = "BEDROCK_GATE_LEDGER")]
        ledger: Option<PathBuf>,
    },
    /// Model prices from the AWS Price List.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Read every mapped model's rates (regional and Global) in the regions used from the AWS
    /// Price List and write them to the prices file (`prices_file`, default prices.toml,
    /// added to the config if missing).
    Sync {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// The config file a command reads or edits.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Config file (TOML).
    #[arg(long, short = 'c', env = "BEDROCK_GATE_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Add a user with no keys yet.
    Add {
        name: String,
        /// Extra cost-allocation tag for this user's profiles (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Map a model to "auto", for `profiles apply` to provision (repeatable).
        #[arg(long = "model", value_name = "MODEL_ID")]
        models: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user and their keys and mappings (their profiles stay in AWS).
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum IamCommand {
    /// The gateway role's least-privilege policy, the deny for everyone else (SCP and
    /// permissions boundary), and with aws.user_role_arn that role's trust and policy.
    Policy {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value = "json")]
        format: PolicyFormat,
        /// The role bedrock-gate signs with; default `role/bedrock-gate` in the account of the
        /// configured profiles.
        #[arg(long, value_name = "ARN")]
        gateway_role_arn: Option<String>,
        /// Print only this policy, as a bare IAM document (for `aws iam create-policy
        /// --policy-document file://…`).
        #[arg(long, value_name = "NAME")]
        only: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyFormat {
    /// IAM policy JSON: one object keyed by policy name (or one document with --only).
    Json,
    /// `aws_iam_policy_document` data sources.
    Terraform,
}

/// The ledger file sessions are stored in (beside the usage rows).
#[derive(Debug, Clone, clap::Args)]
pub struct LedgerArg {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Ledger database; overrides `ledger.path` (as `serve --ledger` does).
    #[arg(long, env = "BEDROCK_GATE_LEDGER")]
    pub ledger: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// The sessions that still work (bearer or refresh token not expired, not revoked).
    List {
        #[command(flatten)]
        ledger: LedgerArg,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// End a user's sessions, or everyone's with --all: their next call gets 401 and Claude
    /// Code asks them to /login again.
    Revoke {
        /// The user whose sessions end.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        user: Option<String>,
        /// End every session.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        ledger: LedgerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Create or upgrade the schema (versioned; safe from many processes at once, and `serve`
    /// runs it too).
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy every row of a SQLite ledger into the store, each request id once (a second run
    /// copies nothing).
    ImportSqlite {
        /// The SQLite ledger file (`ledger.path`).
        path: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new key for a user; prints it once and stores only its hash.
    Add {
        name: String,
        /// Issue an AWS-style key pair instead, for clients that sign with SigV4: prints
        /// `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` once and stores only the access
        /// key id (the secret derives from the master key, `auth.sigv4_master_key_file`, which
        /// this creates with mode 0600 when missing).
        #[arg(long)]
        sigv4: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke one key (by its `sha256:` hash), one key pair (by its access key id), or all of
    /// a user's keys and key pairs.
    Revoke {
        name: String,
        /// The hash to revoke, as it stands in the config.
        #[arg(
            long,
            value_name = "sha256:HEX",
            required_unless_present_any = ["all", "access_key_id"],
            conflicts_with_all = ["all", "access_key_id"]
        )]
        hash: Option<String>,
        /// The access key id of the key pair to revoke.
        #[arg(long, value_name = "ID", conflicts_with = "all")]
        access_key_id: Option<String>,
        /// Revoke every key and key pair of the user.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Show what `apply` would do; changes nothing.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create missing profiles, repair their tags and write the ARNs into the config.
    Apply {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check every configured profile in AWS; exits 1 on any drift.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
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
                ..
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

    #[test]
    fn parses_admin_commands() {
        let cli = Cli::try_parse_from([
            "bedrock-gate",
            "users",
            "add",
            "alice",
            "--tag",
            "team=ml",
            "--model",
            "anthropic.x",
            "-c",
            "c.toml",
        ])
        .unwrap();
        match cli.command {
            Command::Users {
                command:
                    UsersCommand::Add {
                        name,
                        tags,
                        models,
                        config,
                    },
            } => {
                assert_eq!(name, "alice");
                assert_eq!(tags, [("team".to_string(), "ml".to_string())]);
                assert_eq!(models, ["anthropic.x"]);
                assert_eq!(config.config, PathBuf::from("c.toml"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Cli::try_parse_from([
                "bedrock-gate",
                "users",
                "add",
                "a",
                "--tag",
                "novalue",
                "-c",
                "c"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["bedrock-gate", "keys", "revoke", "a", "-c", "c"]).is_err());
        assert!(
            Cli::try_parse_from([
                "bedrock-gate",
                "keys",
                "revoke",
                "a",
                "--all",
                "--hash",
                "x",
                "-c",
                "c"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from(["bedrock-gate", "keys", "revoke", "a", "--all", "-c", "c"])
                .is_ok()
        );
        assert!(Cli::try_parse_from(["bedrock-gate", "profiles", "verify", "-c", "c"]).is_ok());
    }
}
