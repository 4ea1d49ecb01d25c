//! Format detection, ranking expansion, implicit prompts, and file:line errors for bad input.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use rlhf_data::formats::{parse_ranking, ranking_pairs};
use rlhf_data::{
    load_preferences, load_preferences_lenient, load_prompts, load_records, load_sft,
    load_text_prompts, split_implicit_prompt, PreferencePair, Prompt, SftExample,
};
use rlhf_model::tokenizer::ChatMessage;
use serde_json::json;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Write `content` to a fresh temp file with the given extension.
fn temp_file(ext: &str, content: &[u8]) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("rlhf-data-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("f{n}.{ext}"));
    std::fs::write(&p, content).unwrap();
    p
}

fn jsonl(rows: &[serde_json::Value]) -> PathBuf {
    let s: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    temp_file("jsonl", (s.join("\n") + "\n").as_bytes())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn ranking_without_ties_gives_k_choose_2_pairs_for_k_2_to_9() {
    for k in 2..=9usize {
        // Best-first order k-1, k-2, ..., 0 as singleton tiers.
        let order: Vec<usize> = (0..k).rev().collect();
        let ranking = json!(order.iter().map(|&i| vec![i]).collect::<Vec<_>>());
        let tiers = parse_ranking(&ranking, k, "x:1").unwrap();
        let pairs = ranking_pairs(&tiers);
        assert_eq!(pairs.len(), k * (k - 1) / 2, "K={k}");
        let rank_of = |i: usize| order.iter().position(|&x| x == i).unwrap();
        for &(a, b) in &pairs {
            assert!(rank_of(a) < rank_of(b), "K={k}: {a} should beat {b}");
        }
        let mut uniq = pairs.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), pairs.len());
    }
    // A flat list is a strict order too.
    let tiers = parse_ranking(&json!([2, 0, 1]), 3, "x:1").unwrap();
    assert_eq!(ranking_pairs(&tiers), vec![(2, 0), (2, 1), (0, 1)]);
}

#[test]
fn ties_give_no_pairs_between_tied_items() {
    let tiers = parse_ranking(&json!([[0], [2, 1], [3]]), 4, "x:1").unwrap();
    let pairs = ranking_pairs(&tiers);
    assert_eq!(pairs, vec![(0, 2), (0, 1), (0, 3), (2, 3), (1, 3)]);
    assert!(!pairs.contains(&(2, 1)) && !pairs.contains(&(1, 2)));
    let all_tied = parse_ranking(&json!([[0, 1, 2]]), 3, "x:1").unwrap();
    assert!(ranking_pairs(&all_tied).is_empty());
}

#[test]
fn ranking_rows_expand_with_shared_group_and_line() {
    let p = jsonl(&[
        json!({"prompt": "Q1", "completions": ["a", "b", "c"], "ranking": [[1], [0], [2]]}),
        json!({"prompt": "Q2", "chosen": "x", "rejected": "y", "margin": 2.5}),
        json!({"prompt": "Q3", "completions": ["d", "e", "f", "g"], "ranking": [[3], [0, 1], [2]]}),
    ]);
    let pairs = load_preferences(&p).unwrap();
    assert_eq!(pairs.len(), 3 + 1 + 5);
    let g: Vec<usize> = pairs.iter().map(|p| p.group).collect();
    assert_eq!(g, vec![0, 0, 0, 1, 2, 2, 2, 2, 2]);
    let lines: Vec<usize> = pairs.iter().map(|p| p.source_line).collect();
    assert_eq!(lines, vec![1, 1, 1, 2, 3, 3, 3, 3, 3]);
    assert_eq!(
        pairs[0],
        PreferencePair {
            prompt: Prompt::Text("Q1".into()),
            chosen: "b".into(),
            rejected: "a".into(),
            margin: None,
            group: 0,
            source_line: 1,
        }
    );
    assert_eq!(pairs[3].margin, Some(2.5));
    let q3: Vec<(&str, &str)> = pairs[4..]
        .iter()
        .map(|p| (p.chosen.as_str(), p.rejected.as_str()))
        .collect();
    assert_eq!(
        q3,
        vec![("g", "d"), ("g", "e"), ("g", "f"), ("d", "f"), ("e", "f")]
    );
}

#[test]
fn explicit_conversational_and_sharegpt_pairs() {
    let p = jsonl(&[
        json!({"prompt": [{"role": "user", "content": "hi"}],
               "chosen": [{"role": "assistant", "content": "hello"}],
               "rejected": [{"role": "assistant", "content": "go away"}]}),
        json!({"conversations": [{"from": "human", "value": "hi"}],
               "chosen": {"from": "gpt", "value": "hello"},
               "rejected": {"from": "gpt", "value": "bye"}, "system": "be nice"}),
        json!({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}),
    ]);
    let pairs = load_preferences(&p).unwrap();
    assert_eq!(pairs.len(), 3);
    assert_eq!(
        pairs[0].prompt,
        Prompt::Chat(vec![ChatMessage::new("user", "hi")])
    );
    assert_eq!(
        (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
        ("hello", "go away")
    );
    assert_eq!(
        pairs[1].prompt,
        Prompt::Chat(vec![
            ChatMessage::new("system", "be nice"),
            ChatMessage::new("user", "hi")
        ])
    );
    assert_eq!(pairs[1].chosen, "hello");
    assert_eq!(
        pairs[2].prompt,
        Prompt::Chat(vec![ChatMessage::new("user", "q")])
    );
    assert_eq!(
        (pairs[2].chosen.as_str(), pairs[2].rejected.as_str()),
        ("good", "bad")
    );
}

#[test]
fn implicit_prompt_hh_style() {
    let c = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine, thanks.";
    let r = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Go away.";
    let (p, cc, rr) = split_implicit_prompt(c, r).unwrap();
    assert_eq!(
        p,
        "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    );
    assert_eq!(cc, " Fine, thanks.");
    assert_eq!(rr, " Go away.");
    // Responses that share their first words: the prompt still ends at the marker.
    let (p, cc, rr) = split_implicit_prompt(
        "\n\nHuman: x\n\nAssistant: I think yes",
        "\n\nHuman: x\n\nAssistant: I think no",
    )
    .unwrap();
    assert_eq!(p, "\n\nHuman: x\n\nAssistant:");
    assert_eq!((cc.as_str(), rr.as_str()), (" I think yes", " I think no"));
    // Without a marker: common prefix cut at a word boundary.
    let (p, cc, rr) = split_implicit_prompt("Q: 2+2? A: four", "Q: 2+2? A: fourteen").unwrap();
    assert_eq!(p, "Q: 2+2? A:");
    assert_eq!((cc.as_str(), rr.as_str()), (" four", " fourteen"));
    assert!(split_implicit_prompt("abc", "xyz").is_none());
}

#[test]
fn sft_formats_are_detected_per_row() {
    let p = jsonl(&[
        json!({"prompt": "2+2=", "completion": "4"}),
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}),
        json!({"instruction": "Add.", "input": "2 and 2", "output": "4"}),
        json!({"instruction": "Say hi.", "input": "", "output": "hi"}),
        json!({"text": "once upon a time"}),
        json!({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}),
        json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ]);
    let ex = load_sft(&p).unwrap();
    assert_eq!(
        ex,
        vec![
            SftExample::PromptCompletion {
                prompt: "2+2=".into(),
                completion: "4".into()
            },
            SftExample::Chat(vec![
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "hey")
            ]),
            SftExample::PromptCompletion {
                prompt: "Add.\n\n2 and 2".into(),
                completion: "4".into()
            },
            SftExample::PromptCompletion {
                prompt: "Say hi.".into(),
                completion: "hi".into()
            },
            SftExample::Text("once upon a time".into()),
            SftExample::ChatPromptCompletion {
                prompt: vec![ChatMessage::new("user", "q")],
                completion: vec![ChatMessage::new("assistant", "a")]
            },
            SftExample::Chat(vec![
                ChatMessage::new("user", "q"),
                ChatMessage::new("assistant", "a")
            ]),
        ]
    );
}

#[test]
fn json_array_and_gzip_inputs() {
    let text = "[\n  {\"text\": \"a b\"},\n  {\"text\": \"c\"}\n]\n";
    let arr = temp_file("json", text.as_bytes());
    let recs = load_records(&arr).unwrap();
    assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3]);
    let gz = temp_file("json.gz", &gzip(text.as_bytes()));
    assert_eq!(load_sft(&gz).unwrap(), load_sft(&arr).unwrap());
    let gzl = temp_file("jsonl.gz", &gzip(b"{\"text\":\"x\"}\n\n{\"text\":\"y\"}\n"));
    let recs = load_records(&gzl).unwrap();
    assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn prompts_only() {
    let p = jsonl(&[
        json!({"prompt": "Tell me a joke"}),
        json!({"prompt": [{"role": "user", "content": "hi"}]}),
    ]);
    let ps = load_prompts(&p).unwrap();
    assert_eq!(ps[0], Prompt::Text("Tell me a joke".into()));
    assert_eq!(ps[1], Prompt::Chat(vec![ChatMessage::new("user", "hi")]));
    let t = jsonl(&[
        json!({"label": "pos", "text": "the  movie was\tgreat fun overall"}),
        json!({"prompt": "explicit"}),
    ]);
    let ps = load_text_prompts(&t, 3).unwrap();
    assert_eq!(ps[0], Prompt::Text("the movie was".into()));
    assert_eq!(ps[1], Prompt::Text("explicit".into()));
    let err = load_prompts(&t).unwrap_err().to_string();
    assert!(
        err.ends_with(":1: missing field `prompt` (record has keys [label, text])"),
        "{err}"
    );
}

/// Every bad input is an error that names `file:line` and says what is wrong.
#[test]
fn bad_preference_inputs_name_file_and_line() {
    let good = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
    let cases: Vec<(&str, &str)> = vec![
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "b""#,
            "broken JSON",
        ),
        (
            r#"{"prompt": "p", "chosen": "a"}"#,
            "missing field `rejected`",
        ),
        (
            r#"{"prompt": "p", "chosen": 5, "rejected": "b"}"#,
            "field `chosen`: expected a string or an assistant message, found a number",
        ),
        (
            r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#,
            "field `prompt`: expected a string or a list of messages, found a number",
        ),
        (
            r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
            "identical",
        ),
        (
            r#"{"prompt": "p", "chosen": "  ", "rejected": "b"}"#,
            "empty chosen response",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": ""}"#,
            "empty rejected response",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}"#,
            "field `margin`: expected a number",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[0], [0], [2]]}"#,
            "index 0 appears more than once",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[0], [2]]}"#,
            "completions [1] are not ranked",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[0], [1], [3]]}"#,
            "index 3 out of range",
        ),
        (
            r#"{"prompt": "p", "completions": ["a"], "ranking": [[0]]}"#,
            "at least 2 completions",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [-1]]}"#,
            "non-negative integers",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", "a"], "ranking": [[0], [1]]}"#,
            "identical but ranked differently",
        ),
        (
            r#"{"prompt": "p", "completions": ["a", ""], "ranking": [[0], [1]]}"#,
            "completion 1 is empty",
        ),
        (
            r#"{"prompt": "p", "completions": "a", "ranking": [[0]]}"#,
            "field `completions`: expected a list",
        ),
        (
            r#"{"chosen": "abc", "rejected": "xyz"}"#,
            "share no common prompt",
        ),
        (
            r#"{"foo": 1}"#,
            "unrecognised preference record with keys [foo]",
        ),
        (r#"[1, 2]"#, "expected a JSON object, found a list"),
        (
            r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#,
            "field `prompt`[0]: message has no `content`",
        ),
        (
            r#"{"conversations": [{"from": "robot", "value": "x"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
            "unsupported speaker",
        ),
        (
            r#"{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}"#,
            "must have role assistant",
        ),
    ];
    for (bad, want) in cases {
        let p = temp_file("jsonl", format!("{good}\n\n{bad}\n{good}\n").as_bytes());
        let err = load_preferences(&p).expect_err(bad).to_string();
        let loc = format!("{}:3", p.display());
        assert!(
            err.starts_with(&loc),
            "{bad}\n  -> {err}\n  (wanted prefix {loc})"
        );
        assert!(err.contains(want), "{bad}\n  -> {err}\n  (wanted {want:?})");
    }
}

#[test]
fn bad_sft_inputs_name_file_and_line() {
    let cases: Vec<(&str, &str)> = vec![
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            "no assistant turn",
        ),
        (
            r#"{"messages": "hi"}"#,
            "field `messages`: expected a list of messages, found a string",
        ),
        (r#"{"messages": []}"#, "empty message list"),
        (
            r#"{"prompt": "a", "completion": 3}"#,
            "field `completion`: expected a string",
        ),
        (r#"{"prompt": "a", "completion": ""}"#, "empty completion"),
        (
            r#"{"instruction": "a", "input": 1, "output": "b"}"#,
            "field `input`: expected a string, found a number",
        ),
        (
            r#"{"instruction": "a", "output": null}"#,
            "field `output`: expected a string, found null",
        ),
        (r#"{"text": ""}"#, "empty `text`"),
        (r#"{"txt": "a"}"#, "unrecognised SFT record with keys [txt]"),
        (
            r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}"#,
            "no assistant message",
        ),
    ];
    for (bad, want) in cases {
        let p = temp_file("jsonl", format!("{{\"text\":\"ok\"}}\n{bad}\n").as_bytes());
        let err = load_sft(&p).expect_err(bad).to_string();
        let loc = format!("{}:2", p.display());
        assert!(err.starts_with(&loc), "{bad}\n  -> {err}");
        assert!(err.contains(want), "{bad}\n  -> {err}\n  (wanted {want:?})");
    }
}

#[test]
fn json_array_errors_name_element_and_line() {
    let text = "[\n  {\"text\": \"ok\"},\n  {\n    \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]\n  }\n]";
    let p = temp_file("json", text.as_bytes());
    let err = load_sft(&p).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}:3 (element 1): conversation has no assistant turn",
            p.display()
        )),
        "{err}"
    );
    let broken = "[\n  {\"text\": \"ok\"},\n  {\"text\": \"a\" \"b\"}\n]";
    let p = temp_file("json", broken.as_bytes());
    let err = load_sft(&p).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:3:", p.display())), "{err}");
    assert!(
        err.contains("element 1") && err.contains("broken JSON"),
        "{err}"
    );
    let obj = temp_file("json", b"{\"data\": [1]}\n");
    let err = load_sft(&obj).unwrap_err().to_string();
    assert!(err.contains(":1: unrecognised SFT record"), "{err}");
}

#[test]
fn empty_files_and_missing_files() {
    for content in ["", "\n\n   \n", "[]"] {
        let p = temp_file("jsonl", content.as_bytes());
        let err = load_preferences(&p).unwrap_err().to_string();
        assert!(
            err.contains(&p.display().to_string()) && err.contains("empty"),
            "{err}"
        );
    }
    let p = temp_file("jsonl.gz", &gzip(b""));
    let err = load_sft(&p).unwrap_err().to_string();
    assert!(err.contains("empty file"), "{err}");
    let err = load_sft("/nonexistent/x.jsonl").unwrap_err().to_string();
    assert!(err.contains("/nonexistent/x.jsonl: cannot read"), "{err}");
}

#[test]
fn lenient_loading_skips_and_reports() {
    let p = jsonl(&[
        json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
        json!({"prompt": "p", "chosen": "a", "rejected": "a"}),
        json!({"prompt": "p", "chosen": "c", "rejected": "d"}),
    ]);
    let (pairs, skipped) = load_preferences_lenient(&p).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[1].source_line, 3);
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].starts_with(&format!("{}:2: ", p.display())),
        "{}",
        skipped[0]
    );
}
