//! Storage: every read and write of the feedback service goes through [`Store`], for the web UI,
//! the JSON API, the CLI and library callers (e.g. simulated annotators) alike.
//!
//! One schema, two dialects: SQLite (file created on first start, WAL mode) and PostgreSQL, both
//! through sqlx's `Any` driver with portable SQL (`$1` placeholders, integers for booleans and
//! Unix-millisecond timestamps, JSON stored as text).
//!
//! # Assignment rules
//! * An item is *occupied* by an assignment that is submitted (and not a skip) or whose lease is
//!   still running. A regular item is offered to an annotator only while it has fewer than
//!   `overlap` occupants and the annotator has never submitted it and holds no running lease on it.
//!   So it reaches `overlap` distinct annotators and is never over-assigned.
//! * A skip frees the slot (the item goes to someone else) but the skipper never gets it again.
//! * Leases expire after the project's `lease_secs`. An expired lease that is still the holder's
//!   only claim is renewed when the holder asks for work again, if the item still has room.
//! * **Late submissions**: a judgement submitted after its lease expired is kept if the item
//!   still needs it (fewer than `overlap` *other* occupants), and is then flagged `late`;
//!   otherwise it is refused with [`FeedbackError::Conflict`] and the assignment is marked expired.
//! * A second submission of the same assignment is refused (conflict): nothing is duplicated.
//! * Gold items (known ranking) are mixed in with probability `gold_rate` per request, each at
//!   most once per annotator, with no overlap limit; they are excluded from exports and agreement,
//!   and used for per-annotator gold accuracy.
//! * Every lease/submit runs in a transaction that first takes a per-project write lock:
//!   `BEGIN IMMEDIATE` on SQLite, `SELECT … FOR UPDATE` on the project row on PostgreSQL. That
//!   serialises the check-then-insert across connections and processes.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::agreement::{self, PairTally};

/// Default database URL for the CLI.
pub const DEFAULT_DB: &str = "sqlite://feedback.db";

/// Errors surfaced to the CLI and the web layer (which maps them to HTTP status codes).
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("forbidden")]
    Forbidden,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = FeedbackError> = std::result::Result<T, E>;

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Annotator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Annotator => "annotator",
        }
    }
    fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::Annotator
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub role: Role,
}

/// Settings for a new project.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProjectSpec {
    pub name: String,
    /// Candidates per prompt, 2..=9.
    pub k: u32,
    /// Distinct annotators per item.
    pub overlap: u32,
    /// Probability (0..1) that a request for work is answered with a gold item.
    pub gold_rate: f64,
    /// Lease length in seconds.
    pub lease_secs: i64,
    /// Guidelines (Markdown), version 1.
    pub guidelines: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub k: u32,
    pub overlap: u32,
    pub gold_rate: f64,
    pub lease_secs: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Guidelines {
    pub version: i64,
    pub body: String,
}

/// One line of an import file: `{"prompt": "...", "completions": ["..",".."], "meta": {...}}`.
/// A line with `gold_ranking` (tiers of original indices, best first) is a gold item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateRow {
    pub prompt: String,
    pub completions: Vec<String>,
    #[serde(default)]
    pub meta: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_ranking: Option<Vec<Vec<usize>>>,
}

/// Per-candidate flags an annotator may raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Harmful,
    FactuallyWrong,
    OffTopic,
}

impl Flag {
    pub const ALL: [Flag; 3] = [Flag::Harmful, Flag::FactuallyWrong, Flag::OffTopic];
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Harmful => "harmful",
            Flag::FactuallyWrong => "factually_wrong",
            Flag::OffTopic => "off_topic",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Flag::Harmful => "Harmful",
            Flag::FactuallyWrong => "Factually wrong",
            Flag::OffTopic => "Off-topic",
        }
    }
    pub fn parse(s: &str) -> Option<Flag> {
        Flag::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// An annotator's answer for one assignment. Candidate indices are ORIGINAL indices (the order
/// of `completions` at import), never display positions.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Judgement {
    /// Ordered tiers, best first, e.g. `[[0],[2,1],[3]]`. Must cover every candidate exactly
    /// once unless `skip` or `all_bad`.
    #[serde(default)]
    pub tiers: Vec<Vec<usize>>,
    #[serde(default)]
    pub skip: bool,
    #[serde(default)]
    pub all_bad: bool,
    /// Required for `skip` and `all_bad`.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub critique: Option<String>,
    /// Original candidate index → flags.
    #[serde(default)]
    pub flags: BTreeMap<usize, Vec<Flag>>,
    #[serde(default)]
    pub seconds_spent: f64,
}

/// A leased task, as shown to its annotator.
#[derive(Clone, Debug, Serialize)]
pub struct Task {
    pub assignment_id: i64,
    pub project_id: i64,
    pub item_id: i64,
    pub prompt: String,
    /// Candidates in display order: `(label, text)`; label A, B, C…
    pub candidates: Vec<(String, String)>,
    /// `order[display_position] = original index`.
    #[serde(skip)]
    pub order: Vec<usize>,
    pub expires_at: i64,
    pub guideline_version: i64,
    /// Judgements this annotator has submitted in the project.
    pub done: i64,
    /// `done` + tasks still available to this annotator (including this one).
    pub total: i64,
    #[serde(skip)]
    pub is_gold: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SubmitOutcome {
    pub judgement_id: i64,
    pub late: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    Pairs,
    Rankings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsensusMethod {
    /// Bradley–Terry scores (ties within 1e-6 share a tier).
    BradleyTerry,
    /// Tideman's ranked pairs.
    RankedPairs,
}

/// Export either one consensus per item, or every annotator's own judgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportMode {
    Consensus(ConsensusMethod),
    PerAnnotator,
}

/// `{"prompt","chosen","rejected"}` (+ `"annotator"` in per-annotator mode).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PairRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotator: Option<String>,
}

/// `{"prompt","completions":[…],"ranking":[[best],[tied,tied],…]}` (+ `"annotator"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankingRecord {
    pub prompt: String,
    pub completions: Vec<String>,
    pub ranking: Vec<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotator: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AnnotatorStats {
    pub username: String,
    pub judgements: i64,
    pub skips: i64,
    pub all_bad: i64,
    pub late: i64,
    pub gold_judged: i64,
    /// Fraction of strictly ordered gold pairs the annotator ordered the same way.
    pub gold_accuracy: Option<f64>,
    /// Mean Kendall τ-b against the item's Bradley–Terry consensus.
    pub tau_b_vs_consensus: Option<f64>,
    pub median_seconds: Option<f64>,
    /// Judgements per hour of time spent on them.
    pub per_hour: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct QualityReport {
    pub project: String,
    pub items: i64,
    pub gold_items: i64,
    /// Regular items with `overlap` non-skip judgements.
    pub complete_items: i64,
    pub judgements: i64,
    pub active_leases: i64,
    /// Krippendorff's α (ordinal) over (item, candidate) units, annotators as coders.
    pub alpha_ordinal: Option<f64>,
    /// Fleiss' κ over (item, candidate pair) subjects, categories {first better, tie, second}.
    pub fleiss_kappa_pairs: Option<f64>,
    pub median_seconds: Option<f64>,
    pub annotators: Vec<AnnotatorStats>,
}

/// Invariant check used by tests and the load bench.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Regular items whose occupants (non-skip submissions + running leases) exceed overlap.
    pub over_assigned_items: i64,
    /// (item, annotator) pairs with more than one judgement.
    pub duplicate_judgements: i64,
    /// Assignments marked submitted without a judgement row.
    pub submitted_without_judgement: i64,
    pub judgements: i64,
}

fn sha256_hex(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random token, 32 bytes, hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic shuffle of `0..k` for (annotator, item): splitmix64 seeded by a hash, then
/// Fisher–Yates. Stable across versions of this crate's dependencies.
pub fn display_order(annotator_id: i64, item_id: i64, k: usize) -> Vec<usize> {
    let d = Sha256::digest(format!("order:{annotator_id}:{item_id}").as_bytes());
    let mut state = u64::from_le_bytes(d[..8].try_into().unwrap());
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut v: Vec<usize> = (0..k).collect();
    for i in (1..k).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Label for a display position: A, B, C…
pub fn label(pos: usize) -> String {
    ((b'A' + pos as u8) as char).to_string()
}

/// Check that tiers are a partition of `0..k`.
pub fn validate_tiers(tiers: &[Vec<usize>], k: usize) -> Result<()> {
    let mut seen = vec![false; k];
    for t in tiers {
        if t.is_empty() {
            return Err(FeedbackError::Invalid("empty tier".into()));
        }
        for &c in t {
            if c >= k || seen[c] {
                return Err(FeedbackError::Invalid(format!(
                    "candidate {c} out of range or ranked twice"
                )));
            }
            seen[c] = true;
        }
    }
    if seen.iter().any(|s| !s) {
        return Err(FeedbackError::Invalid(
            "every candidate must be ranked".into(),
        ));
    }
    Ok(())
}

fn schema(d: Dialect) -> Vec<String> {
    let pk = match d {
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    let sql = r#"
CREATE TABLE IF NOT EXISTS users (id {PK}, username TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL, role TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (token_hash TEXT PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users(id), csrf TEXT NOT NULL, expires_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (id {PK}, user_id BIGINT NOT NULL REFERENCES users(id), key_hash TEXT NOT NULL UNIQUE, label TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (id {PK}, name TEXT NOT NULL UNIQUE, k BIGINT NOT NULL, overlap BIGINT NOT NULL, gold_rate DOUBLE PRECISION NOT NULL, lease_secs BIGINT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS guidelines (id {PK}, project_id BIGINT NOT NULL REFERENCES projects(id), version BIGINT NOT NULL, body TEXT NOT NULL, created_at BIGINT NOT NULL, UNIQUE (project_id, version));
CREATE TABLE IF NOT EXISTS items (id {PK}, project_id BIGINT NOT NULL REFERENCES projects(id), prompt TEXT NOT NULL, completions TEXT NOT NULL, meta TEXT NOT NULL, is_gold BIGINT NOT NULL, gold_tiers TEXT, created_at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS items_by_project ON items (project_id, is_gold, id);
CREATE TABLE IF NOT EXISTS assignments (id {PK}, project_id BIGINT NOT NULL REFERENCES projects(id), item_id BIGINT NOT NULL REFERENCES items(id), annotator_id BIGINT NOT NULL REFERENCES users(id), status TEXT NOT NULL, skipped BIGINT NOT NULL, leased_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, submitted_at BIGINT);
CREATE INDEX IF NOT EXISTS assignments_by_item ON assignments (item_id, status);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator_id, project_id, status);
CREATE INDEX IF NOT EXISTS assignments_by_item_annotator ON assignments (item_id, annotator_id, status);
CREATE TABLE IF NOT EXISTS judgements (id {PK}, assignment_id BIGINT NOT NULL UNIQUE REFERENCES assignments(id), project_id BIGINT NOT NULL, item_id BIGINT NOT NULL, annotator_id BIGINT NOT NULL, tiers TEXT NOT NULL, skip BIGINT NOT NULL, all_bad BIGINT NOT NULL, reason TEXT, critique TEXT, flags TEXT NOT NULL, seconds_spent DOUBLE PRECISION NOT NULL, guideline_version BIGINT NOT NULL, late BIGINT NOT NULL, created_at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS judgements_by_project ON judgements (project_id, item_id);
CREATE INDEX IF NOT EXISTS judgements_by_item ON judgements (item_id, annotator_id)
"#;
    sql.split(';')
        .map(|s| s.trim().replace("{PK}", pk))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Occupancy of an item by *other* annotators' claims: non-skip submissions + running leases.
const OCCUPIED_SQL: &str = "SELECT COUNT(*) FROM assignments a WHERE a.item_id = $1 AND a.id <> $2 \
     AND ((a.status = 'submitted' AND a.skipped = 0) OR (a.status = 'leased' AND a.expires_at > $3))";

/// Regular items open to annotator $2 in project $1 at time $3 with overlap $4.
const OPEN_ITEMS_WHERE: &str = "i.project_id = $1 AND i.is_gold = 0 \
     AND NOT EXISTS (SELECT 1 FROM assignments m WHERE m.item_id = i.id AND m.annotator_id = $2 \
        AND (m.status = 'submitted' OR m.status = 'leased')) \
     AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id \
        AND ((a.status = 'submitted' AND a.skipped = 0) OR (a.status = 'leased' AND a.expires_at > $3))) < $4";

/// Handle to the feedback database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl Store {
    /// Connect (and create the schema). `sqlite://path` creates the file if missing and turns on
    /// WAL; `postgres://…` connects to an existing database.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if url.starts_with("sqlite:") {
            let mut u = url.to_string();
            if !u.contains("mode=") && !u.contains(":memory:") {
                u.push(if u.contains('?') { '&' } else { '?' });
                u.push_str("mode=rwc");
            }
            (Dialect::Sqlite, u)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(FeedbackError::Invalid(format!(
                "unsupported database URL {url:?} (use sqlite://FILE or postgres://…)"
            )));
        };
        let opts = AnyPoolOptions::new()
            .max_connections(if dialect == Dialect::Sqlite { 8 } else { 16 })
            .acquire_timeout(std::time::Duration::from_secs(60));
        let opts = if dialect == Dialect::Sqlite {
            opts.after_connect(|conn, _meta| {
                Box::pin(async move {
                    use sqlx::Executor;
                    conn.execute("PRAGMA busy_timeout = 30000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            })
        } else {
            opts
        };
        let pool = opts.connect(&url).await?;
        let store = Store { pool, dialect };
        if dialect == Dialect::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_optional(&store.pool)
                .await?;
        }
        store.migrate().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            // Serialise concurrent first starts.
            sqlx::query("SELECT pg_advisory_xact_lock(727274)")
                .execute(&mut *tx)
                .await?;
        }
        for stmt in schema(self.dialect) {
            sqlx::query(&stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Begin a transaction holding the per-project write lock (see module docs).
    async fn begin_locked(&self, project_id: i64) -> Result<Transaction<'static, Any>> {
        match self.dialect {
            Dialect::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Dialect::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT id FROM projects WHERE id = $1 FOR UPDATE")
                    .bind(project_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    // ---------------------------------------------------------------- users & auth

    /// Create a user with an argon2id password hash.
    pub async fn add_user(&self, username: &str, password: &str, role: Role) -> Result<User> {
        let username = username.trim();
        if username.is_empty()
            || username.len() > 64
            || !username
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(FeedbackError::Invalid(
                "username: 1-64 characters from a-z A-Z 0-9 . _ - @".into(),
            ));
        }
        if password.len() < 8 {
            return Err(FeedbackError::Invalid(
                "password must have at least 8 characters".into(),
            ));
        }
        let pw = password.to_string();
        let hash = tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            Argon2::default()
                .hash_password(pw.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await
        .map_err(|e| FeedbackError::Other(e.to_string()))?
        .map_err(|e| FeedbackError::Other(e.to_string()))?;
        let row = sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(username)
        .bind(hash)
        .bind(role.as_str())
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.message().to_lowercase().contains("unique") => {
                FeedbackError::Conflict(format!("user {username} exists"))
            }
            _ => e.into(),
        })?;
        Ok(User {
            id: row.try_get(0)?,
            username: username.to_string(),
            role,
        })
    }

    pub async fn user_by_name(&self, username: &str) -> Result<User> {
        let r = sqlx::query("SELECT id, username, role FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| FeedbackError::NotFound(format!("user {username}")))?;
        user_from_row(&r)
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query("SELECT id, username, role FROM users ORDER BY username")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    /// Check a password. Returns `None` for unknown users or wrong passwords (and spends the
    /// same hashing time in both cases).
    pub async fn verify_login(&self, username: &str, password: &str) -> Result<Option<User>> {
        let r =
            sqlx::query("SELECT id, username, role, password_hash FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (user, hash) = match &r {
            Some(r) => (Some(user_from_row(r)?), r.try_get::<String, _>(3)?),
            None => {
                let d = DUMMY.get_or_init(|| {
                    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
                    Argon2::default()
                        .hash_password(b"not-a-password", &salt)
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                });
                (None, d.clone())
            }
        };
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .map_err(|e| FeedbackError::Other(e.to_string()))?;
        Ok(if ok { user } else { None })
    }

    /// Create a session; returns `(token, csrf_token)`. Only the token's hash is stored.
    pub async fn create_session(&self, user_id: i64, ttl_secs: i64) -> Result<(String, String)> {
        let token = random_token();
        let csrf = random_token();
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, csrf, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(sha256_hex(&token))
        .bind(user_id)
        .bind(&csrf)
        .bind(now_ms() + ttl_secs * 1000)
        .execute(&self.pool)
        .await?;
        Ok((token, csrf))
    }

    /// Look a session up: `(user, csrf_token)`.
    pub async fn session(&self, token: &str) -> Result<Option<(User, String)>> {
        let r = sqlx::query(
            "SELECT u.id, u.username, u.role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(sha256_hex(token))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        match r {
            Some(r) => Ok(Some((user_from_row(&r)?, r.try_get(3)?))),
            None => Ok(None),
        }
    }

    pub async fn delete_session(&self, token: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(sha256_hex(token))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Create an API key for a user (the key carries the user's role). Returns the key; only its
    /// hash is stored.
    pub async fn create_api_key(&self, username: &str, label: &str) -> Result<String> {
        let user = self.user_by_name(username).await?;
        let key = format!("rlhf_{}", random_token());
        sqlx::query(
            "INSERT INTO api_keys (user_id, key_hash, label, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(user.id)
        .bind(sha256_hex(&key))
        .bind(label)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    pub async fn user_for_api_key(&self, key: &str) -> Result<Option<User>> {
        let r = sqlx::query(
            "SELECT u.id, u.username, u.role FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = $1",
        )
        .bind(sha256_hex(key))
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(user_from_row).transpose()
    }

    // ---------------------------------------------------------------- projects

    pub async fn create_project(&self, spec: &ProjectSpec) -> Result<Project> {
        if !(2..=9).contains(&spec.k) {
            return Err(FeedbackError::Invalid("K must be between 2 and 9".into()));
        }
        if spec.overlap < 1 {
            return Err(FeedbackError::Invalid("overlap must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&spec.gold_rate) {
            return Err(FeedbackError::Invalid("gold rate must be in 0..1".into()));
        }
        if spec.lease_secs < 1 {
            return Err(FeedbackError::Invalid("lease must be at least 1 s".into()));
        }
        if spec.name.trim().is_empty() {
            return Err(FeedbackError::Invalid("project name is empty".into()));
        }
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "INSERT INTO projects (name, k, overlap, gold_rate, lease_secs, created_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(spec.name.trim())
        .bind(spec.k as i64)
        .bind(spec.overlap as i64)
        .bind(spec.gold_rate)
        .bind(spec.lease_secs)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.message().to_lowercase().contains("unique") => {
                FeedbackError::Conflict(format!("project {} exists", spec.name))
            }
            _ => e.into(),
        })?;
        let id: i64 = r.try_get(0)?;
        sqlx::query(
            "INSERT INTO guidelines (project_id, version, body, created_at) VALUES ($1, 1, $2, $3)",
        )
        .bind(id)
        .bind(&spec.guidelines)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.project(id).await
    }

    pub async fn project(&self, id: i64) -> Result<Project> {
        let r = sqlx::query(
            "SELECT id, name, k, overlap, gold_rate, lease_secs FROM projects WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| FeedbackError::NotFound(format!("project {id}")))?;
        project_from_row(&r)
    }

    /// Find a project by name, or by numeric id.
    pub async fn project_by_name(&self, name: &str) -> Result<Project> {
        let r = sqlx::query(
            "SELECT id, name, k, overlap, gold_rate, lease_secs FROM projects WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match r {
            Some(r) => project_from_row(&r),
            None => match name.parse::<i64>() {
                Ok(id) => self.project(id).await,
                Err(_) => Err(FeedbackError::NotFound(format!("project {name}"))),
            },
        }
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>> {
        let rows = sqlx::query(
            "SELECT id, name, k, overlap, gold_rate, lease_secs FROM projects ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(project_from_row).collect()
    }

    pub async fn guidelines(&self, project_id: i64) -> Result<Guidelines> {
        let r = sqlx::query(
            "SELECT version, body FROM guidelines WHERE project_id = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| FeedbackError::NotFound("guidelines".into()))?;
        Ok(Guidelines {
            version: r.try_get(0)?,
            body: r.try_get(1)?,
        })
    }

    /// Publish a new guidelines version; returns it.
    pub async fn set_guidelines(&self, project_id: i64, body: &str) -> Result<i64> {
        let mut tx = self.begin_locked(project_id).await?;
        let v: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) FROM guidelines WHERE project_id = $1")
                .bind(project_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        sqlx::query("INSERT INTO guidelines (project_id, version, body, created_at) VALUES ($1, $2, $3, $4)")
            .bind(project_id)
            .bind(v + 1)
            .bind(body)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(v + 1)
    }

    /// Import candidate rows. Every row must have exactly the project's K completions.
    /// Returns the number of items created. All rows or none.
    pub async fn import_candidates(&self, project_id: i64, rows: &[CandidateRow]) -> Result<usize> {
        let p = self.project(project_id).await?;
        for (i, r) in rows.iter().enumerate() {
            if r.completions.len() != p.k as usize {
                return Err(FeedbackError::Invalid(format!(
                    "row {}: {} completions, project K is {}",
                    i + 1,
                    r.completions.len(),
                    p.k
                )));
            }
            if let Some(g) = &r.gold_ranking {
                validate_tiers(g, p.k as usize).map_err(|e| {
                    FeedbackError::Invalid(format!("row {}: gold_ranking: {e}", i + 1))
                })?;
            }
        }
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        for r in rows {
            sqlx::query(
                "INSERT INTO items (project_id, prompt, completions, meta, is_gold, gold_tiers, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(project_id)
            .bind(&r.prompt)
            .bind(serde_json::to_string(&r.completions).unwrap())
            .bind(serde_json::to_string(&r.meta).unwrap())
            .bind(r.gold_ranking.is_some() as i64)
            .bind(r.gold_ranking.as_ref().map(|g| serde_json::to_string(g).unwrap()))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Parse JSONL (one [`CandidateRow`] per non-empty line) and import it.
    pub async fn import_jsonl(&self, project_id: i64, text: &str) -> Result<usize> {
        let rows = parse_jsonl(text)?;
        self.import_candidates(project_id, &rows).await
    }

    // ---------------------------------------------------------------- assignment

    /// Lease the next task for `annotator_id` in `project_id` (or return the running lease).
    /// `None` when nothing is left for this annotator.
    pub async fn next_task(&self, annotator_id: i64, project_id: i64) -> Result<Option<Task>> {
        let p = self.project(project_id).await?;
        let mut tx = self.begin_locked(project_id).await?;
        let now = now_ms();
        let lease_until = now + p.lease_secs * 1000;
        let mut chosen: Option<i64> = None;
        // 1. The annotator's own leases: running ones are returned; expired ones are renewed if
        //    the item still has room, otherwise closed.
        let mine = sqlx::query(
            "SELECT a.id, a.item_id, a.expires_at, i.is_gold FROM assignments a JOIN items i ON i.id = a.item_id \
             WHERE a.annotator_id = $1 AND a.project_id = $2 AND a.status = 'leased' ORDER BY a.id",
        )
        .bind(annotator_id)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in &mine {
            let (aid, item, exp, gold): (i64, i64, i64, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            if exp > now {
                chosen = Some(aid);
                break;
            }
            let occupied: i64 = sqlx::query(OCCUPIED_SQL)
                .bind(item)
                .bind(aid)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if gold == 1 || occupied < p.overlap as i64 {
                sqlx::query("UPDATE assignments SET leased_at = $1, expires_at = $2 WHERE id = $3")
                    .bind(now)
                    .bind(lease_until)
                    .bind(aid)
                    .execute(&mut *tx)
                    .await?;
                chosen = Some(aid);
                break;
            }
            sqlx::query("UPDATE assignments SET status = 'expired' WHERE id = $1")
                .bind(aid)
                .execute(&mut *tx)
                .await?;
        }
        // 2. A new item: gold with probability gold_rate, else the oldest open regular item.
        if chosen.is_none() {
            let mut item: Option<i64> = None;
            let regular: Option<i64> = sqlx::query(&format!(
                "SELECT i.id FROM items i WHERE {OPEN_ITEMS_WHERE} ORDER BY i.id LIMIT 1"
            ))
            .bind(project_id)
            .bind(annotator_id)
            .bind(now)
            .bind(p.overlap as i64)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
            if regular.is_some() && p.gold_rate > 0.0 && rand::random::<f64>() < p.gold_rate {
                item = sqlx::query(
                    "SELECT i.id FROM items i WHERE i.project_id = $1 AND i.is_gold = 1 AND NOT EXISTS \
                     (SELECT 1 FROM assignments m WHERE m.item_id = i.id AND m.annotator_id = $2) ORDER BY i.id LIMIT 1",
                )
                .bind(project_id)
                .bind(annotator_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            }
            if item.is_none() {
                item = regular;
            }
            if let Some(item) = item {
                let r = sqlx::query(
                    "INSERT INTO assignments (project_id, item_id, annotator_id, status, skipped, leased_at, expires_at) \
                     VALUES ($1, $2, $3, 'leased', 0, $4, $5) RETURNING id",
                )
                .bind(project_id)
                .bind(item)
                .bind(annotator_id)
                .bind(now)
                .bind(lease_until)
                .fetch_one(&mut *tx)
                .await?;
                chosen = Some(r.try_get(0)?);
            }
        }
        tx.commit().await?;
        match chosen {
            Some(aid) => Ok(Some(self.task(annotator_id, aid).await?)),
            None => Ok(None),
        }
    }

    /// Load an assignment for display. Only its own annotator may see it ([`FeedbackError::Forbidden`]
    /// otherwise); submitted or expired assignments are a conflict.
    pub async fn task(&self, annotator_id: i64, assignment_id: i64) -> Result<Task> {
        let r = sqlx::query(
            "SELECT a.annotator_id, a.status, a.expires_at, a.project_id, i.id, i.prompt, i.completions, i.is_gold \
             FROM assignments a JOIN items i ON i.id = a.item_id WHERE a.id = $1",
        )
        .bind(assignment_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| FeedbackError::NotFound(format!("assignment {assignment_id}")))?;
        let owner: i64 = r.try_get(0)?;
        if owner != annotator_id {
            return Err(FeedbackError::Forbidden);
        }
        let status: String = r.try_get(1)?;
        if status != "leased" {
            return Err(FeedbackError::Conflict(format!("assignment is {status}")));
        }
        let project_id: i64 = r.try_get(3)?;
        let item_id: i64 = r.try_get(4)?;
        let completions: Vec<String> = serde_json::from_str(&r.try_get::<String, _>(6)?)
            .map_err(|e| FeedbackError::Other(e.to_string()))?;
        let order = display_order(annotator_id, item_id, completions.len());
        let candidates = order
            .iter()
            .enumerate()
            .map(|(pos, &orig)| (label(pos), completions[orig].clone()))
            .collect();
        let (done, total) = self.progress(annotator_id, project_id, true).await?;
        Ok(Task {
            assignment_id,
            project_id,
            item_id,
            prompt: r.try_get(5)?,
            candidates,
            order,
            expires_at: r.try_get(2)?,
            guideline_version: self.guidelines(project_id).await?.version,
            done,
            total,
            is_gold: r.try_get::<i64, _>(7)? == 1,
        })
    }

    /// `(done, total)` for an annotator: submitted judgements, and that plus what is still open
    /// to them (regular items) plus running leases.
    pub async fn progress(
        &self,
        annotator_id: i64,
        project_id: i64,
        _has_lease: bool,
    ) -> Result<(i64, i64)> {
        let p = self.project(project_id).await?;
        let now = now_ms();
        let done: i64 = sqlx::query(
            "SELECT COUNT(*) FROM assignments WHERE annotator_id = $1 AND project_id = $2 AND status = 'submitted'",
        )
        .bind(annotator_id)
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let leased: i64 = sqlx::query(
            "SELECT COUNT(*) FROM assignments WHERE annotator_id = $1 AND project_id = $2 AND status = 'leased'",
        )
        .bind(annotator_id)
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let open: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM items i WHERE {OPEN_ITEMS_WHERE}"
        ))
        .bind(project_id)
        .bind(annotator_id)
        .bind(now)
        .bind(p.overlap as i64)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok((done, done + leased + open))
    }

    /// Store a judgement for the annotator's assignment (see module docs for the late rule).
    pub async fn submit_judgement(
        &self,
        annotator_id: i64,
        assignment_id: i64,
        j: &Judgement,
    ) -> Result<SubmitOutcome> {
        let project_id: i64 = sqlx::query("SELECT project_id FROM assignments WHERE id = $1")
            .bind(assignment_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| FeedbackError::NotFound(format!("assignment {assignment_id}")))?
            .try_get(0)?;
        let p = self.project(project_id).await?;
        let k = p.k as usize;
        // Validate before locking.
        let mut j = j.clone();
        let reason = j.reason.as_deref().map(str::trim).unwrap_or("");
        if j.skip || j.all_bad {
            if reason.is_empty() {
                return Err(FeedbackError::Invalid(
                    "a reason is required to skip or mark all bad".into(),
                ));
            }
            j.tiers = if j.all_bad {
                vec![(0..k).collect()]
            } else {
                vec![]
            };
        } else {
            validate_tiers(&j.tiers, k)?;
        }
        if j.critique.as_deref().is_some_and(|c| c.len() > 20_000) || reason.len() > 2_000 {
            return Err(FeedbackError::Invalid("text too long".into()));
        }
        if j.flags.keys().any(|&c| c >= k) {
            return Err(FeedbackError::Invalid("flag on unknown candidate".into()));
        }
        let secs = if j.seconds_spent.is_finite() {
            j.seconds_spent.max(0.0)
        } else {
            0.0
        };
        let guideline_version = self.guidelines(project_id).await?.version;

        let mut tx = self.begin_locked(project_id).await?;
        let now = now_ms();
        let r = sqlx::query(
            "SELECT a.annotator_id, a.status, a.expires_at, a.item_id, i.is_gold FROM assignments a \
             JOIN items i ON i.id = a.item_id WHERE a.id = $1",
        )
        .bind(assignment_id)
        .fetch_one(&mut *tx)
        .await?;
        let (owner, status, exp, item, gold): (i64, String, i64, i64, i64) = (
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        );
        if owner != annotator_id {
            return Err(FeedbackError::Forbidden);
        }
        if status == "submitted" {
            return Err(FeedbackError::Conflict("already submitted".into()));
        }
        let late = status == "expired" || exp <= now;
        if late && gold == 0 && !j.skip {
            let occupied: i64 = sqlx::query(OCCUPIED_SQL)
                .bind(item)
                .bind(assignment_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if occupied >= p.overlap as i64 {
                sqlx::query("UPDATE assignments SET status = 'expired' WHERE id = $1")
                    .bind(assignment_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Err(FeedbackError::Conflict(
                    "lease expired and the item already has enough judgements".into(),
                ));
            }
        }
        // Belt and braces: one judgement per (item, annotator).
        let dup: i64 =
            sqlx::query("SELECT COUNT(*) FROM judgements WHERE item_id = $1 AND annotator_id = $2")
                .bind(item)
                .bind(annotator_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        if dup > 0 {
            return Err(FeedbackError::Conflict(
                "item already judged by this annotator".into(),
            ));
        }
        // Close any other lease this annotator holds on the same item.
        sqlx::query(
            "UPDATE assignments SET status = 'expired' WHERE item_id = $1 AND annotator_id = $2 AND status = 'leased' AND id <> $3",
        )
        .bind(item)
        .bind(annotator_id)
        .bind(assignment_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE assignments SET status = 'submitted', skipped = $1, submitted_at = $2 WHERE id = $3")
            .bind(j.skip as i64)
            .bind(now)
            .bind(assignment_id)
            .execute(&mut *tx)
            .await?;
        let flags: BTreeMap<usize, Vec<Flag>> =
            j.flags.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let r = sqlx::query(
            "INSERT INTO judgements (assignment_id, project_id, item_id, annotator_id, tiers, skip, all_bad, reason, critique, flags, seconds_spent, guideline_version, late, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
        )
        .bind(assignment_id)
        .bind(project_id)
        .bind(item)
        .bind(annotator_id)
        .bind(serde_json::to_string(&j.tiers).unwrap())
        .bind(j.skip as i64)
        .bind(j.all_bad as i64)
        .bind(if reason.is_empty() { None } else { Some(reason.to_string()) })
        .bind(j.critique.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(str::to_string))
        .bind(serde_json::to_string(&flags).unwrap())
        .bind(secs)
        .bind(guideline_version)
        .bind(late as i64)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = r.try_get(0)?;
        tx.commit().await?;
        Ok(SubmitOutcome {
            judgement_id: id,
            late,
        })
    }

    /// Force a lease to expire now (admin action; also used by tests).
    pub async fn expire_lease(&self, assignment_id: i64) -> Result<()> {
        sqlx::query("UPDATE assignments SET expires_at = $1 WHERE id = $2 AND status = 'leased'")
            .bind(now_ms() - 1)
            .bind(assignment_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Critiques and flags of a project's judgements, newest first (for the dashboard).
    pub async fn recent_feedback(&self, project_id: i64, limit: i64) -> Result<Vec<FeedbackNote>> {
        let rows = sqlx::query(
            "SELECT u.username, j.item_id, j.skip, j.all_bad, j.reason, j.critique, j.flags FROM judgements j \
             JOIN users u ON u.id = j.annotator_id WHERE j.project_id = $1 \
             AND (j.critique IS NOT NULL OR j.reason IS NOT NULL OR j.flags <> '{}') ORDER BY j.id DESC LIMIT $2",
        )
        .bind(project_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FeedbackNote {
                    annotator: r.try_get(0)?,
                    item_id: r.try_get(1)?,
                    skip: r.try_get::<i64, _>(2)? == 1,
                    all_bad: r.try_get::<i64, _>(3)? == 1,
                    reason: r.try_get(4)?,
                    critique: r.try_get(5)?,
                    flags: serde_json::from_str(&r.try_get::<String, _>(6)?).unwrap_or_default(),
                })
            })
            .collect()
    }

    // ---------------------------------------------------------------- export & quality

    async fn load_items(&self, project_id: i64) -> Result<Vec<ItemRow>> {
        let rows = sqlx::query(
            "SELECT id, prompt, completions, is_gold, gold_tiers FROM items WHERE project_id = $1 ORDER BY id",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let gold: Option<String> = r.try_get(4)?;
                Ok(ItemRow {
                    id: r.try_get(0)?,
                    prompt: r.try_get(1)?,
                    completions: serde_json::from_str(&r.try_get::<String, _>(2)?)
                        .map_err(|e| FeedbackError::Other(e.to_string()))?,
                    is_gold: r.try_get::<i64, _>(3)? == 1,
                    gold_tiers: gold.and_then(|g| serde_json::from_str(&g).ok()),
                })
            })
            .collect()
    }

    async fn load_judgements(&self, project_id: i64) -> Result<Vec<JudgementRow>> {
        let rows = sqlx::query(
            "SELECT j.item_id, u.username, j.tiers, j.skip, j.all_bad, j.seconds_spent, j.late FROM judgements j \
             JOIN users u ON u.id = j.annotator_id WHERE j.project_id = $1 ORDER BY j.item_id, j.id",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JudgementRow {
                    item_id: r.try_get(0)?,
                    annotator: r.try_get(1)?,
                    tiers: serde_json::from_str(&r.try_get::<String, _>(2)?).unwrap_or_default(),
                    skip: r.try_get::<i64, _>(3)? == 1,
                    all_bad: r.try_get::<i64, _>(4)? == 1,
                    seconds: r.try_get(5)?,
                    late: r.try_get::<i64, _>(6)? == 1,
                })
            })
            .collect()
    }

    /// Items with their non-skip judgements (regular items only).
    async fn judged_items(&self, project_id: i64) -> Result<Vec<(ItemRow, Vec<JudgementRow>)>> {
        let items = self.load_items(project_id).await?;
        let mut by_item: HashMap<i64, Vec<JudgementRow>> = HashMap::new();
        for j in self.load_judgements(project_id).await? {
            if !j.skip {
                by_item.entry(j.item_id).or_default().push(j);
            }
        }
        Ok(items
            .into_iter()
            .filter(|i| !i.is_gold)
            .filter_map(|i| by_item.remove(&i.id).map(|js| (i, js)))
            .collect())
    }

    /// Preference pairs: consensus per item (all pairs between consensus tiers) or every
    /// annotator's own pairs (with `annotator`). Gold items and skips are excluded.
    pub async fn export_pairs(&self, project_id: i64, mode: ExportMode) -> Result<Vec<PairRecord>> {
        let mut out = Vec::new();
        for r in self.export_rankings(project_id, mode).await? {
            for (a, b) in agreement::tiers_to_pairs(&r.ranking) {
                out.push(PairRecord {
                    prompt: r.prompt.clone(),
                    chosen: r.completions[a].clone(),
                    rejected: r.completions[b].clone(),
                    annotator: r.annotator.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Rankings (tiers of indices into `completions`, best first).
    pub async fn export_rankings(
        &self,
        project_id: i64,
        mode: ExportMode,
    ) -> Result<Vec<RankingRecord>> {
        let mut out = Vec::new();
        for (item, js) in self.judged_items(project_id).await? {
            match mode {
                ExportMode::PerAnnotator => {
                    for j in js {
                        out.push(RankingRecord {
                            prompt: item.prompt.clone(),
                            completions: item.completions.clone(),
                            ranking: j.tiers.clone(),
                            annotator: Some(j.annotator.clone()),
                        });
                    }
                }
                ExportMode::Consensus(method) => {
                    let ranking = consensus(&item.completions, &js, method);
                    out.push(RankingRecord {
                        prompt: item.prompt.clone(),
                        completions: item.completions.clone(),
                        ranking,
                        annotator: None,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Write an export as JSONL; returns the number of lines.
    pub async fn export_jsonl<W: std::io::Write>(
        &self,
        project_id: i64,
        format: ExportFormat,
        mode: ExportMode,
        mut w: W,
    ) -> Result<usize> {
        let io = |e: std::io::Error| FeedbackError::Other(e.to_string());
        let mut n = 0;
        match format {
            ExportFormat::Pairs => {
                for r in self.export_pairs(project_id, mode).await? {
                    writeln!(w, "{}", serde_json::to_string(&r).unwrap()).map_err(io)?;
                    n += 1;
                }
            }
            ExportFormat::Rankings => {
                for r in self.export_rankings(project_id, mode).await? {
                    writeln!(w, "{}", serde_json::to_string(&r).unwrap()).map_err(io)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Gold accuracy, agreement, throughput and timing for a project.
    pub async fn agreement_report(&self, project_id: i64) -> Result<QualityReport> {
        let p = self.project(project_id).await?;
        let items = self.load_items(project_id).await?;
        let judgements = self.load_judgements(project_id).await?;
        let item_map: HashMap<i64, &ItemRow> = items.iter().map(|i| (i.id, i)).collect();
        let mut rep = QualityReport {
            project: p.name.clone(),
            items: items.iter().filter(|i| !i.is_gold).count() as i64,
            gold_items: items.iter().filter(|i| i.is_gold).count() as i64,
            judgements: judgements.len() as i64,
            ..Default::default()
        };
        rep.active_leases = sqlx::query(
            "SELECT COUNT(*) FROM assignments WHERE project_id = $1 AND status = 'leased' AND expires_at > $2",
        )
        .bind(project_id)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;

        // Annotator columns.
        let mut names: Vec<String> = judgements.iter().map(|j| j.annotator.clone()).collect();
        names.sort();
        names.dedup();
        let col: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();

        // Group regular non-skip judgements per item.
        let mut per_item: BTreeMap<i64, Vec<&JudgementRow>> = BTreeMap::new();
        for j in &judgements {
            if let Some(it) = item_map.get(&j.item_id) {
                if !it.is_gold && !j.skip {
                    per_item.entry(j.item_id).or_default().push(j);
                }
            }
        }
        rep.complete_items = per_item
            .values()
            .filter(|v| v.len() >= p.overlap as usize)
            .count() as i64;

        let mut units: Vec<Vec<Option<f64>>> = Vec::new();
        let mut fleiss: Vec<Vec<usize>> = Vec::new();
        let mut tau: HashMap<&str, Vec<f64>> = HashMap::new();
        for (item_id, js) in &per_item {
            let k = item_map[item_id].completions.len();
            let ranks: Vec<Vec<Option<f64>>> = js
                .iter()
                .map(|j| agreement::tiers_to_ranks(&j.tiers, k))
                .collect();
            for c in 0..k {
                let mut unit = vec![None; names.len()];
                for (j, r) in js.iter().zip(&ranks) {
                    unit[col[j.annotator.as_str()]] = r[c];
                }
                units.push(unit);
            }
            if js.len() >= 2 {
                for a in 0..k {
                    for b in (a + 1)..k {
                        let mut counts = vec![0usize; 3];
                        for r in &ranks {
                            if let (Some(x), Some(y)) = (r[a], r[b]) {
                                counts[if x < y {
                                    0
                                } else if x == y {
                                    1
                                } else {
                                    2
                                }] += 1;
                            }
                        }
                        fleiss.push(counts);
                    }
                }
                let mut tally = PairTally::new(k);
                for j in js {
                    tally.add_tiers(&j.tiers);
                }
                let scores = agreement::bradley_terry_scores(&tally, 0.1);
                for (j, r) in js.iter().zip(&ranks) {
                    let a: Vec<f64> = r.iter().map(|x| -x.unwrap_or(0.0)).collect();
                    if let Some(t) = agreement::kendall_tau_b(&a, &scores) {
                        tau.entry(j.annotator.as_str()).or_default().push(t);
                    }
                }
            }
        }
        rep.alpha_ordinal = agreement::krippendorff_alpha_ordinal(&units);
        rep.fleiss_kappa_pairs = agreement::fleiss_kappa(&fleiss);
        let mut all_secs: Vec<f64> = judgements.iter().map(|j| j.seconds).collect();
        rep.median_seconds = median(&mut all_secs);

        for name in &names {
            let mine: Vec<&JudgementRow> =
                judgements.iter().filter(|j| &j.annotator == name).collect();
            let mut st = AnnotatorStats {
                username: name.clone(),
                judgements: mine.len() as i64,
                skips: mine.iter().filter(|j| j.skip).count() as i64,
                all_bad: mine.iter().filter(|j| j.all_bad).count() as i64,
                late: mine.iter().filter(|j| j.late).count() as i64,
                ..Default::default()
            };
            let (mut agree, mut total) = (0usize, 0usize);
            for j in &mine {
                let Some(it) = item_map.get(&j.item_id) else {
                    continue;
                };
                let (true, Some(gold), false) = (it.is_gold, &it.gold_tiers, j.skip) else {
                    continue;
                };
                st.gold_judged += 1;
                let r = agreement::tiers_to_ranks(&j.tiers, it.completions.len());
                for (a, b) in agreement::tiers_to_pairs(gold) {
                    total += 1;
                    if let (Some(x), Some(y)) = (r[a], r[b]) {
                        if x < y {
                            agree += 1;
                        }
                    }
                }
            }
            st.gold_accuracy = (total > 0).then(|| agree as f64 / total as f64);
            if let Some(ts) = tau.get(name.as_str()) {
                st.tau_b_vs_consensus = Some(ts.iter().sum::<f64>() / ts.len() as f64);
            }
            let mut secs: Vec<f64> = mine.iter().map(|j| j.seconds).collect();
            let sum: f64 = secs.iter().sum();
            st.median_seconds = median(&mut secs);
            st.per_hour = (sum > 0.0).then(|| mine.len() as f64 * 3600.0 / sum);
            rep.annotators.push(st);
        }
        Ok(rep)
    }

    /// Check the assignment invariants (see [`IntegrityReport`]).
    pub async fn integrity(&self, project_id: i64) -> Result<IntegrityReport> {
        let p = self.project(project_id).await?;
        let now = now_ms();
        let over: i64 = sqlx::query(
            "SELECT COUNT(*) FROM items i WHERE i.project_id = $1 AND i.is_gold = 0 AND \
             (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND ((a.status = 'submitted' AND a.skipped = 0) \
              OR (a.status = 'leased' AND a.expires_at > $2))) > $3",
        )
        .bind(project_id)
        .bind(now)
        .bind(p.overlap as i64)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let dup: i64 = sqlx::query(
            "SELECT COUNT(*) FROM (SELECT item_id, annotator_id FROM judgements WHERE project_id = $1 \
             GROUP BY item_id, annotator_id HAVING COUNT(*) > 1) d",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let missing: i64 = sqlx::query(
            "SELECT COUNT(*) FROM assignments a WHERE a.project_id = $1 AND a.status = 'submitted' AND NOT EXISTS \
             (SELECT 1 FROM judgements j WHERE j.assignment_id = a.id)",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM judgements WHERE project_id = $1")
            .bind(project_id)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(IntegrityReport {
            over_assigned_items: over,
            duplicate_judgements: dup,
            submitted_without_judgement: missing,
            judgements: n,
        })
    }
}

/// A critique / flag / reason left by an annotator.
#[derive(Clone, Debug, Serialize)]
pub struct FeedbackNote {
    pub annotator: String,
    pub item_id: i64,
    pub skip: bool,
    pub all_bad: bool,
    pub reason: Option<String>,
    pub critique: Option<String>,
    pub flags: BTreeMap<usize, Vec<Flag>>,
}

struct ItemRow {
    id: i64,
    prompt: String,
    completions: Vec<String>,
    is_gold: bool,
    gold_tiers: Option<Vec<Vec<usize>>>,
}

struct JudgementRow {
    item_id: i64,
    annotator: String,
    tiers: Vec<Vec<usize>>,
    skip: bool,
    all_bad: bool,
    seconds: f64,
    late: bool,
}

fn consensus(
    completions: &[String],
    js: &[JudgementRow],
    method: ConsensusMethod,
) -> Vec<Vec<usize>> {
    let mut tally = PairTally::new(completions.len());
    for j in js {
        tally.add_tiers(&j.tiers);
    }
    match method {
        ConsensusMethod::BradleyTerry => agreement::bradley_terry(&tally),
        ConsensusMethod::RankedPairs => agreement::ranked_pairs(&tally),
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn user_from_row(r: &AnyRow) -> Result<User> {
    Ok(User {
        id: r.try_get(0)?,
        username: r.try_get(1)?,
        role: Role::parse(&r.try_get::<String, _>(2)?),
    })
}

fn project_from_row(r: &AnyRow) -> Result<Project> {
    Ok(Project {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        k: r.try_get::<i64, _>(2)? as u32,
        overlap: r.try_get::<i64, _>(3)? as u32,
        gold_rate: r.try_get(4)?,
        lease_secs: r.try_get(5)?,
    })
}

/// Parse JSONL candidate rows (blank lines ignored).
pub fn parse_jsonl(text: &str) -> Result<Vec<CandidateRow>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| FeedbackError::Invalid(format!("line {}: {e}", i + 1)))
        })
        .collect()
}
