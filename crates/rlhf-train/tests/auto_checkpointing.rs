//! `gradient_checkpointing = "auto"` (the default) on a `Trainer` built directly: it plans from
//! the models the objective names (`Objective::step_shapes`) and the memory available, here
//! capped with `RLHF_MEMORY_GIB`. One test in its own binary, since it sets the process's
//! environment.

use rlhf_data::formats::SftExample;
use rlhf_data::tokenize::{tokenize_sft, SftTokenizeConfig};
use rlhf_data::vocab::word_level_tokenizer;
use rlhf_model::kernels::block::blocks_recomputed;
use rlhf_model::CausalLM;
use rlhf_train::memory::{Checkpointing, StepShape};
use rlhf_train::sft::SftObjective;
use rlhf_train::{Objective, TrainConfig, Trainer};

#[test]
fn a_trainer_given_auto_plans_from_the_objectives_models() {
    let tok = word_level_tokenizer(&["the", "sky", "is", "blue", "grass", "green", "?", "."]);
    let examples: Vec<SftExample> = [("the sky is ?", "blue ."), ("the grass is ?", "green .")]
        .iter()
        .map(|(p, c)| SftExample::PromptCompletion {
            prompt: format!("{p} "),
            completion: c.to_string(),
        })
        .collect();
    let (train, _) = tokenize_sft(&tok, &examples, &SftTokenizeConfig::default()).unwrap();
    let longest = train.iter().map(|t| t.len()).max().unwrap();
    let model = CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(), "n_positions": 32,
            "n_embd": 32, "n_layer": 2, "n_head": 2}),
        3,
    )
    .unwrap();
    let mut obj = SftObjective {
        model,
        tokenizer: tok,
        train,
        eval: vec![],
        eval_batch: 2,
        token_norm: None,
        padding_free: true,
    };
    // What the objective names: its model, 2 rows as wide as the longest example, the head on
    // each row.
    let shapes = obj.step_shapes(2);
    assert_eq!(shapes.len(), 1);
    let want = StepShape {
        rows: 2,
        len: longest,
        lm_head_rows: 2,
    };
    assert_eq!(shapes[0].1, want);
    let cfg = TrainConfig {
        max_steps: 2,
        batch_size: 2,
        log_every: 1,
        ..Default::default()
    };
    assert_eq!(cfg.gradient_checkpointing, Checkpointing::Auto);
    let dir = std::env::temp_dir().join(format!("rlhf-auto-ckpt-{}", std::process::id()));
    let mut rebuilt = vec![];
    // Room to spare: nothing recomputed. Next to none: both layers, in each step's backward.
    for gib in ["1000", "0.000001"] {
        std::env::set_var("RLHF_MEMORY_GIB", gib);
        let _ = std::fs::remove_dir_all(&dir);
        let before = blocks_recomputed();
        Trainer::new(cfg.clone(), &dir)
            .run(&mut obj, false)
            .unwrap();
        rebuilt.push(blocks_recomputed() - before);
    }
    std::env::remove_var("RLHF_MEMORY_GIB");
    assert_eq!(rebuilt, [0, 2 * 2], "blocks rebuilt with room, without");
    let _ = std::fs::remove_dir_all(&dir);
}
