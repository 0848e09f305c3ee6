//! `bedrock-gate iam policy`: golden output for configs with several users, regions and
//! sources, and the properties every policy must have whatever the config: valid IAM JSON, only
//! ARNs the config implies, the expected actions per statement, and a deny that never matches
//! the gateway's own role.
//!
//! `BEDROCK_GATE_BLESS=1 cargo test iam::` rewrites the golden files after an intended change.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::Value;

const ACCOUNT: &str = "123456789012";
const GATEWAY: &str = "arn:aws:iam::123456789012:role/bedrock-gate-proxy";
const USER_ROLE: &str = "arn:aws:iam::123456789012:role/bedrock-gate-users";

fn profile(region: &str, id: &str) -> String {
    format!("arn:aws:bedrock:{region}:{ACCOUNT}:application-inference-profile/{id}")
}

/// Cross-region profiles in two geos, a global one, per-user sessions.
fn cross_region_config() -> String {
    format!(
        r#"[aws]
region = "us-east-1"
user_role_arn = "{USER_ROLE}"
[provisioning]
source = "cross-region"
tag_key = "CostUser"
[users.alice.models]
"{SONNET}" = "{a_s}"
"{HAIKU}" = "{a_h}"
[users.bob.models]
"{SONNET}" = "{b_s}"
[users.carol.models]
"global.{SONNET}" = "{c_g}"
"#,
        a_s = profile("us-east-1", "alicesonnet"),
        a_h = profile("eu-central-1", "alicehaiku"),
        b_s = profile("us-east-1", "bobsonnet"),
        c_g = profile("us-west-2", "carolglobal"),
    )
}

/// Profiles copied from foundation models, one region each, no per-user sessions.
fn foundation_model_config() -> String {
    format!(
        r#"[aws]
region = "us-west-2"
[provisioning]
source = "foundation-model"
[users.dave.models]
"{OPUS}" = "{d_o}"
[users.erin.models]
"{HAIKU}" = "{e_h}"
"us.{SONNET}" = "{e_s}"
"#,
        d_o = profile("us-west-2", "daveopus"),
        e_h = profile("ap-northeast-1", "erinhaiku"),
        e_s = profile("us-west-2", "erinsonnet"),
    )
}

async fn policy(config: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gate.toml");
    std::fs::write(&path, config).unwrap();
    let mut all = vec!["iam", "policy", "-c", path.to_str().unwrap()];
    all.extend_from_slice(args);
    run(dir.path(), &all).await
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures/iam")
        .join(name);
    if std::env::var_os("BEDROCK_GATE_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (BEDROCK_GATE_BLESS=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs from the golden file");
}

/// Every string value in a JSON tree.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

fn list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        Value::Null => vec![],
        other => panic!("not a string or list: {other}"),
    }
}

fn statement<'a>(policy: &'a Value, sid: &str) -> &'a Value {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid} in {policy}"))
}

/// IAM's wildcard match of an action pattern (`bedrock:Invoke*`).
fn action_matches(pattern: &str, action: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => action.starts_with(prefix),
        None => pattern == action,
    }
}

/// Whether a deny statement applies to a call by `principal` (its only condition is on
/// aws:PrincipalArn).
fn denies(statement: &Value, principal: &str, action: &str) -> bool {
    let actions = list(&statement["Action"]);
    if !actions.iter().any(|a| action_matches(a, action)) {
        return false;
    }
    let not = list(&statement["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]);
    !not.iter().any(|p| p == principal)
}

/// The checks that hold for any config.
fn check_policies(all: &Value, implied: &BTreeSet<String>) {
    let map = all.as_object().unwrap();
    for (name, p) in map {
        assert_eq!(p["Version"], "2012-10-17", "{name}");
        let sids: Vec<&str> = p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["Sid"].as_str().unwrap())
            .collect();
        let unique: BTreeSet<_> = sids.iter().collect();
        assert_eq!(unique.len(), sids.len(), "{name}: statement ids are unique");
        assert!(
            sids.iter()
                .all(|s| s.chars().all(|c| c.is_ascii_alphanumeric())),
            "{name}: {sids:?}"
        );
        for s in p["Statement"].as_array().unwrap() {
            assert!(matches!(s["Effect"].as_str(), Some("Allow" | "Deny")));
            let trust = name.ends_with("_trust");
            assert_eq!(
                s.get("Principal").is_some(),
                trust,
                "{name}: a Principal only in the trust policy"
            );
            if trust {
                assert_eq!(
                    list(&s["Principal"]["AWS"]),
                    [GATEWAY],
                    "never a wildcard principal"
                );
            }
        }
        let mut all_strings = Vec::new();
        strings(p, &mut all_strings);
        for s in all_strings.iter().filter(|s| s.starts_with("arn:")) {
            assert!(
                implied.contains(s),
                "{name}: `{s}` is not an ARN the config implies"
            );
        }
    }
    // The deny for everyone else never matches the gateway (nor the per-user role).
    for name in [
        "deny_bedrock_outside_gateway_scp",
        "deny_bedrock_outside_gateway_boundary",
    ] {
        let deny = statement(&map[name], "DenyBedrockInvokeExceptThroughTheGateway");
        assert_eq!(deny["Effect"], "Deny");
        for action in [
            "bedrock:InvokeModel",
            "bedrock:InvokeModelWithResponseStream",
            "bedrock:Converse",
            "bedrock:ConverseStream",
        ] {
            assert!(
                !denies(deny, GATEWAY, action),
                "{name} would deny the gateway {action}"
            );
            assert!(
                denies(deny, "arn:aws:iam::123456789012:role/someone-else", action),
                "{name} must deny others {action}"
            );
            assert!(
                denies(deny, "arn:aws:iam::123456789012:user/dev", action),
                "{name} must deny IAM users (and their Bedrock API keys) {action}"
            );
        }
        assert!(
            !denies(deny, GATEWAY, "bedrock:CountTokens"),
            "CountTokens is free"
        );
    }
}

fn gateway_actions(all: &Value) -> Vec<(String, BTreeSet<String>)> {
    all["bedrock_gate_role"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["Sid"].as_str().unwrap().to_string(),
                list(&s["Action"]).into_iter().collect(),
            )
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn cross_region_profiles_and_user_sessions() {
    let run = policy(&cross_region_config(), &["--gateway-role-arn", GATEWAY]).await;
    assert!(run.ok, "{}", run.stderr);
    golden("cross-region.json", &run.stdout);
    let all: Value = serde_json::from_str(&run.stdout).unwrap();

    let us = ["us-east-1", "us-east-2", "us-west-1", "us-west-2"];
    let eu = [
        "eu-central-1",
        "eu-central-2",
        "eu-north-1",
        "eu-south-1",
        "eu-south-2",
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
    ];
    let regions = ["us-east-1", "eu-central-1", "us-west-2"];
    let mut implied: BTreeSet<String> = [
        profile("us-east-1", "alicesonnet"),
        profile("eu-central-1", "alicehaiku"),
        profile("us-east-1", "bobsonnet"),
        profile("us-west-2", "carolglobal"),
        GATEWAY.to_string(),
        USER_ROLE.to_string(),
        format!("arn:aws:bedrock:*:{ACCOUNT}:inference-profile/*"),
        format!("arn:aws:bedrock:*::foundation-model/{SONNET}"),
        format!("arn:aws:bedrock:::foundation-model/{SONNET}"),
    ]
    .into();
    for r in us {
        implied.insert(format!("arn:aws:bedrock:{r}::foundation-model/{SONNET}"));
    }
    for r in eu {
        implied.insert(format!("arn:aws:bedrock:{r}::foundation-model/{HAIKU}"));
    }
    for r in regions {
        implied.insert(format!(
            "arn:aws:bedrock:{r}:{ACCOUNT}:application-inference-profile/*"
        ));
        implied.insert(format!("arn:aws:bedrock:{r}:{ACCOUNT}:inference-profile/*"));
        implied.insert(format!("arn:aws:bedrock:{r}::foundation-model/*"));
    }
    check_policies(&all, &implied);

    let names: BTreeSet<&str> = all
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        names,
        [
            "bedrock_gate_role",
            "deny_bedrock_outside_gateway_scp",
            "deny_bedrock_outside_gateway_boundary",
            "bedrock_gate_user_role_trust",
            "bedrock_gate_user_role",
        ]
        .into()
    );
    let invoke = set(&[
        "bedrock:InvokeModel",
        "bedrock:InvokeModelWithResponseStream",
    ]);
    let want: Vec<(String, BTreeSet<String>)> = vec![
        ("InvokeTheMappedProfiles".into(), invoke.clone()),
        ("InvokeTheirModelsOnlyThroughThem".into(), invoke.clone()),
        (
            "CountTokensOnTheirModels".into(),
            set(&["bedrock:CountTokens"]),
        ),
        (
            "ReadTheMappedProfiles".into(),
            set(&["bedrock:GetInferenceProfile"]),
        ),
        (
            "ListProfiles".into(),
            set(&["bedrock:ListInferenceProfiles"]),
        ),
        (
            "OptionalProvisionProfiles".into(),
            set(&[
                "bedrock:CreateInferenceProfile",
                "bedrock:GetInferenceProfile",
                "bedrock:TagResource",
                "bedrock:ListTagsForResource",
            ]),
        ),
        (
            "OptionalBillingReads".into(),
            set(&[
                "ce:GetCostAndUsage",
                "ce:ListCostAllocationTags",
                "ce:UpdateCostAllocationTagsStatus",
                "pricing:GetProducts",
                "servicequotas:GetServiceQuota",
                "servicequotas:GetAWSDefaultServiceQuota",
            ]),
        ),
        (
            "AssumeTheUserRole".into(),
            set(&["sts:AssumeRole", "sts:TagSession"]),
        ),
    ];
    assert_eq!(gateway_actions(&all), want);

    // Exactly the mapped profiles; their models only through them.
    let role = &all["bedrock_gate_role"];
    let own: BTreeSet<String> = list(&statement(role, "InvokeTheMappedProfiles")["Resource"])
        .into_iter()
        .collect();
    assert_eq!(own.len(), 4);
    let through = statement(role, "InvokeTheirModelsOnlyThroughThem");
    let cond: BTreeSet<String> =
        list(&through["Condition"]["ArnEquals"]["bedrock:InferenceProfileArn"])
            .into_iter()
            .collect();
    assert_eq!(cond, own);

    // A user's session may use only profiles tagged with its own user.
    let user = &all["bedrock_gate_user_role"];
    let tagged = statement(user, "InvokeOnlyProfilesTaggedForThisUser");
    assert_eq!(
        tagged["Condition"]["StringEquals"]["aws:ResourceTag/CostUser"],
        "${aws:PrincipalTag/CostUser}"
    );
    let trust = statement(
        &all["bedrock_gate_user_role_trust"],
        "TheGatewayAssumesAndTagsUserSessions",
    );
    assert_eq!(list(&trust["Action"]), ["sts:AssumeRole", "sts:TagSession"]);
    assert_eq!(
        trust["Condition"]["StringLike"]["aws:RequestTag/CostUser"],
        "?*"
    );

    // Terraform: the same policies as aws_iam_policy_document data sources.
    let tf = policy(
        &cross_region_config(),
        &["--gateway-role-arn", GATEWAY, "--format", "terraform"],
    )
    .await;
    assert!(tf.ok, "{}", tf.stderr);
    golden("cross-region.tf", &tf.stdout);
    assert_eq!(
        tf.stdout
            .matches("data \"aws_iam_policy_document\"")
            .count(),
        5
    );
    assert!(
        tf.stdout.contains("\"$${aws:PrincipalTag/CostUser}\""),
        "IAM variables escaped for Terraform"
    );
    // Valid HCL, laid out as `terraform fmt` lays it out (terraform is on the CI machine).
    let file = tempfile::Builder::new().suffix(".tf").tempfile().unwrap();
    std::fs::write(file.path(), &tf.stdout).unwrap();
    match std::process::Command::new("terraform")
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .args(["fmt", "-check", "-diff"])
        .arg(file.path())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "terraform fmt -check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("terraform not found ({e}); HCL layout not checked by terraform"),
    }
}

#[tokio::test]
async fn foundation_model_profiles_without_user_sessions() {
    let run = policy(&foundation_model_config(), &["--gateway-role-arn", GATEWAY]).await;
    assert!(run.ok, "{}", run.stderr);
    golden("foundation-model.json", &run.stdout);
    let all: Value = serde_json::from_str(&run.stdout).unwrap();
    let mut implied: BTreeSet<String> = [
        profile("us-west-2", "daveopus"),
        profile("ap-northeast-1", "erinhaiku"),
        profile("us-west-2", "erinsonnet"),
        GATEWAY.to_string(),
        format!("arn:aws:bedrock:us-west-2::foundation-model/{OPUS}"),
        format!("arn:aws:bedrock:ap-northeast-1::foundation-model/{HAIKU}"),
        format!("arn:aws:bedrock:*:{ACCOUNT}:inference-profile/*"),
    ]
    .into();
    // The `us.` key is a cross-region copy even though the default source is foundation-model.
    for r in ["us-east-1", "us-east-2", "us-west-1", "us-west-2"] {
        implied.insert(format!("arn:aws:bedrock:{r}::foundation-model/{SONNET}"));
    }
    for r in ["us-west-2", "ap-northeast-1"] {
        implied.insert(format!(
            "arn:aws:bedrock:{r}:{ACCOUNT}:application-inference-profile/*"
        ));
        implied.insert(format!("arn:aws:bedrock:{r}:{ACCOUNT}:inference-profile/*"));
        implied.insert(format!("arn:aws:bedrock:{r}::foundation-model/*"));
    }
    check_policies(&all, &implied);
    assert_eq!(
        all.as_object().unwrap().len(),
        3,
        "no user role, no user-role policies"
    );
    let through = statement(
        &all["bedrock_gate_role"],
        "InvokeTheirModelsOnlyThroughThem",
    );
    let models = list(&through["Resource"]);
    assert!(models.contains(&format!(
        "arn:aws:bedrock:us-west-2::foundation-model/{OPUS}"
    )));
    assert!(
        !models
            .iter()
            .any(|m| m.contains("us-east-1") && m.contains(OPUS)),
        "a foundation-model copy runs in its own region only: {models:?}"
    );
    let deny = statement(
        &all["deny_bedrock_outside_gateway_scp"],
        "DenyBedrockInvokeExceptThroughTheGateway",
    );
    assert_eq!(
        list(&deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]),
        [GATEWAY]
    );
}

#[tokio::test]
async fn one_policy_alone_the_default_role_and_clear_errors() {
    let only = policy(
        &foundation_model_config(),
        &[
            "--gateway-role-arn",
            GATEWAY,
            "--only",
            "deny_bedrock_outside_gateway_scp",
        ],
    )
    .await;
    assert!(only.ok, "{}", only.stderr);
    let doc: Value = serde_json::from_str(&only.stdout).unwrap();
    assert_eq!(
        doc["Version"], "2012-10-17",
        "a bare document for aws iam create-policy"
    );

    let default = policy(&foundation_model_config(), &[]).await;
    assert!(default.ok, "{}", default.stderr);
    assert!(
        default
            .stderr
            .contains("arn:aws:iam::123456789012:role/bedrock-gate"),
        "{}",
        default.stderr
    );

    let bad_role = policy(
        &foundation_model_config(),
        &["--gateway-role-arn", "bedrock-gate"],
    )
    .await;
    assert!(!bad_role.ok);
    assert!(
        bad_role.stderr.contains("not an IAM role ARN"),
        "{}",
        bad_role.stderr
    );
    let nope = policy(&foundation_model_config(), &["--only", "nope"]).await;
    assert!(!nope.ok);
    assert!(nope.stderr.contains("bedrock_gate_role"), "{}", nope.stderr);
    let empty = policy("[users.x]\nkeys = []\n", &[]).await;
    assert!(!empty.ok);
    assert!(empty.stderr.contains("profiles apply"), "{}", empty.stderr);
}
