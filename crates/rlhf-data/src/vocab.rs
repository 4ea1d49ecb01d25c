//! A word-level tokenizer with a small chat template, for tests and toy worlds.
//!
//! Words are split like `tokenizers`' `Whitespace` pre-tokenizer (runs of word characters, runs
//! of punctuation); decoding joins tokens with single spaces, so `decode(encode(x))` gives back
//! the words of `x`. Special tokens: `<pad>` (0), `<unk>` (1), `<bos>` (2), `<eos>` (3),
//! `<|user|>`, `<|assistant|>`, `<|system|>`. BOS is added by `encode(.., true)`.

use rlhf_model::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// The special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
];

/// The chat template of [`word_level_tokenizer`]. It renders
/// `<bos> <|user|> hi <|assistant|> hello <eos> ` for `[user: hi, assistant: hello]`; a prefix of
/// a conversation (with the generation prompt `<|assistant|> `) renders to a text prefix, so
/// assistant spans can be located.
pub const WORD_LEVEL_CHAT_TEMPLATE: &str = "{{ bos_token }} {% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% if m.role == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}";

/// Split text into word-level pieces the way the `Whitespace` pre-tokenizer does
/// (`\w+|[^\w\s]+`).
pub fn split_words(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut start: Option<(usize, bool)> = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some((s, _)) = start.take() {
                out.push(&text[s..i]);
            }
            continue;
        }
        let w = is_word(c);
        match start {
            Some((_, kind)) if kind == w => {}
            Some((s, _)) => {
                out.push(&text[s..i]);
                start = Some((i, w));
            }
            None => start = Some((i, w)),
        }
    }
    if let Some((s, _)) = start {
        out.push(&text[s..]);
    }
    out
}

/// The `tokenizer.json` text of a word-level tokenizer over `words` (each split with
/// [`split_words`]; duplicates and special tokens ignored).
pub fn word_level_tokenizer_json(words: &[&str]) -> String {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        added.push(json!({
            "id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for w in words.iter().flat_map(|w| split_words(w)) {
        if !vocab.contains_key(w) {
            let id = vocab.len();
            vocab.insert(w.to_string(), json!(id));
        }
    }
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": Value::Object(vocab), "unk_token": "<unk>"}
    });
    tj.to_string()
}

/// The `tokenizer_config.json` value of [`word_level_tokenizer`].
pub fn word_level_tokenizer_config() -> Value {
    json!({
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "chat_template": WORD_LEVEL_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

/// A word-level tokenizer over `words` (see the module docs), with BOS/EOS/PAD and a chat
/// template set.
pub fn word_level_tokenizer(words: &[&str]) -> Tokenizer {
    let inner: tokenizers::Tokenizer = word_level_tokenizer_json(words)
        .parse()
        .expect("the generated word-level tokenizer JSON is valid");
    Tokenizer::new(inner, word_level_tokenizer_config()).expect("word-level tokenizer config")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_model::tokenizer::ChatMessage;

    #[test]
    fn split_words_matches_whitespace_pretokenizer() {
        assert_eq!(
            split_words("Hello, world!! don't  x_1?"),
            vec!["Hello", ",", "world", "!!", "don", "'", "t", "x_1", "?"]
        );
    }

    #[test]
    fn round_trip_and_specials() {
        let tok = word_level_tokenizer(&["the cat sat", "on the mat.", "hello"]);
        assert_eq!(tok.bos_id(), Some(2));
        assert_eq!(tok.eos_id(), Some(3));
        assert_eq!(tok.pad_id(), 0);
        let ids = tok.encode("the cat sat on the mat.", true).unwrap();
        assert_eq!(ids[0], 2);
        assert_eq!(ids.len(), 8);
        assert_eq!(tok.decode(&ids, true).unwrap(), "the cat sat on the mat .");
        // Unknown words map to <unk>.
        let ids = tok.encode("the dog", false).unwrap();
        assert_eq!(ids[1], 1);
        // Specials are matched inside text.
        let ids = tok.encode("<|user|> hello <eos>", false).unwrap();
        assert_eq!(ids, vec![4, tok.token_to_id("hello").unwrap(), 3]);
    }

    #[test]
    fn chat_template_renders_and_has_prefix_property() {
        let tok = word_level_tokenizer(&["hi", "hello", "there"]);
        let msgs = vec![
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "hello there"),
        ];
        let full = tok.apply_chat_template(&msgs, false).unwrap();
        assert_eq!(full, "<bos> <|user|> hi <|assistant|> hello there <eos> ");
        let pre = tok.apply_chat_template(&msgs[..1], true).unwrap();
        assert_eq!(pre, "<bos> <|user|> hi <|assistant|> ");
        assert!(full.starts_with(&pre));
        let ids = tok.encode(&full, false).unwrap();
        let pre_ids = tok.encode(&pre, false).unwrap();
        assert_eq!(&ids[..pre_ids.len()], &pre_ids[..]);
        assert_eq!(ids.len(), pre_ids.len() + 3);
    }
}
