//! JSONL records: `{"text"}`, `{"prompt", "completion"}` or `{"messages": [...]}`.
//! Every problem is a [`DataError`] naming the file, the line and the field.

use crate::chat::Message;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One training or evaluation example, as written in JSONL.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text, trained on as is (EOS appended).
    Text(String),
    /// A prompt and its completion: a user turn and an assistant turn.
    Completion {
        /// The user's message.
        prompt: String,
        /// The answer.
        completion: String,
    },
    /// A conversation with system, user and assistant turns.
    Chat(Vec<Message>),
}

impl Record {
    /// The record as chat messages (`None` for text records).
    pub fn messages(&self) -> Option<Vec<Message>> {
        match self {
            Record::Text(_) => None,
            Record::Completion { prompt, completion } => Some(vec![
                Message::user(prompt.clone()),
                Message::assistant(completion.clone()),
            ]),
            Record::Chat(m) => Some(m.clone()),
        }
    }
}

/// A problem with a data file, located precisely.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
pub struct DataError {
    /// The file.
    pub path: PathBuf,
    /// The 1-based line, when the problem is on a line.
    pub line: Option<usize>,
    /// The JSON field, when one is at fault.
    pub field: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl DataError {
    fn at(path: &Path, line: usize, field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line: Some(line),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// The roles a chat record may use.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn string_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<String, DataError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(DataError::at(
            path,
            line,
            Some(key),
            format!("expected a string, found {}", kind(other)),
        )),
        None => Err(DataError::at(path, line, Some(key), "missing")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one JSON line into a record.
pub fn parse_line(text: &str, path: &Path, line: usize) -> Result<Record, DataError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DataError::at(path, line, None, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(DataError::at(
            path,
            line,
            None,
            format!("expected a JSON object, found {}", kind(&value)),
        ));
    };
    if let Some(messages) = obj.get("messages") {
        let Value::Array(items) = messages else {
            return Err(DataError::at(
                path,
                line,
                Some("messages"),
                format!("expected an array, found {}", kind(messages)),
            ));
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Value::Object(m) = item else {
                return Err(DataError::at(
                    path,
                    line,
                    Some(&format!("messages[{i}]")),
                    format!("expected an object, found {}", kind(item)),
                ));
            };
            let role = string_field(m, "role", path, line).map_err(|e| DataError {
                field: Some(format!("messages[{i}].role")),
                ..e
            })?;
            if !ROLES.contains(&role.as_str()) {
                return Err(DataError::at(
                    path,
                    line,
                    Some(&format!("messages[{i}].role")),
                    format!("unknown role '{role}': use one of {}", ROLES.join(", ")),
                ));
            }
            let content = string_field(m, "content", path, line).map_err(|e| DataError {
                field: Some(format!("messages[{i}].content")),
                ..e
            })?;
            out.push(Message::new(role, content));
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err(DataError::at(
                path,
                line,
                Some("messages"),
                "has no assistant turn: there is nothing to learn from it",
            ));
        }
        return Ok(Record::Chat(out));
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        return Ok(Record::Completion {
            prompt: string_field(&obj, "prompt", path, line)?,
            completion: string_field(&obj, "completion", path, line)?,
        });
    }
    if obj.contains_key("text") {
        return Ok(Record::Text(string_field(&obj, "text", path, line)?));
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(DataError::at(
        path,
        line,
        None,
        format!(
            "no `text`, `prompt`/`completion` or `messages` field (found: {})",
            if keys.is_empty() {
                "none".into()
            } else {
                keys.join(", ")
            }
        ),
    ))
}

/// Reads every record of a JSONL file. Blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, DataError> {
    Ok(read_jsonl_located(path)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Reads every record of a JSONL file with its 1-based line number. A byte
/// order mark at the file's start (Windows editors and spreadsheet exports
/// write one) and Windows line ends are read as what they are, not data.
pub fn read_jsonl_located(path: &Path) -> Result<Vec<(usize, Record)>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError {
        path: path.to_path_buf(),
        line: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut records = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|e| {
            DataError::at(
                path,
                line,
                None,
                format!(
                    "not valid UTF-8 (bad byte at column {}); save the file as UTF-8",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        records.push((line, parse_line(text, path, line)?));
    }
    if records.is_empty() {
        return Err(DataError {
            path: path.to_path_buf(),
            line: None,
            field: None,
            message: "the file is empty: it holds no JSONL records".into(),
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> DataError {
        parse_line(text, Path::new("d.jsonl"), 7).unwrap_err()
    }

    #[test]
    fn parses_the_three_formats() {
        let p = Path::new("d.jsonl");
        assert_eq!(
            parse_line(r#"{"text": "hi"}"#, p, 1).unwrap(),
            Record::Text("hi".into())
        );
        assert!(matches!(
            parse_line(r#"{"prompt": "a", "completion": "b"}"#, p, 1).unwrap(),
            Record::Completion { .. }
        ));
        let chat = parse_line(r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}"#, p, 1).unwrap();
        assert_eq!(chat.messages().unwrap().len(), 5);
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err("{not json");
        assert_eq!(e.line, Some(7));
        assert!(
            e.to_string().starts_with("d.jsonl:7: not valid JSON"),
            "{e}"
        );
        let e = err(r#"{"prompt": "a", "completion": 3}"#);
        assert_eq!(e.field.as_deref(), Some("completion"));
        assert!(
            e.to_string().contains("expected a string, found a number"),
            "{e}"
        );
        let e = err(r#"{"prompt": "a"}"#);
        assert_eq!(e.field.as_deref(), Some("completion"));
        let e = err(r#"{"messages": [{"role": "robot", "content": "x"}]}"#);
        assert_eq!(e.field.as_deref(), Some("messages[0].role"));
        assert!(e.message.contains("unknown role 'robot'"));
        let e = err(r#"{"messages": [{"role": "user", "content": "x"}]}"#);
        assert!(e.message.contains("no assistant turn"));
        let e = err(r#"{"messages": [{"role": "user"}]}"#);
        assert_eq!(e.field.as_deref(), Some("messages[0].content"));
        let e = err(r#"{"input": 1}"#);
        assert!(e.message.contains("found: input"));
        assert!(err("[1]").message.contains("expected a JSON object"));
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "\n  \n").unwrap();
        assert!(read_jsonl(&empty).unwrap_err().message.contains("empty"));
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").unwrap();
        let e = read_jsonl(&bad).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("UTF-8"));
        let e = read_jsonl(&dir.path().join("missing.jsonl")).unwrap_err();
        assert!(e.message.contains("cannot read"));
    }

    /// A UTF-8 byte order mark and Windows line ends, as Notepad and
    /// spreadsheet exports save a file, read as the same records.
    #[test]
    fn a_byte_order_mark_and_windows_line_ends_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("windows.jsonl");
        std::fs::write(
            &path,
            b"\xEF\xBB\xBF{\"text\": \"one\"}\r\n{\"text\": \"two\"}\r\n",
        )
        .unwrap();
        let records = read_jsonl_located(&path).unwrap();
        assert_eq!(
            records,
            vec![
                (1, Record::Text("one".into())),
                (2, Record::Text("two".into()))
            ]
        );
        // Only at the start: elsewhere it is a character of the data.
        let inside = dir.path().join("inside.jsonl");
        std::fs::write(
            &inside,
            b"{\"text\": \"one\"}\n\xEF\xBB\xBF{\"text\": \"two\"}\n",
        )
        .unwrap();
        assert_eq!(read_jsonl(&inside).unwrap_err().line, Some(2));
    }
}
