//! The HTTPS listener (`tls_cert`, `tls_key`): HTTP/1.1 and HTTP/2 by ALPN, streaming over
//! both, certificate rotation on reload, and `check` refusing a bad pair.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use common::*;
use http::{Method, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A self-signed certificate for 127.0.0.1 and its key, as PEM.
fn certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn write_pair(dir: &Path, (cert, key): &(String, String)) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

fn tls_config(fake: &FakeBedrock, dir: &Path) -> String {
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        two_user_config(fake, "")
    )
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client that trusts only `cert_pem`, speaking HTTP/2 when `h2`, else HTTP/1.1.
fn client_trusting(cert_pem: &str, h2: bool) -> HttpsClient {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut client = Client::builder(TokioExecutor::new());
    if h2 {
        client.http2_only(true);
    }
    client.build(connector)
}

async fn call(
    client: &HttpsClient,
    proxy: &Proxy,
    op: &str,
) -> Result<(Version, http::StatusCode, Bytes), String> {
    let body = if op == "converse" {
        CONVERSE_BODY
    } else {
        INVOKE_BODY
    };
    let req = request(
        Method::POST,
        &format!("{}/model/{SONNET}/{op}", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        body,
    );
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (version, status) = (resp.version(), resp.status());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((version, status, body))
}

#[tokio::test]
async fn https_serves_http1_and_http2_and_streams_over_both() {
    let fake = FakeBedrock::start().await;
    let certs = tempfile::tempdir().unwrap();
    let pair = certificate();
    write_pair(certs.path(), &pair);
    let proxy = Proxy::start(&tls_config(&fake, certs.path())).await;
    assert!(proxy.url().starts_with("https://"), "{}", proxy.url());

    for (h2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let client = client_trusting(&pair.0, h2);
        let (v, status, body) = call(&client, &proxy, "converse").await.unwrap();
        assert_eq!((v, status.as_u16()), (version, 200));
        assert!(String::from_utf8_lossy(&body).contains(fake::TEXT));

        let (v, status, body) = call(&client, &proxy, "invoke-with-response-stream")
            .await
            .unwrap();
        assert_eq!((v, status.as_u16()), (version, 200));
        let mut buf = BytesMut::from(&body[..]);
        let mut decoder = aws_smithy_eventstream::frame::MessageFrameDecoder::new();
        let events = fake::decode_messages(&mut decoder, &mut buf);
        assert_eq!(events.len(), fake::anthropic_events(SONNET).len());
        assert!(buf.is_empty());
    }

    // Plain HTTP to the TLS port gets no answer.
    let plain = format!("http://{}/model/{SONNET}/converse", proxy.addr);
    assert!(
        client()
            .request(request(Method::POST, &plain, &[], CONVERSE_BODY))
            .await
            .is_err()
    );
    assert_eq!(fake.received().len(), 4);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_after_sighup() {
    let fake = FakeBedrock::start().await;
    let certs = tempfile::tempdir().unwrap();
    let (old, new) = (certificate(), certificate());
    write_pair(certs.path(), &old);
    let proxy = Proxy::start(&tls_config(&fake, certs.path())).await;
    let trusts_new = client_trusting(&new.0, false);
    assert!(call(&trusts_new, &proxy, "converse").await.is_err());

    write_pair(certs.path(), &new);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually("the new certificate is served", || async {
        // A fresh client each time: no pooled connection from before the rotation.
        let fresh = client_trusting(&new.0, false);
        call(&fresh, &proxy, "converse").await.ok()
    })
    .await;
    // Clients pinned to the old certificate now fail; those already connected finished.
    assert!(
        call(&client_trusting(&old.0, false), &proxy, "converse")
            .await
            .is_err()
    );
}

#[test]
fn check_refuses_a_key_that_does_not_fit_and_a_missing_half() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate();
    let (_, other_key) = certificate();
    write_pair(dir.path(), &(cert, other_key));
    let check = |text: &str| {
        let path = dir.path().join("bedrock-gate.toml");
        std::fs::write(&path, text).unwrap();
        let out = command(dir.path())
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Relative paths are relative to the config file's directory.
    let (ok, err) = check("tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n");
    assert!(!ok);
    assert!(
        err.contains("tls_key") && err.contains("does not fit"),
        "{err}"
    );
    let (ok, err) = check("tls_cert = \"cert.pem\"\n");
    assert!(!ok);
    assert!(err.contains("set both tls_cert and tls_key"), "{err}");
    let (ok, err) = check("tls_cert = \"missing.pem\"\ntls_key = \"key.pem\"\n");
    assert!(!ok);
    assert!(
        err.contains("tls_cert") && err.contains("missing.pem"),
        "{err}"
    );
}
