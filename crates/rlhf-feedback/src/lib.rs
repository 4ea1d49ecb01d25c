//! # rlhf-feedback: the human-feedback service
//!
//! Annotators rank model completions in a browser; admins watch quality and export preference
//! data for `rlhf reward` / `rlhf dpo`.
//!
//! * [`store`]: the database layer ([`Store`]) — projects, users, sessions and API keys,
//!   candidate import, leasing ([`Store::next_task`]) and judgements
//!   ([`Store::submit_judgement`]), exports and the quality report. SQLite (default, WAL) or
//!   PostgreSQL. Library callers (e.g. simulated annotators) use it directly and go through the
//!   same code path as the web UI. The assignment / late-submission rules are documented there.
//! * [`web`]: the axum server — server-rendered annotator UI (works without JavaScript),
//!   admin dashboard, JSON API with bearer keys; the security model is documented there.
//! * [`html`]: pages, stylesheet and the small drag/keyboard ranking script.
//! * [`agreement`]: pure metric functions — Krippendorff's α (ordinal, missing data), Fleiss' κ,
//!   Kendall τ-b, Bradley–Terry and ranked-pairs consensus.
//! * [`cli`]: `rlhf feedback …` subcommands (clap) and [`cli::run`].
//!
//! All APIs are async (tokio). Synchronous callers create a runtime, e.g.
//! `tokio::runtime::Runtime::new()?.block_on(Store::connect("sqlite://feedback.db"))`, or use
//! [`cli::run_blocking`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use rlhf_feedback::store::*;
//! let store = Store::connect("sqlite://feedback.db").await?;
//! let p = store.create_project(&ProjectSpec { name: "demo".into(), k: 2, overlap: 1, gold_rate: 0.0,
//!     lease_secs: 600, guidelines: "Be helpful.".into() }).await?;
//! let alice = store.add_user("alice", "correct horse", Role::Annotator).await?;
//! store.import_candidates(p.id, &[CandidateRow { prompt: "2+2?".into(),
//!     completions: vec!["4".into(), "5".into()], meta: serde_json::json!({}), gold_ranking: None }]).await?;
//! let task = store.next_task(alice.id, p.id).await?.expect("work");
//! store.submit_judgement(alice.id, task.assignment_id, &Judgement { tiers: vec![vec![0], vec![1]],
//!     seconds_spent: 3.0, ..Default::default() }).await?;
//! let pairs = store.export_pairs(p.id, ExportMode::Consensus(ConsensusMethod::BradleyTerry)).await?;
//! # Ok(()) }
//! ```

pub mod agreement;
pub mod cli;
pub mod html;
pub mod store;
pub mod web;

pub use store::{
    CandidateRow, ConsensusMethod, ExportFormat, ExportMode, FeedbackError, Flag, Judgement,
    PairRecord, Project, ProjectSpec, QualityReport, RankingRecord, Role, Store, Task, User,
};
