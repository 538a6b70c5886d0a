//! Constrained decoding to a JSON object of known keys.
//!
//! A [`JsonSchema`] says which keys an answer may have, which it must have,
//! and, where the training answers show only a few, which values a key takes.
//! A [`JsonMatcher`] reads an answer byte by byte and accepts exactly the
//! prefixes of objects that fit the schema; before each token is chosen, the
//! tokens whose bytes it would refuse are masked out, and the end of the turn
//! is allowed only once the object is closed. So a prompted model gets, for
//! free, the valid JSON a grammar gives, and only the choice of values is its own.

mod value;

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use value::{AnyValue, Fed};

/// A key's values are limited to those seen in training when there are at
/// most this many, all strings, numbers, booleans or null.
pub const MAX_CHOICES: usize = 12;

/// Spaces, tabs or newlines allowed in a row between the tokens of the object.
const MAX_WHITESPACE: u8 = 8;

/// The shape of a JSON object answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonSchema {
    /// The keys, in sorted order.
    pub fields: Vec<JsonField>,
}

/// One key of a [`JsonSchema`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonField {
    /// The key.
    pub key: String,
    /// Whether every answer has it (the object cannot close without it).
    pub required: bool,
    /// The values it may take (`None`: any JSON value).
    pub one_of: Option<Vec<Value>>,
}

impl JsonSchema {
    /// The schema of `answers` when every one is a JSON object (`None`
    /// otherwise): the keys seen, each required when every answer has it,
    /// and its values limited to those seen when they are few and scalar.
    pub fn from_answers(answers: &[&str]) -> Option<Self> {
        let objects: Vec<serde_json::Map<String, Value>> = answers
            .iter()
            .map(|a| match serde_json::from_str(a.trim()) {
                Ok(Value::Object(o)) => Some(o),
                _ => None,
            })
            .collect::<Option<_>>()?;
        if objects.is_empty() {
            return None;
        }
        let mut order: Vec<String> = Vec::new();
        let mut seen: BTreeMap<String, (usize, Vec<Value>)> = BTreeMap::new();
        for o in &objects {
            for (k, v) in o {
                let entry = seen.entry(k.clone()).or_insert_with(|| {
                    order.push(k.clone());
                    (0, Vec::new())
                });
                entry.0 += 1;
                if !entry.1.contains(v) {
                    entry.1.push(v.clone());
                }
            }
        }
        let fields = order
            .into_iter()
            .map(|key| {
                let (count, values) = seen.remove(&key).expect("every key was seen");
                let scalar = values.iter().all(|v| !v.is_object() && !v.is_array());
                JsonField {
                    required: count == objects.len(),
                    one_of: (scalar && values.len() <= MAX_CHOICES).then_some(values),
                    key,
                }
            })
            .collect::<Vec<_>>();
        // The matcher keeps the keys used in a 64-bit set.
        (fields.len() <= 64).then_some(Self { fields })
    }
}

/// Where a [`JsonMatcher`] is in the object.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Before `{`.
    Start,
    /// After `{` (`first`) or a comma: a key, or `}` after `{`.
    Open { first: bool },
    /// Inside a key: the bytes so far, opening quote included.
    Key(Vec<u8>),
    /// After field `0`'s key: the colon.
    Colon(usize),
    /// After the colon: field `0`'s value begins.
    ValueStart(usize),
    /// Inside one of field `0`'s allowed values: the bytes so far.
    Choice(usize, Vec<u8>),
    /// Inside a value of any shape.
    Any(AnyValue),
    /// After a value: a comma or `}`.
    AfterValue,
    /// The object is closed.
    Done,
}

/// Reads an answer byte by byte, accepting exactly the prefixes of objects
/// that fit its schema.
#[derive(Debug, Clone)]
pub struct JsonMatcher<'s> {
    schema: &'s JsonSchema,
    /// The keys used so far, as bits.
    used: u64,
    state: State,
    /// Whitespace bytes in a row.
    whitespace: u8,
}

impl<'s> JsonMatcher<'s> {
    /// A matcher at the start of the answer.
    pub fn new(schema: &'s JsonSchema) -> Self {
        Self {
            schema,
            used: 0,
            state: State::Start,
            whitespace: 0,
        }
    }

    /// Whether the object is complete, so the answer may end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds `bytes`; false (leaving the matcher part-way) if any is refused.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed_byte(b))
    }

    /// Whether `bytes` would be accepted, leaving the matcher as it is.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        self.clone().feed(bytes)
    }

    fn quoted(&self, field: usize) -> Vec<u8> {
        serde_json::to_vec(&self.schema.fields[field].key).expect("a string serializes")
    }

    fn required_done(&self) -> bool {
        let fields = &self.schema.fields;
        (0..fields.len()).all(|i| !fields[i].required || self.used & (1 << i) != 0)
    }

    fn feed_byte(&mut self, b: u8) -> bool {
        let space = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        let between = matches!(
            self.state,
            State::Start
                | State::Open { .. }
                | State::Colon(_)
                | State::ValueStart(_)
                | State::AfterValue
        );
        if space && between {
            self.whitespace += 1;
            return self.whitespace <= MAX_WHITESPACE;
        }
        self.whitespace = 0;
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start if b == b'{' => self.state = State::Open { first: true },
            State::Open { first } if b == b'}' && first && self.required_done() => {}
            State::Open { .. } if b == b'"' => self.state = State::Key(vec![b]),
            State::Key(mut key) => {
                key.push(b);
                let unused = (0..self.schema.fields.len()).filter(|i| self.used & (1 << i) == 0);
                let matches: Vec<usize> = unused
                    .filter(|&i| self.quoted(i).starts_with(&key))
                    .collect();
                self.state = match matches.iter().find(|&&i| self.quoted(i) == key) {
                    Some(&i) => {
                        self.used |= 1 << i;
                        State::Colon(i)
                    }
                    None if !matches.is_empty() => State::Key(key),
                    None => return false,
                };
            }
            State::Colon(field) if b == b':' => self.state = State::ValueStart(field),
            State::ValueStart(field) => {
                self.state = match self.schema.fields[field].one_of {
                    Some(_) => State::Choice(field, Vec::new()),
                    None => State::Any(AnyValue::default()),
                };
                return self.feed_byte(b);
            }
            State::Choice(field, mut text) => {
                let options: Vec<Vec<u8>> = self.schema.fields[field]
                    .one_of
                    .iter()
                    .flatten()
                    .map(|v| serde_json::to_vec(v).expect("a value serializes"))
                    .collect();
                let complete = options.contains(&text);
                text.push(b);
                if options.iter().any(|o| o.starts_with(&text)) {
                    // A value that no other option extends ends here.
                    let extended = options
                        .iter()
                        .any(|o| o.len() > text.len() && o.starts_with(&text));
                    self.state = match options.contains(&text) && !extended {
                        true => State::AfterValue,
                        false => State::Choice(field, text),
                    };
                } else if complete {
                    // A number that ended at a byte of what follows it.
                    self.state = State::AfterValue;
                    return self.feed_byte(b);
                } else {
                    return false;
                }
            }
            State::Any(mut value) => match value.feed(b) {
                Fed::Took => {
                    self.state = match value.is_done() {
                        true => State::AfterValue,
                        false => State::Any(value),
                    }
                }
                Fed::EndedBefore => {
                    self.state = State::AfterValue;
                    return self.feed_byte(b);
                }
                Fed::Refused => return false,
            },
            State::AfterValue if b == b',' => {
                let all = self.schema.fields.len();
                if self.used.count_ones() as usize >= all {
                    return false;
                }
                self.state = State::Open { first: false };
            }
            State::AfterValue if b == b'}' && self.required_done() => {}
            _ => return false,
        }
        true
    }
}

/// Chooses the next token from `logits` (`[vocab]`, f32) with `sampler`
/// among the tokens whose bytes (`token_bytes`, by id) `matcher` accepts, and
/// feeds it to the matcher. Once the object is closed, or when no token fits,
/// the choice is the first of `eos`, which ends the answer.
pub(crate) fn choose(
    logits: &candle_core::Tensor,
    sampler: &mut candle_transformers::generation::LogitsProcessor,
    greedy: bool,
    matcher: &mut JsonMatcher,
    token_bytes: &[Option<Vec<u8>>],
    eos: &[u32],
) -> anyhow::Result<u32> {
    let end = eos.first().copied().unwrap_or(0);
    if matcher.is_done() {
        return Ok(end);
    }
    let fits = |id: usize| {
        token_bytes
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|b| !b.is_empty() && matcher.accepts(b))
    };
    let mut scores: Vec<f32> = logits.to_vec1()?;
    let chosen = if greedy {
        // Best first: usually the first or second candidate fits.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.into_iter().find(|&id| fits(id)).map(|id| id as u32)
    } else {
        let mut any = false;
        for (id, s) in scores.iter_mut().enumerate() {
            match fits(id) {
                true => any = true,
                false => *s = f32::NEG_INFINITY,
            }
        }
        match any {
            true => {
                let masked = candle_core::Tensor::new(scores.as_slice(), logits.device())?;
                Some(sampler.sample(&masked)?)
            }
            false => None,
        }
    };
    Ok(match chosen {
        Some(id) => {
            let fed = matcher.feed(token_bytes[id as usize].as_deref().unwrap_or_default());
            debug_assert!(fed, "a token that fits is accepted");
            id
        }
        None => end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> JsonSchema {
        JsonSchema::from_answers(&[
            r#"{"category": "billing", "priority": "low", "n": 3, "tags": ["a"]}"#,
            r#"{"category": "account", "priority": "high", "n": 10}"#,
        ])
        .unwrap()
    }

    fn accepts_whole(schema: &JsonSchema, text: &str) -> bool {
        let mut m = JsonMatcher::new(schema);
        m.feed(text.as_bytes()) && m.is_done()
    }

    #[test]
    fn the_schema_follows_the_training_answers() {
        let s = schema();
        let keys: Vec<(&str, bool)> = s
            .fields
            .iter()
            .map(|f| (f.key.as_str(), f.required))
            .collect();
        assert_eq!(
            keys,
            [
                ("category", true),
                ("n", true),
                ("priority", true),
                ("tags", false)
            ]
        );
        assert_eq!(s.fields[2].one_of.as_ref().unwrap().len(), 2);
        assert_eq!(s.fields[3].one_of, None, "arrays take any value");
        assert_eq!(
            JsonSchema::from_answers(&["{\"a\": 1}", "plain text"]),
            None
        );
    }

    #[test]
    fn objects_that_fit_the_schema_are_accepted() {
        let s = schema();
        for text in [
            r#"{"category": "billing", "priority": "low", "n": 3}"#,
            r#"{"priority":"high","category":"account","n":10,"tags":["x",{"y":[1.5e-3,true,null]}]}"#,
            "{\n  \"category\": \"billing\",\n  \"priority\": \"low\", \"n\": 10, \"tags\": []}",
            r#"{"n": 3, "tags": "a \"quoted\" \u00e9 word", "category": "account", "priority": "low"}"#,
        ] {
            assert!(accepts_whole(&s, text), "{text}");
        }
    }

    #[test]
    fn anything_else_is_refused_at_the_first_wrong_byte() {
        let s = schema();
        for (text, good) in [
            (r#"Sure! {"#, 0),
            (r#"{"category": "shipping""#, 14),
            (r#"{"colour": 1"#, 3),
            (r#"{"category": "billing", "category""#, 25),
            (r#"{"category": "billing", "priority": "low"}"#, 41),
            (r#"{"n": 30"#, 7),
            (r#"{"n": 3, "tags": [1,]"#, 20),
            (r#"{"n": 3, "tags": tru"#, 20),
        ] {
            let mut m = JsonMatcher::new(&s);
            let taken = text.bytes().take_while(|&b| m.feed(&[b])).count();
            assert_eq!(taken, good, "{text}");
        }
        let mut m = JsonMatcher::new(&s);
        assert!(m.feed(br#"{"n": 3, "category": "billing", "priority": "low""#));
        assert!(!m.is_done(), "open until }}");
        assert!(m.accepts(b"}") && !m.accepts(b"}}") && !m.accepts(&[b' '; 9]));
        assert!(m.feed(b"}") && m.is_done() && !m.accepts(b" "));
    }
}
