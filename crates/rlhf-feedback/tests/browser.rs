//! End-to-end test in a real browser: headless Chromium driven over WebDriver (chromedriver on a
//! free loopback port). Skips with a message when chromium / chromedriver are not installed
//! (`apt-get install -y chromium chromium-driver`). Screenshots go to `target/tmp/screenshots/`.
mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rlhf_feedback::store::*;
use rlhf_feedback::web::{spawn, ServerConfig};
use serde_json::{json, Value};

const ELEM: &str = "element-6066-11e4-a52e-4f689c0ab7a";

fn find_bin(env: &str, names: &[&str]) -> Option<String> {
    if let Ok(p) = std::env::var(env) {
        return Some(p);
    }
    names
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
}

struct Driver {
    child: Child,
    http: reqwest::Client,
    base: String,
    session: String,
    _profile: std::path::PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

impl Driver {
    async fn start(chromedriver: &str, chromium: &str) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("rlhf-chromium-{}", random_token()));
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     "--window-size=1280,1400", format!("--user-data-dir={}", profile.display())]
        }}}});
        let mut d = Driver {
            child,
            http,
            base,
            session: String::new(),
            _profile: profile,
        };
        let v = d.call("POST", "/session", caps).await;
        d.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        d
    }
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{}", self.base, path)
        } else {
            format!("{}/session/{}{}", self.base, self.session, path)
        };
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        let v = r["value"].clone();
        if v.get("error").is_some() {
            panic!("webdriver {method} {path}: {v}");
        }
        v
    }
    async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }
    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        // W3C element reference: the object's single value (key "element-6066-…").
        v.get(ELEM)
            .or_else(|| v.as_object().and_then(|o| o.values().next()))
            .and_then(|x| x.as_str())
            .unwrap_or_else(|| panic!("no element for {css}: {v}"))
            .to_string()
    }
    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }
    async fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }
    async fn body_text(&self) -> String {
        self.js("return document.body.innerText")
            .await
            .as_str()
            .unwrap()
            .to_string()
    }
    /// Poll the page until its text contains `needle` (navigation after a click is async).
    async fn wait_text(&self, needle: &str) -> String {
        let mut text = String::new();
        for _ in 0..100 {
            text = self
                .js("return document.body ? document.body.innerText : ''")
                .await
                .as_str()
                .unwrap_or("")
                .to_string();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("page never showed {needle:?}; it shows:\n{text}");
    }
    async fn screenshot(&self, name: &str) {
        let v = self.call("GET", "/screenshot", Value::Null).await;
        let png = b64decode(v.as_str().unwrap());
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, png).unwrap();
        eprintln!("screenshot: {}", p.display());
    }
    async fn login(&self, base: &str, user: &str, pw: &str) {
        self.goto(&format!("{base}/login")).await;
        self.type_into("input[name=username]", user).await;
        self.type_into("input[name=password]", pw).await;
        self.click("button[type=submit]").await;
        self.wait_text("Sign out").await;
    }
    async fn logout(&self) {
        self.click("nav form button").await;
        self.wait_text("Sign in").await;
    }
    /// Display position of the candidate whose text is `text`.
    async fn pos_of(&self, text: &str) -> usize {
        let v = self
            .js("return Array.from(document.querySelectorAll('.cand')).map(c => [c.dataset.pos, c.querySelector('.cand-text').textContent])")
            .await;
        for pair in v.as_array().unwrap() {
            if pair[1].as_str().unwrap() == text {
                return pair[0].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("candidate {text:?} not on page: {v}");
    }
    async fn rank(&self, text: &str, rank: usize) {
        let pos = self.pos_of(text).await;
        self.click(&format!("select[name=rank_{pos}]")).await;
        self.click(&format!("select[name=rank_{pos}] option[value='{rank}']"))
            .await;
    }
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .map(val)
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for ch in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, b) in ch.iter().enumerate() {
            n |= (*b as u32) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if ch.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if ch.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

#[tokio::test]
async fn two_annotators_rank_tie_skip_and_export_in_chromium() {
    let (Some(chromedriver), Some(chromium)) = (
        find_bin(
            "CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        ),
        find_bin(
            "CHROMIUM",
            &[
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
                "/usr/bin/google-chrome",
            ],
        ),
    ) else {
        eprintln!("SKIP browser e2e test: chromium/chromedriver not found (apt-get install -y chromium chromium-driver)");
        return;
    };
    for (n, url) in backends("browser").await.into_iter().enumerate() {
        let s = store(&url).await;
        let mut sp = spec("Helpfulness v1", 3, 2, 600);
        sp.guidelines = "# Ranking guidelines\n\n1. Prefer **correct** answers.\n2. Then prefer complete ones.\n\nTies are fine when two answers are equally good.".into();
        let p = s.create_project(&sp).await.unwrap();
        let france = ["Paris.", "Lyon.", "Paris is the capital of France."];
        let prime = ["7", "8", "9"];
        let row = |prompt: &str, c: &[&str]| CandidateRow {
            prompt: prompt.into(),
            completions: c.iter().map(|x| x.to_string()).collect(),
            meta: json!({"model": "tiny-gpt", "temperature": 0.8}),
            gold_ranking: None,
        };
        s.import_candidates(
            p.id,
            &[
                row("What is the capital of France?", &france),
                row("Name a prime number.", &prime),
            ],
        )
        .await
        .unwrap();
        s.add_user("admin", "admin-password", Role::Admin)
            .await
            .unwrap();
        s.add_user("alice", "alice-password", Role::Annotator)
            .await
            .unwrap();
        s.add_user("bob", "bob-password", Role::Annotator)
            .await
            .unwrap();
        let (addr, _h) = spawn(s.clone(), "127.0.0.1:0", ServerConfig::default())
            .await
            .unwrap();
        let base = format!("http://{addr}");
        let d = Driver::start(&chromedriver, &chromium).await;

        // Alice: France with a tie (the two Paris answers), then skips the prime question.
        d.login(&base, "alice", "alice-password").await;
        d.wait_text("Helpfulness v1").await;
        d.goto(&format!("{base}/p/{}/annotate", p.id)).await;
        let text = d.wait_text("What is the capital of France?").await;
        assert!(text.contains("1 of 2"), "progress shown: {text}");
        assert!(!text.contains("tiny-gpt"), "meta is never shown");
        d.rank(france[2], 1).await;
        d.rank(france[0], 1).await;
        d.rank(france[1], 2).await;
        // The JS enhancement grouped the tie into one tier.
        let tied = d
            .js("return document.querySelectorAll('.tier.tied .cand').length")
            .await;
        assert_eq!(tied, json!(2), "JS ranker shows the tie");
        d.type_into(
            "textarea[name=critique]",
            "Both Paris answers are right; <b>Lyon</b> is wrong.",
        )
        .await;
        let lyon = d.pos_of(france[1]).await;
        d.click(&format!("input[name=flag_{lyon}_factually_wrong]"))
            .await;
        if n == 0 {
            d.screenshot("annotator.png").await;
        }
        d.click("#submit-btn").await;
        let text = d.wait_text("Name a prime number.").await;
        assert!(text.contains("2 of 2"), "{text}");
        d.type_into("input[name=reason_text]", "not sure").await;
        d.click("#skip-btn").await;
        d.wait_text("All done").await;
        d.logout().await;

        // Bob: same tie on France; ranks the prime question with a tie between 8 and 9.
        d.login(&base, "bob", "bob-password").await;
        d.goto(&format!("{base}/p/{}/annotate", p.id)).await;
        d.wait_text("What is the capital of France?").await;
        d.rank(france[0], 1).await;
        d.rank(france[2], 1).await;
        d.rank(france[1], 3).await;
        d.click("#submit-btn").await;
        d.wait_text("Name a prime number.").await;
        // Submitting with a missing rank re-renders the page with an error.
        d.rank(prime[0], 1).await;
        d.click("#submit-btn").await;
        d.wait_text("Give every response a rank").await;
        d.rank(prime[0], 1).await;
        d.rank(prime[1], 2).await;
        d.rank(prime[2], 2).await;
        d.click("#submit-btn").await;
        d.wait_text("All done").await;
        d.logout().await;

        // Admin: dashboard and export.
        d.login(&base, "admin", "admin-password").await;
        d.goto(&format!("{base}/admin/p/{}", p.id)).await;
        let text = d.wait_text("Annotators").await;
        assert!(text.contains("alice") && text.contains("bob"), "{text}");
        assert!(
            text.contains("<b>Lyon</b> is wrong"),
            "critique shown as text"
        );
        if n == 0 {
            d.screenshot("dashboard.png").await;
        }
        d.goto(&format!(
            "{base}/admin/p/{}/export?format=pairs&mode=consensus",
            p.id
        ))
        .await;
        let body = d.body_text().await;
        let got: BTreeSet<(String, String, String)> = body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let r: PairRecord = serde_json::from_str(l).unwrap();
                (r.prompt, r.chosen, r.rejected)
            })
            .collect();
        let q1 = "What is the capital of France?".to_string();
        let q2 = "Name a prime number.".to_string();
        let want: BTreeSet<(String, String, String)> = [
            (q1.clone(), france[0].into(), france[1].into()),
            (q1.clone(), france[2].into(), france[1].into()),
            (q2.clone(), prime[0].into(), prime[1].into()),
            (q2.clone(), prime[0].into(), prime[2].into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want, "export:\n{body}");
        assert_eq!(
            body.lines().filter(|l| !l.trim().is_empty()).count(),
            4,
            "no duplicates"
        );
        d.goto(&format!("{base}/p/{}/guidelines", p.id)).await;
        d.wait_text("Prefer correct answers.").await;
        d.call("DELETE", "", Value::Null).await;
    }
}
