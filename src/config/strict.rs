//! Reading config sections as mappings only. serde lets a derived struct be read from a sequence
//! too, its fields taken by position, so `forward: [x-a, x-b, x-c, true]` would quietly set
//! `strip_authorization`. A config names what it sets: [`Strict`] hands serde a parsed YAML value
//! in which a sequence where a struct is expected is a type error, and is otherwise
//! `serde_json::Value`'s own deserializer.

use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde_json::Value;

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
        match self.0 {
            Value::Array(_) => Err(de::Error::invalid_type(Unexpected::Seq, &"a mapping")),
            other => Strict(other).deserialize_any(visitor),
        }
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
