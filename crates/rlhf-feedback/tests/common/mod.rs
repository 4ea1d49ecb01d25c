//! Shared test helpers: database URLs for each backend and a tiny cookie-keeping HTTP client.
#![allow(dead_code)]

use std::collections::HashMap;

use rlhf_feedback::store::{CandidateRow, ProjectSpec, Store};
use sqlx::Connection;

/// A fresh SQLite database file under the target dir.
pub fn sqlite_url(tag: &str) -> String {
    let dir = std::env::temp_dir().join("rlhf-feedback-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!(
        "{tag}-{}-{}.db",
        std::process::id(),
        rlhf_feedback::store::random_token()
    ));
    format!("sqlite://{}", p.display())
}

/// A fresh PostgreSQL database (created on the server named by `RLHF_TEST_PG_URL`).
pub async fn pg_url(tag: &str) -> Option<String> {
    let base = std::env::var("RLHF_TEST_PG_URL").ok()?;
    let name = format!(
        "rlhf_{}_{}",
        tag,
        &rlhf_feedback::store::random_token()[..12]
    );
    let mut c = sqlx::postgres::PgConnection::connect(&base)
        .await
        .expect("connect to RLHF_TEST_PG_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .expect("create database");
    let _ = c.close().await;
    let (head, _) = base.split_once('?').unwrap_or((&base, ""));
    let cut = head.rfind('/').expect("database URL with a path");
    Some(format!("{}/{}", &head[..cut], name))
}

/// Database URLs to run a test against: SQLite always, PostgreSQL when `RLHF_TEST_PG_URL` is set.
pub async fn backends(tag: &str) -> Vec<String> {
    let mut v = vec![sqlite_url(tag)];
    match pg_url(tag).await {
        Some(u) => v.push(u),
        None => eprintln!("SKIP postgres variant of {tag}: RLHF_TEST_PG_URL is not set"),
    }
    v
}

pub fn rows(n: usize, k: usize) -> Vec<CandidateRow> {
    (0..n)
        .map(|i| CandidateRow {
            prompt: format!("Prompt number {i}"),
            completions: (0..k).map(|c| format!("item {i} completion {c}")).collect(),
            meta: serde_json::json!({"model": "tiny", "temperature": 0.7}),
            gold_ranking: None,
        })
        .collect()
}

pub fn spec(name: &str, k: u32, overlap: u32, lease_secs: i64) -> ProjectSpec {
    ProjectSpec {
        name: name.into(),
        k,
        overlap,
        gold_rate: 0.0,
        lease_secs,
        guidelines: "# Guidelines\n\nPrefer **correct** and concise answers.\n\n* Ties are fine.\n* Flag harmful content.".into(),
    }
}

pub async fn store(url: &str) -> Store {
    Store::connect(url).await.expect("connect")
}

/// Minimal HTTP client that keeps cookies and never follows redirects.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub cookies: HashMap<String, String>,
}

pub struct Resp {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_string(),
            cookies: HashMap::new(),
        }
    }
    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
    async fn finish(&mut self, r: reqwest::Response) -> Resp {
        for v in r.headers().get_all("set-cookie") {
            let s = v.to_str().unwrap();
            let kv = s.split(';').next().unwrap();
            if let Some((k, v)) = kv.split_once('=') {
                if v.is_empty() {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
        }
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        Resp {
            status,
            location,
            body: r.text().await.unwrap(),
        }
    }
    pub async fn get(&mut self, path: &str) -> Resp {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(r).await
    }
    pub async fn post_form(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        let r = self
            .http
            .post(format!("{}{}", self.base, path))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(r).await
    }
    /// GET /login, then POST credentials; returns the response of the POST.
    pub async fn login(&mut self, user: &str, pw: &str) -> Resp {
        let page = self.get("/login").await;
        let csrf = csrf_of(&page.body).expect("csrf on login page");
        self.post_form(
            "/login",
            &[("csrf", &csrf), ("username", user), ("password", pw)],
        )
        .await
    }
}

/// The first `name="csrf" value="…"` in a page.
pub fn csrf_of(html: &str) -> Option<String> {
    let i = html.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
    let j = html[i..].find('"')?;
    Some(html[i..i + j].to_string())
}

/// The first `/a/{id}` form action in a page.
pub fn assignment_of(html: &str) -> Option<i64> {
    let i = html.find(r#"action="/a/"#)? + r#"action="/a/"#.len();
    let j = html[i..].find('"')?;
    html[i..i + j].parse().ok()
}
