//! Property tests for everything that parses caller or admin input: request paths, model ids
//! and ARNs, API key headers, and config files. Bad input must get an error, never a panic.

use bedrock_gate::arn::{BedrockArn, ModelRef, strip_geo_prefix};
use bedrock_gate::auth::{KeyHash, extract_key};
use bedrock_gate::config::Config;
use bedrock_gate::front::bedrock::{Route, parse, status};
use bedrock_gate::refusal::Reason;
use bedrock_gate::resolve::encode_segment;
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::OPTIONS)
    ]
}

/// Path-ish strings: mostly the characters that matter (`/`, `%`, `:`, `.`), some anything.
fn pathish() -> impl Strategy<Value = String> {
    prop_oneof![
        "(/|model|inference-profiles|invoke|converse|-stream|count-tokens|%2F|%3A|%25|%|:|\\.|\\.\\.|arn|aws|bedrock|us\\.|[a-z0-9]|\u{e9}|%FF){0,24}",
        "\\PC{0,64}",
        "/model/[a-zA-Z0-9.:%/-]{0,80}/(invoke|converse|converse-stream|invoke-with-response-stream|count-tokens|x)",
    ]
}

fn model_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "(us\\.|eu\\.|apac\\.|global\\.)?anthropic\\.claude-[a-z0-9-]{1,30}(-v1:0)?",
        "arn:aws:bedrock:[a-z]{2}-[a-z]{4,9}-[1-9]:[0-9]{12}:application-inference-profile/[a-z0-9]{1,20}",
        "arn:aws:bedrock:[a-z]{2}-[a-z]{4,9}-[1-9]::foundation-model/anthropic\\.[a-z0-9.:-]{1,30}",
        "arn:aws:bedrock:[a-z]{2}-[a-z]{4,9}-[1-9]:[0-9]{12}:inference-profile/us\\.anthropic\\.[a-z0-9.:-]{1,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn path_parsing_never_panics_and_refusals_are_client_errors(m in method(), p in pathish()) {
        match parse(&m, &p) {
            Ok(_) => {}
            Err(e) => prop_assert!(status(e.reason).is_client_error(), "{:?} for {m} {p}", e.reason),
        }
    }

    #[test]
    fn a_parsed_runtime_model_is_a_valid_model_ref(p in pathish()) {
        if let Ok(Route::Runtime { model, .. }) = parse(&Method::POST, &p) {
            prop_assert!(ModelRef::parse(&model).is_ok());
            prop_assert!(!model.is_empty());
        }
    }

    #[test]
    fn any_valid_model_id_round_trips_through_every_client_encoding(id in model_id()) {
        prop_assume!(ModelRef::parse(&id).is_ok());
        let sdk_style = encode_segment(&id);
        let claude_style = id.replace('/', "%2F");
        for enc in [sdk_style, claude_style] {
            for op in ["invoke", "invoke-with-response-stream", "converse", "converse-stream", "count-tokens"] {
                let route = parse(&Method::POST, &format!("/model/{enc}/{op}")).unwrap();
                match route {
                    Route::Runtime { model, .. } => prop_assert_eq!(&model, &id),
                    other => prop_assert!(false, "{other:?}"),
                }
            }
        }
    }

    #[test]
    fn encoded_segments_never_contain_a_slash_or_colon(s in "\\PC{0,80}") {
        let e = encode_segment(&s);
        prop_assert!(!e.contains('/') && !e.contains(':'));
        prop_assert_eq!(percent_encoding::percent_decode_str(&e).decode_utf8().unwrap(), s.as_str());
    }

    #[test]
    fn arn_and_model_parsing_never_panic(s in "\\PC{0,120}") {
        let _ = BedrockArn::parse(&s);
        let _ = ModelRef::parse(&s);
        let stripped = strip_geo_prefix(&s);
        prop_assert!(s.ends_with(stripped));
    }

    #[test]
    fn key_extraction_never_panics(auth in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
                                   xkey in proptest::option::of("\\PC{0,600}")) {
        let mut h = HeaderMap::new();
        if let Some(a) = auth.and_then(|b| HeaderValue::from_bytes(&b).ok()) {
            h.insert("authorization", a);
        }
        if let Some(k) = xkey.and_then(|k| HeaderValue::from_str(&k).ok()) {
            h.insert("x-api-key", k);
        }
        match extract_key(&h, "Send the key.") {
            Ok(k) => prop_assert!(!k.expose().is_empty() && k.expose().len() <= 512),
            Err(e) => prop_assert_eq!(e.reason, Reason::Unauthenticated),
        }
    }

    #[test]
    fn config_hash_parsing_never_panics(s in "\\PC{0,100}") {
        let _ = KeyHash::from_config(&s);
    }

    #[test]
    fn config_parsing_never_panics_on_arbitrary_text(s in "\\PC{0,400}") {
        let _ = Config::parse(&s);
    }

    #[test]
    fn config_parsing_never_panics_on_mutated_example(pos in 0usize..4000, del in 0usize..20, ins in "\\PC{0,20}") {
        let example = include_str!("../../config/bedrock-gate.example.toml");
        let mut chars: Vec<char> = example.chars().collect();
        let pos = pos.min(chars.len());
        let end = (pos + del).min(chars.len());
        chars.splice(pos..end, ins.chars());
        let text: String = chars.into_iter().collect();
        if let Err(e) = Config::parse(&text) {
            prop_assert!(!e.path.is_empty() && !e.message.is_empty());
        }
    }
}
