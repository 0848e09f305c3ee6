//! `profiles plan|apply|verify`, run as an admin would: the real binary against a fake Bedrock
//! control plane on 127.0.0.1:0 that keeps state, pages its lists, checks every signature and
//! refuses what AWS would refuse. The fake is driven through the real aws-sdk-bedrock client
//! inside the binary, so these tests also pin the wire shapes.

use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::billing::BillingFake;
use common::control::{FakeControl, Fault, Op, foundation_model_arn, system_profile_arn};
use common::{ALICE_KEY, HAIKU, OPUS, Proxy, Run, SONNET, hash};

const CAROL: &str = "carol@example.com";
const NONEXISTENT: &str = "anthropic.claude-nonexistent-v1:0";

/// One user × model of the standard config, and what `apply` must make for it.
struct Want {
    user: &'static str,
    model: &'static str,
    /// `{prefix}-{user}-{model short name}` in the characters Bedrock allows in a name.
    name: &'static str,
    /// The system cross-region profile it copies from in us-east-1.
    system: &'static str,
}

const WANTS: [Want; 4] = [
    Want {
        user: "alice",
        model: HAIKU,
        name: "bg-alice-claude-haiku-4-5-20251001-v1-0",
        system: "us.anthropic.claude-haiku-4-5-20251001-v1:0",
    },
    Want {
        user: "alice",
        model: SONNET,
        name: "bg-alice-claude-sonnet-4-5-20250929-v1-0",
        system: "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    },
    Want {
        user: "bob",
        model: SONNET,
        name: "bg-bob-claude-sonnet-4-5-20250929-v1-0",
        system: "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    },
    Want {
        user: CAROL,
        model: OPUS,
        name: "bg-carol-example-com-claude-opus-4-1-20250805-v1-0",
        system: "us.anthropic.claude-opus-4-1-20250805-v1:0",
    },
];

fn want(user: &str, model: &str) -> &'static Want {
    WANTS
        .iter()
        .find(|w| w.user == user && w.model == model)
        .unwrap_or_else(|| panic!("no want for {user} {model}"))
}

/// The tags every profile of `user` must carry: the cost tag, the global extras, their own.
fn want_tags(user: &str) -> BTreeMap<String, String> {
    let mut t = BTreeMap::from([
        ("BedrockUser".to_string(), user.to_string()),
        ("CostCenter".to_string(), "rnd".to_string()),
    ]);
    if user == "alice" {
        t.insert("team".into(), "ml".into());
    }
    t
}

fn us_models(model: &str) -> Vec<String> {
    ["us-east-1", "us-east-2", "us-west-2"]
        .iter()
        .map(|r| foundation_model_arn(r, model))
        .collect()
}

/// The config file, with `value(user, model)` as each model's value and `extra_alice` lines
/// added to alice's models. Comments and odd spacing are there to be kept byte for byte.
fn config(
    url: &str,
    billing: &str,
    source: &str,
    extra_alice: &str,
    value: &dyn Fn(&str, &str) -> String,
) -> String {
    format!(
        r#"# bedrock-gate config for the provisioning tests.
# `profiles apply` must keep every comment and all this layout.
listen = "127.0.0.1:8787"

[aws]
region = "us-east-1"
runtime_endpoint = "http://127.0.0.1:9"   # not used by `profiles`
control_endpoint = "{url}"   # the fake control plane
cost_explorer_endpoint = "{billing}"   # fake Cost Explorer and Service Quotas
service_quotas_endpoint = "{billing}"

# How apply names and tags the profiles it creates.
[provisioning]
tag_key = "BedrockUser"      # cost-allocation tag; its value is the user name
name_prefix = "bg"
source = "{source}"
tags = {{ CostCenter = "rnd" }}

# Alice is on the ML team; her profiles carry her team tag too.
[users.alice]
keys = ["{alice_key}"]
tags = {{ team = "ml" }}
[users.alice.models]
"{HAIKU}" = "{alice_haiku}"
# her main model
"{SONNET}"   =   "{alice_sonnet}"   # filled in by apply
{extra_alice}
[users.bob]
keys = []
[users.bob.models]
"{SONNET}" = "{bob_sonnet}"

# An e-mail address is a valid user name.
[users."{CAROL}"]
keys = []   # none yet
[users."{CAROL}".models]
"{OPUS}" = "{carol_opus}"
"#,
        alice_key = hash(ALICE_KEY),
        alice_haiku = value("alice", HAIKU),
        alice_sonnet = value("alice", SONNET),
        bob_sonnet = value("bob", SONNET),
        carol_opus = value(CAROL, OPUS),
    )
}

impl Run {
    /// Lines whose first word is `word`.
    fn lines(&self, word: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(word))
            .collect()
    }

    /// The verify table as rows of column name -> cell.
    fn table(&self) -> Vec<BTreeMap<String, String>> {
        let mut lines = self.stdout.lines();
        let header = lines
            .find(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("no verify table:\n{self}"));
        // Columns are padded to one width, so each starts where its header word starts.
        let mut cols: Vec<(usize, String)> = Vec::new();
        let mut prev = ' ';
        for (i, c) in header.char_indices() {
            if c != ' ' && prev == ' ' {
                cols.push((i, String::new()));
            }
            if c != ' ' {
                cols.last_mut().unwrap().1.push(c);
            }
            prev = c;
        }
        lines
            .take_while(|l| !l.starts_with("verify:") && !l.starts_with("cost tag "))
            .map(|l| {
                cols.iter()
                    .enumerate()
                    .map(|(i, (start, name))| {
                        let end = cols.get(i + 1).map_or(l.len(), |c| c.0).min(l.len());
                        let cell = l.get(*start.min(&end)..end).unwrap_or("").trim();
                        (name.clone(), cell.to_string())
                    })
                    .collect()
            })
            .collect()
    }
}

fn row<'a>(
    rows: &'a [BTreeMap<String, String>],
    user: &str,
    model: &str,
) -> &'a BTreeMap<String, String> {
    rows.iter()
        .find(|r| r["USER"] == user && r["MODEL"] == model)
        .unwrap_or_else(|| panic!("no row for {user} {model}: {rows:#?}"))
}

fn assert_row_ok(r: &BTreeMap<String, String>) {
    assert_eq!(r["EXISTS"], "yes", "{r:?}");
    assert_eq!(r["STATUS"], "ACTIVE", "{r:?}");
    assert_eq!(r["MODEL-MATCH"], "yes", "{r:?}");
    assert_eq!(r["COST-TAG"], "ok", "{r:?}");
    assert_eq!(r["SHARED"], "no", "{r:?}");
    assert_eq!(r["RESULT"], "ok", "{r:?}");
}

/// A temp directory with a config pointing at a fresh fake.
struct Env {
    fake: FakeControl,
    billing: BillingFake,
    dir: tempfile::TempDir,
    path: PathBuf,
    source: &'static str,
    extra_alice: String,
}

impl Env {
    async fn new(source: &'static str) -> Env {
        Env::with_extra(source, "").await
    }

    async fn with_extra(source: &'static str, extra_alice: &str) -> Env {
        let fake = FakeControl::start().await;
        let billing = BillingFake::start().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bedrock-gate.toml");
        let env = Env {
            fake,
            billing,
            dir,
            path,
            source,
            extra_alice: extra_alice.to_string(),
        };
        std::fs::write(
            &env.path,
            config(
                &env.fake.url(),
                &env.billing.url(),
                source,
                extra_alice,
                &|_, _| "auto".to_string(),
            ),
        )
        .unwrap();
        env
    }

    /// A config after `apply` has run: ARNs written by the earlier run.
    async fn applied() -> Env {
        let env = Env::new("cross-region").await;
        let run = env.profiles("apply").await;
        assert!(run.ok, "{run}");
        assert_eq!(env.fake.applications().len(), WANTS.len());
        env
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    /// The config exactly as it must be when it matches the fake: each value is the ARN of the
    /// profile with its planned name, or "auto" where none exists.
    fn expected_text(&self) -> String {
        config(
            &self.fake.url(),
            &self.billing.url(),
            self.source,
            &self.extra_alice,
            &|user, model| match self.fake.named(want(user, model).name).as_slice() {
                [] => "auto".to_string(),
                [p] => p.arn.clone(),
                more => panic!("duplicate profiles: {more:#?}"),
            },
        )
    }

    /// The value configured for a user's model.
    fn value(&self, user: &str, model: &str) -> String {
        let t: toml::Table = toml::from_str(&self.text()).unwrap();
        t["users"][user]["models"][model]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn run(&self, args: &[&str]) -> Run {
        common::run(self.dir.path(), args).await
    }

    async fn profiles(&self, sub: &str) -> Run {
        let path = self.path.to_str().unwrap();
        self.run(&["profiles", sub, "--config", path]).await
    }

    async fn check(&self) -> Run {
        let path = self.path.to_str().unwrap();
        self.run(&["check", "--config", path]).await
    }

    /// No temp file of an atomic write was left behind.
    fn assert_no_temp_files(&self) {
        let names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("bedrock-gate.toml"))
            .collect();
        assert_eq!(names, ["bedrock-gate.toml"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_lists_what_apply_would_create_and_changes_nothing() {
    let env = Env::new("cross-region").await;
    let before = env.text();

    let run = env.profiles("plan").await;
    assert!(run.ok, "{run}");
    let creates = run.lines("create");
    assert_eq!(creates.len(), WANTS.len(), "{run}");
    for w in &WANTS {
        let tags: Vec<String> = want_tags(w.user)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let expected = [
            "create".to_string(),
            w.user.to_string(),
            w.model.to_string(),
            format!("name={}", w.name),
            format!("from={}", system_profile_arn(w.system)),
            format!("tags={}", tags.join(",")),
        ];
        assert!(
            creates
                .iter()
                .any(|l| l.split_whitespace().eq(expected.iter().map(String::as_str))),
            "no line like {expected:?}:\n{run}"
        );
    }
    assert!(
        run.stdout
            .contains("plan: 4 to create, 0 to adopt, 0 to tag, 0 problem(s)"),
        "{run}"
    );

    assert_eq!(env.text(), before, "plan must not touch the config");
    assert_eq!(env.fake.writes(), 0, "plan must not change AWS");
    assert!(env.fake.applications().is_empty());
    // The `us.` profiles are only on later pages: finding them means nextToken was followed.
    let lists = env.fake.calls_of(Op::ListInferenceProfiles);
    assert!(
        lists
            .iter()
            .any(|c| c.query.as_deref().unwrap_or("").contains("nextToken=")),
        "{lists:#?}"
    );
    assert!(lists.iter().all(|c| c.status == 200), "{lists:#?}");
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_creates_tagged_profiles_and_writes_their_arns_keeping_comments() {
    let env = Env::new("cross-region").await;

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");

    assert_eq!(env.fake.applications().len(), WANTS.len());
    for w in &WANTS {
        let p = env.fake.the(w.name);
        assert_eq!(
            p.copy_from.as_deref(),
            Some(system_profile_arn(w.system).as_str())
        );
        assert_eq!(p.models, us_models(w.model));
        assert_eq!(p.tags, want_tags(w.user), "{}", w.name);
        assert_eq!(env.value(w.user, w.model), p.arn);
        assert!(
            run.stdout
                .contains(&format!("created  {}  {}  {}", w.user, w.model, p.arn)),
            "{run}"
        );
    }
    // Tags go on with the create; each create carries its own idempotency token.
    assert_eq!(env.fake.count(Op::TagResource), 0);
    let creates = env.fake.calls_of(Op::CreateInferenceProfile);
    assert_eq!(creates.len(), WANTS.len());
    let mut tokens: Vec<String> = creates
        .iter()
        .map(|c| {
            assert_eq!(c.status, 201, "{c:?}");
            c.json()["clientRequestToken"].as_str().unwrap().to_string()
        })
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), WANTS.len());

    // Only the values changed: comments and layout are byte for byte what they were.
    assert_eq!(env.text(), env.expected_text());
    assert!(!env.text().contains("\"auto\""));
    env.assert_no_temp_files();
    let check = env.check().await;
    assert!(check.ok, "{check}");
    assert!(check.stdout.contains("ok (3 users, 4 profiles"), "{check}");
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_apply_changes_nothing() {
    let env = Env::applied().await;
    let text = env.text();
    let writes = env.fake.writes();

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("apply: 0 change(s) made"), "{run}");
    assert_eq!(env.fake.writes(), writes, "nothing created or tagged");
    assert_eq!(env.text(), text, "config byte-identical");
    assert_eq!(env.fake.applications().len(), WANTS.len());

    let plan = env.profiles("plan").await;
    assert!(plan.ok, "{plan}");
    assert!(
        plan.stdout
            .contains("plan: 0 to create, 0 to adopt, 0 to tag, 0 problem(s)"),
        "{plan}"
    );
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_then_reports_a_profile_deleted_behind_its_back() {
    let env = Env::applied().await;

    let run = env.profiles("verify").await;
    assert!(run.ok, "{run}");
    let rows = run.table();
    assert_eq!(rows.len(), WANTS.len(), "{run}");
    for w in &WANTS {
        let r = row(&rows, w.user, w.model);
        assert_eq!(r["PROFILE"], env.fake.the(w.name).arn);
        assert_row_ok(r);
    }
    assert!(run.stdout.contains("verify: 4 profile(s), all ok"), "{run}");

    let gone = env.fake.the(want("alice", SONNET).name);
    assert!(env.fake.delete(&gone.arn));
    let text = env.text();

    let run = env.profiles("verify").await;
    assert!(!run.ok, "{run}");
    let rows = run.table();
    let r = row(&rows, "alice", SONNET);
    assert_eq!(r["PROFILE"], gone.arn);
    assert_eq!(r["EXISTS"], "NO", "{run}");
    assert_eq!(r["RESULT"], "DRIFT", "{run}");
    for w in WANTS.iter().filter(|w| w.name != gone.name) {
        assert_row_ok(row(&rows, w.user, w.model));
    }
    assert!(
        run.stdout.contains("verify: 1 of 4 profile(s) drifted"),
        "{run}"
    );

    let plan = env.profiles("plan").await;
    assert!(!plan.ok, "{plan}");
    let missing = plan.lines("MISSING");
    assert_eq!(missing.len(), 1, "{plan}");
    assert!(
        missing[0].contains("alice")
            && missing[0].contains(SONNET)
            && missing[0].contains(&gone.arn)
            && missing[0].contains("does not exist"),
        "{plan}"
    );
    assert!(plan.stdout.contains("1 problem(s)"), "{plan}");

    // apply reports it too, and does not quietly replace a profile someone deleted.
    let creates = env.fake.count(Op::CreateInferenceProfile);
    let apply = env.profiles("apply").await;
    assert!(!apply.ok, "{apply}");
    assert_eq!(apply.lines("MISSING").len(), 1, "{apply}");
    assert_eq!(env.fake.count(Op::CreateInferenceProfile), creates);
    assert_eq!(env.text(), text);
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_or_changed_tag_is_reported_by_verify_and_repaired_by_apply() {
    let env = Env::applied().await;
    let text = env.text();
    let bob = env.fake.the(want("bob", SONNET).name);
    let alice = env.fake.the(want("alice", HAIKU).name);
    assert!(env.fake.remove_tag(&bob.arn, "CostCenter"));
    env.fake.set_tag(&alice.arn, "BedrockUser", "bob");

    let run = env.profiles("verify").await;
    assert!(!run.ok, "{run}");
    let rows = run.table();
    let r = row(&rows, "bob", SONNET);
    assert_eq!(r["COST-TAG"], "CostCenter missing", "{run}");
    assert_eq!(r["RESULT"], "DRIFT");
    let r = row(&rows, "alice", HAIKU);
    assert_eq!(r["COST-TAG"], "BedrockUser=bob, want alice", "{run}");
    assert_eq!(r["RESULT"], "DRIFT");
    assert_row_ok(row(&rows, "alice", SONNET));
    assert_row_ok(row(&rows, CAROL, OPUS));

    let plan = env.profiles("plan").await;
    assert!(plan.ok, "tag repairs are not problems: {plan}");
    assert_eq!(plan.lines("tag").len(), 2, "{plan}");

    let tagged_before = env.fake.count(Op::TagResource);
    let apply = env.profiles("apply").await;
    assert!(apply.ok, "{apply}");
    let tag_calls = env.fake.calls_of(Op::TagResource);
    let new: Vec<serde_json::Value> = tag_calls[tagged_before..]
        .iter()
        .map(|c| c.json())
        .collect();
    assert_eq!(new.len(), 2, "{new:#?}");
    for (arn, key, value) in [
        (&bob.arn, "CostCenter", "rnd"),
        (&alice.arn, "BedrockUser", "alice"),
    ] {
        let expected = serde_json::json!({
            "resourceARN": arn,
            "tags": [{ "key": key, "value": value }],
        });
        assert!(new.contains(&expected), "no {expected} in {new:#?}");
    }
    assert_eq!(env.fake.tags(&bob.arn), want_tags("bob"));
    assert_eq!(env.fake.tags(&alice.arn), want_tags("alice"));
    assert_eq!(env.fake.count(Op::CreateInferenceProfile), WANTS.len());
    assert_eq!(env.text(), text, "a tag repair does not touch the config");

    let run = env.profiles("verify").await;
    assert!(run.ok, "{run}");
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_midway_leaves_the_config_matching_aws_and_a_rerun_finishes() {
    let env = Env::new("cross-region").await;
    // Profiles are created user by user: alice's haiku first, then this one.
    let failing = want("alice", SONNET).name;
    env.fake
        .inject(Fault::internal(Op::CreateInferenceProfile).target(failing));

    let run = env.profiles("apply").await;
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains("InternalServerException") && run.stderr.contains(failing),
        "{run}"
    );
    assert!(env.fake.named(failing).is_empty());
    let made = env.fake.applications();
    assert!(
        !made.is_empty() && made.len() < WANTS.len(),
        "{made:#?}\n{run}"
    );
    // Exactly the ARNs of what exists, the rest still "auto", layout intact, and valid.
    assert_eq!(env.text(), env.expected_text());
    env.assert_no_temp_files();
    let check = env.check().await;
    assert!(check.ok, "{check}");

    env.fake.clear_faults();
    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    for w in &WANTS {
        assert_eq!(env.fake.named(w.name).len(), 1, "{}", w.name);
        assert_eq!(env.value(w.user, w.model), env.fake.the(w.name).arn);
    }
    assert_eq!(env.fake.applications().len(), WANTS.len());
    assert_eq!(env.text(), env.expected_text());
    let verify = env.profiles("verify").await;
    assert!(verify.ok, "{verify}");
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_create_response_is_retried_without_a_duplicate() {
    let env = Env::new("cross-region").await;
    // Bedrock creates the second profile, but the answer is a 500: the SDK retries.
    env.fake.inject(
        Fault::internal(Op::CreateInferenceProfile)
            .nth(2)
            .after_effect(),
    );

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    let creates = env.fake.calls_of(Op::CreateInferenceProfile);
    assert_eq!(creates.len(), WANTS.len() + 1, "{creates:#?}");
    assert_eq!(creates[1].status, 500);
    assert_eq!(
        creates[1].json(),
        creates[2].json(),
        "the retry repeats the request, idempotency token included"
    );
    for w in &WANTS {
        assert_eq!(env.fake.named(w.name).len(), 1, "{}", w.name);
    }
    assert_eq!(env.text(), env.expected_text());
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_profile_with_the_planned_name_is_adopted_and_its_tags_completed() {
    let env = Env::new("cross-region").await;
    let w = want("bob", SONNET);
    let existing = env.fake.add_application(
        w.name,
        &system_profile_arn(w.system),
        &[("BedrockUser", "bob")],
    );

    let plan = env.profiles("plan").await;
    assert!(plan.ok, "{plan}");
    assert_eq!(
        plan.lines("adopt"),
        [format!(
            "adopt    bob  {SONNET}  name={} arn={}",
            w.name, existing.arn
        )],
        "{plan}"
    );
    assert_eq!(
        plan.lines("tag"),
        [format!(
            "tag      bob  {SONNET}  {} set CostCenter=rnd",
            existing.arn
        )],
        "{plan}"
    );
    assert!(
        plan.stdout
            .contains("plan: 3 to create, 1 to adopt, 1 to tag, 0 problem(s)"),
        "{plan}"
    );

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    assert_eq!(env.fake.named(w.name).len(), 1);
    assert_eq!(env.value("bob", SONNET), existing.arn);
    assert_eq!(env.fake.tags(&existing.arn), want_tags("bob"));
    assert!(
        env.fake
            .calls_of(Op::CreateInferenceProfile)
            .iter()
            .all(|c| c.json()["inferenceProfileName"] != w.name)
    );
    assert_eq!(env.text(), env.expected_text());
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn foundation_model_source_copies_from_the_regional_model() {
    let env = Env::new("foundation-model").await;

    let plan = env.profiles("plan").await;
    assert!(plan.ok, "{plan}");
    for w in &WANTS {
        let from = format!("from={}", foundation_model_arn("us-east-1", w.model));
        assert!(
            plan.lines("create")
                .iter()
                .any(|l| l.contains(&format!("name={}", w.name)) && l.contains(&from)),
            "{plan}"
        );
    }

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    for w in &WANTS {
        let p = env.fake.the(w.name);
        let fm = format!("arn:aws:bedrock:us-east-1::foundation-model/{}", w.model);
        assert_eq!(p.copy_from.as_deref(), Some(fm.as_str()));
        assert_eq!(p.models, [fm]);
        assert_eq!(p.tags, want_tags(w.user));
    }
    assert_eq!(env.text(), env.expected_text());
    let verify = env.profiles("verify").await;
    assert!(verify.ok, "{verify}");
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_without_a_system_profile_is_an_error_naming_it() {
    let env = Env::with_extra(
        "cross-region",
        &format!("\"{NONEXISTENT}\" = \"auto\"   # no such model\n"),
    )
    .await;
    let before = env.text();

    let plan = env.profiles("plan").await;
    assert!(!plan.ok, "{plan}");
    let errors = plan.lines("ERROR");
    assert_eq!(errors.len(), 1, "{plan}");
    assert!(
        errors[0].contains("alice") && errors[0].contains(NONEXISTENT),
        "{plan}"
    );
    assert!(plan.stdout.contains("1 problem(s)"), "{plan}");
    assert_eq!(env.fake.writes(), 0);
    assert_eq!(env.text(), before);

    // apply makes what it can, reports the rest, and exits non-zero.
    let apply = env.profiles("apply").await;
    assert!(!apply.ok, "{apply}");
    assert_eq!(apply.lines("ERROR").len(), 1, "{apply}");
    assert!(
        env.fake
            .calls_of(Op::CreateInferenceProfile)
            .iter()
            .all(|c| !c.json().to_string().contains("nonexistent")),
    );
    assert_eq!(env.fake.applications().len(), WANTS.len());
    assert_eq!(env.value("alice", NONEXISTENT), "auto");
    assert_eq!(env.text(), env.expected_text());
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_flags_profiles_mapped_to_the_wrong_model() {
    let env = Env::applied().await;
    let haiku = env.fake.the(want("alice", HAIKU).name).arn;
    let sonnet = env.fake.the(want("alice", SONNET).name).arn;
    // Swap alice's two ARNs by hand: each now points at the other model.
    let swapped = env
        .text()
        .replace(&haiku, "SWAP")
        .replace(&sonnet, &haiku)
        .replace("SWAP", &sonnet);
    std::fs::write(&env.path, swapped).unwrap();

    let run = env.profiles("verify").await;
    assert!(!run.ok, "{run}");
    let rows = run.table();
    for model in [HAIKU, SONNET] {
        let r = row(&rows, "alice", model);
        assert_eq!(r["MODEL-MATCH"], "NO", "{run}");
        assert_eq!(r["RESULT"], "DRIFT", "{run}");
    }
    assert_row_ok(row(&rows, "bob", SONNET));
    assert_row_ok(row(&rows, CAROL, OPUS));
    env.fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_activates_the_cost_tag_and_verify_reports_each_state() {
    use common::billing::{Op as BillingOp, TagStatus};
    let env = Env::new("cross-region").await;
    // Billing has seen both keys (earlier billed use) but neither is active.
    env.billing.see_tag("BedrockUser");
    env.billing.see_tag("CostCenter");

    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("cost tag BedrockUser: Active"), "{run}");
    assert_eq!(env.billing.tag_status("BedrockUser"), TagStatus::Active);
    assert_eq!(
        env.billing.tag_status("CostCenter"),
        TagStatus::Inactive,
        "extra tags are activated only with activate_extra_tags"
    );

    let run = env.profiles("verify").await;
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("cost tag BedrockUser: Active"), "{run}");

    // Someone deactivates it in Billing: verify fails and says what to run.
    env.billing
        .set_tag_status("BedrockUser", TagStatus::Inactive);
    let run = env.profiles("verify").await;
    assert!(!run.ok, "an Inactive cost tag fails verify: {run}");
    assert!(
        run.stdout.contains("cost tag BedrockUser: Inactive")
            && run.stdout.contains("profiles apply"),
        "{run}"
    );
    assert!(run.stdout.contains("verify: 4 profile(s), all ok"), "{run}");

    // apply repairs it and nothing else; a second apply activates nothing.
    let run = env.profiles("apply").await;
    assert!(
        run.ok && run.stdout.contains("apply: 0 change(s) made"),
        "{run}"
    );
    assert_eq!(env.billing.tag_status("BedrockUser"), TagStatus::Active);
    let updates = env.billing.count(BillingOp::UpdateCostAllocationTagsStatus);
    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    assert_eq!(
        env.billing.count(BillingOp::UpdateCostAllocationTagsStatus),
        updates,
        "an Active key is left alone"
    );
    let run = env.profiles("verify").await;
    assert!(run.ok, "{run}");

    // With activate_extra_tags the global extra keys are activated too.
    std::fs::write(
        &env.path,
        env.text().replace(
            "name_prefix = \"bg\"",
            "name_prefix = \"bg\"\nactivate_extra_tags = true",
        ),
    )
    .unwrap();
    let run = env.profiles("apply").await;
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("cost tag CostCenter: Active"), "{run}");
    assert_eq!(env.billing.tag_status("CostCenter"), TagStatus::Active);
    env.billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cost_tag_billing_has_not_seen_is_a_hint_not_an_error() {
    use common::billing::{Op as BillingOp, TagStatus};
    let env = Env::new("cross-region").await;

    let run = env.profiles("apply").await;
    assert!(run.ok, "a key without billed use yet is no error: {run}");
    assert_eq!(env.fake.applications().len(), WANTS.len());
    let hint = run
        .stdout
        .lines()
        .find(|l| l.starts_with("cost tag BedrockUser"))
        .unwrap_or_else(|| panic!("no tag line:\n{run}"));
    assert!(hint.contains("not yet visible"), "{hint}");
    assert!(hint.contains("about a day"), "{hint}");
    assert!(hint.contains("profiles apply"), "{hint}");
    assert_eq!(
        env.billing.count(BillingOp::UpdateCostAllocationTagsStatus),
        1,
        "apply asked to activate it"
    );
    assert_eq!(env.billing.tag_status("BedrockUser"), TagStatus::Unknown);

    let run = env.profiles("verify").await;
    assert!(run.ok, "not yet visible passes verify: {run}");
    assert!(run.stdout.contains("not yet visible"), "{run}");

    // A day later Billing lists it (Inactive); the next apply activates it.
    env.billing.see_tag("BedrockUser");
    let run = env.profiles("apply").await;
    assert!(
        run.ok && run.stdout.contains("cost tag BedrockUser: Active"),
        "{run}"
    );

    // Without ce permissions apply says which one is missing.
    env.billing
        .set_tag_status("BedrockUser", TagStatus::Inactive);
    env.billing.deny(BillingOp::UpdateCostAllocationTagsStatus);
    let run = env.profiles("apply").await;
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains("ce:UpdateCostAllocationTagsStatus"),
        "{run}"
    );
    env.billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_over_the_quota_fails_and_apply_creates_nothing() {
    let env = Env::new("cross-region").await;
    // Room for three of the four profiles.
    env.billing.set_quota("us-east-1", 3.0);
    let text = env.text();

    let plan = env.profiles("plan").await;
    assert!(!plan.ok, "{plan}");
    let over = plan
        .stdout
        .lines()
        .find(|l| l.starts_with("OVER QUOTA"))
        .unwrap_or_else(|| panic!("no quota line:\n{plan}"));
    assert!(over.contains("L-40EC9882") && over.contains("Inference profiles per account"));
    assert!(over.contains("3, 0 in use, 4 to create: 1 over"), "{over}");

    let apply = env.profiles("apply").await;
    assert!(!apply.ok, "{apply}");
    assert!(apply.stdout.contains("nothing done"), "{apply}");
    assert_eq!(env.fake.writes(), 0, "never half a plan");
    assert!(env.fake.applications().is_empty());
    assert_eq!(env.text(), text, "config untouched");

    // Raised to four: the plan fits exactly, and apply makes them all.
    env.billing.set_quota("us-east-1", 4.0);
    let plan = env.profiles("plan").await;
    assert!(plan.ok, "{plan}");
    assert!(
        plan.stdout
            .contains("4, 0 in use, 4 to create, 0 left after"),
        "{plan}"
    );
    let apply = env.profiles("apply").await;
    assert!(apply.ok, "{apply}");
    assert_eq!(env.fake.applications().len(), WANTS.len());

    // Now four in use: one more profile does not fit.
    std::fs::write(
        &env.path,
        env.text().replace(
            &format!("\"{OPUS}\" = \""),
            &format!("\"{HAIKU}\" = \"auto\"\n\"{OPUS}\" = \""),
        ),
    )
    .unwrap();
    let plan = env.profiles("plan").await;
    assert!(!plan.ok, "{plan}");
    assert!(
        plan.stdout.contains("4, 4 in use, 1 to create: 1 over"),
        "{plan}"
    );
    env.billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_each_profile_as_the_last_verify_found_it() {
    const ADMIN: &str = "bgadmin_provision_0123456789abcdefghijklmnopqrstuvw";
    let env = Env::applied().await;
    let text = format!(
        "{}\n[admin]\ntoken_sha256 = \"{}\"\n",
        env.text(),
        hash(ADMIN)
    );
    let proxy = Proxy::start(&text).await;
    let profiles = || async {
        let r = proxy.admin_get("/api/profiles", ADMIN).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()
    };
    // Never verified here: every profile says so.
    let before = profiles().await;
    assert_eq!(before["verify"], serde_json::Value::Null, "{before}");
    let config = proxy.config_path.to_str().unwrap().to_string();
    let args = ["profiles", "verify", "--config", config.as_str()];
    let verify = || common::run(proxy.dir.path(), &args);

    let run = verify().await;
    assert!(run.ok, "{run}");
    let after = profiles().await;
    assert_eq!(after["verify"]["ok"], true, "{after}");
    let lines = after["profiles"].as_array().unwrap();
    assert_eq!(lines.len(), WANTS.len(), "{after}");
    assert!(lines.iter().all(|l| l["verify_ok"] == true), "{after}");

    // A profile deleted behind the proxy's back: the next verify's drift is on its line.
    let gone = env.fake.the(want("alice", SONNET).name);
    assert!(env.fake.delete(&gone.arn));
    let run = verify().await;
    assert!(!run.ok, "{run}");
    let after = profiles().await;
    assert_eq!(after["verify"]["ok"], false, "{after}");
    for l in after["profiles"].as_array().unwrap() {
        let is_gone = l["arn"] == gone.arn.as_str();
        assert_eq!(l["verify_ok"], !is_gone, "{l}");
        if is_gone {
            assert_eq!(l["verify"]["exists"], false, "{l}");
        }
    }
    // And the page says DRIFT on that line.
    let page = proxy.admin_get("/profiles", ADMIN).await;
    let html = String::from_utf8_lossy(&page.body).to_string();
    assert_eq!(html.matches("DRIFT: missing").count(), 1, "{html}");
    assert!(html.contains("found problems"), "{html}");
}
