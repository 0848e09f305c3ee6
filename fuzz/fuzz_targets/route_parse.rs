//! Fuzzes request routing: `front::bedrock::parse` on any method and path, then `ModelRef::parse` on the
//! model or profile id it extracted (and on the raw path). Nothing may panic, and:
//! - a refusal is a 4xx and renders as a response;
//! - an accepted id is a valid, non-empty `ModelRef`, and re-encoding it with `encode_segment`
//!   routes to the same operation and id;
//! - a parsed ARN prints back to the exact text it was parsed from.
//!
//! Input layout: byte 0 picks the method (7 = a custom method whose length is byte 1, then its
//! bytes); the rest is the path (lossy UTF-8, as the path reaches the router as `&str`).

#![no_main]

use bedrock_gate::arn::{BedrockArn, ModelRef, ResourceKind, strip_geo_prefix};
use bedrock_gate::front::bedrock::{Route, error_response, parse, status};
use bedrock_gate::resolve::encode_segment;
use http::Method;
use libfuzzer_sys::fuzz_target;

/// The router's own limit on the raw path.
const MAX_PATH_LEN: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (method, rest) = match selector % 8 {
        0 => (Method::GET, rest),
        1 => (Method::POST, rest),
        2 => (Method::PUT, rest),
        3 => (Method::DELETE, rest),
        4 => (Method::HEAD, rest),
        5 => (Method::OPTIONS, rest),
        6 => (Method::PATCH, rest),
        _ => {
            let Some((&len, rest)) = rest.split_first() else {
                return;
            };
            let (name, rest) = rest.split_at(usize::from(len).min(rest.len()));
            let Ok(method) = Method::from_bytes(name) else {
                return;
            };
            (method, rest)
        }
    };
    let path = String::from_utf8_lossy(rest);

    // The raw path as an id, too: the router only ever hands over decoded ids, the admin
    // commands take ids from config and the command line.
    check_model_ref(&path);

    match parse(&method, &path) {
        Ok(route) => {
            let _ = route.op().name();
            match route {
                Route::Runtime { op, model } => {
                    assert_eq!(method, Method::POST);
                    assert!(!model.is_empty());
                    assert!(
                        check_model_ref(&model),
                        "accepted model {model:?} does not parse"
                    );
                    let again = format!("/model/{}/{}", encode_segment(&model), op.suffix());
                    if again.len() <= MAX_PATH_LEN {
                        assert_eq!(
                            parse(&Method::POST, &again).ok(),
                            Some(Route::Runtime { op, model }),
                            "re-encoded path {again:?}"
                        );
                    }
                }
                Route::GetProfile { id } => {
                    assert_eq!(method, Method::GET);
                    assert!(!id.is_empty());
                    assert!(
                        check_model_ref(&id),
                        "accepted profile id {id:?} does not parse"
                    );
                    let again = format!("/inference-profiles/{}", encode_segment(&id));
                    if again.len() <= MAX_PATH_LEN {
                        assert_eq!(
                            parse(&Method::GET, &again).ok(),
                            Some(Route::GetProfile { id }),
                            "re-encoded path {again:?}"
                        );
                    }
                }
                Route::Health | Route::Usage | Route::ListProfiles => {
                    assert_eq!(method, Method::GET);
                }
            }
        }
        Err(e) => {
            assert!(
                status(e.reason).is_client_error(),
                "{:?} for {method} {path:?}",
                e.reason
            );
            let _ = error_response(&e, "fuzz");
        }
    }
});

/// Parses `s` as a model reference and checks what a success promises; true if it parsed.
fn check_model_ref(s: &str) -> bool {
    let _ = strip_geo_prefix(s);
    let arn = BedrockArn::parse(s);
    match ModelRef::parse(s) {
        Ok(ModelRef::Arn(parsed)) => {
            assert_eq!(arn.as_ref().ok(), Some(&parsed));
            assert_eq!(
                print_arn(&parsed),
                s,
                "an ARN must print back as it was written"
            );
            let base = strip_geo_prefix(&parsed.resource_id);
            assert!(parsed.resource_id.ends_with(base));
            true
        }
        Ok(ModelRef::Id(id)) => {
            assert_eq!(id, s);
            let base = strip_geo_prefix(&id);
            assert!(!base.is_empty() && id.ends_with(base));
            true
        }
        Err(_) => false,
    }
}

fn print_arn(arn: &BedrockArn) -> String {
    let kind = match arn.kind {
        ResourceKind::FoundationModel => "foundation-model",
        ResourceKind::InferenceProfile => "inference-profile",
        ResourceKind::ApplicationInferenceProfile => "application-inference-profile",
    };
    format!(
        "arn:{}:bedrock:{}:{}:{kind}/{}",
        arn.partition, arn.region, arn.account, arn.resource_id
    )
}
