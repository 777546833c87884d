//! Documents read by name, never by position. serde lets a derived struct be read from a sequence
//! too, its fields taken in declaration order: `forward: [x-a, x-b, x-c, true]` would quietly set
//! `strip_authorization`, and a directory answering `[null, null, null, null]` would name a user.
//! Every document subguard reads (its config, users files, directory answers, key sets, events)
//! is a mapping of named members. [`Strict`] reads a parsed YAML value that way at every depth;
//! [`object_from_slice`] refuses a JSON document that is not an object.

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use serde_json::Value;

/// The first byte of a JSON text after its leading whitespace: `{` opens an object, `[` an array.
pub fn opening(json: &[u8]) -> Option<u8> {
    json.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// `T` from a JSON document that must be an object: an array is a type error (serde_json alone
/// would read a struct from it by position); anything else reads as `serde_json::from_slice`.
pub fn object_from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    match opening(bytes) {
        Some(b'[') => Err(de::Error::invalid_type(Unexpected::Seq, &"a JSON object")),
        _ => serde_json::from_slice(bytes),
    }
}

/// A parsed value that refuses to be read as a struct unless it is a mapping, at every depth.
pub struct Strict(pub Value);

impl<'de> Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => {
                let len = items.len();
                let mut seq = Items(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                match seq.0.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(len, &"fewer elements in the sequence")),
                }
            }
            Value::Object(map) => visitor.visit_map(Entries { iter: map.into_iter(), value: None }),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        // Anything but a mapping is refused here, in the words of the YAML the user wrote: serde
        // would name the Rust type it wanted (`expected struct Tenant`).
        let unexpected = match &self.0 {
            Value::Object(_) => return self.deserialize_any(visitor),
            Value::Null => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Unexpected::Unsigned(u),
                (None, Some(i)) => Unexpected::Signed(i),
                (None, None) => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Unexpected::Str(s),
            Value::Array(_) => Unexpected::Seq,
        };
        Err(de::Error::invalid_type(unexpected, &"a mapping"))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(Strict(other)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Items(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for Items {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0.next().map(|v| seed.deserialize(Strict(v))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Entries {
    iter: serde_json::map::IntoIter,
    value: Option<Value>,
}

impl<'de> MapAccess<'de> for Entries {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        match self.iter.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(IntoDeserializer::<serde_json::Error>::into_deserializer(key)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let value = self.value.take().ok_or_else(|| de::Error::custom("a key without its value"))?;
        seed.deserialize(Strict(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::Strict;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        name: String,
        on: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        inner: Option<Inner>,
        list: Vec<Inner>,
        #[serde(default)]
        words: Vec<String>,
        #[serde(default)]
        by_name: std::collections::BTreeMap<String, u64>,
    }

    fn read(v: serde_json::Value) -> Result<Outer, String> {
        Outer::deserialize(Strict(v)).map_err(|e| e.to_string())
    }

    #[test]
    fn mappings_sequences_and_scalars_read_as_serde_json_reads_them() {
        let v = json!({"inner": {"name": "a", "on": true}, "list": [{"name": "b", "on": null}],
                       "words": ["x", "y"], "by_name": {"k": 7}});
        let expected: Outer = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(read(v).unwrap(), expected);
        assert_eq!(expected.by_name["k"], 7);
        assert_eq!(read(json!({"inner": null, "list": []})).unwrap().inner, None);
    }

    #[test]
    fn a_struct_given_as_a_sequence_is_a_type_error_at_any_depth() {
        for v in [
            json!({"inner": ["a", true], "list": []}),
            json!({"inner": null, "list": [["b", null]]}),
            json!([null, []]),
        ] {
            assert!(
                serde_json::from_value::<Outer>(v.clone()).is_ok(),
                "serde_json alone takes {v} by position"
            );
            let e = read(v.clone()).unwrap_err();
            assert!(e.contains("invalid type: sequence, expected a mapping"), "{v}: {e}");
        }
    }

    #[test]
    fn a_json_document_that_is_an_array_is_not_read_as_an_object() {
        let from = |text: &str| super::object_from_slice::<Inner>(text.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(from(r#" {"name": "a"}"#).unwrap(), Inner { name: "a".into(), on: None });
        assert!(
            serde_json::from_str::<Inner>(r#"["a", null]"#).is_ok(),
            "serde_json alone reads it by position"
        );
        for text in [r#"["a", null]"#, "\n [", "[]"] {
            assert_eq!(from(text).unwrap_err(), "invalid type: sequence, expected a JSON object", "{text:?}");
        }
        assert!(from("7").unwrap_err().starts_with("invalid type: integer `7`"));
        assert!(from("").unwrap_err().starts_with("EOF while parsing"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_still_fail() {
        assert!(
            read(json!({"inner": null, "list": [], "lsit": []}))
                .unwrap_err()
                .contains("unknown field `lsit`")
        );
        assert!(
            read(json!({"inner": {"name": 5}, "list": []}))
                .unwrap_err()
                .contains("invalid type: integer `5`")
        );
        assert!(read(json!({"list": [], "words": "x"})).unwrap_err().contains("expected a sequence"));
    }
}
