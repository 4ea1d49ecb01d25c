//! Metrics: one JSONL line per logging step, TensorBoard event files (so existing dashboards read
//! them), and a progress bar on a terminal (plain periodic lines otherwise).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub type Scalars = BTreeMap<String, f64>;

pub struct MetricsWriter {
    jsonl: File,
    tb: TbWriter,
    pub path: PathBuf,
}

impl MetricsWriter {
    /// Open (append) `dir/metrics.jsonl` and a new TensorBoard event file in `dir/tb/`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("metrics.jsonl");
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}", path.display()))?;
        let tb = TbWriter::create(&dir.join("tb"))?;
        Ok(Self { jsonl, tb, path })
    }

    pub fn log(&mut self, step: usize, scalars: &Scalars) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in scalars {
            obj.insert(
                k.clone(),
                serde_json::Number::from_f64(*v)
                    .map(Into::into)
                    .unwrap_or(serde_json::Value::Null),
            );
        }
        writeln!(self.jsonl, "{}", serde_json::Value::Object(obj))?;
        self.jsonl.flush()?;
        self.tb.write_scalars(step as i64, scalars)?;
        Ok(())
    }
}

/// Read back a metrics.jsonl file.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

// ----- TensorBoard event files (TFRecord framing of `Event` protos, written by hand) -----

pub struct TbWriter {
    f: File,
}

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut x: u64, out: &mut Vec<u8>) {
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
}

fn len_field(tag: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

impl TbWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{now}.{host}.{}",
            std::process::id()
        ));
        let f = File::create(&path).with_context(|| format!("{}", path.display()))?;
        let mut w = Self { f };
        let mut ev = vec![];
        ev.push(0x09);
        ev.extend_from_slice(&wall_time().to_le_bytes());
        len_field(0x1a, b"brain.Event:2", &mut ev);
        w.record(&ev)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.f.write_all(&buf)?;
        self.f.flush()?;
        Ok(())
    }

    pub fn write_scalars(&mut self, step: i64, scalars: &Scalars) -> Result<()> {
        let mut summary = vec![];
        for (k, v) in scalars {
            let mut val = vec![];
            len_field(0x0a, k.as_bytes(), &mut val);
            val.push(0x15);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            len_field(0x0a, &val, &mut summary);
        }
        let mut ev = vec![0x09];
        ev.extend_from_slice(&wall_time().to_le_bytes());
        ev.push(0x10);
        varint(step as u64, &mut ev);
        len_field(0x2a, &summary, &mut ev);
        self.record(&ev)
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ----- progress -----

/// A progress bar with ETA on a terminal; periodic plain lines when stderr is not a TTY.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: usize,
    start: std::time::Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(label: &str, total: usize, start_at: usize) -> Self {
        let quiet = std::env::var("RLHF_QUIET").is_ok();
        let bar = if std::io::stderr().is_terminal() && !quiet {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.set_position(start_at as u64);
            Some(b)
        } else {
            None
        };
        Self {
            bar,
            label: label.to_string(),
            total,
            start: std::time::Instant::now(),
            quiet,
        }
    }

    pub fn update(&self, step: usize, msg: &str, print_line: bool) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg.to_string());
            }
            None if print_line && !self.quiet => {
                eprintln!(
                    "[{}] step {step}/{} ({:.0}s) {msg}",
                    self.label,
                    self.total,
                    self.start.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
    }

    pub fn finish(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.finish_with_message(msg.to_string());
        } else if !self.quiet {
            eprintln!("[{}] done: {msg}", self.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
