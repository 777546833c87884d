//! A check's `envoy.service.auth.v3.CheckResponse`, written straight onto the wire.
//!
//! The generated `CheckResponse` (envoy-types) is a tree of owned values: every header name and
//! value, every `headers_to_remove` entry and every dynamic-metadata key and value is its own
//! `String`, the metadata a SipHash map of them, about twenty allocations for an allow that are
//! freed again as soon as the message is encoded. [`Answer`] keeps what the response says (the
//! decision's parts, whose strings are shared `Arc`s, and the policy naming the forwarded headers) and
//! writes the protobuf encoding of the same message from it, with the field numbers of
//! `external_auth.proto`, `base.proto` (`HeaderValueOption`), `http_status.proto`, `status.proto`
//! and `struct.proto`.
//!
//! What it writes is what the generated message holds, field for field: [`Answer::to_message`]
//! decodes it into that message (`subguard explain` prints it), and the tests compare that with
//! the message built the generated way for every reason and every shape of identity.

use std::borrow::Cow;
use std::sync::Arc;

use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::check::Policy;
use crate::config::{Forward, OutageResponse};
use crate::decision::{Decision, Identity, Outcome, Reason};

/// `HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD`: a forwarded header replaces
/// whatever the client sent under that name.
const OVERWRITE_IF_EXISTS_OR_ADD: u64 = 2;

/// The response to one check, encoded on demand.
pub struct Answer {
    said: Said,
    /// The tenant, as the allow's tenant header carries it.
    tenant: Option<Arc<str>>,
    /// `ok` or the deny's reason code (metadata `reason`).
    reason: &'static str,
    /// The metadata values of tenant, sub and issuer, with control characters escaped.
    printable: [Option<Arc<str>>; 3],
}

/// What Envoy is told to do with the request.
enum Said {
    /// Forward it, with the identity in the headers `forward` names.
    Allow { identity: Identity, forward: Arc<Forward> },
    /// Answer it (built when the answer is; denies are the rarer answer).
    Deny {
        reason: Reason,
        /// As Envoy's `error_response` (an outage with `outage_response: error`).
        as_error: bool,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
}

impl Answer {
    /// The answer to a check decided under `policy`.
    pub fn new(decision: Decision, policy: &Policy, request_id: Option<&str>) -> Answer {
        Answer::with(decision, &policy.forward, policy.config.outage_response, request_id)
    }

    /// The answer with the forwarded header names and the outage response given directly.
    pub fn with(
        decision: Decision,
        forward: &Arc<Forward>,
        outage: OutageResponse,
        request_id: Option<&str>,
    ) -> Answer {
        let reason = decision.reason_code();
        let printable = [&decision.tenant, &decision.sub, &decision.issuer].map(|v| {
            v.as_ref().map(|v| match super::grpc::printable(v) {
                Cow::Borrowed(_) => v.clone(),
                Cow::Owned(escaped) => Arc::from(escaped),
            })
        });
        let tenant = decision.tenant;
        let said = match decision.outcome {
            Outcome::Allow(identity) => Said::Allow { identity, forward: forward.clone() },
            Outcome::Deny(reason) => Said::Deny {
                reason,
                as_error: reason.is_outage() && outage == OutageResponse::Error,
                headers: super::grpc::deny_headers(reason, tenant.as_deref()),
                body: super::grpc::deny_body(reason, tenant.as_deref(), request_id),
            },
        };
        Answer { said, tenant, reason, printable }
    }

    /// The length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        let mut len = Len(0);
        self.write(&mut len);
        len.0
    }

    /// Appends the encoded message to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        self.write(&mut Write(buf));
    }

    /// The message as the generated type, as Envoy decodes it.
    pub fn to_message(
        &self,
    ) -> Result<envoy_types::pb::envoy::service::auth::v3::CheckResponse, prost::DecodeError> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        prost::Message::decode(buf.as_slice())
    }

    /// `CheckResponse`: `status = 1`, `denied_response = 2` | `ok_response = 3` |
    /// `error_response = 5`, `dynamic_metadata = 4`.
    fn write(&self, out: &mut dyn Out) {
        match &self.said {
            Said::Allow { identity, forward: f } => {
                // google.rpc.Status with code OK: present, and empty.
                out.message(1, &|_| {});
                out.message(3, &|ok| {
                    // OkHttpResponse: `headers = 2`, `headers_to_remove = 5`.
                    let tenant = self.tenant.as_deref().unwrap_or("");
                    set_header(ok, 2, &f.tenant_header, tenant);
                    set_header(ok, 2, &f.user_header, &identity.user_id);
                    match &identity.roles {
                        Some(roles) => set_header(ok, 2, &f.roles_header, roles),
                        None => ok.bytes(5, f.roles_header.as_bytes()),
                    }
                    if f.strip_authorization {
                        ok.bytes(5, b"authorization");
                    }
                });
            }
            Said::Deny { reason, as_error, headers, body } => {
                let reason = *reason;
                out.message(1, &|status| {
                    // google.rpc.Status: `code = 1`, `message = 2`.
                    status.varint(1, rpc_code(reason));
                    status.bytes(2, reason.code().as_bytes());
                });
                out.message(if *as_error { 5 } else { 2 }, &|denied| {
                    // DeniedHttpResponse: `status = 1` (HttpStatus: `code = 1`), `headers = 2`,
                    // `body = 3`.
                    denied.message(1, &|s| s.varint(1, u64::from(reason.http_status())));
                    for (name, value) in headers {
                        set_header(denied, 2, name, value);
                    }
                    denied.bytes(3, body.as_bytes());
                });
            }
        }
        out.message(4, &|fields| self.metadata(fields));
    }

    /// `google.protobuf.Struct`: `fields = 1`, a `map<string, Value>`; each entry `key = 1`,
    /// `value = 2`, a `Value` with `string_value = 3`.
    fn metadata(&self, out: &mut dyn Out) {
        let [tenant, sub, issuer] = &self.printable;
        let allow = matches!(self.said, Said::Allow { .. });
        let entries = [
            ("decision", Some(if allow { "allow" } else { "deny" })),
            ("reason", Some(self.reason)),
            ("tenant", tenant.as_deref()),
            ("sub", sub.as_deref()),
            ("issuer", issuer.as_deref()),
        ];
        for (key, value) in entries {
            if let Some(value) = value {
                out.message(1, &|entry| {
                    entry.bytes(1, key.as_bytes());
                    // A oneof member is written even when empty.
                    entry.message(2, &|v| v.bytes_always(3, value.as_bytes()));
                });
            }
        }
    }
}

/// `HeaderValueOption` (`header = 1`, a `HeaderValue` of `key = 1`, `value = 2`;
/// `append_action = 3`) that sets `name` to `value`.
fn set_header(out: &mut dyn Out, tag: u32, name: &str, value: &str) {
    out.message(tag, &|option| {
        option.message(1, &|header| {
            header.bytes(1, name.as_bytes());
            header.bytes(2, value.as_bytes());
        });
        option.varint(3, OVERWRITE_IF_EXISTS_OR_ADD);
    });
}

/// google.rpc codes, so gRPC-level tooling sees a meaningful status too (Envoy only cares OK or
/// not).
fn rpc_code(reason: Reason) -> u64 {
    match reason.http_status() {
        400 => 3,  // INVALID_ARGUMENT
        401 => 16, // UNAUTHENTICATED
        404 => 5,  // NOT_FOUND
        503 => 14, // UNAVAILABLE
        500 => 13, // INTERNAL
        _ => 7,    // PERMISSION_DENIED
    }
}

/// Where a message's fields go: counted ([`Len`]) or written ([`Write`]). Fields with their
/// default value are left out, as proto3 encoders do.
trait Out {
    /// A `bytes`/`string` field; nothing when empty.
    fn bytes(&mut self, tag: u32, value: &[u8]) {
        if !value.is_empty() {
            self.bytes_always(tag, value);
        }
    }
    /// A `bytes`/`string` field, also when empty (a oneof member).
    fn bytes_always(&mut self, tag: u32, value: &[u8]);
    /// An integer or enum field; nothing when zero.
    fn varint(&mut self, tag: u32, value: u64);
    /// An embedded message whose fields `body` gives.
    fn message(&mut self, tag: u32, body: &dyn Fn(&mut dyn Out));
}

fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

struct Len(usize);

impl Out for Len {
    fn bytes_always(&mut self, tag: u32, value: &[u8]) {
        self.0 += delimited_len(tag, value.len());
    }
    fn varint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.0 += key_len(tag) + encoded_len_varint(value);
        }
    }
    fn message(&mut self, tag: u32, body: &dyn Fn(&mut dyn Out)) {
        let mut inner = Len(0);
        body(&mut inner);
        self.0 += delimited_len(tag, inner.0);
    }
}

struct Write<'a, B>(&'a mut B);

impl<B: BufMut> Out for Write<'_, B> {
    fn bytes_always(&mut self, tag: u32, value: &[u8]) {
        encode_key(tag, WireType::LengthDelimited, self.0);
        encode_varint(value.len() as u64, self.0);
        self.0.put_slice(value);
    }
    fn varint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            encode_key(tag, WireType::Varint, self.0);
            encode_varint(value, self.0);
        }
    }
    fn message(&mut self, tag: u32, body: &dyn Fn(&mut dyn Out)) {
        // The length prefix comes first: the body is counted, then written. Messages here nest
        // five deep at most and are a few hundred bytes, so counting again at each level costs
        // less than building them.
        let mut inner = Len(0);
        body(&mut inner);
        encode_key(tag, WireType::LengthDelimited, self.0);
        encode_varint(inner.0 as u64, self.0);
        body(self);
    }
}

#[cfg(test)]
mod tests {
    //! The oracle: the `CheckResponse` built the generated way, with owned strings and a map, as
    //! the server built it before answers were written directly.

    use std::collections::HashMap;
    use std::sync::Arc;

    use envoy_types::pb::envoy::config::core::v3::{
        HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
    };
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use envoy_types::pb::google::rpc;
    use prost::Message;

    use super::Answer;
    use crate::config::{Forward, OutageResponse};
    use crate::decision::{Decision, Identity, Outcome, Reason};
    use crate::server::grpc::{deny_body, deny_headers, printable};

    fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue { key: key.to_string(), value: value.into(), raw_value: Vec::new() }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        }
    }

    fn string_value(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.to_string())) }
    }

    fn metadata(d: &Decision) -> Struct {
        let mut fields = HashMap::new();
        fields.insert("decision".to_string(), string_value(if d.is_allow() { "allow" } else { "deny" }));
        fields.insert("reason".to_string(), string_value(d.reason_code()));
        for (k, v) in
            [("tenant", d.tenant.as_deref()), ("sub", d.sub.as_deref()), ("issuer", d.issuer.as_deref())]
        {
            if let Some(v) = v {
                fields.insert(k.to_string(), string_value(&printable(v)));
            }
        }
        Struct { fields }
    }

    fn rpc_code(reason: Reason) -> i32 {
        match reason.http_status() {
            400 => 3,
            401 => 16,
            404 => 5,
            503 => 14,
            500 => 13,
            _ => 7,
        }
    }

    fn reference(
        d: &Decision,
        f: &Forward,
        outage: OutageResponse,
        request_id: Option<&str>,
    ) -> CheckResponse {
        let dynamic_metadata = Some(metadata(d));
        match &d.outcome {
            Outcome::Allow(identity) => {
                let tenant = d.tenant.as_deref().unwrap_or("");
                let mut headers =
                    vec![header(&f.tenant_header, tenant), header(&f.user_header, &*identity.user_id)];
                let mut headers_to_remove = Vec::new();
                match &identity.roles {
                    Some(roles) => headers.push(header(&f.roles_header, &**roles)),
                    None => headers_to_remove.push(f.roles_header.clone()),
                }
                if f.strip_authorization {
                    headers_to_remove.push("authorization".to_string());
                }
                CheckResponse {
                    status: Some(rpc::Status { code: 0, ..Default::default() }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers,
                        headers_to_remove,
                        ..Default::default()
                    })),
                    dynamic_metadata,
                }
            }
            Outcome::Deny(reason) => {
                let tenant = d.tenant.as_deref();
                let denied = DeniedHttpResponse {
                    status: Some(HttpStatus { code: i32::from(reason.http_status()) }),
                    headers: deny_headers(*reason, tenant).into_iter().map(|(k, v)| header(k, v)).collect(),
                    body: deny_body(*reason, tenant, request_id),
                };
                let as_error = reason.is_outage() && outage == OutageResponse::Error;
                CheckResponse {
                    status: Some(rpc::Status {
                        code: rpc_code(*reason),
                        message: reason.code().to_string(),
                        ..Default::default()
                    }),
                    http_response: Some(if as_error {
                        HttpResponse::ErrorResponse(denied)
                    } else {
                        HttpResponse::DeniedResponse(denied)
                    }),
                    dynamic_metadata,
                }
            }
        }
    }

    fn forwards() -> Vec<Arc<Forward>> {
        let f = |t: &str, u: &str, r: &str, strip| {
            Arc::new(Forward {
                tenant_header: t.into(),
                user_header: u.into(),
                roles_header: r.into(),
                strip_authorization: strip,
            })
        };
        vec![
            f("x-tenant-id", "x-user-id", "x-user-roles", true),
            f("x-tenant-id", "x-user-id", "x-user-roles", false),
            // A name long enough that its length prefix takes two bytes.
            f(&format!("x-{}", "t".repeat(200)), "u", "r", true),
        ]
    }

    fn texts() -> Vec<Option<Arc<str>>> {
        vec![
            None,
            Some("acme".into()),
            Some("".into()),
            Some("jörg\nINFO forged line\u{7f}".into()),
            Some("x".repeat(300).into()),
        ]
    }

    fn decisions() -> Vec<Decision> {
        let mut out = Vec::new();
        let outcomes = Reason::ALL.iter().map(|r| Outcome::Deny(*r)).chain([
            Outcome::Allow(Identity { user_id: "u-1".into(), roles: Some("admin,dev".into()) }),
            Outcome::Allow(Identity { user_id: "u-2".into(), roles: None }),
            Outcome::Allow(Identity { user_id: "".into(), roles: Some("".into()) }),
        ]);
        for outcome in outcomes {
            for (i, text) in texts().into_iter().enumerate() {
                let tenant = if i == 3 { Some("globex".into()) } else { text.clone() };
                out.push(Decision {
                    outcome: outcome.clone(),
                    tenant,
                    sub: text.clone(),
                    issuer: texts()[(i + 1) % 5].clone(),
                    detail: Some("never sent".into()),
                });
            }
        }
        out
    }

    #[test]
    fn answers_decode_as_the_message_built_the_generated_way() {
        let mut compared = 0;
        for d in decisions() {
            for f in forwards() {
                for outage in [OutageResponse::Deny, OutageResponse::Error] {
                    for request_id in [None, Some("req-1"), Some("quote\" and \\ and \u{1}")] {
                        let answer = Answer::with(d.clone(), &f, outage, request_id);
                        let want = reference(&d, &f, outage, request_id);
                        let mut bytes = Vec::new();
                        answer.encode(&mut bytes);
                        assert_eq!(bytes.len(), answer.encoded_len(), "{d:?}");
                        let got = CheckResponse::decode(bytes.as_slice()).unwrap();
                        assert_eq!(got, want, "{d:?} {outage:?} {request_id:?}");
                        // Nothing more and nothing less than the generated encoder writes.
                        assert_eq!(bytes.len(), want.encoded_len(), "{d:?}");
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 23 * 5 * 3 * 2 * 3);
    }

    #[test]
    fn control_characters_reach_metadata_escaped_and_headers_as_they_are() {
        let d = Decision {
            outcome: Outcome::Allow(Identity { user_id: "a\nb".into(), roles: None }),
            tenant: Some("acme".into()),
            sub: Some("a\nb".into()),
            issuer: None,
            detail: None,
        };
        let msg = Answer::with(d, &forwards()[0], OutageResponse::Deny, None).to_message().unwrap();
        let sub = &msg.dynamic_metadata.unwrap().fields["sub"];
        assert_eq!(sub.kind, Some(Kind::StringValue("a\\u000ab".into())));
        let Some(HttpResponse::OkResponse(ok)) = msg.http_response else { panic!("not an allow") };
        assert_eq!(ok.headers[1].header.as_ref().unwrap().value, "a\nb");
        assert_eq!(ok.headers_to_remove, ["x-user-roles", "authorization"]);
    }
}
