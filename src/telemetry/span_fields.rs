//! Span fields for the JSON log lines, written as JSON as they are recorded.
//!
//! tracing-subscriber's fmt layer keeps every span's fields as formatted text, made when the span
//! is created; its JSON formatter (`JsonFields`) collects them into a `BTreeMap` of
//! `serde_json::Value`s and serialises the map, and re-parses that text for every later `record`.
//! Every check opens a span, so this ran on every request whether or not a line was logged
//! (2.4% of the sidecar's CPU under load, in the profile of docs/benchmarks.md item 17).
//! [`JsonSpanFields`] writes the same JSON object straight into the span's text, and appends to
//! it on `record`. The JSON event formatter reads the text back as a JSON object, as before, so
//! log lines are unchanged (tested against `JsonFields` below).

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// A `FormatFields` for `fmt::layer().json()` that writes span fields as a JSON object directly.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Fields { out: &mut writer, empty: true, result: Ok(()) };
        visitor.out.write_char('{')?;
        fields.record(&mut visitor);
        visitor.result?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // `current` is an object this type wrote: `{}` or `{"a":1}`. New fields go before the
        // closing brace; a field recorded twice appears twice, and the last one wins when the
        // event formatter reads the object, as the last insert into `JsonFields`' map did.
        let text = &mut current.fields;
        let empty = match text.pop() {
            Some('}') => text.len() <= 1,
            _ => {
                text.clear();
                text.push('{');
                true
            }
        };
        let mut visitor = Fields { out: text, empty, result: Ok(()) };
        fields.record(&mut visitor);
        let result = visitor.result;
        text.push('}');
        result
    }
}

struct Fields<'a, W: Write> {
    out: &'a mut W,
    empty: bool,
    result: fmt::Result,
}

impl<W: Write> Fields<'_, W> {
    /// Writes `"name":` (after a comma when needed), or `None` for a field `JsonFields` skips.
    fn key(&mut self, name: &str) -> Option<&mut W> {
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        let sep = if std::mem::replace(&mut self.empty, false) { "" } else { "," };
        self.result = self
            .out
            .write_str(sep)
            .and_then(|()| string(self.out, name))
            .and_then(|()| self.out.write_char(':'));
        self.result.is_ok().then_some(&mut *self.out)
    }

    fn value(&mut self, write: impl FnOnce(&mut W) -> fmt::Result, field: &Field) {
        self.named(field.name(), write);
    }

    fn named(&mut self, name: &str, write: impl FnOnce(&mut W) -> fmt::Result) {
        if let Some(out) = self.key(name) {
            self.result = write(out);
        }
    }
}

impl<W: Write> Visit for Fields<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // What serde_json writes for an f64: the number, or null when it is not finite.
        self.value(|out| write!(out, "{}", serde_json::Value::from(value)), field);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(|out| write!(out, "{value}"), field);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(|out| write!(out, "{value}"), field);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(|out| write!(out, "{value}"), field);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.value(|out| string(out, value), field);
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.value(|out| write!(out, "{}", serde_json::Value::from(value)), field);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // As `JsonFields`: a raw identifier loses its `r#` here (only here).
        let name = field.name();
        self.named(name.strip_prefix("r#").unwrap_or(name), |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Writes text escaped for the inside of a JSON string.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::JsonSpanFields;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read through Debug
    struct Thing {
        name: &'static str,
        n: u8,
    }

    /// Spans of every field type, recorded at creation and later, with an event in each.
    fn emit() {
        let texts = [
            "plain",
            "quote \" backslash \\ slash /",
            "line\nbreak\r\ttab",
            "nul \0 esc \u{1b} del \u{7f}",
            "jörg 🙂 \u{2028}",
            "",
        ];
        for (i, text) in texts.into_iter().enumerate() {
            let span = tracing::info_span!(
                "check",
                request_id = text,
                trace_id = "",
                r#type = "raw name",
                n = i as u64,
                neg = -(i as i64),
                ratio = 0.5 + i as f64,
                nan = f64::NAN,
                inf = f64::INFINITY,
                yes = i % 2 == 0,
                shown = %text,
                debugged = ?Thing { name: "x\"y", n: 7 },
                tenant = tracing::field::Empty,
                reason = tracing::field::Empty,
            );
            span.in_scope(|| tracing::info!(code = 1, "in the span"));
            span.record("tenant", text);
            span.in_scope(|| tracing::info!("after one record"));
            span.record("reason", "ok");
            span.record("tenant", "again");
            span.in_scope(|| tracing::warn!("after three records"));
            let empty = tracing::info_span!("empty", later = tracing::field::Empty);
            empty.in_scope(|| tracing::info!("no fields"));
            empty.record("later", 3_u64);
            empty.in_scope(|| tracing::info!("a field recorded later"));
        }
    }

    fn lines(json_fields: bool) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .without_time()
            .with_writer(buffer.clone());
        if json_fields {
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        } else {
            tracing::subscriber::with_default(
                tracing_subscriber::registry().with(layer.fmt_fields(JsonSpanFields)),
                emit,
            );
        }
        let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes)
            .expect("UTF-8 log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    #[test]
    fn log_lines_are_those_of_tracing_subscribers_json_fields() {
        let (ours, theirs) = (lines(false), lines(true));
        assert_eq!(ours.len(), 30);
        assert_eq!(ours, theirs);
        // The lines carry the span's fields at all: the comparison is not of two empty objects.
        assert_eq!(ours[2]["span"]["tenant"], "again");
        assert_eq!(ours[2]["span"]["reason"], "ok");
        assert_eq!(ours[5]["span"]["request_id"], "quote \" backslash \\ slash /");
        assert_eq!(ours[4]["span"]["later"], 3);
    }
}
