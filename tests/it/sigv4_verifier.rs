//! The fake Bedrock's SigV4 verifier must itself be right, or every signing test proves
//! nothing. Checked against the worked example in the AWS SigV4 documentation.

use crate::common;

use common::sigv4::verify_with;
use http::{HeaderMap, HeaderValue};

fn aws_doc_example(signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("iam.amazonaws.com"));
    h.insert(
        "content-type",
        HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
    );
    h.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={signature}"
        ))
        .unwrap(),
    );
    h
}

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const GOOD: &str = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";

#[test]
fn accepts_the_aws_documented_signature() {
    let v = verify_with(
        SECRET,
        "GET",
        "/",
        Some("Action=ListUsers&Version=2010-05-08"),
        &aws_doc_example(GOOD),
        b"",
    )
    .expect("documented example verifies");
    assert_eq!(v.region, "us-east-1");
    assert_eq!(v.service, "iam");
}

#[test]
fn rejects_any_change_to_what_was_signed() {
    let h = aws_doc_example(GOOD);
    let q = Some("Action=ListUsers&Version=2010-05-08");
    assert!(verify_with("wrong-secret", "GET", "/", q, &h, b"").is_err());
    assert!(verify_with(SECRET, "POST", "/", q, &h, b"").is_err());
    assert!(verify_with(SECRET, "GET", "/x", q, &h, b"").is_err());
    assert!(
        verify_with(
            SECRET,
            "GET",
            "/",
            Some("Action=ListUsers&Version=2010-05-09"),
            &h,
            b""
        )
        .is_err()
    );
    assert!(verify_with(SECRET, "GET", "/", q, &h, b"body").is_err());
    let mut other_host = h.clone();
    other_host.insert("host", HeaderValue::from_static("evil.example"));
    assert!(verify_with(SECRET, "GET", "/", q, &other_host, b"").is_err());
    let bad_sig = aws_doc_example(&GOOD.replace('5', "6"));
    assert!(verify_with(SECRET, "GET", "/", q, &bad_sig, b"").is_err());
}
