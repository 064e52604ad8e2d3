//! Where a field is written, for config errors: `FieldPath` (`routes[2].path`, indices
//! from 1 like `check-config`'s route table) and `line_of`, the line of the value at a
//! path or, for a field the file does not write, of the key whose mapping lacks it.
//!
//! serde_norway keeps no spans, but an error raised while it reads a node carries that
//! node's mark. So `line_of` re-reads the text with the same parser, walks to the node and
//! fails there on purpose: anchors, aliases and flow style resolve exactly as in the load,
//! every check (serde's and `sections`') is located the same way, and nothing is spent on
//! spans unless a config is refused.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// One step of a field path; an index counts from 0 here, from 1 when shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A path to a field, as errors name it: `proxy.upstream`, `routes[1].scopes[2]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Step>);

impl FieldPath {
    /// A path of keys only: `proxy.timeouts.idle`.
    pub fn keys(dotted: &str) -> Self {
        FieldPath(dotted.split('.').map(|k| Step::Key(k.into())).collect())
    }

    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Step::Key(key.into()));
        self
    }

    /// `index` counts from 0.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Step::Index(index));
        self
    }

    /// The path with indices from 0, as serde_norway prints it inside its own messages.
    pub(super) fn zero_based(&self) -> String {
        render(&self.0, 0)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render(&self.0, 1))
    }
}

fn render(steps: &[Step], first_index: usize) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{}]", i + first_index)),
        }
    }
    out
}

/// The 1-based line to show for `path` in `text`: the value's line for a scalar; the
/// key's line for a mapping or list under a key (a block mapping starts a line later);
/// for a field that is not written, the key line of the nearest mapping that is (for a
/// top-level field, the line the document starts on). `None` only if the parser cannot
/// read that far.
pub fn line_of(text: &str, path: &FieldPath) -> Option<usize> {
    let steps = &path.0;
    match probe(text, steps, Target::Value) {
        (Found::Scalar, line) => line,
        (Found::Collection, line) => match steps.last() {
            Some(Step::Key(_)) => probe(text, steps, Target::Key(0)).1,
            _ => line,
        },
        (Found::Nothing, _) => (0..steps.len())
            .rev()
            .map(|n| holder_line(text, &steps[..n]))
            .find(Option::is_some)
            .flatten(),
    }
}

/// The line of the second time the last key of `path` is written in its mapping.
pub fn line_of_repeat(text: &str, path: &FieldPath) -> Option<usize> {
    match probe(text, &path.0, Target::Key(1)) {
        (Found::Nothing, _) => None,
        (_, line) => line,
    }
}

/// The line that names the node at `steps`: its key's, or its own for a list element.
fn holder_line(text: &str, steps: &[Step]) -> Option<usize> {
    let target = match steps.last() {
        Some(Step::Key(_)) => Target::Key(0),
        _ => Target::Value,
    };
    match probe(text, steps, target) {
        (Found::Nothing, _) => None,
        (_, line) => line,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Nothing,
    Scalar,
    Collection,
}

/// Stop at the node itself, or at the key that holds it (the last step is a key): at the
/// key's first occurrence (`0`) or a repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Value,
    Key(usize),
}

/// Walk `steps` and fail at the target node; the failure's location is the node's.
fn probe(text: &str, steps: &[Step], target: Target) -> (Found, Option<usize>) {
    let found = Cell::new(Found::Nothing);
    let walk = Walk {
        steps,
        target,
        found: &found,
    };
    let result = walk.deserialize(serde_norway::Deserializer::from_str(text));
    let line = result.err().and_then(|e| e.location()).map(|l| l.line());
    match found.get() {
        Found::Nothing => (Found::Nothing, None),
        f => (f, line),
    }
}

/// The message of the deliberate failure (never shown).
const HERE: &str = "keygate: probe reached its node";

#[derive(Clone, Copy)]
struct Walk<'a> {
    steps: &'a [Step],
    target: Target,
    found: &'a Cell<Found>,
}

impl Walk<'_> {
    /// At the end of the path: note what the node is, and fail here.
    fn here<T, E: de::Error>(self, what: Found) -> Result<T, E> {
        if self.steps.is_empty() {
            self.found.set(what);
        }
        Err(E::custom(HERE))
    }

    fn next(self) -> Self {
        Walk {
            steps: &self.steps[1..],
            ..self
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Step::Key(want)) = self.steps.first() else {
            return self.here(Found::Collection);
        };
        let last_key = match self.target {
            Target::Key(nth) if self.steps.len() == 1 => Some(nth),
            _ => None,
        };
        let mut seen = 0;
        loop {
            let at_key = (last_key == Some(seen)).then_some(self.found);
            let Some(hit) = map.next_key_seed(KeyIs { want, at_key })? else {
                return Ok(());
            };
            if hit && last_key.is_none() {
                return map.next_value_seed(self.next());
            }
            seen += usize::from(hit);
            map.next_value::<IgnoredAny>()?;
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(&Step::Index(want)) = self.steps.first() else {
            return self.here(Found::Collection);
        };
        for _ in 0..want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(self.next()).map(|_| ())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here(Found::Scalar)
    }
    // A tagged node (`!!binary x`): failing leaves its content unread, which is fine.
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.here(Found::Scalar)
    }
}

/// A mapping key: is it the one wanted? With `at_key`, the wanted key is the target.
struct KeyIs<'a> {
    want: &'a str,
    at_key: Option<&'a Cell<Found>>,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match self.at_key {
            Some(found) if key == self.want => {
                found.set(Found::Scalar);
                Err(E::custom(HERE))
            }
            _ => Ok(key == self.want),
        }
    }

    // Keys that are not text: serde_path_to_error names them as they print.
    fn visit_bool<E: de::Error>(self, key: bool) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_i64<E: de::Error>(self, key: i64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_u64<E: de::Error>(self, key: u64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_f64<E: de::Error>(self, key: f64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, path: FieldPath) -> Option<usize> {
        line_of(text, &path)
    }

    #[test]
    fn paths_show_indices_from_one() {
        let p = FieldPath::keys("routes").index(0).key("scopes").index(2);
        assert_eq!(p.to_string(), "routes[1].scopes[3]");
        assert_eq!(p.zero_based(), "routes[0].scopes[2]");
        assert_eq!(
            FieldPath::keys("proxy.timeouts.idle").to_string(),
            "proxy.timeouts.idle"
        );
    }

    #[test]
    fn lines_of_values_keys_and_missing_fields() {
        let text = "\
# a comment
a:
  b:
    c: 1
  d: { e: [x, y] }
  f:
    long value
list:
  - k: v
  - { k: w }
";
        let keys = FieldPath::keys;
        assert_eq!(line(text, keys("a.b.c")), Some(4));
        // A collection under a key: the key's line.
        assert_eq!(line(text, keys("a.b")), Some(3));
        assert_eq!(line(text, keys("a")), Some(2));
        // Flow style, and a scalar on the line after its key.
        assert_eq!(line(text, keys("a.d.e").index(1)), Some(5));
        assert_eq!(line(text, keys("a.f")), Some(7));
        // List elements, block and flow.
        assert_eq!(line(text, keys("list").index(0).key("k")), Some(9));
        assert_eq!(line(text, keys("list").index(1).key("k")), Some(10));
        // Not written: the nearest mapping that is (a list element: its own line).
        assert_eq!(line(text, keys("a.b.zz")), Some(3));
        assert_eq!(line(text, keys("a.zz.yy")), Some(2));
        assert_eq!(line(text, keys("list").index(1).key("zz")), Some(10));
        assert_eq!(line(text, keys("list").index(5)), Some(8));
        assert_eq!(line(text, keys("zz")), Some(2));
        // A path through a scalar: the scalar's key.
        assert_eq!(line(text, keys("a.b.c.d")), Some(4));
    }

    #[test]
    fn a_repeated_key_is_found_where_it_repeats() {
        let text = "a:\n  b: 1\n  c: 2\n  b: 3\n";
        assert_eq!(line_of_repeat(text, &FieldPath::keys("a.b")), Some(4));
        assert_eq!(line_of_repeat(text, &FieldPath::keys("a.c")), None);
        assert_eq!(line(text, FieldPath::keys("a.b")), Some(2));
    }

    #[test]
    fn aliases_resolve_to_the_anchored_value() {
        let text = "x: &t 5 parsecs\na:\n  b: *t\n";
        assert_eq!(line(text, FieldPath::keys("a.b")), Some(1));
    }
}
