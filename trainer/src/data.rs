//! Training data: JSONL in the three forms people have (OpenAI `messages`, ShareGPT
//! `conversations`, Alpaca `instruction/input/output`, LLaMA-Factory's names), detected per
//! file, and its encoding into token ids plus a mask of the tokens to train on: the assistant
//! turns' content and each turn's end token, never the prompt.

use bft_model::{ChatTemplate, Message};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}:{line}: {msg}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("encoding: {0}")]
    Encode(String),
}

/// The row layout of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"messages": [{"role", "content"}, ...]}`
    Messages,
    /// `{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?}`
    ShareGpt,
    /// `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`
    Alpaca,
}

/// One training conversation and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// 1-based line in its file.
    pub line: usize,
}

/// Rows read from a file, and how many were skipped as bad (with `skip_bad_rows`).
#[derive(Debug)]
pub struct Dataset {
    pub format: Format,
    pub conversations: Vec<Conversation>,
    pub skipped: usize,
}

fn detect(v: &Value) -> Option<Format> {
    if v.get("messages").is_some() {
        Some(Format::Messages)
    } else if v.get("conversations").is_some() {
        Some(Format::ShareGpt)
    } else if v.get("instruction").is_some() {
        Some(Format::Alpaca)
    } else {
        None
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{key}` must be a string"))
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.to_string(),
        content: content.to_string(),
    }
}

/// Parses one row in `format` into messages.
fn parse_row(v: &Value, format: Format) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    match format {
        Format::Messages => {
            let list = v["messages"]
                .as_array()
                .ok_or("`messages` must be a list")?;
            for (i, m) in list.iter().enumerate() {
                let role = text(m, "role").map_err(|e| format!("message {i}: {e}"))?;
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(format!(
                        "message {i}: unknown role `{role}` (system, user or assistant)"
                    ));
                }
                out.push(msg(
                    role,
                    text(m, "content").map_err(|e| format!("message {i}: {e}"))?,
                ));
            }
        }
        Format::ShareGpt => {
            if let Some(s) = v.get("system").and_then(Value::as_str) {
                out.push(msg("system", s));
            }
            let list = v["conversations"]
                .as_array()
                .ok_or("`conversations` must be a list")?;
            for (i, m) in list.iter().enumerate() {
                let role = match text(m, "from").map_err(|e| format!("turn {i}: {e}"))? {
                    "human" | "user" => "user",
                    "gpt" | "assistant" => "assistant",
                    "system" => "system",
                    other => {
                        return Err(format!(
                            "turn {i}: unknown speaker `{other}` (human, gpt or system)"
                        ));
                    }
                };
                out.push(msg(
                    role,
                    text(m, "value").map_err(|e| format!("turn {i}: {e}"))?,
                ));
            }
        }
        Format::Alpaca => {
            if let Some(s) = v.get("system").and_then(Value::as_str) {
                out.push(msg("system", s));
            }
            if let Some(history) = v.get("history").and_then(Value::as_array) {
                for (i, pair) in history.iter().enumerate() {
                    let p = pair
                        .as_array()
                        .filter(|p| p.len() == 2)
                        .ok_or(format!("history {i}: must be [question, answer]"))?;
                    let (q, a) = (p[0].as_str(), p[1].as_str());
                    let (Some(q), Some(a)) = (q, a) else {
                        return Err(format!("history {i}: must hold two strings"));
                    };
                    out.extend([msg("user", q), msg("assistant", a)]);
                }
            }
            let instruction = text(v, "instruction")?;
            let input = v.get("input").and_then(Value::as_str).unwrap_or("");
            // LLaMA-Factory's layout: the input follows the instruction on its own line.
            let user = if input.is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n{input}")
            };
            out.extend([msg("user", &user), msg("assistant", text(v, "output")?)]);
        }
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("no assistant reply to train on".into());
    }
    if out
        .iter()
        .any(|m| m.role == "assistant" && m.content.trim().is_empty())
    {
        return Err("an assistant reply is empty".into());
    }
    Ok(out)
}

/// Reads a JSONL file. The format is detected from the first row; every row must follow it.
/// A bad row is an error naming file and line, or, with `skip_bad_rows`, counted and skipped.
/// A file with no usable row is an error.
pub fn read_jsonl(path: &Path, skip_bad_rows: bool) -> Result<Dataset, DataError> {
    let body = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_owned(),
        error: e,
    })?;
    let (mut format, mut conversations, mut skipped) = (None, Vec::new(), 0);
    for (i, raw) in body.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(raw).map_err(|e| format!("invalid JSON: {e}")).and_then(|v| {
            let f = *format.get_or_insert(detect(&v).ok_or(
                "unknown row format: expected `messages` (OpenAI), `conversations` (ShareGPT) or `instruction` (Alpaca)",
            )?);
            if detect(&v) != Some(f) {
                return Err(format!("row is not in the file's {f:?} format"));
            }
            parse_row(&v, f)
        });
        match parsed {
            Ok(messages) => conversations.push(Conversation { messages, line }),
            Err(_) if skip_bad_rows => skipped += 1,
            Err(msg) => {
                return Err(DataError::Row {
                    path: path.to_owned(),
                    line,
                    msg,
                });
            }
        }
    }
    match format {
        Some(format) if !conversations.is_empty() => Ok(Dataset {
            format,
            conversations,
            skipped,
        }),
        _ => Err(DataError::File {
            path: path.to_owned(),
            msg: format!("no usable rows ({skipped} skipped)"),
        }),
    }
}

/// Token ids of a conversation and which of them are training targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Same length as `ids`: true for tokens of assistant replies and their end-of-turn token.
    pub target_mask: Vec<bool>,
}

/// Renders `conv` with the model's chat template and marks the assistant spans.
///
/// For assistant turn i, the template's rendering of turns `..i` with a generation prompt is
/// the text before the reply, and its rendering of turns `..=i` ends after it; the reply's
/// target span runs from the first to the end of the turn's last end-of-turn token (`eos`).
/// Tokens starting inside a span are targets. Sequences are cut to `cutoff_len` tokens.
pub fn encode(
    conv: &Conversation,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    eos: &str,
    cutoff_len: usize,
) -> Result<Encoded, DataError> {
    let enc_err = |m: String| DataError::Encode(format!("line {}: {m}", conv.line));
    let full = template
        .render(&conv.messages, false)
        .map_err(|e| enc_err(e.to_string()))?;
    let mut spans = Vec::new();
    for (i, _) in conv
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
    {
        let before = template
            .render(&conv.messages[..i], true)
            .map_err(|e| enc_err(e.to_string()))?;
        let through = template
            .render(&conv.messages[..=i], false)
            .map_err(|e| enc_err(e.to_string()))?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(enc_err(
                "the chat template does not render conversations prefix by prefix".into(),
            ));
        }
        let turn = &through[before.len()..];
        let end = match turn.rfind(eos).filter(|_| !eos.is_empty()) {
            Some(p) => before.len() + p + eos.len(),
            None => through.len(),
        };
        spans.push(before.len()..end);
    }
    let e = tokenizer
        .encode(full.as_str(), false)
        .map_err(|e| enc_err(e.to_string()))?;
    let mut ids = e.get_ids().to_vec();
    let mut target_mask: Vec<bool> = e
        .get_offsets()
        .iter()
        .map(|(s, _)| spans.iter().any(|r| r.contains(s)))
        .collect();
    ids.truncate(cutoff_len);
    target_mask.truncate(cutoff_len);
    Ok(Encoded { ids, target_mask })
}

/// Encodes every conversation (see `encode`).
pub fn encode_all(
    convs: &[Conversation],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    eos: &str,
    cutoff_len: usize,
) -> Result<Vec<Encoded>, DataError> {
    convs
        .iter()
        .map(|c| encode(c, tokenizer, template, eos, cutoff_len))
        .collect()
}

/// Response tokens there are to predict. Position 0 never counts: the first token has nothing
/// before it to predict it from.
pub fn count_targets(encoded: &[Encoded]) -> usize {
    encoded
        .iter()
        .map(|e| e.target_mask.iter().skip(1).filter(|&&t| t).count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file holding `body`, removed when the returned path is dropped.
    fn write(name: &str, body: &str) -> tempfile::TempPath {
        let f = tempfile::Builder::new()
            .prefix(&format!("bft-data-{name}-"))
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        std::fs::write(f.path(), body).unwrap();
        f.into_temp_path()
    }

    #[test]
    fn three_formats_give_the_same_conversation() {
        let rows = [
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\nI"}, {"role": "assistant", "content": "A"}]}"#,
            r#"{"system": "S", "conversations": [{"from": "human", "value": "Q\nI"}, {"from": "gpt", "value": "A"}]}"#,
            r#"{"system": "S", "instruction": "Q", "input": "I", "output": "A"}"#,
        ];
        let parsed: Vec<Vec<Message>> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                read_jsonl(&write(&format!("f{i}"), r), false)
                    .unwrap()
                    .conversations
                    .remove(0)
                    .messages
            })
            .collect();
        assert_eq!(parsed[0], parsed[1]);
        assert_eq!(parsed[0], parsed[2]);
        let ds = read_jsonl(
            &write(
                "hist",
                r#"{"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}"#,
            ),
            false,
        )
        .unwrap();
        let roles: Vec<&str> = ds.conversations[0]
            .messages
            .iter()
            .map(|m| m.role.as_str())
            .collect();
        assert_eq!(
            (ds.format, roles),
            (
                Format::Alpaca,
                vec!["user", "assistant", "user", "assistant"]
            )
        );
    }

    #[test]
    fn bad_rows_name_file_and_line_or_are_skipped_and_counted() {
        let good = r#"{"instruction": "q", "output": "a"}"#;
        let body = format!(
            "{good}\n\n{{not json\n{}\n{}\n",
            r#"{"instruction": "q", "output": "  "}"#, r#"{"messages": []}"#
        );
        let p = write("bad", &body);
        let e = read_jsonl(&p, false).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}:3: invalid JSON", p.display())),
            "{e}"
        );
        let ds = read_jsonl(&p, true).unwrap();
        assert_eq!((ds.conversations.len(), ds.skipped), (1, 3));
        let e = read_jsonl(&write("empty", "\n\n"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no usable rows"), "{e}");
        let e = read_jsonl(&write("unk", r#"{"prompt": "x"}"#), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":1:") && e.contains("unknown row format"), "{e}");
        let e = read_jsonl(&PathBuf::from("/nonexistent/x.jsonl"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
        let e = read_jsonl(
            &write("role", r#"{"messages": [{"role": "bot", "content": "x"}]}"#),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown role `bot`"));
    }
}
