//! Parsing the real data sets in `../shared/data` (skipped, with a message, when absent).

use std::path::PathBuf;

use rlhf_data::{
    collate_pairs, load_preferences, load_preferences_lenient, load_records, load_sft,
    load_text_prompts, tokenize_pairs, tokenize_sft, word_level_tokenizer, PairTokenizeConfig,
    Prompt, SftExample, SftTokenizeConfig,
};

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")).join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not found (shared data absent)", p.display());
        None
    }
}

#[test]
fn hh_rlhf_implicit_prompts() {
    for set in ["helpful-base", "harmless-base"] {
        let Some(path) = shared(&format!("hh-rlhf/{set}/test.jsonl.gz")) else {
            return;
        };
        let raw = load_records(&path).unwrap();
        let (pairs, skipped) = load_preferences_lenient(&path).unwrap();
        assert_eq!(pairs.len() + skipped.len(), raw.len(), "{set}");
        eprintln!(
            "{set}: {} pairs, {} rows skipped",
            pairs.len(),
            skipped.len()
        );
        for s in skipped.iter().take(3) {
            eprintln!("  skipped: {s}");
        }
        assert!(raw.len() > 2000, "{set}: {}", raw.len());
        // Only a handful of rows are unusable (identical or empty responses).
        assert!(
            skipped.len() * 100 < raw.len(),
            "{set}: skipped {skipped:?}"
        );
        for s in &skipped {
            assert!(s.contains("test.jsonl.gz:"), "{s}");
        }
        let by_line: std::collections::HashMap<usize, &serde_json::Value> =
            raw.iter().map(|(l, v)| (*l, v)).collect();
        for p in &pairs {
            let Prompt::Text(prompt) = &p.prompt else {
                panic!("HH prompts are text")
            };
            assert!(prompt.starts_with("\n\nHuman:"), "{prompt:?}");
            assert!(prompt.ends_with("\n\nAssistant:"), "{prompt:?}");
            let row = by_line[&p.source_line];
            assert_eq!(
                format!("{prompt}{}", p.chosen),
                row["chosen"].as_str().unwrap()
            );
            assert_eq!(
                format!("{prompt}{}", p.rejected),
                row["rejected"].as_str().unwrap()
            );
            assert_ne!(p.chosen, p.rejected);
        }
        if set == "helpful-base" {
            let first = &pairs[0];
            assert_eq!(
                first.prompt,
                Prompt::Text(
                    "\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:"
                        .into()
                )
            );
            assert!(first
                .chosen
                .starts_with(" To be honest, I don’t know anything about that."));
            assert!(first
                .rejected
                .starts_with(" I know that the American Indians"));
        }
        // Strict loading fails on the first bad row, naming it.
        if let Some(first_bad) = skipped.first() {
            let err = load_preferences(&path).unwrap_err().to_string();
            assert_eq!(&err, first_bad);
        }
    }
}

#[test]
fn alpaca_demo_parses_999_rows() {
    let Some(path) = shared("sft/alpaca_en_demo.json") else {
        return;
    };
    let ex = load_sft(&path).unwrap();
    assert_eq!(ex.len(), 999);
    assert!(ex
        .iter()
        .all(|e| matches!(e, SftExample::PromptCompletion { .. })));
    let SftExample::PromptCompletion { prompt, completion } = &ex[0] else {
        unreachable!()
    };
    assert_eq!(prompt, "Describe a process of making crepes.");
    assert!(completion.starts_with("Making crepes is an easy and delicious process!"));
    // Rows with an input get "instruction\n\ninput".
    let raw = load_records(&path).unwrap();
    let (i, row) = raw
        .iter()
        .enumerate()
        .find(|(_, (_, v))| !v["input"].as_str().unwrap_or("").is_empty())
        .map(|(i, (_, v))| (i, v))
        .expect("some row has an input");
    let SftExample::PromptCompletion { prompt, .. } = &ex[i] else {
        unreachable!()
    };
    assert_eq!(
        prompt,
        &format!(
            "{}\n\n{}",
            row["instruction"].as_str().unwrap(),
            row["input"].as_str().unwrap()
        )
    );
    // Tokenise a few with a word-level tokenizer over their own words.
    let words: Vec<String> = ex[..20]
        .iter()
        .map(|e| match e {
            SftExample::PromptCompletion { prompt, completion } => format!("{prompt} {completion}"),
            _ => unreachable!(),
        })
        .collect();
    let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let tok = word_level_tokenizer(&refs);
    let (out, st) = tokenize_sft(
        &tok,
        &ex[..20],
        &SftTokenizeConfig {
            max_len: 128,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(out
        .iter()
        .all(|o| o.len() <= 128 && !o.input_ids.contains(&1)));
    let long = out.iter().filter(|o| o.len() == 128).count();
    assert_eq!(st.truncated, long);
    assert!(st.truncated > 0, "some Alpaca outputs exceed 128 words");
}

#[test]
fn llamafactory_dpo_demo_parses() {
    let Some(path) = shared("preference-misc/llamafactory_dpo_en_demo.json") else {
        return;
    };
    let pairs = load_preferences(&path).unwrap();
    assert_eq!(pairs.len(), 300);
    for p in &pairs {
        let Prompt::Chat(m) = &p.prompt else {
            panic!("ShareGPT prompts are conversations")
        };
        assert!(!m.is_empty());
        assert!(m
            .iter()
            .all(|x| ["user", "assistant", "system"].contains(&x.role.as_str())));
        assert_eq!(m.last().unwrap().role, "user");
        assert!(!p.chosen.is_empty() && !p.rejected.is_empty());
    }
    let lines: Vec<usize> = pairs.iter().map(|p| p.source_line).collect();
    assert_eq!(lines[0], 2);
    assert!(lines.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        pairs.iter().map(|p| p.group).collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>()
    );

    // Tokenise through the chat template and collate.
    let text: Vec<String> = pairs[..10]
        .iter()
        .map(|p| {
            let Prompt::Chat(m) = &p.prompt else {
                unreachable!()
            };
            let mut s: Vec<String> = m.iter().map(|x| x.content.clone()).collect();
            s.push(p.chosen.clone());
            s.push(p.rejected.clone());
            s.join(" ")
        })
        .collect();
    let refs: Vec<&str> = text.iter().map(|s| s.as_str()).collect();
    let tok = word_level_tokenizer(&refs);
    let (tp, st) = tokenize_pairs(
        &tok,
        &pairs[..10],
        &PairTokenizeConfig {
            max_len: 96,
            max_prompt_len: None,
        },
    )
    .unwrap();
    assert_eq!(st.examples, 10);
    let assistant = tok.token_to_id("<|assistant|>").unwrap();
    for t in &tp {
        assert_eq!(*t.prompt_ids.last().unwrap(), assistant);
        assert!(t.prompt_ids.len() + t.chosen_ids.len().max(t.rejected_ids.len()) <= 96);
    }
    let pb = collate_pairs(tp.iter(), tok.pad_id());
    assert_eq!(pb.batch.batch, 20);
    for r in 0..20 {
        let last = pb.last_index[r];
        assert_eq!(pb.batch.attention_mask[r * pb.batch.seq_len + last], 1);
        assert_eq!(pb.batch.loss_mask[r * pb.batch.seq_len + last], 1);
        assert!(
            last + 1 == pb.batch.seq_len
                || pb.batch.attention_mask[r * pb.batch.seq_len + last + 1] == 0
        );
    }
}

#[test]
fn sentiment_text_rows_become_prompts() {
    let Some(path) = shared("sentiment/sentence_polarity.jsonl") else {
        return;
    };
    let ps = load_text_prompts(&path, 4).unwrap();
    assert_eq!(ps.len(), 10662);
    assert_eq!(ps[0], Prompt::Text("the rock is destined".into()));
    assert!(ps.iter().all(|p| match p {
        Prompt::Text(s) => (1..=4).contains(&s.split(' ').count()),
        Prompt::Chat(_) => false,
    }));
}
