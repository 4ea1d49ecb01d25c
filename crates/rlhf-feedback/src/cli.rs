//! `rlhf feedback …` subcommands (clap derive), for the `rlhf` binary to embed:
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Cmd { #[command(subcommand)] Feedback(rlhf_feedback::cli::FeedbackCmd), /* … */ }
//! // …
//! Cmd::Feedback(c) => rlhf_feedback::cli::run(c).await?,   // or cli::run_blocking(c)?
//! ```

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::store::{
    ConsensusMethod, ExportFormat, ExportMode, ProjectSpec, Role, Store, DEFAULT_DB,
};
use crate::web::{self, ServerConfig};

/// Who an export speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportModeArg {
    /// One consensus ranking per item (see `--method`).
    Consensus,
    /// Every annotator's own judgement, with an `"annotator"` field.
    Annotators,
}

#[derive(Debug, clap::Subcommand)]
pub enum FeedbackCmd {
    /// Run the web service (annotator UI, admin dashboard, JSON API).
    Serve {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: String,
        /// Mark cookies `Secure` (when served behind HTTPS).
        #[arg(long)]
        secure_cookies: bool,
    },
    /// Create a project.
    CreateProject {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        name: String,
        /// Candidates per prompt (2–9).
        #[arg(long, default_value_t = 4)]
        k: u32,
        /// Distinct annotators per item.
        #[arg(long, default_value_t = 3)]
        overlap: u32,
        /// Fraction of requests answered with a gold item.
        #[arg(long, default_value_t = 0.1)]
        gold_rate: f64,
        /// Lease length in seconds.
        #[arg(long, default_value_t = 1800)]
        lease_secs: i64,
        /// Guidelines Markdown file.
        #[arg(long)]
        guidelines: Option<PathBuf>,
    },
    /// Publish a new version of a project's guidelines.
    SetGuidelines {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        project: String,
        file: PathBuf,
    },
    /// Add a user.
    AddUser {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        username: String,
        #[arg(long, value_enum, default_value = "annotator")]
        role: Role,
        /// Password (else read from env RLHF_FEEDBACK_PASSWORD).
        #[arg(long)]
        password: Option<String>,
    },
    /// Create an API key for a user (printed once; the key has the user's role).
    CreateApiKey {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        username: String,
        #[arg(long, default_value = "cli")]
        label: String,
    },
    /// Import candidates from JSONL (`{"prompt","completions":[..],"meta":{..}}` per line;
    /// a `"gold_ranking"` field marks a gold item). `-` reads stdin.
    Import {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        project: String,
        file: PathBuf,
    },
    /// Export judgements as JSONL.
    Export {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        project: String,
        #[arg(long, value_enum, default_value = "pairs")]
        format: ExportFormat,
        #[arg(long, value_enum, default_value = "consensus")]
        mode: ExportModeArg,
        #[arg(long, value_enum, default_value = "bradley-terry")]
        method: ConsensusMethod,
        /// Output file (default stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Print quality and agreement numbers.
    Stats {
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        project: String,
        #[arg(long)]
        json: bool,
    },
}

/// Run one subcommand.
pub async fn run(cmd: FeedbackCmd) -> anyhow::Result<()> {
    match cmd {
        FeedbackCmd::Serve {
            db,
            bind,
            secure_cookies,
        } => {
            let store = Store::connect(&db).await?;
            let cfg = ServerConfig {
                secure_cookies,
                ..Default::default()
            };
            web::serve(store, &bind, cfg).await?;
        }
        FeedbackCmd::CreateProject {
            db,
            name,
            k,
            overlap,
            gold_rate,
            lease_secs,
            guidelines,
        } => {
            let store = Store::connect(&db).await?;
            let guidelines = match guidelines {
                Some(p) => std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                None => "# Guidelines\n\nRank the responses from most to least helpful, honest and harmless.".into(),
            };
            let p = store
                .create_project(&ProjectSpec {
                    name,
                    k,
                    overlap,
                    gold_rate,
                    lease_secs,
                    guidelines,
                })
                .await?;
            println!("created project {} (id {})", p.name, p.id);
        }
        FeedbackCmd::SetGuidelines { db, project, file } => {
            let store = Store::connect(&db).await?;
            let p = store.project_by_name(&project).await?;
            let body = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let v = store.set_guidelines(p.id, &body).await?;
            println!("published guidelines v{v} for {}", p.name);
        }
        FeedbackCmd::AddUser {
            db,
            username,
            role,
            password,
        } => {
            let password = match password.or_else(|| std::env::var("RLHF_FEEDBACK_PASSWORD").ok()) {
                Some(p) => p,
                None => bail!("give --password or set RLHF_FEEDBACK_PASSWORD"),
            };
            let store = Store::connect(&db).await?;
            let u = store.add_user(&username, &password, role).await?;
            println!("added {} ({})", u.username, u.role.as_str());
        }
        FeedbackCmd::CreateApiKey {
            db,
            username,
            label,
        } => {
            let store = Store::connect(&db).await?;
            println!("{}", store.create_api_key(&username, &label).await?);
        }
        FeedbackCmd::Import { db, project, file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let store = Store::connect(&db).await?;
            let p = store.project_by_name(&project).await?;
            let n = store.import_jsonl(p.id, &text).await?;
            println!("imported {n} items into {}", p.name);
        }
        FeedbackCmd::Export {
            db,
            project,
            format,
            mode,
            method,
            out,
        } => {
            let store = Store::connect(&db).await?;
            let p = store.project_by_name(&project).await?;
            let mode = match mode {
                ExportModeArg::Consensus => ExportMode::Consensus(method),
                ExportModeArg::Annotators => ExportMode::PerAnnotator,
            };
            let n = match out {
                Some(path) => {
                    let f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    store.export_jsonl(p.id, format, mode, f).await?
                }
                None => {
                    store
                        .export_jsonl(p.id, format, mode, std::io::stdout().lock())
                        .await?
                }
            };
            eprintln!("wrote {n} records");
        }
        FeedbackCmd::Stats { db, project, json } => {
            let store = Store::connect(&db).await?;
            let p = store.project_by_name(&project).await?;
            let r = store.agreement_report(p.id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or("-".into());
                println!(
                    "project {}: {} items ({} complete), {} gold, {} judgements, {} active leases",
                    r.project,
                    r.items,
                    r.complete_items,
                    r.gold_items,
                    r.judgements,
                    r.active_leases
                );
                println!(
                    "Krippendorff alpha (ordinal): {}  Fleiss kappa (pairs): {}  median s/item: {}",
                    f(r.alpha_ordinal),
                    f(r.fleiss_kappa_pairs),
                    f(r.median_seconds)
                );
                println!(
                    "{:<20} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    "annotator",
                    "judged",
                    "skips",
                    "all_bad",
                    "gold_acc",
                    "tau_b",
                    "med_s",
                    "per_h"
                );
                for a in &r.annotators {
                    println!(
                        "{:<20} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
                        a.username,
                        a.judgements,
                        a.skips,
                        a.all_bad,
                        f(a.gold_accuracy),
                        f(a.tau_b_vs_consensus),
                        f(a.median_seconds),
                        f(a.per_hour)
                    );
                }
            }
        }
    }
    Ok(())
}

/// [`run`] on a fresh multi-threaded tokio runtime, for synchronous callers.
pub fn run_blocking(cmd: FeedbackCmd) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cmd))
}
