//! The part of Envoy's `envoy.service.auth.v3.CheckRequest` subguard reads, decoded without
//! copying, and [`EnvoyRequest`], the pipeline's [`RequestView`] of it.
//!
//! The generated `CheckRequest` (envoy-types) decodes everything Envoy sends: both peers'
//! addresses, the time, method, path, every header as an owned `String` in a SipHash map, and
//! rejects the whole check when any of those strings is not UTF-8. A check needs four things: the
//! headers (`headers`, or `header_map` with `encode_raw_headers: true`), `host`, and
//! `context_extensions.tenant`. The messages below declare only those, with the field numbers of
//! `external_auth.proto` and `attribute_context.proto`, so prost skips everything else on the
//! wire. Strings are declared as `bytes` backed by [`Bytes`]: each value is a slice of the gRPC
//! message buffer, not a copy. A protobuf `map<string, string>` is on the wire a repeated
//! message of `key = 1, value = 2`, which is what [`Entry`] reads.
//!
//! Text that is not UTF-8 (Envoy passes header bytes through as they came) is read with every
//! invalid sequence replaced by U+FFFD, as raw header values always were: such a header cannot
//! match a tenant or carry a well-formed token, so the check gets its precise reason
//! (`malformed_token`, `missing_tenant`...) instead of failing to decode as a whole.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map;

use prost::bytes::Bytes;

use crate::check::RequestView;

/// `envoy.service.auth.v3.CheckRequest`: `attributes = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `AttributeContext`: `request = 4`, `context_extensions = 10` (a `map<string, string>`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
}

/// `AttributeContext.Request`: `http = 2`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`: `headers = 3` (a `map<string, string>`), `host = 5`,
/// `header_map = 13`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// One entry of a `map<string, string>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `envoy.config.core.v3.HeaderMap`: `headers = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`: `key = 1`, `value = 2`, `raw_value = 3`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// A request id longer than this is cut in the body and logs (it is client-controlled at the edge).
const MAX_REQUEST_ID: usize = 128;

/// `bytes` as text: borrowed when UTF-8, else with U+FFFD for every invalid sequence.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    // `from_utf8` first: the lossy reader walks the bytes chunk by chunk, a few times slower on the
    // text that is nearly always valid.
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// A `CheckRequest` seen through [`RequestView`].
///
/// Envoy sends headers in `headers` (a map, repeated headers joined by commas) or, with
/// `encode_raw_headers: true`, in `header_map` as raw bytes; both are read here, the raw form
/// joined the same way so the pipeline sees one value per name either way. Header values borrow
/// the request's buffer.
pub struct EnvoyRequest<'a> {
    headers: Headers<'a>,
    host: Option<Cow<'a, str>>,
    route_tenant: Option<Cow<'a, str>>,
}

enum Headers<'a> {
    /// The `headers` map in wire order; a name sent twice counts once, its last entry winning,
    /// as in a decoded map. A name that is not UTF-8 is no name subguard reads, and is left out.
    Map(Vec<(&'a str, Cow<'a, str>)>),
    /// `header_map` (`encode_raw_headers: true`): names lowercased, `raw_value` preferred over
    /// `value`, a name that appears more than once joined with commas as Envoy joins the map.
    Raw(HashMap<String, Cow<'a, str>>),
}

impl<'a> EnvoyRequest<'a> {
    pub fn new(req: &'a CheckRequest) -> Self {
        let attrs = req.attributes.as_ref();
        let http = attrs.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let headers = match http {
            Some(h) if h.headers.is_empty() && h.header_map.is_some() => {
                Headers::Raw(h.header_map.as_ref().map(raw_headers).unwrap_or_default())
            }
            Some(h) => Headers::Map(
                h.headers
                    .iter()
                    .filter_map(|e| Some((std::str::from_utf8(&e.key).ok()?, text(&e.value))))
                    .collect(),
            ),
            None => Headers::Map(Vec::new()),
        };
        let host = http.map(|h| &h.host).filter(|h| !h.is_empty()).map(|h| text(h));
        let route_tenant = attrs
            .and_then(|a| a.context_extensions.iter().rev().find(|e| e.key == "tenant"))
            .map(|e| text(&e.value));
        EnvoyRequest { headers, host, route_tenant }
    }

    pub fn request_id(&self) -> Option<&str> {
        // An empty header names no request: the body says `null`, as for none.
        self.header("x-request-id").filter(|id| !id.is_empty()).map(|id| truncate(id, MAX_REQUEST_ID))
    }
}

fn raw_headers(map: &HeaderMap) -> HashMap<String, Cow<'_, str>> {
    let mut out: HashMap<String, Cow<'_, str>> = HashMap::with_capacity(map.headers.len());
    for hv in &map.headers {
        let value = text(if hv.raw_value.is_empty() { &hv.value } else { &hv.raw_value });
        match out.entry(text(&hv.key).to_ascii_lowercase()) {
            // Appended in place: a name sent many times costs the bytes it brings, not a copy
            // of all joined so far for each entry.
            hash_map::Entry::Occupied(mut joined) => {
                let joined = joined.get_mut().to_mut();
                joined.push(',');
                joined.push_str(&value);
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
    out
}

impl RequestView for EnvoyRequest<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        match &self.headers {
            Headers::Map(entries) => entries.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| v.as_ref()),
            Headers::Raw(map) => map.get(name).map(|v| v.as_ref()),
        }
    }

    fn host(&self) -> Option<&str> {
        self.host.as_deref().or_else(|| self.header(":authority")).or_else(|| self.header("host"))
    }

    fn route_tenant(&self) -> Option<&str> {
        self.route_tenant.as_deref()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3 as auth;
    use prost::Message;

    use super::{CheckRequest, Entry, EnvoyRequest};
    use crate::check::RequestView;

    /// What the generated `CheckRequest` gave the pipeline before this module: the reference.
    struct Typed<'a>(&'a auth::CheckRequest);

    impl Typed<'_> {
        fn http(&self) -> Option<&auth::attribute_context::HttpRequest> {
            self.0.attributes.as_ref()?.request.as_ref()?.http.as_ref()
        }
        fn header(&self, name: &str) -> Option<String> {
            let http = self.http()?;
            match &http.header_map {
                Some(m) if http.headers.is_empty() => {
                    let mut joined: Option<String> = None;
                    for hv in m.headers.iter().filter(|hv| hv.key.to_ascii_lowercase() == name) {
                        let v = if hv.raw_value.is_empty() {
                            hv.value.clone()
                        } else {
                            String::from_utf8_lossy(&hv.raw_value).into_owned()
                        };
                        joined = Some(match joined {
                            Some(j) => format!("{j},{v}"),
                            None => v,
                        });
                    }
                    joined
                }
                _ => http.headers.get(name).cloned(),
            }
        }
        fn host(&self) -> Option<String> {
            self.http()
                .map(|h| h.host.clone())
                .filter(|h| !h.is_empty())
                .or_else(|| self.header(":authority"))
                .or_else(|| self.header("host"))
        }
        fn route_tenant(&self) -> Option<String> {
            self.0.attributes.as_ref()?.context_extensions.get("tenant").cloned()
        }
    }

    const NAMES: [&str; 8] = [
        "authorization",
        "x-tenant-id",
        ":authority",
        "host",
        "x-request-id",
        "traceparent",
        "Authorization",
        "x-other",
    ];
    const VALUES: [&str; 6] = ["", "acme", "Bearer a.b.c", "Acme.API.example.com:8443", "jörg", "a,b"];

    fn pick<'a>(seed: &mut u64, from: &[&'a str]) -> &'a str {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        from[(*seed % from.len() as u64) as usize]
    }

    /// A request as Envoy fills it, with every field subguard skips set too.
    fn generated(seed: &mut u64) -> auth::CheckRequest {
        let raw = pick(seed, &["map", "raw"]) == "raw";
        let n = pick(seed, &["0", "1", "3", "6"]).parse::<usize>().unwrap_or(0);
        let mut http = auth::attribute_context::HttpRequest {
            id: "4711".into(),
            method: "GET".into(),
            path: "/orders?x=1".into(),
            host: pick(seed, &["", "acme.api.example.com", "jörg.example"]).into(),
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            size: 42,
            body: "ignored".into(),
            raw_body: vec![0xff, 0x00],
            ..Default::default()
        };
        let mut map = core::HeaderMap::default();
        for _ in 0..n {
            let (k, v) = (pick(seed, &NAMES), pick(seed, &VALUES));
            if raw {
                let as_raw = pick(seed, &["value", "raw"]) == "raw";
                map.headers.push(core::HeaderValue {
                    key: k.into(),
                    value: if as_raw { String::new() } else { v.into() },
                    raw_value: if as_raw { v.as_bytes().to_vec() } else { Vec::new() },
                });
            } else {
                http.headers.insert(k.into(), v.into());
            }
        }
        if raw {
            http.header_map = Some(map);
        }
        let peer = || auth::attribute_context::Peer {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "10.0.0.1".into(),
                    ..Default::default()
                })),
            }),
            principal: "spiffe://x".into(),
            ..Default::default()
        };
        let mut context_extensions = HashMap::new();
        for _ in 0..pick(seed, &["0", "1", "2"]).parse::<usize>().unwrap_or(0) {
            context_extensions.insert(pick(seed, &["tenant", "other"]).into(), pick(seed, &VALUES).into());
        }
        auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                source: Some(peer()),
                destination: Some(peer()),
                request: Some(auth::attribute_context::Request {
                    time: Some(Default::default()),
                    http: Some(http),
                }),
                context_extensions,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_every_request_as_the_generated_message_did() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..3000 {
            let typed = generated(&mut seed);
            let wire = CheckRequest::decode(typed.encode_to_vec().as_slice()).expect("decodes");
            let (old, new) = (Typed(&typed), EnvoyRequest::new(&wire));
            for name in NAMES.iter().map(|n| n.to_ascii_lowercase()) {
                assert_eq!(new.header(&name), old.header(&name).as_deref(), "#{i} {name}: {typed:?}");
            }
            assert_eq!(new.host(), old.host().as_deref(), "#{i} host: {typed:?}");
            assert_eq!(new.route_tenant(), old.route_tenant().as_deref(), "#{i} route tenant: {typed:?}");
        }
    }

    #[test]
    fn a_name_sent_twice_reads_as_a_decoded_map_reads_it() {
        // No map value holds two entries of one key; the wire can. prost keeps the last.
        let entry = |k: &str, v: &str| Entry { key: k.to_owned().into(), value: v.to_owned().into() };
        let wire = CheckRequest {
            attributes: Some(super::AttributeContext {
                request: Some(super::Request {
                    http: Some(super::HttpRequest {
                        headers: vec![
                            entry("x-tenant-id", "first"),
                            entry("a", "1"),
                            entry("x-tenant-id", "last"),
                        ],
                        ..Default::default()
                    }),
                }),
                context_extensions: vec![entry("tenant", "first"), entry("tenant", "last")],
            }),
        };
        let bytes = wire.encode_to_vec();
        let typed = auth::CheckRequest::decode(bytes.as_slice()).expect("the generated message reads it too");
        let decoded = CheckRequest::decode(bytes.as_slice()).expect("decodes");
        let (old, new) = (Typed(&typed), EnvoyRequest::new(&decoded));
        assert_eq!(new.header("x-tenant-id"), Some("last"));
        assert_eq!(old.header("x-tenant-id").as_deref(), Some("last"));
        assert_eq!(new.route_tenant(), Some("last"));
        assert_eq!(old.route_tenant().as_deref(), Some("last"));
    }

    #[test]
    fn text_that_is_not_utf8_reads_with_replacement_characters() {
        let entry = |k: &[u8], v: &[u8]| Entry { key: k.to_vec().into(), value: v.to_vec().into() };
        let wire = CheckRequest {
            attributes: Some(super::AttributeContext {
                request: Some(super::Request {
                    http: Some(super::HttpRequest {
                        headers: vec![entry(b"x-tenant-id", b"ac\xffme"), entry(b"x-\xff", b"1")],
                        host: b"acme\xfe.example".to_vec().into(),
                        header_map: None,
                    }),
                }),
                context_extensions: vec![entry(b"tenant", b"\xc3")],
            }),
        };
        let view = EnvoyRequest::new(&wire);
        assert_eq!(view.header("x-tenant-id"), Some("ac\u{fffd}me"));
        assert_eq!(view.header("x-\u{fffd}"), None, "a name that is not UTF-8 matches nothing");
        assert_eq!(view.host(), Some("acme\u{fffd}.example"));
        assert_eq!(view.route_tenant(), Some("\u{fffd}"));
    }

    #[test]
    fn request_ids_are_cut_on_a_character_boundary() {
        let id = format!("{}é", "a".repeat(127));
        let wire = CheckRequest {
            attributes: Some(super::AttributeContext {
                request: Some(super::Request {
                    http: Some(super::HttpRequest {
                        headers: vec![Entry { key: "x-request-id".into(), value: id.into_bytes().into() }],
                        ..Default::default()
                    }),
                }),
                context_extensions: Vec::new(),
            }),
        };
        assert_eq!(EnvoyRequest::new(&wire).request_id(), Some("a".repeat(127).as_str()));
    }

    #[test]
    fn an_empty_request_id_is_none() {
        let with = |id: &str| CheckRequest {
            attributes: Some(super::AttributeContext {
                request: Some(super::Request {
                    http: Some(super::HttpRequest {
                        headers: vec![Entry {
                            key: "x-request-id".into(),
                            value: id.to_string().into_bytes().into(),
                        }],
                        ..Default::default()
                    }),
                }),
                context_extensions: Vec::new(),
            }),
        };
        assert_eq!(EnvoyRequest::new(&with("")).request_id(), None);
        assert_eq!(EnvoyRequest::new(&with("r-1")).request_id(), Some("r-1"));
    }
}
