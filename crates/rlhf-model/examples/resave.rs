//! Load a model (HF directory or .gguf) and save it in the HF layout:
//! `cargo run -p rlhf-model --example resave -- SRC DST`. Used by scripts/check_hf_roundtrip.py
//! to show that transformers loads what we write.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        anyhow::bail!("usage: resave SRC DST");
    }
    let loaded = rlhf_model::load::load(&args[1])?;
    loaded
        .model
        .save(std::path::Path::new(&args[2]), loaded.tokenizer.as_ref())?;
    println!("saved {} -> {}", args[1], args[2]);
    Ok(())
}
