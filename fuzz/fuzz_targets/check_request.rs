//! The `CheckRequest` as subguard decodes it (`server::wire`): any bytes decode or are refused
//! without a panic, and whenever the generated envoy-types message also reads them, subguard sees
//! the headers, host and route tenant that message holds.
//!
//! Input: the bytes of an encoded `CheckRequest` (the seeds are real ones).

#![no_main]

use envoy_types::pb::envoy::service::auth::v3::CheckRequest as Generated;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use subguard::check::RequestView;
use subguard::server::wire::{CheckRequest, EnvoyRequest};

const NAMES: [&str; 7] = ["authorization", "x-tenant-id", ":authority", "host", "x-request-id", "traceparent", ""];

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = CheckRequest::decode(data) else {
        // What subguard cannot frame, the generated message cannot either.
        assert!(Generated::decode(data).is_err(), "the generated message reads what subguard refused");
        return;
    };
    let view = EnvoyRequest::new(&wire);
    let _ = (view.host(), view.route_tenant(), view.request_id());
    let Ok(generated) = Generated::decode(data) else { return };
    let attrs = generated.attributes.as_ref();
    let http = attrs.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
    let route = attrs.and_then(|a| a.context_extensions.get("tenant"));
    assert_eq!(view.route_tenant(), route.map(String::as_str), "route tenant");
    let Some(http) = http else {
        assert!(NAMES.iter().all(|n| view.header(n).is_none()), "headers without an HTTP request");
        return;
    };
    if !http.host.is_empty() {
        assert_eq!(view.host(), Some(http.host.as_str()), "host");
    }
    if http.headers.is_empty() && http.header_map.is_some() {
        // Raw headers: names lowercased and values joined, as the unit tests pin down.
        return;
    }
    for name in NAMES {
        assert_eq!(view.header(name), http.headers.get(name).map(String::as_str), "header {name:?}");
    }
});
