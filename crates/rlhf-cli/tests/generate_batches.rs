//! `rlhf generate --prompts FILE --batch-size N`: a prompt file goes through in batches, and the
//! sampled text is the same whatever the batch size (each row keeps its own random stream).

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rlhf"))
}

fn generate(model: &std::path::Path, prompts: &std::path::Path, batch: &str) -> Output {
    Command::new(bin())
        .args(["generate", "--model"])
        .arg(model)
        .arg("--prompts")
        .arg(prompts)
        .args([
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--seed",
            "5",
        ])
        .args(["--json", "--batch-size", batch])
        .output()
        .unwrap()
}

#[test]
fn batches_sample_what_one_batch_samples() {
    let Some(model) = rlhf_model::load::smollm2_gguf() else {
        eprintln!(
            "SKIP: SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh or set RLHF_SMOLLM2_GGUF"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("rlhf-gen-batches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    // Five prompts, the first two repeated: repeats must sample their own continuations.
    let texts = [
        "Name a colour.",
        "Say hello.",
        "Count to three.",
        "Name a colour.",
        "Say hello.",
    ];
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "prompt": t }).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();

    let one = generate(&model, &prompts, "64");
    let two = generate(&model, &prompts, "2");
    for o in [&one, &two] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let rows = |o: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (rows(&one), rows(&two));
    assert_eq!(a.len(), 5);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x["prompt"], texts[i]);
        assert_eq!(
            x["tokens"], y["tokens"],
            "row {i}: batch size changed the sample"
        );
    }
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(
        err.contains("[generate] batch 3/3: 5 prompts done"),
        "{err}"
    );
    // A repeated prompt draws from its own row's stream.
    assert!(
        a[0]["tokens"] != a[3]["tokens"] || a[1]["tokens"] != a[4]["tokens"],
        "repeated prompts sampled the same continuations"
    );

    let zero = generate(&model, &prompts, "0");
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--batch-size must be at least 1"));
    std::fs::remove_dir_all(&dir).ok();
}
