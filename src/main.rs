use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use bedrock_gate::cli::{Cli, Command};
use bedrock_gate::config::Config;
use bedrock_gate::server::{self, ServeOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            log_format,
            shutdown_grace_secs,
            no_watch,
            allow_empty_reload,
            admin_listen,
            ledger,
            workers,
        } => {
            bedrock_gate::logging::init(log_format, std::io::stderr().is_terminal());
            let opts = ServeOptions {
                config_path: config,
                listen,
                grace: Duration::from_secs(shutdown_grace_secs),
                watch: !no_watch,
                allow_empty_reload,
                admin_listen,
                ledger,
                workers: workers.map(usize::from),
            };
            let code = match server::serve_blocking(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    bedrock_gate::logging::flush();
                    eprintln!("bedrock-gate: {e:#}");
                    ExitCode::FAILURE
                }
            };
            bedrock_gate::logging::flush();
            code
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                let profiles: usize = c.users.iter().map(|u| u.models.len()).sum();
                println!(
                    "{}: ok ({} users, {} profiles, listen {})",
                    config.display(),
                    c.users.len(),
                    profiles,
                    c.listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::FAILURE
            }
        },
        Command::Usage {
            config,
            since,
            until,
            by,
            format,
            ledger,
        } => run_async(bedrock_gate::admin::usage(
            &config.config,
            ledger.as_deref(),
            since,
            until,
            by,
            format,
        )),
        Command::Users { command } => report(bedrock_gate::admin::users(command)),
        Command::Sessions { command } => run_async(bedrock_gate::admin::sessions(command)),
        Command::Iam { command } => report(bedrock_gate::admin::iam_command(command)),
        Command::Keys { command } => report(bedrock_gate::admin::keys(command)),
        Command::Store { command } => run_async(bedrock_gate::admin::store(command)),
        Command::Profiles { command } => run_async(bedrock_gate::admin::profiles(command)),
        Command::Reconcile {
            config,
            since,
            until,
            format,
            tolerance,
            ledger,
        } => run_async(bedrock_gate::admin::reconcile(
            config.config,
            ledger,
            since,
            until,
            format,
            tolerance,
        )),
        Command::Prices { command } => run_async(bedrock_gate::admin::prices(command)),
        Command::Healthcheck { url, timeout_secs } => {
            match bedrock_gate::server::healthcheck(&url, Duration::from_secs(timeout_secs)) {
                Ok(status) => {
                    println!("{url}: {status}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bedrock-gate healthcheck: {url}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keygen => match bedrock_gate::auth::generate_key() {
            Ok(k) => {
                println!("key:    {}", k.key.expose());
                println!("config: keys = [\"{}\"]", k.hash);
                eprintln!(
                    "Give the key to the user once; only the sha256 line goes in the config."
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bedrock-gate: no randomness from the OS: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs an admin command that talks to AWS on a runtime of its own.
fn run_async(command: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => report(rt.block_on(command)),
        Err(e) => {
            eprintln!("bedrock-gate: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("bedrock-gate: {e:#}");
        ExitCode::FAILURE
    })
}
