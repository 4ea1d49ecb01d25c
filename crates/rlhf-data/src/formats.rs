//! Dataset formats (TRL conventions, plus Alpaca and LLaMA-Factory ShareGPT), detected per row and
//! normalised to [`SftExample`], [`PreferencePair`] and [`Prompt`]. Every error names `file:line`.

use std::path::Path;

use anyhow::{bail, Result};
use rlhf_model::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::load::{load_record_set, RecordSet};

/// One supervised fine-tuning example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SftExample {
    /// `{"text"}`: language modelling, loss on every token.
    Text(String),
    /// `{"prompt","completion"}` as strings, or Alpaca `{"instruction","input","output"}`.
    /// Concatenated as-is (no separator is inserted), loss on the completion.
    PromptCompletion { prompt: String, completion: String },
    /// `{"messages"}` (or ShareGPT `{"conversations"}`): rendered with the chat template, loss on
    /// the assistant turns. Always contains at least one assistant turn.
    Chat(Vec<ChatMessage>),
    /// Conversational `{"prompt":[messages],"completion":[messages]}`: rendered with the chat
    /// template, loss on the completion messages only (assistant turns inside the prompt, e.g.
    /// few-shot history, get none).
    ChatPromptCompletion {
        prompt: Vec<ChatMessage>,
        completion: Vec<ChatMessage>,
    },
}

impl SftExample {
    /// Turn a plain prompt/completion into a one-turn conversation (user prompt, assistant
    /// completion) so that it is rendered with the chat template; other variants unchanged.
    pub fn into_chat(self) -> SftExample {
        match self {
            SftExample::PromptCompletion { prompt, completion } => {
                SftExample::ChatPromptCompletion {
                    prompt: vec![ChatMessage::new("user", &prompt)],
                    completion: vec![ChatMessage::new("assistant", &completion)],
                }
            }
            other => other,
        }
    }
}

/// A prompt: plain text (tokenised as-is) or a conversation (rendered with the chat template and
/// the generation prompt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// One preference pair: `chosen` preferred over `rejected` as continuations of `prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: Prompt,
    pub chosen: String,
    pub rejected: String,
    /// Optional per-pair margin (`"margin"` field).
    pub margin: Option<f32>,
    /// Pairs expanded from one ranking share a group id; every other record gets its own.
    /// Unique within one file (it is the record's index in the file).
    pub group: usize,
    /// 1-based line of the record in its file.
    pub source_line: usize,
}

/// A record that failed validation in lenient loading: where and why.
pub type Skipped = String;

// ---------------------------------------------------------------------------------------------
// Field helpers
// ---------------------------------------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn as_object<'a>(v: &'a Value, loc: &str) -> Result<&'a Map<String, Value>> {
    match v {
        Value::Object(o) => Ok(o),
        other => bail!("{loc}: expected a JSON object, found {}", type_name(other)),
    }
}

fn keys(o: &Map<String, Value>) -> String {
    let k: Vec<&str> = o.keys().map(|s| s.as_str()).collect();
    format!("[{}]", k.join(", "))
}

fn req<'a>(o: &'a Map<String, Value>, key: &str, loc: &str) -> Result<&'a Value> {
    match o.get(key) {
        Some(v) => Ok(v),
        None => bail!("{loc}: missing field `{key}` (record has keys {})", keys(o)),
    }
}

fn req_str(o: &Map<String, Value>, key: &str, loc: &str) -> Result<String> {
    match req(o, key, loc)? {
        Value::String(s) => Ok(s.clone()),
        other => bail!(
            "{loc}: field `{key}`: expected a string, found {}",
            type_name(other)
        ),
    }
}

/// A string field that may be absent or null (→ empty).
fn opt_str(o: &Map<String, Value>, key: &str, loc: &str) -> Result<String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!(
            "{loc}: field `{key}`: expected a string, found {}",
            type_name(other)
        ),
    }
}

/// Message content: a string, or a list of `{"type":"text","text"}` parts (joined).
fn content_str(v: &Value, what: &str, loc: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match p.get("text").and_then(|t| t.as_str()) {
                    Some(t) => out.push_str(t),
                    None => bail!("{loc}: {what}: content parts must be {{\"type\":\"text\",\"text\":...}} (non-text parts are not supported)"),
                }
            }
            Ok(out)
        }
        other => bail!(
            "{loc}: {what}: content must be a string, found {}",
            type_name(other)
        ),
    }
}

/// ShareGPT speaker names → chat roles.
fn sharegpt_role(from: &str, what: &str, loc: &str) -> Result<String> {
    Ok(match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" | "bot" => "assistant",
        "system" => "system",
        other => bail!(
            "{loc}: {what}: unsupported speaker `from: {other:?}` (expected human, gpt or system)"
        ),
    }
    .to_string())
}

/// One message: `{"role","content"}` or ShareGPT `{"from","value"}`.
fn parse_message(v: &Value, what: &str, loc: &str) -> Result<ChatMessage> {
    let Value::Object(m) = v else {
        bail!(
            "{loc}: {what}: expected a message object {{\"role\",\"content\"}}, found {}",
            type_name(v)
        )
    };
    if let Some(role) = m.get("role") {
        let Value::String(role) = role else {
            bail!(
                "{loc}: {what}: `role` must be a string, found {}",
                type_name(role)
            )
        };
        let content = match m.get("content") {
            Some(c) => content_str(c, what, loc)?,
            None => bail!("{loc}: {what}: message has no `content`"),
        };
        Ok(ChatMessage {
            role: role.clone(),
            content,
        })
    } else if let Some(from) = m.get("from") {
        let Value::String(from) = from else {
            bail!(
                "{loc}: {what}: `from` must be a string, found {}",
                type_name(from)
            )
        };
        let role = sharegpt_role(from, what, loc)?;
        let content = match m.get("value") {
            Some(c) => content_str(c, what, loc)?,
            None => bail!("{loc}: {what}: message has no `value`"),
        };
        Ok(ChatMessage { role, content })
    } else {
        bail!(
            "{loc}: {what}: message needs `role`/`content` (or ShareGPT `from`/`value`), has keys {}",
            keys(m)
        )
    }
}

fn parse_messages(v: &Value, field: &str, loc: &str) -> Result<Vec<ChatMessage>> {
    let Value::Array(items) = v else {
        bail!(
            "{loc}: field `{field}`: expected a list of messages, found {}",
            type_name(v)
        )
    };
    if items.is_empty() {
        bail!("{loc}: field `{field}`: empty message list");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(m, &format!("field `{field}`[{i}]"), loc))
        .collect()
}

enum TextOrChat {
    Text(String),
    Chat(Vec<ChatMessage>),
}

fn text_or_chat(o: &Map<String, Value>, field: &str, loc: &str) -> Result<TextOrChat> {
    match req(o, field, loc)? {
        Value::String(s) => Ok(TextOrChat::Text(s.clone())),
        v @ Value::Array(_) => Ok(TextOrChat::Chat(parse_messages(v, field, loc)?)),
        other => bail!(
            "{loc}: field `{field}`: expected a string or a list of messages, found {}",
            type_name(other)
        ),
    }
}

/// A response given as a string, a one-message list `[{"role":"assistant",...}]`, or a single
/// message object (ShareGPT `{"from":"gpt","value"}`).
fn response_text(v: &Value, field: &str, loc: &str) -> Result<String> {
    let msg = match v {
        Value::String(s) => return Ok(s.clone()),
        Value::Array(items) => {
            if items.len() != 1 {
                bail!(
                    "{loc}: field `{field}`: a conversational response must be exactly one assistant message, found {} messages",
                    items.len()
                );
            }
            parse_message(&items[0], &format!("field `{field}`[0]"), loc)?
        }
        Value::Object(_) => parse_message(v, &format!("field `{field}`"), loc)?,
        other => bail!(
            "{loc}: field `{field}`: expected a string or an assistant message, found {}",
            type_name(other)
        ),
    };
    if msg.role != "assistant" {
        bail!(
            "{loc}: field `{field}`: the response message must have role assistant, found {:?}",
            msg.role
        );
    }
    Ok(msg.content)
}

fn has_assistant(msgs: &[ChatMessage]) -> bool {
    msgs.iter().any(|m| m.role == "assistant")
}

// ---------------------------------------------------------------------------------------------
// SFT
// ---------------------------------------------------------------------------------------------

/// Parse one SFT record (format detected from its keys).
pub fn parse_sft_record(v: &Value, loc: &str) -> Result<SftExample> {
    let o = as_object(v, loc)?;
    let ex = if o.contains_key("messages") || o.contains_key("conversations") {
        let field = if o.contains_key("messages") {
            "messages"
        } else {
            "conversations"
        };
        let mut msgs = parse_messages(&o[field], field, loc)?;
        if let Some(Value::String(sys)) = o.get("system") {
            if !sys.is_empty() && msgs.first().is_none_or(|m| m.role != "system") {
                msgs.insert(0, ChatMessage::new("system", sys));
            }
        }
        if !has_assistant(&msgs) {
            bail!("{loc}: conversation has no assistant turn (nothing to learn from)");
        }
        SftExample::Chat(msgs)
    } else if o.contains_key("prompt") && o.contains_key("completion") {
        match text_or_chat(o, "prompt", loc)? {
            TextOrChat::Text(prompt) => {
                let completion = match req(o, "completion", loc)? {
                    Value::String(s) => s.clone(),
                    other => bail!(
                        "{loc}: field `completion`: expected a string (the prompt is a string), found {}",
                        type_name(other)
                    ),
                };
                if completion.is_empty() {
                    bail!("{loc}: empty completion");
                }
                SftExample::PromptCompletion { prompt, completion }
            }
            TextOrChat::Chat(prompt) => {
                let completion = match req(o, "completion", loc)? {
                    Value::String(s) => vec![ChatMessage::new("assistant", s)],
                    v => parse_messages(v, "completion", loc)?,
                };
                if !has_assistant(&completion) {
                    bail!("{loc}: field `completion` has no assistant message (nothing to learn from)");
                }
                if completion.iter().all(|m| m.content.is_empty()) {
                    bail!("{loc}: empty completion");
                }
                SftExample::ChatPromptCompletion { prompt, completion }
            }
        }
    } else if o.contains_key("instruction") && o.contains_key("output") {
        let instruction = req_str(o, "instruction", loc)?;
        let input = opt_str(o, "input", loc)?;
        let completion = req_str(o, "output", loc)?;
        if completion.is_empty() {
            bail!("{loc}: empty `output`");
        }
        let prompt = if input.is_empty() {
            instruction
        } else {
            format!("{instruction}\n\n{input}")
        };
        SftExample::PromptCompletion { prompt, completion }
    } else if o.contains_key("text") {
        let text = req_str(o, "text", loc)?;
        if text.is_empty() {
            bail!("{loc}: empty `text`");
        }
        SftExample::Text(text)
    } else {
        bail!(
            "{loc}: unrecognised SFT record with keys {}; expected one of {{\"prompt\",\"completion\"}}, {{\"messages\"}}, {{\"conversations\"}}, {{\"instruction\",\"input\",\"output\"}}, {{\"text\"}}",
            keys(o)
        )
    };
    Ok(ex)
}

/// Parse every record of a loaded file as SFT data. Returns `(line, example)`.
pub fn parse_sft(rs: &RecordSet) -> Result<Vec<(usize, SftExample)>> {
    rs.rows
        .iter()
        .enumerate()
        .map(|(i, (line, v))| Ok((*line, parse_sft_record(v, &rs.loc(i))?)))
        .collect()
}

/// Load an SFT file (JSONL / JSON array, gzip or not). Any bad record is an error naming it.
pub fn load_sft(path: impl AsRef<Path>) -> Result<Vec<SftExample>> {
    let rs = load_record_set(path)?;
    Ok(parse_sft(&rs)?.into_iter().map(|(_, e)| e).collect())
}

// ---------------------------------------------------------------------------------------------
// Preferences
// ---------------------------------------------------------------------------------------------

const HH_ASSISTANT: &str = "\n\nAssistant:";

/// Split two transcripts that share a prompt (HH-RLHF style) into `(prompt, chosen, rejected)`.
/// The prompt is the longest common prefix cut just after the last `"\n\nAssistant:"` in it;
/// without that marker, the common prefix cut at its last whitespace.
pub fn split_implicit_prompt(chosen: &str, rejected: &str) -> Option<(String, String, String)> {
    let lcp = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| chosen.len().min(rejected.len()));
    // `lcp` is a char boundary in both strings (same prefix bytes).
    let common = &chosen[..lcp];
    let cut = match common.rfind(HH_ASSISTANT) {
        Some(i) => i + HH_ASSISTANT.len(),
        None => common
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map(|(i, _)| i)?,
    };
    if cut == 0 {
        return None;
    }
    Some((
        chosen[..cut].to_string(),
        chosen[cut..].to_string(),
        rejected[cut..].to_string(),
    ))
}

fn margin_of(o: &Map<String, Value>, loc: &str) -> Result<Option<f32>> {
    match o.get("margin") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n.as_f64().unwrap_or(f64::NAN) as f32)),
        Some(other) => bail!(
            "{loc}: field `margin`: expected a number, found {}",
            type_name(other)
        ),
    }
}

fn check_pair(chosen: &str, rejected: &str, loc: &str) -> Result<()> {
    if chosen.trim().is_empty() {
        bail!("{loc}: empty chosen response");
    }
    if rejected.trim().is_empty() {
        bail!("{loc}: empty rejected response");
    }
    if chosen == rejected {
        bail!("{loc}: chosen and rejected responses are identical");
    }
    Ok(())
}

/// Parse a ranking `[[best],[tied,tied],…]` over `k` completions into tiers, validating that it
/// names every index in `0..k` exactly once. A bare integer is a one-element tier, so a flat
/// list `[2,0,1]` is a strict order.
pub fn parse_ranking(v: &Value, k: usize, loc: &str) -> Result<Vec<Vec<usize>>> {
    let Value::Array(tiers) = v else {
        bail!(
            "{loc}: field `ranking`: expected a list of tiers like [[0],[2,1]], found {}",
            type_name(v)
        )
    };
    let idx = |x: &Value| -> Result<usize> {
        match x.as_u64() {
            Some(i) if (i as usize) < k => Ok(i as usize),
            Some(i) => bail!(
                "{loc}: field `ranking`: index {i} out of range (there are {k} completions, indices 0..{})",
                k - 1
            ),
            None => bail!(
                "{loc}: field `ranking`: expected completion indices (non-negative integers), found {x}"
            ),
        }
    };
    let mut seen = vec![false; k];
    let mut out = Vec::with_capacity(tiers.len());
    for t in tiers {
        let tier: Vec<usize> = match t {
            Value::Array(xs) => {
                if xs.is_empty() {
                    bail!("{loc}: field `ranking`: empty tier");
                }
                xs.iter().map(idx).collect::<Result<_>>()?
            }
            x => vec![idx(x)?],
        };
        for &i in &tier {
            if seen[i] {
                bail!("{loc}: field `ranking`: index {i} appears more than once");
            }
            seen[i] = true;
        }
        out.push(tier);
    }
    let missing: Vec<usize> = (0..k).filter(|&i| !seen[i]).collect();
    if !missing.is_empty() {
        bail!("{loc}: field `ranking`: completions {missing:?} are not ranked (every index in 0..{k} must appear once)");
    }
    Ok(out)
}

/// All `(better, worse)` index pairs between different tiers, best tiers first. With no ties
/// this is K·(K−1)/2 pairs; tied completions give none.
pub fn ranking_pairs(tiers: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (a, hi) in tiers.iter().enumerate() {
        for lo in &tiers[a + 1..] {
            for &i in hi {
                for &j in lo {
                    out.push((i, j));
                }
            }
        }
    }
    out
}

/// Parse one preference record into its pairs (several for a ranking).
pub fn parse_preference_record(
    v: &Value,
    loc: &str,
    line: usize,
    group: usize,
) -> Result<Vec<PreferencePair>> {
    let o = as_object(v, loc)?;
    let margin = margin_of(o, loc)?;
    let pair = |prompt: Prompt, chosen: String, rejected: String| -> Result<PreferencePair> {
        check_pair(&chosen, &rejected, loc)?;
        Ok(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin,
            group,
            source_line: line,
        })
    };
    if o.contains_key("completions") || o.contains_key("ranking") {
        let prompt = match text_or_chat(o, "prompt", loc)? {
            TextOrChat::Text(s) => Prompt::Text(s),
            TextOrChat::Chat(m) => Prompt::Chat(m),
        };
        let comps = match req(o, "completions", loc)? {
            Value::Array(c) => c,
            other => bail!(
                "{loc}: field `completions`: expected a list, found {}",
                type_name(other)
            ),
        };
        let k = comps.len();
        if k < 2 {
            bail!("{loc}: a ranking needs at least 2 completions, found {k}");
        }
        let texts: Vec<String> = comps
            .iter()
            .enumerate()
            .map(|(i, c)| response_text(c, &format!("completions[{i}]"), loc))
            .collect::<Result<_>>()?;
        for (i, t) in texts.iter().enumerate() {
            if t.trim().is_empty() {
                bail!("{loc}: completion {i} is empty");
            }
        }
        let tiers = parse_ranking(req(o, "ranking", loc)?, k, loc)?;
        return ranking_pairs(&tiers)
            .into_iter()
            .map(|(i, j)| {
                if texts[i] == texts[j] {
                    bail!("{loc}: completions {i} and {j} are identical but ranked differently");
                }
                pair(prompt.clone(), texts[i].clone(), texts[j].clone())
            })
            .collect();
    }
    match (o.contains_key("chosen"), o.contains_key("rejected")) {
        (true, false) => bail!(
            "{loc}: missing field `rejected` (record has keys {})",
            keys(o)
        ),
        (false, true) => bail!(
            "{loc}: missing field `chosen` (record has keys {})",
            keys(o)
        ),
        _ => {}
    }
    if !(o.contains_key("chosen") && o.contains_key("rejected")) {
        bail!(
            "{loc}: unrecognised preference record with keys {}; expected {{\"prompt\",\"chosen\",\"rejected\"}}, {{\"chosen\",\"rejected\"}} (implicit prompt), {{\"prompt\",\"completions\",\"ranking\"}} or {{\"conversations\",\"chosen\",\"rejected\"}}",
            keys(o)
        );
    }
    if o.contains_key("conversations") {
        let mut msgs = parse_messages(&o["conversations"], "conversations", loc)?;
        if let Some(Value::String(sys)) = o.get("system") {
            if !sys.is_empty() && msgs.first().is_none_or(|m| m.role != "system") {
                msgs.insert(0, ChatMessage::new("system", sys));
            }
        }
        let chosen = response_text(&o["chosen"], "chosen", loc)?;
        let rejected = response_text(&o["rejected"], "rejected", loc)?;
        return Ok(vec![pair(Prompt::Chat(msgs), chosen, rejected)?]);
    }
    if o.contains_key("prompt") {
        let prompt = match text_or_chat(o, "prompt", loc)? {
            TextOrChat::Text(s) => Prompt::Text(s),
            TextOrChat::Chat(m) => Prompt::Chat(m),
        };
        let chosen = response_text(&o["chosen"], "chosen", loc)?;
        let rejected = response_text(&o["rejected"], "rejected", loc)?;
        return Ok(vec![pair(prompt, chosen, rejected)?]);
    }
    // Implicit prompt.
    match (
        text_or_chat(o, "chosen", loc)?,
        text_or_chat(o, "rejected", loc)?,
    ) {
        (TextOrChat::Text(c), TextOrChat::Text(r)) => {
            if c == r {
                bail!("{loc}: chosen and rejected responses are identical");
            }
            let Some((p, c, r)) = split_implicit_prompt(&c, &r) else {
                bail!("{loc}: implicit prompt: `chosen` and `rejected` share no common prompt prefix (add a `prompt` field)")
            };
            Ok(vec![pair(Prompt::Text(p), c, r)?])
        }
        (TextOrChat::Chat(c), TextOrChat::Chat(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if n == c.len() && n == r.len() {
                bail!("{loc}: chosen and rejected conversations are identical");
            }
            if n == 0 {
                bail!("{loc}: implicit prompt: `chosen` and `rejected` share no leading messages (add a `prompt` field)");
            }
            let tail = |m: &[ChatMessage], which: &str| -> Result<String> {
                match m {
                    [one] if one.role == "assistant" => Ok(one.content.clone()),
                    _ => bail!("{loc}: implicit prompt: after the shared messages, `{which}` must be exactly one assistant message (found {})", m.len()),
                }
            };
            let chosen = tail(&c[n..], "chosen")?;
            let rejected = tail(&r[n..], "rejected")?;
            Ok(vec![pair(Prompt::Chat(c[..n].to_vec()), chosen, rejected)?])
        }
        _ => bail!("{loc}: `chosen` and `rejected` must both be strings or both message lists"),
    }
}

/// Parse every record of a loaded file as preference data. With `strict`, the first bad record
/// is the error; otherwise bad records are skipped and listed (`file:line: reason`).
pub fn parse_preferences(
    rs: &RecordSet,
    strict: bool,
) -> Result<(Vec<PreferencePair>, Vec<Skipped>)> {
    let mut pairs = Vec::new();
    let mut skipped = Vec::new();
    for (i, (line, v)) in rs.rows.iter().enumerate() {
        match parse_preference_record(v, &rs.loc(i), *line, i) {
            Ok(p) => pairs.extend(p),
            Err(e) if !strict => skipped.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if pairs.is_empty() {
        bail!(
            "{}: no usable preference pairs ({} records skipped{})",
            rs.path,
            skipped.len(),
            skipped
                .first()
                .map(|s| format!("; first: {s}"))
                .unwrap_or_default()
        );
    }
    Ok((pairs, skipped))
}

/// Load a preference file; any bad record is an error naming `file:line`.
pub fn load_preferences(path: impl AsRef<Path>) -> Result<Vec<PreferencePair>> {
    let rs = load_record_set(path)?;
    Ok(parse_preferences(&rs, true)?.0)
}

/// Load a preference file, skipping (and reporting) records that fail validation. Broken JSON is
/// still an error.
pub fn load_preferences_lenient(
    path: impl AsRef<Path>,
) -> Result<(Vec<PreferencePair>, Vec<Skipped>)> {
    let rs = load_record_set(path)?;
    parse_preferences(&rs, false)
}

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

/// The first `n_words` whitespace-separated words of `text`, as a text prompt.
pub fn prompt_from_text(text: &str, n_words: usize) -> Prompt {
    Prompt::Text(
        text.split_whitespace()
            .take(n_words)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn parse_prompt_record(v: &Value, loc: &str, text_words: Option<usize>) -> Result<Prompt> {
    let o = as_object(v, loc)?;
    if o.contains_key("prompt") {
        let p = match text_or_chat(o, "prompt", loc)? {
            TextOrChat::Text(s) => Prompt::Text(s),
            TextOrChat::Chat(m) => Prompt::Chat(m),
        };
        if let Prompt::Text(s) = &p {
            if s.trim().is_empty() {
                bail!("{loc}: empty prompt");
            }
        }
        return Ok(p);
    }
    match text_words {
        Some(n) if o.contains_key("text") => {
            let p = prompt_from_text(&req_str(o, "text", loc)?, n);
            if matches!(&p, Prompt::Text(s) if s.is_empty()) {
                bail!("{loc}: empty `text`");
            }
            Ok(p)
        }
        Some(_) => bail!(
            "{loc}: expected a `prompt` or `text` field, record has keys {}",
            keys(o)
        ),
        None => bail!(
            "{loc}: missing field `prompt` (record has keys {})",
            keys(o)
        ),
    }
}

/// Load prompts (`{"prompt"}`, string or messages) for PPO/GRPO.
pub fn load_prompts(path: impl AsRef<Path>) -> Result<Vec<Prompt>> {
    let rs = load_record_set(path)?;
    (0..rs.rows.len())
        .map(|i| parse_prompt_record(&rs.rows[i].1, &rs.loc(i), None))
        .collect()
}

/// Load prompts from `{"prompt"}` rows or, for `{"text"}` rows (e.g. a sentiment corpus), the
/// first `n_words` words of the text.
pub fn load_text_prompts(path: impl AsRef<Path>, n_words: usize) -> Result<Vec<Prompt>> {
    let rs = load_record_set(path)?;
    (0..rs.rows.len())
        .map(|i| parse_prompt_record(&rs.rows[i].1, &rs.loc(i), Some(n_words)))
        .collect()
}
