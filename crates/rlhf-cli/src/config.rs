//! TOML configs with flag overrides: `--config FILE` then `--set a.b=value` (any key, dotted
//! path; the value is parsed as a TOML literal, else taken as a string), then named flags.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Build a config of type `T` from its defaults, a TOML file, and overrides.
pub fn load<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    sets: &[String],
) -> Result<T> {
    let mut v = toml::Value::try_from(T::default())?;
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read config", f.display()))?;
        let user: toml::Value =
            toml::from_str(&s).with_context(|| format!("{}: malformed TOML", f.display()))?;
        merge(&mut v, user);
    }
    for s in sets {
        let Some((k, val)) = s.split_once('=') else {
            bail!("--set {s}: expected key=value (e.g. --set train.lr=3e-4)")
        };
        set_path(&mut v, k.trim(), parse_value(val.trim()))?;
    }
    let what = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "config".into());
    T::deserialize(v).with_context(|| format!("{what}: invalid configuration"))
}

fn parse_value(s: &str) -> toml::Value {
    let doc = format!("x = {s}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("x")
            .unwrap_or_else(|| toml::Value::String(s.into())),
        Err(_) => toml::Value::String(s.into()),
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Set `a.b.c` in a TOML value, creating tables on the way.
pub fn set_path(v: &mut toml::Value, path: &str, val: toml::Value) -> Result<()> {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let toml::Value::Table(t) = cur else {
            bail!("--set {path}: `{}` is not a table", parts[..i].join("."))
        };
        if i == parts.len() - 1 {
            t.insert(p.to_string(), val);
            return Ok(());
        }
        cur = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_train::sft::SftConfig;

    #[test]
    fn file_then_overrides() {
        let dir = std::env::temp_dir().join(format!("rlhf-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("sft.toml");
        std::fs::write(
            &f,
            "model = \"m\"\ndata = \"d.jsonl\"\n[train]\nlr = 0.001\nbatch_size = 4\n",
        )
        .unwrap();
        let c: SftConfig = load(
            Some(&f),
            &[
                "train.lr=3e-4".into(),
                "out=runs/x".into(),
                "lora.r=4".into(),
                "lora.alpha=8".into(),
                "lora.target_modules=[\"q_proj\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.model, "m");
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.train.batch_size, 4);
        assert_eq!(c.out.to_str(), Some("runs/x"));
        assert_eq!(c.lora.unwrap().r, 4);
        let e = load::<SftConfig>(Some(&f), &["train.lrr=1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("lrr"), "{e:#}");
    }
}
