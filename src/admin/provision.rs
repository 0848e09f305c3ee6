//! Declarative profile provisioning against the Bedrock control plane.
//!
//! `plan` compares the config with what exists in AWS and lists actions; `apply` carries them
//! out, writing each new ARN back into the config (atomically) right after AWS created it, so
//! a failure half way leaves a config that matches AWS; `verify` checks every configured ARN
//! (exists, ACTIVE, right model, right cost tag, not shared). Profiles are found again by
//! their deterministic name, and creation carries a deterministic `clientRequestToken`, so
//! re-running after any failure creates nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use aws_sdk_bedrock::Client;
use aws_sdk_bedrock::types::{
    InferenceProfileModelSource, InferenceProfileStatus, InferenceProfileType, Tag,
};
use sha2::{Digest, Sha256};

use crate::admin::doc::ConfigDoc;
use crate::arn::{BedrockArn, strip_geo_prefix};
use crate::config::{Config, EndpointTemplate, ProfileSource, User};

/// Bedrock's limit on inference profile names.
const MAX_NAME_LEN: usize = 64;

/// A Bedrock control-plane client for the config's region and credentials.
pub struct ControlPlane {
    sdk: aws_config::SdkConfig,
    endpoint: EndpointTemplate,
    /// `aws.region`: where new profiles are created.
    region: String,
    clients: Mutex<HashMap<String, Client>>,
}

/// What we need of an inference profile listed by the control plane.
#[derive(Debug, Clone)]
struct Listed {
    name: String,
    arn: String,
    id: String,
}

impl ControlPlane {
    pub async fn new(config: &Config) -> ControlPlane {
        let region = config.aws.region.clone();
        ControlPlane {
            sdk: crate::upstream::sdk_config(&config.aws).await,
            endpoint: config.aws.control_endpoint.clone(),
            clients: Mutex::new(HashMap::new()),
            region,
        }
    }

    /// A client for a region's control plane (profiles live in the region of their ARN).
    fn client(&self, region: &str) -> Client {
        let mut clients = match self.clients.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let conf = aws_sdk_bedrock::config::Builder::from(&self.sdk)
                    .region(aws_config::Region::new(region.to_string()))
                    .endpoint_url(self.endpoint.for_region(region))
                    .build();
                Client::from_conf(conf)
            })
            .clone()
    }

    fn client_for_arn(&self, arn: &str) -> Client {
        match BedrockArn::parse(arn) {
            Ok(a) => self.client(&a.region),
            Err(_) => self.client(&self.region),
        }
    }

    async fn list(&self, kind: InferenceProfileType, region: &str) -> anyhow::Result<Vec<Listed>> {
        let client = self.client(region);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = client
                .list_inference_profiles()
                .type_equals(kind.clone())
                .max_results(100)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!("ListInferenceProfiles in {region}: {}", sdk_error(&e))
                })?;
            for s in page.inference_profile_summaries() {
                out.push(Listed {
                    name: s.inference_profile_name().to_string(),
                    arn: s.inference_profile_arn().to_string(),
                    id: s.inference_profile_id().to_string(),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn tags(&self, arn: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self
            .client_for_arn(arn)
            .list_tags_for_resource()
            .resource_arn(arn)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("ListTagsForResource {arn}: {}", sdk_error(&e)))?;
        Ok(out
            .tags()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect())
    }
}

/// The error's AWS code and message, which say more than the SDK's Display.
fn sdk_error<E, R>(e: &aws_sdk_bedrock::error::SdkError<E, R>) -> String
where
    E: aws_sdk_bedrock::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    use aws_sdk_bedrock::error::ProvideErrorMetadata as _;
    match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        _ => crate::upstream::error_chain(e),
    }
}

/// `raw` in the shape Bedrock requires of profile names and descriptions,
/// `^([0-9a-zA-Z{extra}][ _-]?)+$`: other characters become a separator (`-`, or a space
/// where `raw` had one and `spaces` is set), never two in a row nor one first.
fn bedrock_words(raw: &str, extra: &[char], spaces: bool) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut last_sep = true;
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() || extra.contains(&c) {
            out.push(c);
            last_sep = false;
        } else if !last_sep {
            out.push(if spaces && c == ' ' { ' ' } else { '-' });
            last_sep = true;
        }
    }
    out
}

/// The profile name for a user and model: `{prefix}-{user}-{model short name}`, in the
/// characters Bedrock allows in a name (`^([0-9a-zA-Z][ _-]?)+$`, at most 64; unlike a
/// description, no `:` or `.`, so `v1:0` becomes `v1-0`).
pub fn profile_name(prefix: &str, user: &str, model: &str) -> String {
    let base = strip_geo_prefix(model);
    let short = base.split_once('.').map_or(base, |(_, m)| m);
    let raw = format!("{prefix}-{user}-{short}");
    let mut name = bedrock_words(&raw, &[], false);
    if name.len() > MAX_NAME_LEN {
        let digest = hex::encode(Sha256::digest(raw.as_bytes()));
        name.truncate(MAX_NAME_LEN - 9);
        while name.ends_with('-') {
            name.pop();
        }
        name.push('-');
        name.push_str(&digest[..8]);
    }
    name
}

/// The profile description, in the characters Bedrock allows there
/// (`^([0-9a-zA-Z:.][ _-]?)+$`, at most 200): an e-mail user name loses its `@`.
fn description(model: &str, user: &str) -> String {
    let mut d = bedrock_words(
        &format!("bedrock-gate: {model} for {user}"),
        &[':', '.'],
        true,
    );
    d.truncate(200); // ASCII only, so any byte is a char boundary
    d
}

/// A creation token that is the same on every run for the same profile name, so a retried
/// or re-run create returns the profile AWS already made instead of a second one.
fn request_token(name: &str) -> String {
    hex::encode(&Sha256::digest(format!("bedrock-gate\0{name}").as_bytes())[..16])
}

/// The tags every profile of `user` must carry.
pub fn desired_tags(config: &Config, user: &User) -> BTreeMap<String, String> {
    let mut tags = config.provisioning.tags.clone();
    tags.extend(user.tags.clone());
    tags.insert(config.provisioning.tag_key.clone(), user.name.clone());
    tags
}

pub(crate) fn geo_for_region(region: &str) -> &'static str {
    if region.starts_with("us-gov-") {
        "us-gov"
    } else if region.starts_with("us-") {
        "us"
    } else if region.starts_with("eu-") {
        "eu"
    } else if region.starts_with("ap-") {
        "apac"
    } else if region.starts_with("ca-") {
        "ca"
    } else {
        "global"
    }
}

/// The prefix of the system profile new profiles copy from: `global.`, or the region's geo.
fn system_prefix(config: &Config, region: &str) -> &'static str {
    match config.provisioning.source {
        ProfileSource::Global => "global",
        _ => geo_for_region(region),
    }
}

fn partition_for_region(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create a profile and write its ARN into the config.
    Create {
        user: String,
        model: String,
        name: String,
        copy_from: String,
        tags: BTreeMap<String, String>,
    },
    /// A profile with our name already exists (an earlier run created it): write its ARN.
    Adopt {
        user: String,
        model: String,
        name: String,
        arn: String,
    },
    /// The profile lacks some of its tags, or has wrong values: set them.
    Tag {
        user: String,
        model: String,
        arn: String,
        tags: BTreeMap<String, String>,
    },
    /// The configured ARN does not exist in AWS. Reported only: set the value to "auto" to
    /// have `apply` create a new one.
    Missing {
        user: String,
        model: String,
        arn: String,
    },
    /// The model cannot be provisioned as configured.
    Unavailable {
        user: String,
        model: String,
        reason: String,
    },
    /// Where the plan leaves the region's quota of application inference profiles.
    Quota {
        region: String,
        limit: u64,
        in_use: u64,
        creating: u64,
    },
    /// The quota could not be read (the plan may still fit; nothing is blocked).
    QuotaUnknown { region: String, reason: String },
}

impl Action {
    /// The user an action is about (`None` for a region's quota).
    pub fn user(&self) -> Option<&str> {
        match self {
            Action::Create { user, .. }
            | Action::Adopt { user, .. }
            | Action::Tag { user, .. }
            | Action::Missing { user, .. }
            | Action::Unavailable { user, .. } => Some(user),
            Action::Quota { .. } | Action::QuotaUnknown { .. } => None,
        }
    }
}

fn show_tags(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Create {
                user,
                model,
                name,
                copy_from,
                tags,
            } => {
                write!(
                    f,
                    "create   {user}  {model}  name={name} from={copy_from} tags={}",
                    show_tags(tags)
                )
            }
            Action::Adopt {
                user,
                model,
                name,
                arn,
            } => write!(f, "adopt    {user}  {model}  name={name} arn={arn}"),
            Action::Tag {
                user,
                model,
                arn,
                tags,
            } => write!(f, "tag      {user}  {model}  {arn} set {}", show_tags(tags)),
            Action::Missing { user, model, arn } => write!(
                f,
                "MISSING  {user}  {model}  {arn} does not exist in AWS; set it to \"auto\" to create a new profile"
            ),
            Action::Unavailable {
                user,
                model,
                reason,
            } => write!(f, "ERROR    {user}  {model}  {reason}"),
            Action::Quota {
                region,
                limit,
                in_use,
                creating,
            } => {
                let after = in_use + creating;
                if after > *limit {
                    write!(
                        f,
                        "OVER QUOTA  {region}  {QUOTA_NAME} ({QUOTA_CODE}): {limit}, {in_use} in use, {creating} to create: \
                         {} over. Raise it in Service Quotas (service bedrock, quota {QUOTA_CODE}) first; apply creates nothing until then",
                        after - limit
                    )
                } else {
                    write!(
                        f,
                        "quota    {region}  {QUOTA_NAME} ({QUOTA_CODE}): {limit}, {in_use} in use, {creating} to create, {} left after",
                        limit - after
                    )
                }
            }
            Action::QuotaUnknown { region, reason } => write!(
                f,
                "quota    {region}  could not read {QUOTA_NAME} ({QUOTA_CODE}): {reason}; \
                 the plan was not checked against it (needs servicequotas:GetServiceQuota)"
            ),
        }
    }
}

impl Action {
    /// Whether the action is a problem apply cannot fix.
    pub fn is_problem(&self) -> bool {
        matches!(self, Action::Missing { .. } | Action::Unavailable { .. }) || self.is_over_quota()
    }

    /// Whether the plan would create more profiles than the region's quota allows.
    pub fn is_over_quota(&self) -> bool {
        matches!(self, Action::Quota { limit, in_use, creating, .. } if in_use + creating > *limit)
    }
}

/// Service Quotas' code and name of the application inference profile quota.
pub const QUOTA_CODE: &str = "L-40EC9882";
const QUOTA_NAME: &str = "Inference profiles per account";

/// The region's quota of application inference profiles: the applied value, or AWS's default
/// where none was ever applied.
async fn profile_quota(config: &Config, region: &str) -> Result<u64, String> {
    let sdk = crate::upstream::sdk_config(&config.aws).await;
    let mut conf = aws_sdk_servicequotas::config::Builder::from(&sdk)
        .region(aws_config::Region::new(region.to_string()));
    if let Some(endpoint) = &config.aws.service_quotas_endpoint {
        conf = conf.endpoint_url(endpoint.for_region(region));
    }
    let sq = aws_sdk_servicequotas::Client::from_conf(conf.build());
    let said = |e: &dyn aws_sdk_servicequotas::error::ProvideErrorMetadata| {
        format!(
            "{}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("no message")
        )
    };
    let quota = match sq
        .get_service_quota()
        .service_code("bedrock")
        .quota_code(QUOTA_CODE)
        .send()
        .await
    {
        Ok(out) => out.quota().cloned(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_no_such_resource_exception()) =>
        {
            sq.get_aws_default_service_quota()
                .service_code("bedrock")
                .quota_code(QUOTA_CODE)
                .send()
                .await
                .map_err(|e| said(&e))?
                .quota()
                .cloned()
        }
        Err(e) => return Err(said(&e)),
    };
    quota
        .and_then(|q| q.value())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
        .ok_or_else(|| "Service Quotas gave no value".to_string())
}

/// Compares the config with AWS. Changes nothing.
pub async fn plan(cp: &ControlPlane, config: &Config) -> anyhow::Result<Vec<Action>> {
    // New profiles are created (and found again by name) in aws.region; configured ones are
    // looked for in the region of their ARN.
    let apps = cp
        .list(InferenceProfileType::Application, &cp.region)
        .await?;
    let by_name: HashMap<&str, &Listed> = apps.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut other_regions: Vec<String> = config
        .users
        .iter()
        .flat_map(|u| u.models.values().map(|p| p.parsed.region.clone()))
        .filter(|r| *r != cp.region)
        .collect();
    other_regions.sort();
    other_regions.dedup();
    let mut elsewhere = Vec::new();
    for region in &other_regions {
        elsewhere.extend(cp.list(InferenceProfileType::Application, region).await?);
    }
    let by_arn: HashMap<&str, &Listed> = apps
        .iter()
        .chain(elsewhere.iter())
        .map(|p| (p.arn.as_str(), p))
        .collect();
    let needs_systems = config.provisioning.source != ProfileSource::FoundationModel
        && config.users.iter().any(|u| !u.pending.is_empty());
    let systems = if needs_systems {
        cp.list(InferenceProfileType::SystemDefined, &cp.region)
            .await?
    } else {
        Vec::new()
    };

    let mut actions = Vec::new();
    let mut names: HashMap<String, (String, String)> = HashMap::new();
    for user in config.users.iter() {
        let tags = desired_tags(config, user);
        for model in &user.pending {
            let name = profile_name(&config.provisioning.name_prefix, &user.name, model);
            if let Some((u, m)) = names.insert(name.clone(), (user.name.clone(), model.clone())) {
                bail!(
                    "users.{}.models.\"{model}\" and users.{u}.models.\"{m}\" would both be named `{name}`",
                    user.name
                );
            }
            if let Some(existing) = by_name.get(name.as_str()) {
                actions.push(Action::Adopt {
                    user: user.name.clone(),
                    model: model.clone(),
                    name: name.clone(),
                    arn: existing.arn.clone(),
                });
                push_tag_repair(cp, &mut actions, user, model, &existing.arn, &tags).await?;
                continue;
            }
            let base = strip_geo_prefix(model);
            let copy_from = match config.provisioning.source {
                ProfileSource::FoundationModel => Some(format!(
                    "arn:{}:bedrock:{}::foundation-model/{base}",
                    partition_for_region(&cp.region),
                    cp.region
                )),
                ProfileSource::CrossRegion | ProfileSource::Global => {
                    let want = format!("{}.{base}", system_prefix(config, &cp.region));
                    systems.iter().find(|s| s.id == want).map(|s| s.arn.clone())
                }
            };
            match copy_from {
                Some(copy_from) => actions.push(Action::Create {
                    user: user.name.clone(),
                    model: model.clone(),
                    name,
                    copy_from,
                    tags: tags.clone(),
                }),
                None => actions.push(Action::Unavailable {
                    user: user.name.clone(),
                    model: model.clone(),
                    reason: format!(
                        "no system cross-region profile `{}.{base}` in {}; check the model id or set provisioning.source = \"foundation-model\"",
                        system_prefix(config, &cp.region),
                        cp.region
                    ),
                }),
            }
        }
        for (model, profile) in &user.models {
            if by_arn.contains_key(profile.arn.as_str()) {
                push_tag_repair(cp, &mut actions, user, model, &profile.arn, &tags).await?;
            } else {
                actions.push(Action::Missing {
                    user: user.name.clone(),
                    model: model.clone(),
                    arn: profile.arn.clone(),
                });
            }
        }
    }
    // New profiles are made in aws.region; the quota there must hold them all.
    let creating = actions
        .iter()
        .filter(|a| matches!(a, Action::Create { .. }))
        .count() as u64;
    actions.push(match profile_quota(config, &cp.region).await {
        Ok(limit) => Action::Quota {
            region: cp.region.clone(),
            limit,
            in_use: apps.len() as u64,
            creating,
        },
        Err(reason) => Action::QuotaUnknown {
            region: cp.region.clone(),
            reason,
        },
    });
    Ok(actions)
}

async fn push_tag_repair(
    cp: &ControlPlane,
    actions: &mut Vec<Action>,
    user: &User,
    model: &str,
    arn: &str,
    desired: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let have = cp.tags(arn).await?;
    let wrong: BTreeMap<String, String> = desired
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !wrong.is_empty() {
        actions.push(Action::Tag {
            user: user.name.clone(),
            model: model.to_string(),
            arn: arn.to_string(),
            tags: wrong,
        });
    }
    Ok(())
}

fn to_tags(tags: &BTreeMap<String, String>) -> anyhow::Result<Vec<Tag>> {
    tags.iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| anyhow::anyhow!("tag {k}: {e}"))
        })
        .collect()
}

/// Writes one ARN into the config. The file is read again for every write, so an edit made
/// while `apply` waited on AWS (a revoked key, say) is kept, not overwritten.
fn save_arn(path: &Path, user: &str, model: &str, arn: &str) -> anyhow::Result<()> {
    let mut doc = ConfigDoc::open(path)?;
    doc.set_model(user, model, arn)?;
    doc.save()?;
    Ok(())
}

/// Carries out a plan. Each created or adopted ARN is saved to the config before the next
/// step, so an error leaves the config matching AWS. Returns the actions done.
pub async fn apply(
    cp: &ControlPlane,
    path: &Path,
    actions: &[Action],
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<usize> {
    let mut done = 0;
    for action in actions {
        match action {
            Action::Create {
                user,
                model,
                name,
                copy_from,
                tags,
            } => {
                let created = cp
                    .client(&cp.region)
                    .create_inference_profile()
                    .inference_profile_name(name)
                    .description(description(model, user))
                    .client_request_token(request_token(name))
                    .model_source(InferenceProfileModelSource::CopyFrom(copy_from.clone()))
                    .set_tags(Some(to_tags(tags)?))
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("CreateInferenceProfile {name}: {}", sdk_error(&e))
                    })?;
                let arn = created.inference_profile_arn().to_string();
                BedrockArn::parse(&arn)
                    .map_err(|e| anyhow::anyhow!("AWS returned an odd ARN `{arn}`: {e}"))?;
                save_arn(path, user, model, &arn).context(
                    "profile created but the config could not be saved; `apply` again adopts it",
                )?;
                writeln!(out, "created  {user}  {model}  {arn}")?;
            }
            Action::Adopt {
                user, model, arn, ..
            } => {
                save_arn(path, user, model, arn)?;
                writeln!(out, "adopted  {user}  {model}  {arn}")?;
            }
            Action::Tag {
                user,
                model,
                arn,
                tags,
            } => {
                cp.client_for_arn(arn)
                    .tag_resource()
                    .resource_arn(arn)
                    .set_tags(Some(to_tags(tags)?))
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("TagResource {arn}: {}", sdk_error(&e)))?;
                writeln!(out, "tagged   {user}  {model}  {arn}  {}", show_tags(tags))?;
            }
            Action::Missing { .. }
            | Action::Unavailable { .. }
            | Action::Quota { .. }
            | Action::QuotaUnknown { .. } => {
                writeln!(out, "{action}")?;
                continue;
            }
        }
        done += 1;
    }
    Ok(done)
}

/// One row of `profiles verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyRow {
    pub user: String,
    pub model: String,
    pub arn: String,
    pub exists: bool,
    pub status: String,
    pub model_matches: bool,
    /// `ok`, or what is wrong with the tags.
    pub tags: String,
    pub shared: bool,
}

impl VerifyRow {
    pub fn ok(&self) -> bool {
        self.exists
            && self.status == "ACTIVE"
            && self.model_matches
            && self.tags == "ok"
            && !self.shared
    }
}

/// Checks every configured profile against AWS.
pub async fn verify(cp: &ControlPlane, config: &Config) -> anyhow::Result<Vec<VerifyRow>> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for user in config.users.iter() {
        for p in user.models.values() {
            *uses.entry(p.arn.as_str()).or_default() += 1;
        }
    }
    let mut rows = Vec::new();
    for user in config.users.iter() {
        let desired = desired_tags(config, user);
        for model in &user.pending {
            rows.push(VerifyRow {
                user: user.name.clone(),
                model: model.clone(),
                arn: "auto (not provisioned: run `profiles apply`)".into(),
                exists: false,
                status: "-".into(),
                model_matches: false,
                tags: "-".into(),
                shared: false,
            });
        }
        for (model, profile) in &user.models {
            let mut row = VerifyRow {
                user: user.name.clone(),
                model: model.clone(),
                arn: profile.arn.clone(),
                exists: false,
                status: "-".into(),
                model_matches: false,
                tags: "-".into(),
                shared: uses.get(profile.arn.as_str()).copied().unwrap_or(0) > 1,
            };
            match cp
                .client_for_arn(&profile.arn)
                .get_inference_profile()
                .inference_profile_identifier(&profile.arn)
                .send()
                .await
            {
                Ok(got) => {
                    row.exists = true;
                    row.status = got.status().as_str().to_string();
                    let base = strip_geo_prefix(model);
                    row.model_matches = !got.models().is_empty()
                        && got.models().iter().all(|m| {
                            m.model_arn()
                                .and_then(|a| BedrockArn::parse(a).ok())
                                .is_some_and(|a| strip_geo_prefix(&a.resource_id) == base)
                        });
                    let have = cp.tags(&profile.arn).await?;
                    let problems: Vec<String> = desired
                        .iter()
                        .filter_map(|(k, v)| match have.get(k) {
                            None => Some(format!("{k} missing")),
                            Some(h) if h != v => Some(format!("{k}={h}, want {v}")),
                            Some(_) => None,
                        })
                        .collect();
                    row.tags = if problems.is_empty() {
                        "ok".into()
                    } else {
                        problems.join("; ")
                    };
                    if got.status() != &InferenceProfileStatus::Active {
                        row.status = got.status().as_str().to_string();
                    }
                }
                Err(e) => {
                    let not_found = e
                        .as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception());
                    if !not_found {
                        bail!("GetInferenceProfile {}: {}", profile.arn, sdk_error(&e));
                    }
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Renders verify rows as an aligned table.
pub fn verify_table(rows: &[VerifyRow]) -> String {
    let yes = |b: bool| if b { "yes" } else { "NO" };
    let mut cells = vec![[
        "USER".to_string(),
        "MODEL".into(),
        "PROFILE".into(),
        "EXISTS".into(),
        "STATUS".into(),
        "MODEL-MATCH".into(),
        "COST-TAG".into(),
        "SHARED".into(),
        "RESULT".into(),
    ]];
    for r in rows {
        cells.push([
            r.user.clone(),
            r.model.clone(),
            r.arn.clone(),
            yes(r.exists).into(),
            r.status.clone(),
            yes(r.model_matches).into(),
            r.tags.clone(),
            if r.shared { "YES".into() } else { "no".into() },
            if r.ok() { "ok".into() } else { "DRIFT".into() },
        ]);
    }
    let mut out = String::new();
    crate::meter::report::aligned(&mut out, &cells, cells[0].len());
    out
}

/// `[oidc.auto_users]`: adds the user a first sign-in needs (the same atomic,
/// comment-preserving edit as `users add`, with their email and the auto-users limits), then
/// creates and tags their profiles (the same plan and apply as `profiles apply`, for this user
/// only). On any failure the entry is taken out again, so the next sign-in tries afresh.
pub async fn add_signed_in_user(
    path: &Path,
    name: &str,
    email: &str,
    auto: &crate::config::signin::AutoUsers,
) -> anyhow::Result<()> {
    let mut doc = ConfigDoc::open(path)?;
    if doc.has_user(name) {
        bail!("user `{name}` exists in the config but does not list this email");
    }
    let tags: Vec<(String, String)> = auto.tags.clone().into_iter().collect();
    doc.add_user(name, &tags, &auto.models)?;
    doc.set_emails(name, &[email])?;
    doc.set_limits(name, &auto.limits)?;
    let config = doc.save()?;
    let provisioned = async {
        let cp = ControlPlane::new(&config).await;
        let actions: Vec<Action> = plan(&cp, &config)
            .await?
            .into_iter()
            .filter(|a| a.user() == Some(name) || a.is_over_quota())
            .collect();
        if let Some(problem) = actions.iter().find(|a| a.is_problem() || a.is_over_quota()) {
            bail!("{problem}");
        }
        apply(&cp, path, &actions, &mut std::io::sink()).await?;
        let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        match config.users.by_name(name) {
            Some(u) if u.pending.is_empty() => Ok(()),
            _ => bail!("the profiles were not all created"),
        }
    }
    .await;
    if let Err(e) = provisioned {
        let mut doc = ConfigDoc::open(path)?;
        if doc.has_user(name) {
            doc.remove_user(name)?;
            doc.save()?;
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern_and_length_limit() {
        assert_eq!(
            profile_name(
                "bg",
                "alice",
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
            ),
            "bg-alice-claude-sonnet-4-5-20250929-v1-0"
        );
        assert_eq!(profile_name("bg", "a@b.com", "anthropic.x"), "bg-a-b-com-x");
        assert_eq!(profile_name("bg", "a__b", "anthropic.x"), "bg-a-b-x");
        let long = profile_name(
            "team",
            &"u".repeat(60),
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
        );
        assert_eq!(long.len(), MAX_NAME_LEN);
        assert_ne!(
            long,
            profile_name(
                "team",
                &"u".repeat(61),
                "anthropic.claude-sonnet-4-5-20250929-v1:0"
            )
        );
        for n in [long, profile_name("bg", "x-", "anthropic.-y")] {
            let mut prev_sep = true;
            for c in n.chars() {
                let sep = matches!(c, ' ' | '_' | '-');
                assert!(!(sep && prev_sep), "{n}");
                assert!(sep || c.is_ascii_alphanumeric(), "{n}");
                prev_sep = sep;
            }
        }
    }

    #[test]
    fn descriptions_fit_the_bedrock_pattern() {
        assert_eq!(
            description("anthropic.claude-sonnet-4-5-20250929-v1:0", "alice"),
            "bedrock-gate: anthropic.claude-sonnet-4-5-20250929-v1:0 for alice"
        );
        assert_eq!(
            description("anthropic.x", "carol@example.com"),
            "bedrock-gate: anthropic.x for carol-example.com"
        );
        assert_eq!(
            description("anthropic.x", "a__b"),
            "bedrock-gate: anthropic.x for a-b"
        );
        assert!(description(&"m".repeat(300), "u").len() <= 200);
    }

    #[test]
    fn request_tokens_are_stable_and_distinct() {
        assert_eq!(request_token("a"), request_token("a"));
        assert_ne!(request_token("a"), request_token("b"));
        assert_eq!(request_token("a").len(), 32);
    }

    #[test]
    fn geo_prefix_follows_the_region() {
        assert_eq!(geo_for_region("us-east-1"), "us");
        assert_eq!(geo_for_region("eu-central-1"), "eu");
        assert_eq!(geo_for_region("ap-southeast-2"), "apac");
        assert_eq!(geo_for_region("us-gov-west-1"), "us-gov");
    }
}
