//! `rlhf --matmul bf16`: on a CPU with a BF16 unit (AMX or AVX512-BF16), SmolLM2 generates through the BF16 products
//! (the prompt's prefill is a many-row product) with the f32 run's greedy tokens and log-probs
//! within BF16 rounding; on a CPU without it, the flag is refused with a clear error.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rlhf"))
}

const PROMPT: &str = "Name three primary colours and explain why mixing them matters in painting.";

fn generate(model: &std::path::Path, matmul: &str) -> Output {
    Command::new(bin())
        .args(["--matmul", matmul, "generate", "--model"])
        .arg(model)
        .args([
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ])
        .arg("--json")
        .output()
        .unwrap()
}

/// The SmolLM2 GGUF, or `None` after saying why the test is skipped.
fn smollm2() -> Option<PathBuf> {
    let model = rlhf_model::load::smollm2_gguf();
    if model.is_none() {
        eprintln!(
            "SKIP: SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh or set RLHF_SMOLLM2_GGUF"
        );
    }
    model
}

#[test]
fn matmul_bf16_generates_like_f32_or_is_refused_without_a_bf16_unit() {
    let Some(model) = smollm2() else { return };
    let bf = generate(&model, "bf16");
    let err = String::from_utf8_lossy(&bf.stderr).to_string();
    let Some(unit) = rlhf_model::kernels::bf16::unit() else {
        assert_eq!(bf.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--matmul bf16") && err.contains("AMX") && err.contains("AVX512-BF16"),
            "{err}"
        );
        return;
    };
    assert!(bf.status.success(), "{err}");
    assert!(
        err.contains(&format!("bf16 inputs, f32 sums ({})", unit.name())),
        "the run must say which unit it uses: {err}"
    );
    let f = generate(&model, "f32");
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));
    let row = |o: &Output| -> serde_json::Value {
        let s = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(s.lines().next().unwrap()).unwrap()
    };
    let (a, b) = (row(&f), row(&bf));
    let toks = |v: &serde_json::Value| -> Vec<u64> {
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    let lps = |v: &serde_json::Value| -> Vec<f64> {
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect()
    };
    let (ta, tb) = (toks(&a), toks(&b));
    assert_eq!(ta.len(), 8);
    // Greedy decoding: the first token comes straight from the prefill's products.
    assert_eq!(ta[0], tb[0], "f32 {ta:?} vs bf16 {tb:?}");
    let (la, lb) = (lps(&a), lps(&b));
    let same = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
    for i in 0..same {
        assert!(
            (la[i] - lb[i]).abs() < 0.1,
            "token {i}: log-prob f32 {} vs bf16 {}",
            la[i],
            lb[i]
        );
    }
    assert_ne!(
        la, lb,
        "the BF16 run must differ from f32 somewhere (else it took the f32 path)"
    );
}

/// `RLHF_BF16_UNIT` chooses the unit where the CPU has it, and is a warning (the default unit
/// stays) where it does not.
#[test]
fn bf16_unit_can_be_chosen_by_environment() {
    use rlhf_model::kernels::bf16::{units, Unit};
    let Some(model) = smollm2() else { return };
    let Some(&best) = units().first() else {
        eprintln!("SKIP: this CPU has no BF16 unit (the refusal is tested above)");
        return;
    };
    for (name, unit) in [("amx", Unit::Amx), ("avx512", Unit::AvxDot)] {
        let out = Command::new(bin())
            .env("RLHF_BF16_UNIT", name)
            .args(["--matmul", "bf16", "generate", "--model"])
            .arg(&model)
            .args(["--prompt", PROMPT, "--max-new-tokens", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{name}: {err}");
        let used = if units().contains(&unit) {
            unit
        } else {
            assert!(
                err.contains(&format!("RLHF_BF16_UNIT={name} ignored")),
                "{name}: {err}"
            );
            best
        };
        assert!(
            err.contains(&format!("bf16 inputs, f32 sums ({})", used.name())),
            "{name}: {err}"
        );
    }
}
