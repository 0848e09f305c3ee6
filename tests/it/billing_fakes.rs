//! The billing fake must speak what the real SDK clients send and parse, or tests of the
//! proxy's cost accounting against it prove nothing. Each test drives it with the real
//! aws-sdk-* client of the service, pointed at the fake with `endpoint_url`.

use std::time::{Duration, SystemTime};

use aws_sdk_costexplorer::types as ce;
use aws_sdk_sts::error::ProvideErrorMetadata as _;
use aws_smithy_types::retry::RetryConfig;
use common::billing::{self, BillingFake, Op, TagStatus};
use common::{FakeBedrock, sigv4};
use serde_json::{Value, json};

use crate::common;

const TAG: &str = "bedrock-gate:user";
const ROLE: &str = "arn:aws:iam::123456789012:role/bedrock-gate-user";

/// A client of `$sdk` against `$url` in `$region`, signing as [`sigv4::ACCESS_KEY`] with
/// `$secret` (and session token `$token`), without retries.
macro_rules! client {
    ($sdk:ident, $url:expr, $region:expr, $secret:expr) => {
        client!($sdk, $url, $region, sigv4::ACCESS_KEY, $secret, None)
    };
    ($sdk:ident, $url:expr, $region:expr, $key:expr, $secret:expr, $token:expr) => {{
        let creds = $sdk::config::Credentials::new($key, $secret, $token, None, "test");
        let config = $sdk::Config::builder()
            .behavior_version($sdk::config::BehaviorVersion::latest())
            .region($sdk::config::Region::new($region))
            .endpoint_url($url)
            .credentials_provider(creds)
            .retry_config(RetryConfig::disabled());
        $sdk::Client::from_conf(config.build())
    }};
}

fn ce_client(fake: &BillingFake, secret: &str) -> aws_sdk_costexplorer::Client {
    client!(aws_sdk_costexplorer, fake.url(), "us-east-1", secret)
}

fn sts_client(fake: &BillingFake, secret: &str) -> aws_sdk_sts::Client {
    client!(aws_sdk_sts, fake.url(), "us-east-1", secret)
}

fn daily_costs(
    client: &aws_sdk_costexplorer::Client,
    start: &str,
    end: &str,
) -> aws_sdk_costexplorer::operation::get_cost_and_usage::builders::GetCostAndUsageFluentBuilder {
    let period = ce::DateInterval::builder().start(start).end(end).build();
    let by_tag = ce::GroupDefinition::builder()
        .r#type(ce::GroupDefinitionType::Tag)
        .key(TAG);
    client
        .get_cost_and_usage()
        .time_period(period.unwrap())
        .granularity(ce::Granularity::Daily)
        .metrics("UnblendedCost")
        .group_by(by_tag.build())
}

#[tokio::test]
async fn cost_allocation_tags_activate_and_list() {
    let fake = BillingFake::start().await;
    fake.add_cost("2025-10-01", &[(TAG, "alice")], 1.0);
    fake.see_tag("team");
    fake.see_tag("project");
    let client = ce_client(&fake, sigv4::SECRET_KEY);
    let entry = |k: &str| {
        ce::CostAllocationTagStatusEntry::builder()
            .tag_key(k)
            .status(ce::CostAllocationTagStatus::Active)
            .build()
            .unwrap()
    };
    let out = client
        .update_cost_allocation_tags_status()
        .cost_allocation_tags_status(entry(TAG))
        .cost_allocation_tags_status(entry("never-seen"))
        .send()
        .await
        .unwrap();
    let errors = out.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].tag_key(), Some("never-seen"));
    assert_eq!(errors[0].code(), Some("TagKeysNotFoundException"));
    assert_eq!(fake.tag_status(TAG), TagStatus::Active);
    assert_eq!(fake.tag_status("never-seen"), TagStatus::Unknown);

    // Three known keys on pages of two: only a client following NextToken sees them all.
    let tags = client
        .list_cost_allocation_tags()
        .r#type(ce::CostAllocationTagType::UserDefined)
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .unwrap();
    let seen: Vec<_> = tags
        .iter()
        .map(|t| (t.tag_key(), t.status().as_str()))
        .collect();
    let want = [
        (TAG, "Active"),
        ("project", "Inactive"),
        ("team", "Inactive"),
    ];
    assert_eq!(seen, want);
    assert_eq!(fake.count(Op::ListCostAllocationTags), 2);

    let some = client
        .list_cost_allocation_tags()
        .tag_keys(TAG)
        .tag_keys("never-seen")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = some
        .cost_allocation_tags()
        .iter()
        .map(|t| t.tag_key())
        .collect();
    assert_eq!(keys, [TAG]);
    fake.assert_clean();
}

#[tokio::test]
async fn cost_and_usage_pages_by_day() {
    let fake = BillingFake::start().await;
    for (day, alice, bob) in [("2025-10-01", 1.23, 0.5), ("2025-10-02", 2.0, 0.0)] {
        fake.add_cost(day, &[(TAG, "alice")], alice);
        fake.add_cost(day, &[(TAG, "bob")], bob);
    }
    fake.add_cost("2025-10-03", &[], 0.25);
    fake.add_cost("2025-10-05", &[(TAG, "alice")], 4.0);
    fake.set_estimated("2025-10-05");
    let client = ce_client(&fake, sigv4::SECRET_KEY);
    let service = ce::DimensionValues::builder().key(ce::Dimension::Service);
    let filter = ce::Expression::builder().dimensions(service.values("Amazon Bedrock").build());
    let query = || daily_costs(&client, "2025-10-01", "2025-10-06").filter(filter.clone().build());

    // While the tag is inactive, all cost is untagged. A page holds two days.
    let first = query().send().await.unwrap();
    assert_eq!(first.results_by_time().len(), 2);
    let token = first.next_page_token().unwrap();
    assert_eq!(
        first.results_by_time()[0].groups()[0].keys(),
        [format!("{TAG}$")]
    );

    // GetCostAndUsage has no SDK paginator: follow NextPageToken by hand.
    fake.set_tag_status(TAG, TagStatus::Active);
    let (mut days, mut next) = (Vec::new(), None);
    loop {
        let page = query().set_next_page_token(next).send().await.unwrap();
        assert_eq!(page.group_definitions()[0].key(), Some(TAG));
        days.extend(page.results_by_time().iter().cloned());
        next = page.next_page_token().map(str::to_string);
        if next.is_none() {
            break;
        }
    }
    let starts: Vec<_> = days
        .iter()
        .map(|d| d.time_period().unwrap().start())
        .collect();
    assert_eq!(
        starts,
        [
            "2025-10-01",
            "2025-10-02",
            "2025-10-03",
            "2025-10-04",
            "2025-10-05"
        ]
    );
    let cost = |d: &ce::ResultByTime, who: &str| {
        let group = d
            .groups()
            .iter()
            .find(|g| g.keys() == [format!("{TAG}${who}")]);
        let metric = &group.map(|g| g.metrics().unwrap()["UnblendedCost"].clone());
        metric.as_ref().map(|m| m.amount().unwrap().to_string())
    };
    assert_eq!(cost(&days[0], "alice").as_deref(), Some("1.2300000000"));
    assert_eq!(cost(&days[0], "bob").as_deref(), Some("0.5000000000"));
    assert_eq!(cost(&days[2], "").as_deref(), Some("0.2500000000"));
    assert!(days[3].groups().is_empty());
    assert_eq!(days[4].time_period().unwrap().end(), "2025-10-06");
    assert!(days[4].estimated() && !days[3].estimated());

    // The Filter is recorded as sent.
    let sent = fake.filters();
    assert_eq!(sent.len(), 4);
    let want = json!({"Dimensions": {"Key": "SERVICE", "Values": ["Amazon Bedrock"]}});
    assert_eq!(sent[3], Some(want));
    // A token from another query is refused.
    let other = daily_costs(&client, "2025-09-01", "2025-10-01").next_page_token(token);
    let e = other.send().await.unwrap_err();
    assert_eq!(e.code(), Some("InvalidNextTokenException"));
}

#[tokio::test]
async fn products_page_and_parse() {
    let fake = BillingFake::start().await;
    let sonnet = "Claude Sonnet 4.5 (Amazon Bedrock Edition)";
    let haiku = "Claude Haiku 4.5 (Amazon Bedrock Edition)";
    let (regional, global) = ([3.3, 16.5, 0.33, 4.125], [3.0, 15.0, 0.3, 3.75]);
    let mut items = billing::claude_price_items(sonnet, "us-east-1", regional, global);
    items.extend(billing::claude_price_items(
        sonnet,
        "eu-west-1",
        regional,
        global,
    ));
    items.extend(billing::claude_price_items(
        haiku,
        "us-east-1",
        [1.0; 4],
        [1.0; 4],
    ));
    fake.set_products(billing::FOUNDATION_MODELS, items);
    let client = client!(aws_sdk_pricing, fake.url(), "us-east-1", sigv4::SECRET_KEY);
    let term = |field: &str, value: &str| {
        aws_sdk_pricing::types::Filter::builder()
            .r#type(aws_sdk_pricing::types::FilterType::TermMatch)
            .field(field)
            .value(value)
            .build()
            .unwrap()
    };
    let list = client
        .get_products()
        .service_code(billing::FOUNDATION_MODELS)
        .filters(term("servicename", sonnet))
        .filters(term("regionCode", "us-east-1"))
        .format_version("aws_v1")
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(list.len(), 9, "4 regional, 4 global, 1 batch");
    assert_eq!(fake.count(Op::GetProducts), 5, "pages of two");
    let parsed: Vec<Value> = list
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    let dimension = |usagetype: &str| {
        let item = parsed
            .iter()
            .find(|p| p["product"]["attributes"]["usagetype"] == usagetype);
        let terms = item.unwrap()["terms"]["OnDemand"].as_object().unwrap();
        let term = terms.values().next().unwrap()["priceDimensions"]
            .as_object()
            .unwrap();
        term.values().next().unwrap().clone()
    };
    let input = dimension("USE1-MP:USE1_InputTokenCount-Units");
    assert_eq!(input["pricePerUnit"]["USD"], "3.3000000000");
    let described = "AWS Marketplace software usage|us-east-1|Million Input Tokens Regional CRIS";
    assert_eq!(input["description"], described);
    let output = dimension("USE1-MP:USE1_OutputTokenCount_Global-Units");
    assert_eq!(output["pricePerUnit"]["USD"], "15.0000000000");
    let usagetypes = parsed
        .iter()
        .map(|p| p["product"]["attributes"]["usagetype"].to_string());
    assert_eq!(usagetypes.filter(|u| u.contains("_Batch")).count(), 1);
    let eu = json!(billing::claude_price_items(
        sonnet,
        "eu-west-1",
        [1.0; 4],
        [1.0; 4]
    ));
    assert!(
        eu.to_string()
            .contains("EU-MP:EU_CacheWriteInputTokenCount_Global-Units")
    );
}

#[tokio::test]
async fn quota_per_region() {
    let fake = BillingFake::start().await;
    fake.set_quota("us-west-2", 50.0);
    for (region, want) in [
        ("us-east-1", 1000.0),
        ("us-west-2", 50.0),
        ("us-east-1", 1000.0),
    ] {
        let client = client!(aws_sdk_servicequotas, fake.url(), region, sigv4::SECRET_KEY);
        let get = client.get_service_quota().service_code("bedrock");
        let out = get.quota_code(billing::PROFILE_QUOTA).send().await.unwrap();
        let q = out.quota().unwrap();
        assert_eq!(
            (q.value(), q.quota_name()),
            (Some(want), Some("Inference profiles per account"))
        );
        assert!(q.quota_arn().unwrap().contains(region));
    }
    let client = client!(
        aws_sdk_servicequotas,
        fake.url(),
        "us-east-1",
        sigv4::SECRET_KEY
    );
    let get = client
        .get_service_quota()
        .service_code("bedrock")
        .quota_code("L-00000000");
    let e = get.send().await.unwrap_err();
    assert!(
        e.as_service_error()
            .unwrap()
            .is_no_such_resource_exception(),
        "{e:?}"
    );
}

#[tokio::test]
async fn assumed_role_credentials_sign_bedrock_requests() {
    let fake = BillingFake::start().await;
    fake.set_lifetime(Duration::from_secs(30));
    let tag = |k: &str, v: &str| aws_sdk_sts::types::Tag::builder().key(k).value(v).build();
    let out = sts_client(&fake, sigv4::SECRET_KEY)
        .assume_role()
        .role_arn(ROLE)
        .role_session_name("alice@example.com")
        .duration_seconds(900)
        .tags(tag(TAG, "alice").unwrap())
        .tags(tag("project", "a b+c/d").unwrap())
        .send()
        .await
        .unwrap();
    let creds = out.credentials().unwrap();
    let user = out.assumed_role_user().unwrap().arn();
    assert_eq!(
        user,
        "arn:aws:sts::123456789012:assumed-role/bedrock-gate-user/alice@example.com"
    );
    let issued = fake.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].access_key, creds.access_key_id());
    assert_eq!(issued[0].session_token, creds.session_token());
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(
        issued[0].tags,
        [pair(TAG, "alice"), pair("project", "a b+c/d")]
    );
    let left = issued[0]
        .expiration
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        left <= Duration::from_secs(30) && left > Duration::from_secs(20),
        "{left:?}"
    );

    // Bedrock verifies a request signed with the issued credentials, and only with its token.
    let bedrock = FakeBedrock::start_with_keyring(fake.keyring()).await;
    let (key, secret) = (creds.access_key_id(), creds.secret_access_key());
    for token in [creds.session_token(), "not-the-token"] {
        let valid = token == creds.session_token();
        let token = Some(token.to_string());
        let client = client!(
            aws_sdk_bedrockruntime,
            bedrock.url(),
            "us-east-1",
            key,
            secret,
            token
        );
        let body = common::INVOKE_BODY.as_bytes().to_vec().into();
        let result = client
            .invoke_model()
            .model_id(common::SONNET)
            .body(body)
            .send()
            .await;
        assert_eq!(result.is_ok(), valid);
    }
    let got = bedrock.received();
    let v = got[0].signature.as_ref().unwrap();
    assert_eq!(v.access_key, creds.access_key_id());
    assert!(v.signed_headers.iter().any(|h| h == "x-amz-security-token"));
    assert!(
        got[1]
            .signature
            .as_ref()
            .unwrap_err()
            .contains("x-amz-security-token")
    );
    fake.assert_clean();
}

#[tokio::test]
async fn sts_validates_and_goes_down() {
    let fake = BillingFake::start().await;
    let sts = sts_client(&fake, sigv4::SECRET_KEY);
    let assume = |session: &str| sts.assume_role().role_arn(ROLE).role_session_name(session);
    let short = assume("a").send().await.unwrap_err();
    assert_eq!(short.code(), Some("ValidationError"));
    let mut many = assume("s1");
    for i in 0..51 {
        let tag = aws_sdk_sts::types::Tag::builder()
            .key(format!("k{i}"))
            .value("v");
        many = many.tags(tag.build().unwrap());
    }
    assert_eq!(
        many.send().await.unwrap_err().code(),
        Some("ValidationError")
    );
    fake.deny(Op::AssumeRole);
    assert_eq!(
        assume("s1").send().await.unwrap_err().code(),
        Some("AccessDenied")
    );
    fake.clear_faults();
    fake.set_sts_down(true);
    let down = assume("s1").send().await.unwrap_err();
    assert_eq!(down.code(), Some("ServiceUnavailable"));
    assert_eq!(fake.calls().last().unwrap().status, 503);
    fake.set_sts_down(false);
    assume("s1").send().await.unwrap();
    assert_eq!(fake.issued().len(), 1);
}

#[tokio::test]
async fn bad_signatures_and_denials_are_refused() {
    let fake = BillingFake::start().await;
    let e = ce_client(&fake, "wrong")
        .list_cost_allocation_tags()
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("InvalidSignatureException"));
    let e = sts_client(&fake, "wrong")
        .assume_role()
        .role_arn(ROLE)
        .role_session_name("s1")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("SignatureDoesNotMatch"));
    assert!(
        fake.calls()
            .iter()
            .all(|c| c.status == 403 && c.signature.is_err())
    );
    assert!(fake.issued().is_empty());

    // Signed correctly, but for another service.
    let (target, body) = (
        "ServiceQuotasV20190624.GetServiceQuota",
        r#"{"ServiceCode":"bedrock","QuotaCode":"L-40EC9882"}"#,
    );
    let (status, text) = signed_post(&fake, "pricing", target, body).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("InvalidSignatureException") && text.contains("servicequotas"));
    assert_eq!(
        signed_post(&fake, "servicequotas", target, body).await.0,
        200
    );

    fake.deny(Op::GetCostAndUsage);
    let client = ce_client(&fake, sigv4::SECRET_KEY);
    let e = daily_costs(&client, "2025-10-01", "2025-10-02")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("AccessDeniedException"));
    let message = e.message().unwrap();
    assert!(
        message.contains("not authorized to perform: ce:GetCostAndUsage"),
        "{message}"
    );
}

/// An awsJson1_1 POST to the fake, signed with the base key for signing name `service`.
async fn signed_post(fake: &BillingFake, service: &str, target: &str, body: &str) -> (u16, String) {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let creds = aws_credential_types::Credentials::new(
        sigv4::ACCESS_KEY,
        sigv4::SECRET_KEY,
        None,
        None,
        "t",
    );
    let identity = creds.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let url = format!("{}/", fake.url());
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target),
    ];
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.into_iter(),
        SignableBody::Bytes(body.as_bytes()),
    );
    let (instructions, _) = sign(signable.unwrap(), &params).unwrap().into_parts();
    let mut request = common::request(http::Method::POST, &url, &headers, body.to_string());
    instructions.apply_to_request_http1x(&mut request);
    let reply = common::send(request).await;
    (
        reply.status.as_u16(),
        String::from_utf8_lossy(&reply.body).into_owned(),
    )
}
