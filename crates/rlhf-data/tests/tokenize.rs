//! Loss masks, EOS handling, chat spans, truncation counts, pairs and packing, with the
//! built-in word-level tokenizer.

use rlhf_data::tokenize::tokenize_response;
use rlhf_data::{
    collate_packed, pack, tokenize_pair, tokenize_pairs, tokenize_prompt, tokenize_sft,
    tokenize_sft_example, word_level_tokenizer, PairTokenizeConfig, PreferencePair, Prompt,
    SftExample, SftTokenizeConfig, TokenizedSft, TruncationStats,
};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};

const BOS: u32 = 2;
const EOS: u32 = 3;

fn tok() -> Tokenizer {
    word_level_tokenizer(&[
        "what is two plus two ? it is four . hello there how are you fine thanks",
        "be brief once upon a time the end bad answer good",
    ])
}

fn ids(t: &Tokenizer, s: &str) -> Vec<u32> {
    t.encode(s, false).unwrap()
}

fn cfg(max_len: usize) -> SftTokenizeConfig {
    SftTokenizeConfig {
        max_len,
        ..Default::default()
    }
}

fn masked(ex: &TokenizedSft) -> Vec<u32> {
    ex.input_ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect()
}

#[test]
fn prompt_completion_masks_prompt_and_trains_completion_plus_eos() {
    let t = tok();
    let ex = SftExample::PromptCompletion {
        prompt: "what is two plus two ?".into(),
        completion: " it is four .".into(),
    };
    let mut st = TruncationStats::default();
    let out = tokenize_sft_example(&t, &ex, &cfg(64), &mut st).unwrap();
    let p = ids(&t, "what is two plus two ?");
    let c = ids(&t, "it is four .");
    let mut want = vec![BOS];
    want.extend(&p);
    want.extend(&c);
    want.push(EOS);
    assert_eq!(out.input_ids, want);
    let mut mask = vec![false; 1 + p.len()];
    mask.extend(vec![true; c.len() + 1]);
    assert_eq!(out.loss_mask, mask);
    let mut target = c.clone();
    target.push(EOS);
    assert_eq!(masked(&out), target);
    assert_eq!(
        st,
        TruncationStats {
            examples: 1,
            ..Default::default()
        }
    );

    // completion_only = false: every token is a target.
    let all = tokenize_sft_example(
        &t,
        &ex,
        &SftTokenizeConfig {
            completion_only: false,
            ..cfg(64)
        },
        &mut st,
    )
    .unwrap();
    assert_eq!(all.input_ids, want);
    assert!(all.loss_mask.iter().all(|&m| m));
}

#[test]
fn text_trains_everything_and_eos_is_not_doubled() {
    let t = tok();
    let (out, st) = tokenize_sft(
        &t,
        &[
            SftExample::Text("once upon a time".into()),
            SftExample::Text("the end <eos>".into()),
        ],
        &cfg(64),
    )
    .unwrap();
    let mut want = vec![BOS];
    want.extend(ids(&t, "once upon a time"));
    want.push(EOS);
    assert_eq!(out[0].input_ids, want);
    assert!(out[0].loss_mask.iter().all(|&m| m));
    assert_eq!(out[1].input_ids.iter().filter(|&&i| i == EOS).count(), 1);
    assert_eq!(*out[1].input_ids.last().unwrap(), EOS);
    assert_eq!(st.truncated, 0);
}

#[test]
fn chat_loss_is_on_assistant_turns_only() {
    let t = tok();
    let msgs = vec![
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "hello there"),
        ChatMessage::new("assistant", "hello"),
        ChatMessage::new("user", "how are you ?"),
        ChatMessage::new("assistant", "fine thanks"),
    ];
    let (out, _) = tokenize_sft(&t, &[SftExample::Chat(msgs.clone())], &cfg(64)).unwrap();
    let out = &out[0];
    let full = t.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(out.input_ids, ids(&t, &full));
    let mut want = ids(&t, "hello <eos>");
    want.extend(ids(&t, "fine thanks <eos>"));
    assert_eq!(masked(out), want);
    // The role tokens and the user's words are never targets.
    let assistant = t.token_to_id("<|assistant|>").unwrap();
    for (i, &id) in out.input_ids.iter().enumerate() {
        if id == assistant || id == BOS {
            assert!(!out.loss_mask[i]);
        }
    }
    // The first "hello" (user's) is masked, the second (assistant's) is not.
    let hello = t.token_to_id("hello").unwrap();
    let pos: Vec<usize> = out
        .input_ids
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == hello)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(pos.len(), 2);
    assert!(!out.loss_mask[pos[0]] && out.loss_mask[pos[1]]);
}

#[test]
fn conversational_prompt_completion_ignores_assistant_turns_in_the_prompt() {
    let t = tok();
    let ex = SftExample::ChatPromptCompletion {
        prompt: vec![
            ChatMessage::new("user", "what is two plus two ?"),
            ChatMessage::new("assistant", "bad answer"),
            ChatMessage::new("user", "what is two plus two ?"),
        ],
        completion: vec![ChatMessage::new("assistant", "it is four .")],
    };
    let (out, _) = tokenize_sft(&t, &[ex], &cfg(64)).unwrap();
    assert_eq!(masked(&out[0]), ids(&t, "it is four . <eos>"));
}

#[test]
fn prompt_completion_as_chat_uses_the_template() {
    let t = tok();
    let ex = SftExample::PromptCompletion {
        prompt: "hello there".into(),
        completion: "fine thanks".into(),
    };
    let c = SftTokenizeConfig {
        prompt_completion_as_chat: true,
        ..cfg(64)
    };
    let (out, _) = tokenize_sft(&t, &[ex], &c).unwrap();
    assert_eq!(
        out[0].input_ids,
        ids(
            &t,
            "<bos> <|user|> hello there <|assistant|> fine thanks <eos>"
        )
    );
    assert_eq!(masked(&out[0]), ids(&t, "fine thanks <eos>"));
}

#[test]
fn template_without_prefix_property_is_a_clear_error() {
    let mut t = tok();
    // Marks the last message differently: a prefix of the conversation is not a text prefix.
    t.set_chat_template(Some(
        "{% for m in messages %}{% if loop.last %}<eos> {% endif %}{{ m.content }} {% endfor %}"
            .into(),
    ));
    let ex = SftExample::Chat(vec![
        ChatMessage::new("user", "hello"),
        ChatMessage::new("assistant", "fine"),
        ChatMessage::new("user", "thanks"),
    ]);
    let err = format!("{:#}", tokenize_sft(&t, &[ex], &cfg(64)).unwrap_err());
    assert!(err.contains("SFT example 0"), "{err}");
    assert!(err.contains("prefix property"), "{err}");

    t.set_chat_template(None);
    let ex = SftExample::Chat(vec![ChatMessage::new("assistant", "fine")]);
    let err = format!("{:#}", tokenize_sft(&t, &[ex], &cfg(64)).unwrap_err());
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn sft_truncation_is_counted() {
    let t = tok();
    let exs = vec![
        // bos + 6 + 4 + eos = 12 tokens
        SftExample::PromptCompletion {
            prompt: "what is two plus two ?".into(),
            completion: " it is four .".into(),
        },
        // bos + 4 + eos = 6 tokens
        SftExample::Text("once upon a time".into()),
        // bos + 6 + 1 + eos = 9: cut to 6 leaves no completion token
        SftExample::PromptCompletion {
            prompt: "what is two plus two ?".into(),
            completion: " four".into(),
        },
    ];
    let (out, st) = tokenize_sft(&t, &exs, &cfg(6)).unwrap();
    assert!(out.iter().all(|e| e.len() <= 6));
    assert_eq!(
        st,
        TruncationStats {
            examples: 3,
            truncated: 2,
            tokens_dropped: 6 + 3,
            prompts_truncated: 0,
            responses_truncated: 0,
            no_loss_left: 2,
        }
    );
    assert!(st
        .warning()
        .unwrap()
        .contains("truncated 2 of 3 examples (9 tokens dropped"));
    let (_, st) = tokenize_sft(&t, &exs, &cfg(12)).unwrap();
    assert_eq!(st.truncated, 0);
    assert!(st.warning().is_none());
}

fn pair(prompt: Prompt, chosen: &str, rejected: &str) -> PreferencePair {
    PreferencePair {
        prompt,
        chosen: chosen.into(),
        rejected: rejected.into(),
        margin: Some(1.0),
        group: 4,
        source_line: 9,
    }
}

#[test]
fn pairs_tokenise_with_eos_and_chat_prompts() {
    let t = tok();
    let p = pair(
        Prompt::Text("what is two plus two ?".into()),
        " four",
        " bad answer",
    );
    let mut st = TruncationStats::default();
    let tp = tokenize_pair(&t, &p, &PairTokenizeConfig::default(), &mut st).unwrap();
    let mut want_p = vec![BOS];
    want_p.extend(ids(&t, "what is two plus two ?"));
    assert_eq!(tp.prompt_ids, want_p);
    assert_eq!(tp.chosen_ids, ids(&t, "four <eos>"));
    assert_eq!(tp.rejected_ids, ids(&t, "bad answer <eos>"));
    assert_eq!((tp.margin, tp.group), (Some(1.0), 4));
    assert_eq!(st.truncated, 0);

    let chat = Prompt::Chat(vec![ChatMessage::new("user", "hello there")]);
    assert_eq!(
        tokenize_prompt(&t, &chat).unwrap(),
        ids(&t, "<bos> <|user|> hello there <|assistant|>")
    );
    assert_eq!(
        tokenize_response(&t, &chat, "fine thanks").unwrap(),
        ids(&t, "fine thanks <eos>")
    );
    let tp = tokenize_pair(
        &t,
        &pair(chat, "fine", "bad"),
        &PairTokenizeConfig::default(),
        &mut st,
    )
    .unwrap();
    assert_eq!(tp.chosen_ids, ids(&t, "fine <eos>"));
    assert_eq!(
        *tp.prompt_ids.last().unwrap(),
        t.token_to_id("<|assistant|>").unwrap()
    );
}

#[test]
fn pair_truncation_cuts_prompt_left_keeping_bos_then_responses_right() {
    let t = tok();
    // prompt: bos + 10 words = 11; chosen 3 + eos = 4; rejected 1 + eos = 2.
    let p = pair(
        Prompt::Text("once upon a time what is two plus two ?".into()),
        " hello there how",
        " bad",
    );
    // Fits exactly: 11 + 4 = 15.
    let (v, st) = tokenize_pairs(
        &t,
        std::slice::from_ref(&p),
        &PairTokenizeConfig {
            max_len: 15,
            max_prompt_len: None,
        },
    )
    .unwrap();
    assert_eq!(v[0].prompt_ids.len(), 11);
    assert_eq!(st.truncated, 0);

    // max_len 12: prompt cut from the left to 12 - 4 = 8 (>= floor 6), BOS kept.
    let (v, st) = tokenize_pairs(
        &t,
        std::slice::from_ref(&p),
        &PairTokenizeConfig {
            max_len: 12,
            max_prompt_len: None,
        },
    )
    .unwrap();
    let mut want = vec![BOS];
    want.extend(ids(&t, "a time what is two plus two ?")[1..].iter());
    assert_eq!(v[0].prompt_ids, want);
    assert_eq!(v[0].prompt_ids.len(), 8);
    assert_eq!(v[0].chosen_ids.len(), 4);
    assert_eq!(
        st,
        TruncationStats {
            examples: 1,
            truncated: 1,
            tokens_dropped: 3,
            prompts_truncated: 1,
            responses_truncated: 0,
            no_loss_left: 0,
        }
    );

    // max_len 8: prompt floor is min(11, 8/2) = 4; responses get 4 tokens: chosen 4 fits, ok.
    // max_len 6: prompt floor 3, responses budget 3: chosen cut (loses EOS), rejected fits.
    let (v, st) = tokenize_pairs(
        &t,
        std::slice::from_ref(&p),
        &PairTokenizeConfig {
            max_len: 6,
            max_prompt_len: None,
        },
    )
    .unwrap();
    assert_eq!(v[0].prompt_ids.len(), 3);
    assert_eq!(v[0].prompt_ids[0], BOS);
    assert_eq!(v[0].prompt_ids[1..], ids(&t, "two ?")[..]);
    assert_eq!(v[0].chosen_ids, ids(&t, "hello there how"));
    assert_eq!(v[0].rejected_ids, ids(&t, "bad <eos>"));
    assert_eq!(st.responses_truncated, 1);
    assert_eq!(st.prompts_truncated, 1);
    assert_eq!(st.tokens_dropped, 8 + 1);

    // An explicit max_prompt_len always applies.
    let (v, st) = tokenize_pairs(
        &t,
        &[p],
        &PairTokenizeConfig {
            max_len: 100,
            max_prompt_len: Some(5),
        },
    )
    .unwrap();
    assert_eq!(v[0].prompt_ids.len(), 5);
    assert_eq!(st.prompts_truncated, 1);
    assert_eq!(st.responses_truncated, 0);
}

#[test]
fn packing_keeps_every_token_and_resets_positions() {
    let mk = |n: usize, base: u32| TokenizedSft {
        input_ids: (0..n as u32).map(|i| base + i).collect(),
        loss_mask: vec![true; n],
        segments: vec![],
    };
    let exs = vec![
        mk(5, 100),
        mk(3, 200),
        mk(7, 300),
        mk(2, 400),
        mk(1, 500),
        mk(12, 600),
    ];
    let rows = pack(&exs, 10);
    assert!(rows.iter().all(|r| r.input_ids.len() <= 10));
    // 5+3+7+2+1+10(cut) = 28 tokens -> at least 3 rows; best-fit decreasing gives exactly 3.
    assert_eq!(rows.len(), 3);
    let total: usize = rows.iter().map(|r| r.input_ids.len()).sum();
    assert_eq!(total, 28);
    for r in &rows {
        assert_eq!(r.input_ids.len(), r.loss_mask.len());
        assert_eq!(r.input_ids.len(), r.position_ids.len());
        for (k, &s) in r.seq_starts.iter().enumerate() {
            assert_eq!(r.position_ids[s], 0);
            assert!(
                !r.loss_mask[s],
                "first token of each packed example is not a target"
            );
            let end = r
                .seq_starts
                .get(k + 1)
                .copied()
                .unwrap_or(r.input_ids.len());
            assert!(r.segments[s..end].iter().all(|&g| g as usize == k + 1));
            for j in s + 1..end {
                assert!(r.loss_mask[j]);
                assert_eq!(r.position_ids[j] as usize, j - s);
                assert_eq!(r.input_ids[j], r.input_ids[j - 1] + 1);
            }
        }
    }
    let mut firsts: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.seq_starts.iter().map(|&s| r.input_ids[s]))
        .collect();
    firsts.sort();
    assert_eq!(firsts, vec![100, 200, 300, 400, 500, 600]);
    assert_eq!(pack(&exs, 10), rows, "deterministic");
    // Segment ids are one byte: no row holds more than 255 examples.
    let many: Vec<TokenizedSft> = (0..600).map(|i| mk(2, 10 * i)).collect();
    let packed = pack(&many, 1 << 20);
    assert_eq!(packed.len(), 3);
    assert!(packed.iter().all(|r| r.seq_starts.len() <= 255));
    assert_eq!(packed[0].segments.last(), Some(&255));

    let b = collate_packed(rows.iter(), 0);
    assert_eq!((b.batch.batch, b.batch.seq_len), (3, 10));
    assert_eq!(b.position_ids.len(), 30);
}
