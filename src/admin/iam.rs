//! `iam policy`: the IAM policies that make the gateway the only way to Bedrock, written for
//! the configured profiles and regions.
//!
//! 1. The gateway role's identity policy, least privilege: invoke exactly the mapped
//!    application inference profiles, and the foundation models behind them only through those
//!    profiles (`bedrock:InferenceProfileArn`); CountTokens on those models; profile reads;
//!    provisioning and billing reads as separate statements an admin may leave out; STS on
//!    `aws.user_role_arn` when set.
//! 2. A deny for every other principal, as an SCP and as a permissions boundary:
//!    `bedrock:Invoke*` and `bedrock:Converse*` unless `aws:PrincipalArn` is the gateway's role
//!    (or the per-user role).
//! 3. With `aws.user_role_arn`: that role's trust policy (the gateway may assume it and tag the
//!    session) and its policy (only profiles tagged with the session's own `{tag_key}`).
//!
//! Pure: reads the config, never AWS. Which regions a profile's model runs in comes from its
//! source (a geo's regions, every region for `global.`, the profile's own region for a
//! foundation-model copy); listing a region too many is harmless, since every model statement is
//! tied to the profiles by condition.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::config::{Config, ProfileSource};

const VERSION: &str = "2012-10-17";
const INVOKE: [&str; 2] = [
    "bedrock:InvokeModel",
    "bedrock:InvokeModelWithResponseStream",
];

/// The regions Bedrock may route a geo's cross-region profile to (a superset of today's).
pub fn geo_regions(geo: &str) -> &'static [&'static str] {
    match geo {
        "us" => &["us-east-1", "us-east-2", "us-west-1", "us-west-2"],
        "us-gov" => &["us-gov-east-1", "us-gov-west-1"],
        "eu" => &[
            "eu-central-1",
            "eu-central-2",
            "eu-north-1",
            "eu-south-1",
            "eu-south-2",
            "eu-west-1",
            "eu-west-2",
            "eu-west-3",
        ],
        "apac" => &[
            "ap-east-2",
            "ap-northeast-1",
            "ap-northeast-2",
            "ap-northeast-3",
            "ap-south-1",
            "ap-south-2",
            "ap-southeast-1",
            "ap-southeast-2",
            "ap-southeast-3",
            "ap-southeast-4",
            "ap-southeast-5",
            "ap-southeast-7",
        ],
        "jp" => &["ap-northeast-1", "ap-northeast-3"],
        "au" => &["ap-southeast-2", "ap-southeast-4"],
        "ca" => &["ca-central-1", "ca-west-1"],
        _ => &[],
    }
}

/// One IAM condition: `test` (`StringEquals`, `ArnNotEquals`, …) on `variable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub test: &'static str,
    pub variable: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sid: &'static str,
    pub allow: bool,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
    pub conditions: Vec<Condition>,
    /// For a trust policy: the AWS principals it trusts.
    pub principals: Vec<String>,
}

impl Statement {
    fn allow(
        sid: &'static str,
        actions: &[&str],
        resources: impl IntoIterator<Item = String>,
    ) -> Statement {
        Statement {
            sid,
            allow: true,
            actions: actions.iter().map(|a| a.to_string()).collect(),
            resources: resources.into_iter().collect(),
            conditions: Vec::new(),
            principals: Vec::new(),
        }
    }

    fn when(
        mut self,
        test: &'static str,
        variable: &str,
        values: impl IntoIterator<Item = String>,
    ) -> Statement {
        self.conditions.push(Condition {
            test,
            variable: variable.to_string(),
            values: values.into_iter().collect(),
        });
        self
    }
}

#[derive(serde::Serialize)]
struct DocumentOut<'a> {
    #[serde(rename = "Version")]
    version: &'static str,
    #[serde(rename = "Statement")]
    statement: Vec<StatementOut<'a>>,
}

#[derive(serde::Serialize)]
struct StatementOut<'a> {
    #[serde(rename = "Sid")]
    sid: &'a str,
    #[serde(rename = "Effect")]
    effect: &'static str,
    #[serde(rename = "Principal", skip_serializing_if = "Option::is_none")]
    principal: Option<Value>,
    #[serde(rename = "Action")]
    action: Value,
    #[serde(rename = "Resource", skip_serializing_if = "Option::is_none")]
    resource: Option<Value>,
    #[serde(rename = "Condition", skip_serializing_if = "Option::is_none")]
    condition: Option<Value>,
}

/// A policy document and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// A name usable as a Terraform identifier and a JSON key.
    pub name: &'static str,
    /// Where it goes, for the header of the output.
    pub purpose: &'static str,
    pub statements: Vec<Statement>,
}

impl Policy {
    /// The document in IAM's usual key order (Version, then each statement's Sid, Effect,
    /// Principal, Action, Resource, Condition).
    fn document(&self) -> DocumentOut<'_> {
        DocumentOut {
            version: VERSION,
            statement: self
                .statements
                .iter()
                .map(|s| StatementOut {
                    sid: s.sid,
                    effect: if s.allow { "Allow" } else { "Deny" },
                    principal: (!s.principals.is_empty())
                        .then(|| json!({"AWS": one_or_many(&s.principals)})),
                    action: one_or_many(&s.actions),
                    resource: (!s.resources.is_empty()).then(|| one_or_many(&s.resources)),
                    condition: (!s.conditions.is_empty()).then(|| {
                        let mut c = serde_json::Map::new();
                        for cond in &s.conditions {
                            if let Value::Object(m) =
                                c.entry(cond.test).or_insert_with(|| json!({}))
                            {
                                m.insert(cond.variable.clone(), one_or_many(&cond.values));
                            }
                        }
                        Value::Object(c)
                    }),
                })
                .collect(),
        }
    }

    /// The IAM JSON document.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.document()).unwrap_or_default()
    }

    /// The IAM JSON document as text, in IAM's usual key order.
    pub fn to_json_text(&self) -> String {
        serde_json::to_string_pretty(&self.document()).unwrap_or_default()
    }

    /// An `aws_iam_policy_document` data source, laid out as `terraform fmt` would.
    pub fn to_terraform(&self) -> String {
        let mut out = format!(
            "# {}\ndata \"aws_iam_policy_document\" \"{}\" {{\n",
            self.purpose, self.name
        );
        for s in &self.statements {
            out.push_str("  statement {\n");
            let effect = if s.allow { "Allow" } else { "Deny" };
            let mut attrs = vec![("sid", hcl_string(s.sid)), ("effect", hcl_string(effect))];
            if !s.principals.is_empty() {
                // A nested block ends a run of aligned attributes.
                attributes(&mut out, 4, &attrs);
                attrs.clear();
                out.push_str("    principals {\n");
                attributes(
                    &mut out,
                    6,
                    &[
                        ("type", hcl_string("AWS")),
                        ("identifiers", hcl_list(&s.principals, 6)),
                    ],
                );
                out.push_str("    }\n");
            }
            attrs.push(("actions", hcl_list(&s.actions, 4)));
            if !s.resources.is_empty() {
                attrs.push(("resources", hcl_list(&s.resources, 4)));
            }
            attributes(&mut out, 4, &attrs);
            for c in &s.conditions {
                out.push_str("    condition {\n");
                attributes(
                    &mut out,
                    6,
                    &[
                        ("test", hcl_string(c.test)),
                        ("variable", hcl_string(&c.variable)),
                        ("values", hcl_list(&c.values, 6)),
                    ],
                );
                out.push_str("    }\n");
            }
            out.push_str("  }\n");
        }
        out.push_str("}\n");
        out
    }
}

/// `key = value` lines; as `terraform fmt` does, the `=` of each run of one-line values is
/// aligned, and a value over several lines stands alone.
fn attributes(out: &mut String, indent: usize, attrs: &[(&str, String)]) {
    let pad = " ".repeat(indent);
    let mut i = 0;
    while i < attrs.len() {
        let mut end = i;
        while end < attrs.len() && !attrs[end].1.contains('\n') {
            end += 1;
        }
        if end == i {
            let (k, v) = &attrs[i];
            out.push_str(&format!("{pad}{k} = {v}\n"));
            i += 1;
            continue;
        }
        let width = attrs[i..end]
            .iter()
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0);
        for (k, v) in &attrs[i..end] {
            out.push_str(&format!("{pad}{k:<width$} = {v}\n"));
        }
        i = end;
    }
}

fn one_or_many(items: &[String]) -> Value {
    match items {
        [one] => json!(one),
        many => json!(many),
    }
}

/// A Terraform string; `${` is escaped so IAM's own policy variables stay literal.
fn hcl_string(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "$${")
        .replace("%{", "%%{");
    format!("\"{escaped}\"")
}

fn hcl_list(items: &[String], indent: usize) -> String {
    if items.len() == 1 {
        return format!("[{}]", hcl_string(&items[0]));
    }
    let pad = " ".repeat(indent + 2);
    let mut out = String::from("[\n");
    for i in items {
        out.push_str(&format!("{pad}{},\n", hcl_string(i)));
    }
    out.push_str(&" ".repeat(indent));
    out.push(']');
    out
}

/// Where a mapped profile's model runs.
fn model_regions(config: &Config, model_key: &str, profile_region: &str) -> Vec<String> {
    let prefix = model_key.split_once('.').map(|(p, _)| p).unwrap_or("");
    let geo = if crate::arn::strip_geo_prefix(model_key) != model_key {
        prefix.to_string()
    } else {
        match config.provisioning.source {
            ProfileSource::Global => "global".to_string(),
            ProfileSource::CrossRegion => {
                crate::admin::provision::geo_for_region(profile_region).to_string()
            }
            ProfileSource::FoundationModel => return vec![profile_region.to_string()],
        }
    };
    if geo == "global" {
        // Global profiles may run in any commercial region; IAM names those models with a
        // wildcard region and without one.
        return vec!["*".to_string(), String::new()];
    }
    let mut regions: Vec<String> = geo_regions(&geo).iter().map(|r| r.to_string()).collect();
    if !regions.iter().any(|r| r == profile_region) {
        regions.push(profile_region.to_string());
    }
    regions
}

/// The role ARN the gateway signs with, as given; or `role/bedrock-gate` in the account of
/// the configured profiles.
pub fn default_gateway_role(config: &Config) -> Option<String> {
    let p = config.users.iter().flat_map(|u| u.models.values()).next()?;
    Some(format!(
        "arn:{}:iam::{}:role/bedrock-gate",
        p.parsed.partition, p.parsed.account
    ))
}

/// Every policy for this config.
pub fn policies(config: &Config, gateway_role: &str) -> anyhow::Result<Vec<Policy>> {
    let profiles: Vec<_> = config
        .users
        .iter()
        .flat_map(|u| u.models.values())
        .collect();
    let Some(first) = profiles.first() else {
        anyhow::bail!(
            "the config maps no profile yet (run `profiles apply` first): there is nothing to allow"
        );
    };
    let partition = first.parsed.partition.clone();
    let account = first.parsed.account.clone();
    let profile_arns: BTreeSet<String> = profiles.iter().map(|p| p.arn.clone()).collect();
    let mut models: BTreeSet<String> = BTreeSet::new();
    let mut count_models: BTreeSet<String> = BTreeSet::new();
    let mut regions: BTreeSet<String> = BTreeSet::new();
    for p in &profiles {
        let base = crate::arn::strip_geo_prefix(&p.model);
        regions.insert(p.parsed.region.clone());
        for r in model_regions(config, &p.model, &p.parsed.region) {
            models.insert(format!(
                "arn:{partition}:bedrock:{r}::foundation-model/{base}"
            ));
        }
        count_models.insert(format!(
            "arn:{partition}:bedrock:{}::foundation-model/{base}",
            p.parsed.region
        ));
    }
    let region_list: Vec<String> = regions.iter().cloned().collect();
    let own_profiles = Statement::allow("InvokeTheMappedProfiles", &INVOKE, profile_arns.clone());
    let behind = Statement::allow("InvokeTheirModelsOnlyThroughThem", &INVOKE, models.clone())
        .when(
            "ArnEquals",
            "bedrock:InferenceProfileArn",
            profile_arns.clone(),
        );
    let count = Statement::allow(
        "CountTokensOnTheirModels",
        &["bedrock:CountTokens"],
        count_models.clone(),
    );
    let read = Statement::allow(
        "ReadTheMappedProfiles",
        &["bedrock:GetInferenceProfile"],
        profile_arns.iter().cloned().chain([format!(
            "arn:{partition}:bedrock:*:{account}:inference-profile/*"
        )]),
    );
    let list = Statement::allow(
        "ListProfiles",
        &["bedrock:ListInferenceProfiles"],
        ["*".to_string()],
    );
    let provision = Statement::allow(
        "OptionalProvisionProfiles",
        &[
            "bedrock:CreateInferenceProfile",
            "bedrock:GetInferenceProfile",
            "bedrock:TagResource",
            "bedrock:ListTagsForResource",
        ],
        region_list
            .iter()
            .flat_map(|r| {
                [
                    format!(
                        "arn:{partition}:bedrock:{r}:{account}:application-inference-profile/*"
                    ),
                    format!("arn:{partition}:bedrock:{r}:{account}:inference-profile/*"),
                    format!("arn:{partition}:bedrock:{r}::foundation-model/*"),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let billing = Statement::allow(
        "OptionalBillingReads",
        &[
            "ce:GetCostAndUsage",
            "ce:ListCostAllocationTags",
            "ce:UpdateCostAllocationTagsStatus",
            "pricing:GetProducts",
            "servicequotas:GetServiceQuota",
            "servicequotas:GetAWSDefaultServiceQuota",
        ],
        ["*".to_string()],
    );
    let mut gateway = vec![
        own_profiles,
        behind,
        count,
        read,
        list.clone(),
        provision,
        billing,
    ];
    let mut allowed_principals = vec![gateway_role.to_string()];
    if let Some(role) = &config.aws.user_role_arn {
        gateway.push(Statement::allow(
            "AssumeTheUserRole",
            &["sts:AssumeRole", "sts:TagSession"],
            [role.clone()],
        ));
        allowed_principals.push(role.clone());
    }
    let mut out = vec![Policy {
        name: "bedrock_gate_role",
        purpose: "Identity policy of the role bedrock-gate signs with (attach to it; leave out the Optional* statements where no admin command runs)",
        statements: gateway,
    }];

    let deny = Statement {
        sid: "DenyBedrockInvokeExceptThroughTheGateway",
        allow: false,
        actions: vec!["bedrock:Invoke*".into(), "bedrock:Converse*".into()],
        resources: vec!["*".into()],
        conditions: vec![Condition {
            test: "ArnNotEquals",
            variable: "aws:PrincipalArn".into(),
            values: allowed_principals,
        }],
        principals: Vec::new(),
    };
    out.push(Policy {
        name: "deny_bedrock_outside_gateway_scp",
        purpose: "Service control policy for the account (AWS Organizations): nobody but the gateway may invoke models",
        statements: vec![deny.clone()],
    });
    out.push(Policy {
        name: "deny_bedrock_outside_gateway_boundary",
        purpose: "Permissions boundary for every other role and user (without Organizations): the same deny",
        statements: vec![
            Statement::allow("AllowWhatTheIdentityPolicyAllows", &["*"], ["*".to_string()]),
            deny,
        ],
    });

    if config.aws.user_role_arn.is_some() {
        let tag_key = &config.provisioning.tag_key;
        let mut trust = Statement::allow(
            "TheGatewayAssumesAndTagsUserSessions",
            &["sts:AssumeRole", "sts:TagSession"],
            [],
        )
        .when(
            "StringLike",
            &format!("aws:RequestTag/{tag_key}"),
            ["?*".to_string()],
        );
        trust.principals = vec![gateway_role.to_string()];
        out.push(Policy {
            name: "bedrock_gate_user_role_trust",
            purpose: "Trust policy of aws.user_role_arn: only the gateway may assume it, and only with the user tag",
            statements: vec![trust],
        });
        let any_app_profile = region_list
            .iter()
            .map(|r| {
                format!("arn:{partition}:bedrock:{r}:{account}:application-inference-profile/*")
            })
            .collect::<Vec<_>>();
        out.push(Policy {
            name: "bedrock_gate_user_role",
            purpose: "Identity policy of aws.user_role_arn: a user's session may invoke only profiles tagged with its own user",
            statements: vec![
                Statement::allow("InvokeOnlyProfilesTaggedForThisUser", &INVOKE, any_app_profile.clone()).when(
                    "StringEquals",
                    &format!("aws:ResourceTag/{tag_key}"),
                    [format!("${{aws:PrincipalTag/{tag_key}}}")],
                ),
                Statement::allow("InvokeTheirModelsOnlyThroughProfiles", &INVOKE, models).when(
                    "ArnLike",
                    "bedrock:InferenceProfileArn",
                    any_app_profile.clone(),
                ),
                Statement::allow("CountTokensOnTheirModels", &["bedrock:CountTokens"], count_models),
                Statement::allow(
                    "ReadProfilesTaggedForThisUser",
                    &["bedrock:GetInferenceProfile"],
                    any_app_profile,
                )
                .when(
                    "StringEquals",
                    &format!("aws:ResourceTag/{tag_key}"),
                    [format!("${{aws:PrincipalTag/{tag_key}}}")],
                ),
                list,
            ],
        });
    }
    Ok(out)
}

/// The policies as one JSON object keyed by name, in the order they are listed.
pub fn render_json(policies: &[Policy]) -> String {
    struct Named<'a>(&'a [Policy]);
    impl serde::Serialize for Named<'_> {
        fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap as _;
            let mut map = ser.serialize_map(Some(self.0.len()))?;
            for p in self.0 {
                map.serialize_entry(p.name, &p.document())?;
            }
            map.end()
        }
    }
    let mut text = serde_json::to_string_pretty(&Named(policies)).unwrap_or_default();
    text.push('\n');
    text
}

/// The policies as Terraform data sources.
pub fn render_terraform(policies: &[Policy]) -> String {
    policies
        .iter()
        .map(Policy::to_terraform)
        .collect::<Vec<_>>()
        .join("\n")
}
