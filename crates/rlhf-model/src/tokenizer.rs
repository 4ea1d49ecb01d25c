//! Tokenizer and chat template: a Hugging Face `tokenizers::Tokenizer` plus the model's own Jinja
//! chat template (from `tokenizer_config.json` or GGUF metadata), rendered with `minijinja`.
//!
//! The tokenizer lives in the model crate (not in `rlhf-data`) because loading and saving a
//! checkpoint — an HF directory or a GGUF file — produces and writes it together with the weights.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One chat turn, in the `{"role", "content"}` shape used by TRL and HF chat templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw JSON of `tokenizer_config.json` (kept so that saving writes it back unchanged).
    config: serde_json::Value,
    chat_template: Option<String>,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    /// Whether `encode(.., add_special=true)` should prepend BOS itself (GGUF `add_bos_token`).
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn token_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Build from a `tokenizers` tokenizer and an HF `tokenizer_config.json` value (may be `{}`).
    pub fn new(inner: tokenizers::Tokenizer, config: serde_json::Value) -> Result<Self> {
        let lookup = |key: &str| -> Option<(String, u32)> {
            let s = config.get(key).and_then(token_str)?;
            let id = inner.token_to_id(&s)?;
            Some((s, id))
        };
        let bos = lookup("bos_token");
        let eos = lookup("eos_token");
        let pad = lookup("pad_token");
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // Newer configs may hold a list of named templates; take "default".
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| a.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        let add_bos = config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            inner,
            config,
            chat_template,
            bos,
            eos,
            pad,
            add_bos,
        })
    }

    /// Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a directory.
    /// A `chat_template.jinja` file, when present, overrides the config's template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?;
        let tc = dir.join("tokenizer_config.json");
        let mut config = if tc.exists() {
            let s = std::fs::read_to_string(&tc).with_context(|| format!("{}", tc.display()))?;
            serde_json::from_str(&s).with_context(|| format!("{}: malformed JSON", tc.display()))?
        } else {
            serde_json::json!({})
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let t = std::fs::read_to_string(&jinja)?;
            config["chat_template"] = serde_json::Value::String(t);
        }
        Self::new(inner, config)
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tj = dir.join("tokenizer.json");
        self.inner
            .save(&tj, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot save tokenizer: {e}", tj.display()))?;
        let mut config = self.config.clone();
        if !config.is_object() {
            config = serde_json::json!({});
        }
        if let Some(t) = &self.chat_template {
            config["chat_template"] = serde_json::Value::String(t.clone());
        }
        for (key, tok) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
        ] {
            if let Some((s, _)) = tok {
                config[key] = serde_json::Value::String(s.clone());
            }
        }
        if config.get("tokenizer_class").is_none() {
            config["tokenizer_class"] = serde_json::Value::String("PreTrainedTokenizerFast".into());
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(())
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|b| b.1)
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|b| b.0.as_str())
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.0.as_str())
    }
    /// The padding id: the configured pad token, else EOS, else 0. Padding is always masked, so
    /// its value never reaches a loss.
    pub fn pad_id(&self) -> u32 {
        self.pad
            .as_ref()
            .map(|p| p.1)
            .or(self.eos_id())
            .unwrap_or(0)
    }
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn set_eos(&mut self, tok: &str) -> Result<()> {
        let Some(id) = self.inner.token_to_id(tok) else {
            bail!("EOS token {tok:?} is not in the vocabulary")
        };
        self.eos = Some((tok.to_string(), id));
        Ok(())
    }
    pub fn set_bos(&mut self, tok: &str) -> Result<()> {
        let Some(id) = self.inner.token_to_id(tok) else {
            bail!("BOS token {tok:?} is not in the vocabulary")
        };
        self.bos = Some((tok.to_string(), id));
        Ok(())
    }
    pub fn set_pad(&mut self, tok: &str) -> Result<()> {
        let Some(id) = self.inner.token_to_id(tok) else {
            bail!("PAD token {tok:?} is not in the vocabulary")
        };
        self.pad = Some((tok.to_string(), id));
        Ok(())
    }
    pub fn set_chat_template(&mut self, t: Option<String>) {
        self.chat_template = t;
    }
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Encode text. With `add_special`, the tokenizer's post-processor runs (and BOS is prepended
    /// when the config asks for it and the post-processor did not).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    /// Render a conversation with the model's own chat template. Fails with a clear message when
    /// the model has no template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this tokenizer has no chat template (tokenizer_config.json has no `chat_template`); use plain prompt/completion data or set one")
        };
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token().unwrap_or(""),
            self.eos_token().unwrap_or(""),
        )
    }
}

/// Render an HF Jinja chat template (Python-compatible string methods enabled).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
    let tmpl = env.get_template("chat")?;
    let out = tmpl
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| anyhow::anyhow!("chat template failed to render: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let msgs = vec![ChatMessage::new("user", "Hi there")];
        let s = render_chat_template(CHATML, &msgs, true, "", "").unwrap();
        assert_eq!(
            s,
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = render_chat_template(CHATML, &msgs, false, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nHi there<|im_end|>\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() }}";
        let ok =
            render_chat_template(t, &[ChatMessage::new("user", "  x  ")], false, "", "").unwrap();
        assert_eq!(ok, "x");
        let err = render_chat_template(t, &[ChatMessage::new("system", "x")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }
}
