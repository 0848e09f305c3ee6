//! Plain AWS access keys the proxy issues (`keys add NAME --sigv4`): real clients sign with
//! them (boto3, aws-sdk-bedrockruntime, Claude Code in Bedrock mode), the proxy checks each
//! signature against the body it read, strips it and signs its own; a wrong secret, a stale
//! date, an altered body, a session token or another user's profile is refused like AWS
//! refuses, nothing forwarded, one ledger row for a key id that named a user.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_bedrockruntime::error::ProvideErrorMetadata;
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ConversationRole, CountTokensInput, InvokeModelTokensRequest, Message,
    ResponseStream,
};
use base64::Engine as _;
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use http::Method;
use sha2::Sha256;

/// The master key the proxy is started with (`BEDROCK_GATE_SIGV4_MASTER_KEY`): base64 of 32
/// bytes.
pub(crate) fn master_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(b"bedrock-gate-test-master-key-32b")
}

pub(crate) const ALICE_ID: &str = "BGAKALICEALICEALICE2";
const BOB_ID: &str = "BGAKBOBBOBBOBBOBBOB2";

/// The documented derivation, computed independently of the proxy: HMAC-SHA256 of the access
/// key id under the master key, base64url without padding.
pub(crate) fn secret_of(id: &str) -> String {
    let master = base64::engine::general_purpose::STANDARD
        .decode(master_key())
        .unwrap();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&master).unwrap();
    mac.update(id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// The two-user config, with an issued key pair each.
fn config(fake: &FakeBedrock) -> String {
    two_user_config(fake, "")
        .replace(
            "[users.alice]\n",
            &format!("[users.alice]\naccess_key_ids = [\"{ALICE_ID}\"]\n"),
        )
        .replace(
            "[users.bob]\n",
            &format!("[users.bob]\naccess_key_ids = [\"{BOB_ID}\"]\n"),
        )
}

async fn start(fake: &FakeBedrock) -> Proxy {
    Proxy::start_with_env(
        &config(fake),
        &[],
        &[("BEDROCK_GATE_SIGV4_MASTER_KEY", &master_key())],
    )
    .await
}

fn sdk_client(proxy: &Proxy, id: &str, secret: &str) -> Client {
    let config = aws_sdk_bedrockruntime::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(proxy.url())
        .credentials_provider(Credentials::new(id, secret, None, None, "test"))
        .build();
    Client::from_conf(config)
}

fn hello() -> Message {
    Message::builder()
        .role(ConversationRole::User)
        .content(ContentBlock::Text("hi".into()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_rust_sdk_signs_all_five_runtime_operations_with_an_issued_pair() {
    let fake = FakeBedrock::start().await;
    let proxy = start(&fake).await;
    let client = sdk_client(&proxy, ALICE_ID, &secret_of(ALICE_ID));

    let out = client
        .converse()
        .model_id(SONNET)
        .messages(hello())
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.output().unwrap().as_message().unwrap().content()[0]
            .as_text()
            .unwrap(),
        fake::TEXT
    );

    let mut stream = client
        .converse_stream()
        .model_id(HAIKU)
        .messages(hello())
        .send()
        .await
        .unwrap()
        .stream;
    let mut events = 0;
    while let Some(event) = stream.recv().await.unwrap() {
        events += 1;
        assert!(!event.is_unknown(), "{event:?}");
    }
    assert_eq!(events, 9);

    let out = client
        .invoke_model()
        .model_id(alice_sonnet())
        .content_type("application/json")
        .body(Blob::new(INVOKE_BODY))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(out.body().as_ref()).unwrap();
    assert_eq!(body["content"][0]["text"], fake::TEXT);

    let mut stream = client
        .invoke_model_with_response_stream()
        .model_id(format!("us.{SONNET}"))
        .content_type("application/json")
        .body(Blob::new(INVOKE_BODY))
        .send()
        .await
        .unwrap()
        .body;
    let mut chunks = 0;
    while let Some(event) = stream.recv().await.unwrap() {
        if let ResponseStream::Chunk(_) = event {
            chunks += 1;
        }
    }
    assert_eq!(chunks, fake::anthropic_events(&alice_sonnet()).len());

    let out = client
        .count_tokens()
        .model_id(SONNET)
        .input(CountTokensInput::InvokeModel(
            InvokeModelTokensRequest::builder()
                .body(Blob::new(INVOKE_BODY))
                .build()
                .unwrap(),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(out.input_tokens(), 42);

    let got = fake.received();
    assert_eq!(got.len(), 5);
    for r in &got {
        // Signed again by the proxy, with its own key: the caller's never reaches Bedrock.
        let v = r.signature.as_ref().expect("proxy's signature verifies");
        assert_eq!(v.access_key, common::sigv4::ACCESS_KEY);
        let auth = r.headers["authorization"].to_str().unwrap();
        assert!(!auth.contains(ALICE_ID), "{auth}");
    }
    let rows = ledger_with(&proxy, 5).await;
    assert!(
        rows.iter()
            .all(|r| r.user.as_deref() == Some("alice") && r.outcome == "complete"),
        "{rows:#?}"
    );
}

#[tokio::test]
async fn boto3_signs_every_operation_with_an_issued_pair() {
    let python = installed_client(
        "BEDROCK_GATE_PYTHON",
        "venv/bin/python",
        "A Python with boto3",
    );
    let fake = FakeBedrock::start().await;
    let proxy = start(&fake).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/boto3_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python)
            .arg(&script)
            .arg(proxy.url())
            .arg(SONNET)
            .arg(bob_sonnet())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", proxy.dir.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", BOB_ID)
            .env("AWS_SECRET_ACCESS_KEY", secret_of(BOB_ID))
            .output(),
    )
    .await
    .expect("boto3 finished in 60 s")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.logs()
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(got["converse"], fake::TEXT);
    assert_eq!(got["converse_stream"], fake::TEXT);
    assert_eq!(got["converse_stream_events"], 9);
    assert_eq!(got["invoke_model"], fake::TEXT);
    assert_eq!(
        got["invoke_stream_types"].as_array().unwrap().len(),
        fake::anthropic_events(&bob_sonnet()).len()
    );
    assert_eq!(got["count_tokens"], 42);
    assert_eq!(got["get_inference_profile"], bob_sonnet());
    assert!(got["list_inference_profiles"].as_u64().unwrap() >= 1);

    let received = fake.received();
    assert!(received.iter().all(|r| r.signature.is_ok()));
    let runtime: Vec<_> = received
        .iter()
        .filter(|r| r.raw_path.starts_with("/model/") && r.op != "count-tokens")
        .collect();
    assert_eq!(runtime.len(), 4);
    assert!(
        runtime.iter().all(|r| r.model == bob_sonnet()),
        "{runtime:#?}"
    );
    let rows = ledger_with(&proxy, 7).await;
    assert!(
        rows.iter().all(|r| r.user.as_deref() == Some("bob")),
        "{rows:#?}"
    );
}

/// A request to sign the way an SDK does, with any secret, time and body, so the refusals can
/// be provoked one at a time.
#[derive(Clone)]
struct Signing<'a> {
    path: String,
    id: &'a str,
    secret: String,
    time: SystemTime,
    signed_body: String,
    sent_body: String,
    extra: Vec<(&'a str, &'a str)>,
}

impl<'a> Signing<'a> {
    /// Alice's good Converse call.
    fn alice(path: &str, body: &str) -> Signing<'a> {
        Signing {
            path: path.to_string(),
            id: ALICE_ID,
            secret: secret_of(ALICE_ID),
            time: SystemTime::now(),
            signed_body: body.to_string(),
            sent_body: body.to_string(),
            extra: Vec::new(),
        }
    }

    fn request(&self, proxy: &Proxy) -> http::Request<http_body_util::Full<bytes::Bytes>> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        use aws_sigv4::sign::v4;
        let url = format!("{}{}", proxy.url(), self.path);
        let host = proxy.addr.clone();
        let identity =
            aws_credential_types::Credentials::new(self.id, &self.secret, None, None, "t").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("bedrock")
            .time(self.time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let mut headers = vec![
            ("content-type", "application/json"),
            ("host", host.as_str()),
        ];
        headers.extend_from_slice(&self.extra);
        let signable = SignableRequest::new(
            "POST",
            &url,
            headers.iter().copied(),
            SignableBody::Bytes(self.signed_body.as_bytes()),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut req = request(Method::POST, &url, &headers, self.sent_body.clone());
        instructions.apply_to_request_http1x(&mut req);
        req
    }
}

#[tokio::test]
async fn bad_signatures_are_refused_like_aws_and_never_forwarded() {
    let fake = FakeBedrock::start().await;
    let proxy = start(&fake).await;
    let good = Signing::alice(&format!("/model/{SONNET}/converse"), CONVERSE_BODY);
    let alice = secret_of(ALICE_ID);

    // The signature checks out: forwarded.
    let ok = send(good.request(&proxy)).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(fake.received().len(), 1);

    let cases = vec![
        (
            "a wrong secret",
            Signing {
                secret: secret_of(BOB_ID),
                ..good.clone()
            },
            "InvalidSignatureException",
            "does not match",
        ),
        (
            "a date 20 minutes old",
            Signing {
                time: SystemTime::now() - Duration::from_secs(1200),
                ..good.clone()
            },
            "InvalidSignatureException",
            "Signature expired",
        ),
        (
            "a body changed after signing",
            Signing {
                sent_body: CONVERSE_BODY.replace("hi", "ho"),
                ..good.clone()
            },
            "InvalidSignatureException",
            "does not match",
        ),
        (
            "a session token",
            Signing {
                extra: vec![("x-amz-security-token", "FwoGZXIvYXdzE")],
                ..good.clone()
            },
            "UnrecognizedClientException",
            "session token",
        ),
        (
            "an access key id nobody has",
            Signing {
                id: "BGAKNOBODYNOBODYNOB2",
                ..good.clone()
            },
            "UnrecognizedClientException",
            "no such access key id",
        ),
        (
            "another user's profile",
            Signing {
                path: format!(
                    "/model/{}/converse",
                    bob_sonnet().replace(':', "%3A").replace('/', "%2F")
                ),
                ..good.clone()
            },
            "AccessDeniedException",
            "",
        ),
    ];
    for (what, signing, error_type, says) in cases {
        let r = send(signing.request(&proxy)).await;
        assert_eq!(r.status, 403, "{what}: {:?}", r.body);
        assert_eq!(r.error_type(), error_type, "{what}: {:?}", r.body);
        assert!(r.message().contains(says), "{what}: {}", r.message());
        assert!(!r.message().contains(&alice), "{what} echoed the secret");
    }
    assert_eq!(fake.received().len(), 1, "no refused call reached Bedrock");

    // One row per request whose key id named a user: the good call and five refusals for
    // alice, none under her name for the unknown key id.
    let rows = ledger_with(&proxy, 6).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows_after = ledger(&proxy);
    assert_eq!(rows_after.len(), rows.len(), "{rows_after:#?}");
    let alices = rows
        .iter()
        .filter(|r| r.user.as_deref() == Some("alice"))
        .count();
    assert_eq!(alices, 6, "{rows:#?}");
    assert!(rows.iter().all(|r| r.user.as_deref() != Some("bob")));
}

#[tokio::test]
async fn a_signature_is_only_for_the_bedrock_routes() {
    let fake = FakeBedrock::start().await;
    let proxy = start(&fake).await;
    let body = messages_body(SONNET, false);
    let r = send(Signing::alice("/v1/messages", &body).request(&proxy)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert!(String::from_utf8_lossy(&r.body).contains("Bedrock routes only"));
    assert!(fake.received().is_empty());
}

/// `keys add alice --sigv4` on the proxy's config: the access key id, the secret and what it
/// said on stderr.
async fn add_pair(proxy: &Proxy) -> (String, String, String) {
    let config = proxy.config_path.to_str().unwrap();
    let r = run(
        proxy.dir.path(),
        &["keys", "add", "alice", "--sigv4", "-c", config],
    )
    .await;
    assert!(r.ok, "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    let value = |line: &str, name: &str| line.strip_prefix(name).unwrap().to_string();
    (
        value(lines[0], "AWS_ACCESS_KEY_ID="),
        value(lines[1], "AWS_SECRET_ACCESS_KEY="),
        r.stderr,
    )
}

#[tokio::test]
async fn keys_add_sigv4_issues_a_pair_a_running_proxy_accepts_and_revoke_ends_it() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let (id, secret, stderr) = add_pair(&proxy).await;
    assert!(stderr.contains("Created the SigV4 master key"), "{stderr}");
    assert!(id.starts_with("BGAK") && id.len() == 20, "{id}");

    // The config lists the id and names the master key file; the secret is nowhere on disk.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("sigv4_master_key_file"), "{text}");
    let key_file = proxy.dir.path().join("sigv4-master.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for entry in std::fs::read_dir(proxy.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret),
                "{} holds the secret",
                path.display()
            );
        }
    }

    // The running proxy picks it up and accepts the pair.
    let client = sdk_client(&proxy, &id, &secret);
    works_soon(&client).await;

    // A second pair reuses the master key; revoking the first leaves the second.
    let (id2, secret2, stderr) = add_pair(&proxy).await;
    assert!(!stderr.contains("Created"), "{stderr}");
    let revoke = run(
        proxy.dir.path(),
        &[
            "keys",
            "revoke",
            "alice",
            "--access-key-id",
            &id,
            "-c",
            proxy.config_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(revoke.ok, "{revoke}");
    let err = eventually("the revoked pair is refused", || async {
        client
            .converse()
            .model_id(SONNET)
            .messages(hello())
            .send()
            .await
            .err()
    })
    .await
    .into_service_error();
    assert_eq!(err.code(), Some("UnrecognizedClientException"), "{err:?}");
    sdk_client(&proxy, &id2, &secret2)
        .converse()
        .model_id(SONNET)
        .messages(hello())
        .send()
        .await
        .unwrap();
    let logs = proxy.settled_logs().await;
    assert!(!logs.contains(&secret) && !logs.contains(&secret2));
}

#[tokio::test]
async fn a_config_with_access_key_ids_needs_the_master_key() {
    let fake = FakeBedrock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&fake)).unwrap();
    let r = run(dir.path(), &["check", "-c", path.to_str().unwrap()]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("auth.sigv4_master_key_file"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("BEDROCK_GATE_SIGV4_MASTER_KEY"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn keys_add_uses_the_master_key_serve_uses_even_with_the_variable_set() {
    // Found in review: with the config naming its key file, `keys add --sigv4` in a shell that
    // also exports BEDROCK_GATE_SIGV4_MASTER_KEY used the variable while serve used the file,
    // and every signature failed.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let (_, _, _) = add_pair(&proxy).await; // creates and names the file
    let config = proxy.config_path.to_str().unwrap();
    let mut cmd = command(proxy.dir.path());
    cmd.env("BEDROCK_GATE_SIGV4_MASTER_KEY", master_key())
        .args(["keys", "add", "alice", "--sigv4", "-c", config]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let id = lines
        .next()
        .unwrap()
        .strip_prefix("AWS_ACCESS_KEY_ID=")
        .unwrap();
    let secret = lines
        .next()
        .unwrap()
        .strip_prefix("AWS_SECRET_ACCESS_KEY=")
        .unwrap();
    works_soon(&sdk_client(&proxy, id, secret)).await;
}

/// Waits until the pair the client signs with is accepted (a running proxy reloads its config
/// when `keys add` changes it).
async fn works_soon(client: &Client) {
    eventually("the key pair works against the running proxy", || async {
        client
            .converse()
            .model_id(SONNET)
            .messages(hello())
            .send()
            .await
            .ok()
    })
    .await;
}
