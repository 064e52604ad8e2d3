//! JSON read as the admin API's documents describe it: an object only where an object is
//! expected. serde_json also gives a struct its fields from an array in order
//! (`["name", "secret"]` as `{"name": ..., "type": ...}`), which no document allows; this
//! wrapper asks the format for a map wherever a struct is wanted, at every depth.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// A deserializer whose structs, at any depth, are read from JSON objects only.
pub struct Strict<D>(pub D);

/// `serde_json::from_slice`, strictly: one JSON value, objects for structs.
pub fn from_slice<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(Strict(&mut *de))?;
    de.end()?;
    Ok(value)
}

/// Passes each call on (with its arguments) with the visitor wrapped, so that nested
/// values stay strict.
macro_rules! forward {
    ($($method:ident($($arg:ident: $t:ty),*)),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $t,)* v: V) -> Result<V::Value, Self::Error> {
            self.0.$method($($arg,)* Wrap(v))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    forward!(
        deserialize_any(),
        deserialize_bool(),
        deserialize_i8(),
        deserialize_i16(),
        deserialize_i32(),
        deserialize_i64(),
        deserialize_i128(),
        deserialize_u8(),
        deserialize_u16(),
        deserialize_u32(),
        deserialize_u64(),
        deserialize_u128(),
        deserialize_f32(),
        deserialize_f64(),
        deserialize_char(),
        deserialize_str(),
        deserialize_string(),
        deserialize_bytes(),
        deserialize_byte_buf(),
        deserialize_option(),
        deserialize_unit(),
        deserialize_seq(),
        deserialize_map(),
        deserialize_identifier(),
        deserialize_ignored_any(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
    );

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(Wrap(v))
    }

    /// The bodies' enums are names (`"secret"`): a string only, never serde's
    /// `{"secret": null}` form.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(UnitVariant(v))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// An enum's visitor fed a variant's name.
struct UnitVariant<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for UnitVariant<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<V::Value, E> {
        self.0
            .visit_enum(de::IntoDeserializer::<E>::into_deserializer(name))
    }
}

/// A visitor whose nested deserializers, sequences and maps are made strict.
struct Wrap<V>(V);

macro_rules! visit {
    ($($method:ident: $t:ty),*) => {$(
        fn $method<E: de::Error>(self, x: $t) -> Result<Self::Value, E> {
            self.0.$method(x)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    visit!(
        visit_bool: bool, visit_i64: i64, visit_i128: i128, visit_u64: u64, visit_u128: u128,
        visit_f64: f64, visit_char: char, visit_str: &str, visit_borrowed_str: &'de str,
        visit_string: String, visit_bytes: &[u8], visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Strict(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(Strict(d))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(Wrap(a))
    }

    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Wrap(a))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(a)
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Wrap(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Wrap(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Strict(d))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        n: u64,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(default)]
        one: Option<Inner>,
        #[serde(default)]
        many: Vec<Inner>,
    }

    fn read(text: &str) -> Result<Outer, String> {
        super::from_slice(text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn objects_are_read_as_before() {
        let got = read(r#"{"name": "a", "one": {"n": 1}, "many": [{"n": 2}, {"n": 3}]}"#);
        let want = Outer {
            name: "a".into(),
            one: Some(Inner { n: 1 }),
            many: vec![Inner { n: 2 }, Inner { n: 3 }],
        };
        assert_eq!(got, Ok(want));
        assert!(read(r#"{"name": "a", "name": "b"}"#)
            .unwrap_err()
            .contains("duplicate field"));
        assert!(read(r#"{"name": "a", "x": 1}"#)
            .unwrap_err()
            .contains("unknown field"));
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Secret,
        Publishable,
    }

    #[test]
    fn an_enum_is_its_name_only() {
        let read =
            |text: &str| super::from_slice::<Kind>(text.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(read(r#""secret""#), Ok(Kind::Secret));
        assert_eq!(read(r#""publishable""#), Ok(Kind::Publishable));
        for text in [r#"{"secret": null}"#, r#"["secret"]"#, "1", r#""other""#] {
            assert!(read(text).is_err(), "{text}");
        }
    }

    #[test]
    fn no_struct_is_read_from_an_array_at_any_depth() {
        for text in [
            r#"["a"]"#,
            r#"{"name": "a", "one": [1]}"#,
            r#"{"name": "a", "many": [[2]]}"#,
            r#"{"name": "a", "many": [{"n": 2}, [3]]}"#,
        ] {
            let err = read(text).unwrap_err();
            assert!(err.contains("invalid type: sequence"), "{text}: {err}");
        }
    }
}
