//! Reading record files: JSON Lines or a JSON array, optionally gzip-compressed, with errors that
//! name `file:line` and what is wrong.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The records of one file, with enough context to name each one in an error message.
#[derive(Debug, Clone)]
pub struct RecordSet {
    /// The path as given, for messages.
    pub path: String,
    /// Whether the file is one JSON array (rather than JSON Lines).
    pub is_array: bool,
    /// `(line, value)`: the 1-based line where the record starts, and the record.
    pub rows: Vec<(usize, Value)>,
}

impl RecordSet {
    /// `file:line` for row `i` (`file:line (element i)` for a JSON array).
    pub fn loc(&self, i: usize) -> String {
        let line = self.rows[i].0;
        if self.is_array {
            format!("{}:{} (element {})", self.path, line, i)
        } else {
            format!("{}:{}", self.path, line)
        }
    }
}

/// Read a file's text, transparently gunzipping (by `.gz` extension or gzip magic bytes).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let gz = path.extension().is_some_and(|e| e == "gz") || bytes.starts_with(&[0x1f, 0x8b]);
    let text = if gz {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .with_context(|| {
                format!("{}: cannot decompress gzip (or not UTF-8)", path.display())
            })?;
        s
    } else {
        String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?
    };
    Ok(match text.strip_prefix('\u{feff}') {
        Some(s) => s.to_string(),
        None => text,
    })
}

/// Load every record of a JSON Lines file (blank lines skipped) or a JSON array file (first
/// non-space character `[`), gzip or not. Returns `(line, value)` pairs, `line` 1-based.
pub fn load_records(path: impl AsRef<Path>) -> Result<Vec<(usize, Value)>> {
    Ok(load_record_set(path)?.rows)
}

/// Like [`load_records`], keeping the context needed for `file:line` messages.
pub fn load_record_set(path: impl AsRef<Path>) -> Result<RecordSet> {
    let path = path.as_ref();
    let text = read_text(path)?;
    parse_record_text(&path.display().to_string(), &text)
}

/// Parse already-read text (see [`load_records`]); `name` is used in messages.
pub fn parse_record_text(name: &str, text: &str) -> Result<RecordSet> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        bail!("{name}: empty file (no records)");
    }
    if trimmed.starts_with('[') {
        let rows = parse_array(name, text)?;
        if rows.is_empty() {
            bail!("{name}: empty JSON array (no records)");
        }
        return Ok(RecordSet {
            path: name.to_string(),
            is_array: true,
            rows,
        });
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) => rows.push((lineno, v)),
            Err(e) => {
                let mut msg = format!(
                    "{name}:{lineno}: broken JSON at column {}: {}",
                    e.column(),
                    strip_serde_position(&e.to_string())
                );
                if rows.is_empty() && e.is_eof() && line.trim_start().starts_with('{') {
                    msg.push_str(
                        " (expected JSON Lines, one object per line, or a JSON array; \
                         a pretty-printed single object is not a dataset)",
                    );
                }
                bail!(msg);
            }
        }
    }
    Ok(RecordSet {
        path: name.to_string(),
        is_array: false,
        rows,
    })
}

/// serde_json appends " at line L column C"; we print our own position.
fn strip_serde_position(s: &str) -> &str {
    match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s,
    }
}

/// Parse a JSON array, returning each element with the line it starts on.
fn parse_array(name: &str, text: &str) -> Result<Vec<(usize, Value)>> {
    let values: Vec<Value> = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let what = if e.is_data() {
                "not a JSON array".to_string()
            } else {
                format!("broken JSON: {}", strip_serde_position(&e.to_string()))
            };
            let elem = element_at_line(text, e.line())
                .map(|i| format!(" (in element {i})"))
                .unwrap_or_default();
            bail!("{name}:{}:{}{elem}: {what}", e.line(), e.column());
        }
    };
    let starts = element_start_lines(text);
    if starts.len() != values.len() {
        // Should not happen for valid JSON; fall back to line 1 rather than misreport.
        return Ok(values.into_iter().map(|v| (1, v)).collect());
    }
    Ok(starts.into_iter().zip(values).collect())
}

/// 1-based start lines of the top-level elements of a JSON array text (assumed well-formed up
/// to where it is scanned).
fn element_start_lines(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut line = 1usize;
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escape = false;
    let mut expecting = false; // at depth 1, waiting for an element to start
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expecting && b != b']' {
            out.push(line);
            expecting = false;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    out
}

/// Index of the element that contains `line` (the last element starting at or before it).
fn element_at_line(text: &str, line: usize) -> Option<usize> {
    let starts = element_start_lines(text);
    let n = starts.iter().take_while(|&&l| l <= line).count();
    n.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_skips_blank_lines_and_keeps_line_numbers() {
        let rs = parse_record_text("f.jsonl", "{\"a\":1}\n\n  \n{\"a\":2}\n").unwrap();
        assert_eq!(rs.rows.len(), 2);
        assert_eq!(rs.rows[0].0, 1);
        assert_eq!(rs.rows[1].0, 4);
        assert_eq!(rs.loc(1), "f.jsonl:4");
    }

    #[test]
    fn jsonl_broken_line_is_named() {
        let err = parse_record_text("f.jsonl", "{\"a\":1}\n{\"a\":\n{\"a\":3}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.jsonl:2: broken JSON"), "{err}");
    }

    #[test]
    fn array_elements_get_start_lines() {
        let text = "[\n  {\"a\": \"x]\\\"{\"},\n  {\n    \"a\": [1, 2]\n  },\n  3\n]\n";
        let rs = parse_record_text("f.json", text).unwrap();
        let lines: Vec<usize> = rs.rows.iter().map(|r| r.0).collect();
        assert_eq!(lines, vec![2, 3, 6]);
        assert_eq!(rs.loc(1), "f.json:3 (element 1)");
    }

    #[test]
    fn array_broken_json_names_line_and_element() {
        let text = "[\n {\"a\": 1},\n {\"a\": 2,},\n {\"a\": 3}\n]";
        let err = parse_record_text("f.json", text).unwrap_err().to_string();
        assert!(err.starts_with("f.json:3:"), "{err}");
        assert!(err.contains("element 1"), "{err}");
        assert!(err.contains("broken JSON"), "{err}");
    }

    #[test]
    fn empty_inputs_are_errors() {
        for t in ["", "  \n\n", "[]", " [ \n ] "] {
            let err = parse_record_text("e.json", t).unwrap_err().to_string();
            assert!(err.contains("empty"), "{t:?}: {err}");
        }
    }

    #[test]
    fn pretty_printed_object_gets_a_hint() {
        let err = parse_record_text("p.json", "{\n \"a\": 1\n}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("p.json:1:"), "{err}");
        assert!(err.contains("JSON Lines"), "{err}");
    }
}
