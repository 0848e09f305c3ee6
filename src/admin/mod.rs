//! Admin commands: users, keys and profile provisioning, all editing the config in place.
//!
//! [`doc`] edits the TOML keeping comments; [`provision`] talks to the Bedrock control plane
//! (and Service Quotas); [`billing`] to Cost Explorer; [`prices`] to the AWS Price List;
//! [`iam`] writes the IAM policies for the config (and calls nothing).
//! These run from the CLI; a running `serve` picks their edits up through live reload.

pub mod billing;
pub mod checks;
pub mod doc;
pub mod iam;
pub mod prices;
pub mod provision;

use std::io::Write as _;
use std::process::ExitCode;

use crate::auth::{KeyHash, generate_key};
use crate::cli::{
    IamCommand, KeysCommand, PolicyFormat, PricesCommand, ProfilesCommand, SessionsCommand,
    StoreCommand, UsersCommand,
};
use crate::config::Config;
use doc::ConfigDoc;

pub fn users(cmd: UsersCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UsersCommand::Add {
            name,
            tags,
            models,
            config,
        } => {
            let mut d = ConfigDoc::open(&config.config)?;
            d.add_user(&name, &tags, &models)?;
            d.save()?;
            println!(
                "added user `{name}`; give them a key with: bedrock-gate keys add {name} --config {}",
                config.config.display()
            );
            if !models.is_empty() {
                println!(
                    "then provision their profiles with: bedrock-gate profiles apply --config {}",
                    config.config.display()
                );
            }
        }
        UsersCommand::Remove { name, config } => {
            let mut d = ConfigDoc::open(&config.config)?;
            d.remove_user(&name)?;
            d.save()?;
            println!(
                "removed user `{name}`; their keys stop working as soon as a running proxy reloads"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Add {
            name,
            sigv4: true,
            config,
        } => add_key_pair(&name, &config.config)?,
        KeysCommand::Add { name, config, .. } => {
            let mut d = ConfigDoc::open(&config.config)?;
            let new =
                generate_key().map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
            d.add_key(&name, &new.hash)?;
            d.save()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", new.key.expose())?;
            eprintln!(
                "New key for `{name}` printed above; it is shown only this once. The config stores {}.",
                new.hash
            );
        }
        KeysCommand::Revoke {
            name,
            hash,
            access_key_id,
            all,
            config,
        } => {
            let mut d = ConfigDoc::open(&config.config)?;
            let n = if all {
                d.revoke_keys(&name, None)? + d.revoke_access_key_ids(&name, None)?
            } else if let Some(id) = &access_key_id {
                d.revoke_access_key_ids(&name, Some(id))?
            } else {
                let hash = hash
                    .as_deref()
                    .map(KeyHash::from_config)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--hash: {e}"))?;
                d.revoke_keys(&name, hash.as_ref())?
            };
            if n == 0 {
                anyhow::bail!("user `{name}` has no such key");
            }
            d.save()?;
            println!("revoked {n} key(s) of `{name}`");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The master key file `keys add --sigv4` names when the config names none.
const DEFAULT_MASTER_KEY_FILE: &str = "sigv4-master.key";

/// `keys add NAME --sigv4`: issues a key pair. The master key comes from
/// `BEDROCK_GATE_SIGV4_MASTER_KEY`, else from `auth.sigv4_master_key_file`, which is created
/// (mode 0600, before the config names it) when missing.
fn add_key_pair(name: &str, config_path: &std::path::Path) -> anyhow::Result<()> {
    use crate::auth::{MASTER_KEY_ENV, MasterKey};
    let mut d = ConfigDoc::open(config_path)?;
    if !d.has_user(name) {
        anyhow::bail!("no user `{name}` in {}", config_path.display());
    }
    // The order `serve` reads it in (config::Auth::load_master_key): the file the config
    // names, else the environment, else a new file.
    let named = d.master_key_file();
    let (master, source) = match (named, std::env::var(MASTER_KEY_ENV).ok()) {
        (None, Some(text)) => (
            MasterKey::parse(&text).map_err(|e| anyhow::anyhow!("{MASTER_KEY_ENV}: {e}"))?,
            MASTER_KEY_ENV.to_string(),
        ),
        (named, _) => {
            let file = match named {
                Some(f) => f,
                None => {
                    d.set_master_key_file(DEFAULT_MASTER_KEY_FILE)?;
                    DEFAULT_MASTER_KEY_FILE.to_string()
                }
            };
            let path = crate::config::dir_of(config_path).join(&file);
            (
                read_or_create_master_key(&path)?,
                path.display().to_string(),
            )
        }
    };
    let id = crate::auth::generate_access_key_id()
        .map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    d.add_access_key_id(name, &id)?;
    d.save()?;
    let secret = master.secret_for(&id);
    let mut out = std::io::stdout().lock();
    writeln!(out, "AWS_ACCESS_KEY_ID={id}")?;
    writeln!(out, "AWS_SECRET_ACCESS_KEY={}", secret.expose())?;
    eprintln!(
        "New key pair for `{name}` printed above; the secret is shown only this once. The config lists \
         the access key id; the secret is never stored (it derives from the master key in {source})."
    );
    Ok(())
}

/// Reads the master key file, or creates it (mode 0600, never overwriting) with a new key.
fn read_or_create_master_key(path: &std::path::Path) -> anyhow::Result<crate::auth::MasterKey> {
    use crate::auth::MasterKey;
    use anyhow::Context as _;
    match std::fs::read_to_string(path) {
        Ok(text) => MasterKey::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, text) = MasterKey::generate()?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            f.write_all(format!("{text}\n").as_bytes())?;
            f.sync_all()?;
            eprintln!(
                "Created the SigV4 master key {} (mode 0600). Back it up: every issued secret derives from it.",
                path.display()
            );
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// `store migrate` and `store import-sqlite`.
pub async fn store(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    use crate::store::pg;
    let path = match &cmd {
        StoreCommand::Migrate { config } | StoreCommand::ImportSqlite { config, .. } => {
            config.config.clone()
        }
    };
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let Some(settings) = &config.store else {
        anyhow::bail!(
            "{} has no [store] url: the ledger is the SQLite file, which needs no migration",
            path.display()
        );
    };
    let dir = crate::config::dir_of(&path);
    let mut client = pg::connect(settings, &dir).await?;
    let applied = pg::migrate(&mut client).await?;
    match &cmd {
        StoreCommand::Migrate { .. } => {
            if applied.is_empty() {
                println!(
                    "{}: schema up to date (version {})",
                    settings.redacted_url(),
                    pg::latest()
                );
            } else {
                println!(
                    "{}: applied schema version(s) {:?}; now at {}",
                    settings.redacted_url(),
                    applied,
                    pg::latest()
                );
            }
        }
        StoreCommand::ImportSqlite { path, .. } => {
            let done = pg::import_sqlite(&mut client, path).await?;
            println!(
                "read {} row(s) from {}; {} were new to {}, {} already there",
                done.read,
                path.display(),
                done.inserted,
                settings.redacted_url(),
                done.read - done.inserted
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn profiles(cmd: ProfilesCommand) -> anyhow::Result<ExitCode> {
    let path = match &cmd {
        ProfilesCommand::Plan { config }
        | ProfilesCommand::Apply { config }
        | ProfilesCommand::Verify { config } => config.config.clone(),
    };
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let cp = provision::ControlPlane::new(&config).await;
    let keys = config.provisioning.activated_keys();
    match cmd {
        ProfilesCommand::Plan { .. } => {
            let actions = provision::plan(&cp, &config).await?;
            print_plan(&actions);
            Ok(exit_for(&actions))
        }
        ProfilesCommand::Apply { .. } => {
            let actions = provision::plan(&cp, &config).await?;
            if let Some(over) = actions.iter().find(|a| a.is_over_quota()) {
                println!("{over}");
                println!("apply: nothing done; the plan does not fit the quota");
                return Ok(ExitCode::FAILURE);
            }
            let done = provision::apply(&cp, &path, &actions, &mut std::io::stdout()).await?;
            println!("apply: {done} change(s) made");
            // Without activation Cost Explorer shows every profile's cost as untagged.
            let ce = billing::client(&config).await;
            for (key, state) in billing::activate(&ce, &keys).await? {
                println!("{}", state.describe(&key));
            }
            Ok(exit_for(&actions))
        }
        ProfilesCommand::Verify { .. } => {
            let rows = provision::verify(&cp, &config).await?;
            print!("{}", provision::verify_table(&rows));
            let drift = rows.iter().filter(|r| !r.ok()).count();
            let ce = billing::client(&config).await;
            let states = billing::tag_states(&ce, &keys).await?;
            for (key, state) in &states {
                println!("{}", state.describe(key));
            }
            let inactive = states
                .values()
                .filter(|s| **s == billing::TagState::Inactive)
                .count();
            if drift == 0 {
                println!("verify: {} profile(s), all ok", rows.len());
            } else {
                println!("verify: {drift} of {} profile(s) drifted", rows.len());
            }
            let tags: std::collections::BTreeMap<&String, String> =
                states.iter().map(|(k, s)| (k, s.describe(k))).collect();
            checks::record(
                &config,
                &path,
                checks::VERIFY,
                drift == 0 && inactive == 0,
                &serde_json::json!({"profiles": rows, "tags": tags}),
            )
            .await;
            if drift == 0 && inactive == 0 {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn print_plan(actions: &[provision::Action]) {
    for a in actions {
        println!("{a}");
    }
    let count = |f: fn(&provision::Action) -> bool| actions.iter().filter(|a| f(a)).count();
    println!(
        "plan: {} to create, {} to adopt, {} to tag, {} problem(s)",
        count(|a| matches!(a, provision::Action::Create { .. })),
        count(|a| matches!(a, provision::Action::Adopt { .. })),
        count(|a| matches!(a, provision::Action::Tag { .. })),
        count(provision::Action::is_problem),
    );
}

fn exit_for(actions: &[provision::Action]) -> ExitCode {
    if actions.iter().any(provision::Action::is_problem) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `iam policy`: the policies for this config, as JSON or Terraform.
pub fn iam_command(cmd: IamCommand) -> anyhow::Result<ExitCode> {
    let IamCommand::Policy {
        config,
        format,
        gateway_role_arn,
        only,
    } = cmd;
    let parsed =
        Config::load(&config.config).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let role = match gateway_role_arn {
        Some(arn) => {
            if !crate::config::is_role_arn(&arn) {
                anyhow::bail!(
                    "--gateway-role-arn `{arn}` is not an IAM role ARN like arn:aws:iam::123456789012:role/bedrock-gate"
                );
            }
            arn
        }
        None => {
            let arn = iam::default_gateway_role(&parsed).ok_or_else(|| {
                anyhow::anyhow!("the config maps no profile yet; run `profiles apply` first")
            })?;
            eprintln!(
                "note: the gateway role is taken to be {arn}; pass --gateway-role-arn if it is another"
            );
            arn
        }
    };
    let mut policies = iam::policies(&parsed, &role)?;
    if let Some(name) = &only {
        policies.retain(|p| p.name == name);
        if policies.is_empty() {
            let names = iam::policies(&parsed, &role)?
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ");
            anyhow::bail!("--only `{name}`: no such policy here (this config has {names})");
        }
    }
    match (format, only.is_some()) {
        (PolicyFormat::Json, true) => {
            println!("{}", policies[0].to_json_text());
        }
        (PolicyFormat::Json, false) => print!("{}", iam::render_json(&policies)),
        (PolicyFormat::Terraform, _) => print!("{}", iam::render_terraform(&policies)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `sessions list|revoke`: the SSO sessions in the ledger file, or in the shared store when
/// the config has `[store] url` (and no `--ledger` names a file).
pub async fn sessions(cmd: SessionsCommand) -> anyhow::Result<ExitCode> {
    use crate::signin::sessions;
    let ledger = match &cmd {
        SessionsCommand::List { ledger, .. } | SessionsCommand::Revoke { ledger, .. } => {
            ledger.clone()
        }
    };
    let path = &ledger.config.config;
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let db = ledger
        .ledger
        .clone()
        .unwrap_or_else(|| config.ledger.resolve(path));
    /// Where the sessions are.
    enum At {
        Store(tokio_postgres::Client),
        File(rusqlite::Connection),
    }
    let mut at = match (&config.store, &ledger.ledger) {
        (Some(store), None) => {
            At::Store(crate::store::pg::connect(store, &crate::config::dir_of(path)).await?)
        }
        _ => At::File(sessions::open_db(&db)?),
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    match &cmd {
        SessionsCommand::List { format, .. } => {
            let rows = match &at {
                At::Store(client) => crate::store::sessions::list(client, now_ms).await?,
                At::File(conn) => sessions::list(conn)?,
            };
            let time = |ms: i64| {
                chrono::DateTime::from_timestamp_millis(ms)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_default()
            };
            match *format {
                crate::meter::report::Format::Json => {
                    let list: Vec<_> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "id": r.id,
                                "user": r.user,
                                "email": r.email,
                                "surface": r.surface,
                                "created": time(r.created_ms),
                                "refreshed": time(r.refreshed_ms),
                                "expires": time(r.expires_ms),
                                "refreshable": r.refreshable,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                }
                _ => {
                    let mut table = vec![
                        [
                            "id",
                            "user",
                            "email",
                            "surface",
                            "signed in",
                            "bearer expires",
                            "refresh",
                        ]
                        .map(String::from)
                        .to_vec(),
                    ];
                    for r in &rows {
                        table.push(vec![
                            r.id.to_string(),
                            r.user.clone(),
                            r.email.clone().unwrap_or_else(|| "-".into()),
                            r.surface.clone().unwrap_or_else(|| "-".into()),
                            time(r.created_ms),
                            time(r.expires_ms),
                            if r.refreshable { "yes" } else { "no" }.into(),
                        ]);
                    }
                    let mut out = String::new();
                    crate::meter::report::aligned(&mut out, &table, 7);
                    print!("{out}");
                    println!("{} session(s)", rows.len());
                }
            }
        }
        SessionsCommand::Revoke { user, all, .. } => {
            let who = if *all { None } else { user.as_deref() };
            if let Some(u) = who
                && config.users.by_name(u).is_none()
            {
                eprintln!("note: `{u}` is not a user in {}", path.display());
            }
            let n = match &mut at {
                At::Store(client) => {
                    crate::store::sessions::revoke_user(client, who, now_ms).await? as usize
                }
                At::File(conn) => sessions::revoke_user(conn, who)?,
            };
            match who {
                Some(u) => println!("revoked {n} session(s) of `{u}`"),
                None => println!("revoked {n} session(s)"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `usage`: the ledger report.
pub async fn usage(
    path: &std::path::Path,
    ledger: Option<&std::path::Path>,
    since: Option<String>,
    until: Option<String>,
    by: crate::meter::report::GroupBy,
    format: crate::meter::report::Format,
) -> anyhow::Result<ExitCode> {
    use crate::meter::report;
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let today = chrono::Utc::now().date_naive();
    let since = since.unwrap_or_else(|| today.format("%Y-%m-01").to_string());
    let until = until.unwrap_or_else(|| today.format("%Y-%m-%d").to_string());
    let since_ms = report::day_start_ms(&since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until_ms =
        report::until_exclusive_ms(&until).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
    let rows = match (&config.store, ledger) {
        // The store holds every replica's rows (a --ledger file is read instead, when named).
        (Some(store), None) => {
            let days = (
                chrono::DateTime::from_timestamp_millis(since_ms).unwrap_or_default(),
                chrono::DateTime::from_timestamp_millis(until_ms).unwrap_or_default(),
            );
            let client = crate::store::pg::connect(store, &crate::config::dir_of(path)).await?;
            crate::store::pg::report(
                &client,
                &days.0.format("%Y-%m-%d").to_string(),
                &days.1.format("%Y-%m-%d").to_string(),
                by,
            )
            .await?
        }
        _ => {
            let db = ledger.map_or_else(|| config.ledger.resolve(path), |p| p.to_path_buf());
            let conn = crate::meter::ledger::open_read_only(&db)?;
            report::query(&conn, since_ms, until_ms, by)?
        }
    };
    print!("{}", report::render(&rows, by, format, &since, &until));
    if format == report::Format::Json {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// `reconcile`: the ledger's estimate against Cost Explorer, per day and user.
pub async fn reconcile(
    path: std::path::PathBuf,
    ledger: Option<std::path::PathBuf>,
    since: Option<String>,
    until: Option<String>,
    format: crate::meter::report::Format,
    tolerance: f64,
) -> anyhow::Result<ExitCode> {
    use crate::meter::report;
    if !tolerance.is_finite() || tolerance < 0.0 {
        anyhow::bail!("--tolerance is a percent, zero or more");
    }
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let today = chrono::Utc::now().date_naive();
    let since = since.unwrap_or_else(|| today.format("%Y-%m-01").to_string());
    let until = until.unwrap_or_else(|| {
        today
            .pred_opt()
            .unwrap_or(today)
            .format("%Y-%m-%d")
            .to_string()
    });
    let since_ms = report::day_start_ms(&since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until_ms =
        report::until_exclusive_ms(&until).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
    if until_ms <= since_ms {
        anyhow::bail!("--until {until} is before --since {since}");
    }
    let end = chrono::DateTime::from_timestamp_millis(until_ms)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .ok_or_else(|| anyhow::anyhow!("--until: out of range"))?;
    let estimate = match (&config.store, ledger) {
        // Every replica's rows are in the store (a --ledger file is read instead, when named).
        (Some(store), None) => {
            let client = crate::store::pg::connect(store, &crate::config::dir_of(&path)).await?;
            let first = chrono::DateTime::from_timestamp_millis(since_ms)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            crate::store::pg::daily_costs(&client, &first, &end).await?
        }
        (_, ledger) => {
            let db = ledger.unwrap_or_else(|| config.ledger.resolve(&path));
            let conn = crate::meter::ledger::open_read_only(&db)?;
            report::daily_costs(&conn, since_ms, until_ms)?
        }
    };
    let ce = billing::client(&config).await;
    let billed = billing::billed(&ce, &config, &since, &end).await?;
    let rows = billing::reconcile(&estimate, &billed, tolerance);
    print!("{}", billing::render(&rows, format, &since, &until));
    if format == report::Format::Json {
        println!();
    }
    let over = rows.iter().filter(|r| r.over).count();
    let mut result: serde_json::Value = serde_json::from_str(&billing::render(
        &rows,
        report::Format::Json,
        &since,
        &until,
    ))
    .unwrap_or_default();
    if let Some(o) = result.as_object_mut() {
        o.insert("tolerance_pct".into(), serde_json::json!(tolerance));
        o.insert("days_over".into(), serde_json::json!(over));
    }
    checks::record(&config, &path, checks::RECONCILE, over == 0, &result).await;
    if over > 0 {
        eprintln!(
            "reconcile: {over} final day(s) differ from the bill by more than {tolerance}% (and $0.01)"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `prices sync`.
pub async fn prices(cmd: PricesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PricesCommand::Sync { config } => prices::sync(&config.config).await,
    }
}
