//! `rlhf quickstart --human` end to end: the run serves its samples on the feedback service and
//! waits; a person (this test, over HTTP, through the same login and ranking forms a browser
//! uses, with a simple rule: shorter is better, equal length a tie) ranks them; the run then trains its reward model on exactly those rankings and finishes.
//! The smoke preset keeps the training stages to seconds: this tests the human path, the
//! learning is tested by `quickstart.rs`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rlhf_data::world::WorldPrompt;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rlhf"))
}

/// Cookie-keeping HTTP client that never follows redirects.
struct Client {
    http: reqwest::Client,
    base: String,
    cookies: HashMap<String, String>,
}

impl Client {
    fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.into(),
            cookies: HashMap::new(),
        }
    }
    async fn send(&mut self, req: reqwest::RequestBuilder) -> (u16, String) {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let r = req.header("cookie", cookie).send().await.unwrap();
        for v in r.headers().get_all("set-cookie") {
            let kv = v.to_str().unwrap().split(';').next().unwrap();
            if let Some((k, v)) = kv.split_once('=') {
                self.cookies.insert(k.into(), v.into());
            }
        }
        (r.status().as_u16(), r.text().await.unwrap())
    }
    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }
    async fn post(&mut self, path: &str, form: &[(String, String)]) -> (u16, String) {
        let req = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(req).await
    }
}

/// Every `<tag class="{class}">…</tag>` text in a page, HTML entities decoded.
fn texts_of(html: &str, class: &str) -> Vec<String> {
    let open = format!(r#"class="{class}">"#);
    let mut out = vec![];
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let j = rest.find("</").unwrap();
        out.push(
            rest[..j]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&#x27;", "'")
                .replace("&amp;", "&"),
        );
        rest = &rest[j..];
    }
    out
}

fn attr_after<'a>(html: &'a str, marker: &str) -> Option<&'a str> {
    let i = html.find(marker)? + marker.len();
    let j = html[i..].find('"')?;
    Some(&html[i..i + j])
}

#[test]
fn human_mode_trains_on_the_rankings_people_submit_in_the_web_ui() {
    let out = std::env::temp_dir().join(format!("rlhf-quickstart-human-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let items = 3;
    let mut child = Command::new(bin())
        .args([
            "quickstart",
            "--preset",
            "smoke",
            "--rounds",
            "1",
            "--human",
            "--human-items",
            &items.to_string(),
            "--annotators",
            "1",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("RLHF_QUIET", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Forward the run's stderr (for failures) and notice when the service is up.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[quickstart] {line}");
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    let mut pid = None;
    while pid.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "no feedback service after 10 minutes"
        );
        if let Some(st) = child.try_wait().unwrap() {
            panic!("quickstart exited before serving: {st}");
        }
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            // "  they rank at:    http://127.0.0.1:PORT/p/{pid}/annotate"
            if let Some(i) = line.find("/p/") {
                let digits: String = line[i + 3..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if !digits.is_empty() {
                    pid = Some(digits);
                }
            }
        }
    }
    let pid = pid.unwrap();

    // An annotator account, made with the CLI the run's message points to, on the run's DB.
    let db = format!("sqlite://{}/feedback.db", out.display());
    let o = Command::new(bin())
        .args([
            "feedback",
            "add-user",
            "--db",
            &db,
            "ann",
            "--password",
            "ann-password-1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The person: logs in, ranks every item it is given, remembering which pairs that implies.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let expected = rt.block_on(async {
        let mut c = Client::new(&format!("http://127.0.0.1:{port}"));
        let (_, page) = c.get("/login").await;
        let csrf = attr_after(&page, r#"name="csrf" value=""#)
            .unwrap()
            .to_string();
        let form = [
            ("csrf", csrf.as_str()),
            ("username", "ann"),
            ("password", "ann-password-1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(c.post("/login", &form).await.0, 303, "login");
        let mut expected = vec![];
        for n in 0.. {
            let (status, page) = c.get(&format!("/p/{pid}/annotate")).await;
            assert_eq!(status, 200);
            let Some(aid) = attr_after(&page, r#"action="/a/"#) else {
                assert!(page.contains("All done"), "{page}");
                break; // the "all done" page
            };
            assert!(n < items, "more tasks than items");
            let aid = aid.to_string();
            let csrf = attr_after(&page, r#"name="csrf" value=""#)
                .unwrap()
                .to_string();
            let prompt = &texts_of(&page, "prompt-text")[0];
            let cands = texts_of(&page, "cand-text");
            assert_eq!(cands.len(), 4, "K candidates shown");
            assert!(
                WorldPrompt::find(prompt).is_some(),
                "a world prompt: {prompt}"
            );
            // The smoke model writes word salad (gold utility is the same for all of it): this
            // person's rule is "shorter is better", equal length a tie.
            let score: Vec<f64> = cands.iter().map(|t| -(t.len() as f64)).collect();
            let mut form = vec![
                ("csrf".to_string(), csrf),
                ("action".into(), "submit".into()),
            ];
            for (i, g) in score.iter().enumerate() {
                let rank = 1 + score.iter().filter(|&&h| h > *g).count();
                form.push((format!("rank_{i}"), rank.to_string()));
                for (j, h) in score.iter().enumerate() {
                    if g > h && cands[i] != cands[j] {
                        expected.push((prompt.clone(), cands[i].clone(), cands[j].clone()));
                    }
                }
            }
            let (status, body) = c.post(&format!("/a/{aid}"), &form).await;
            assert_eq!(status, 303, "submit: {body}");
        }
        expected
    });
    assert!(!expected.is_empty());

    // The run notices, trains on those rankings and finishes with its report.
    let t1 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t1.elapsed() < Duration::from_secs(600),
            "run did not finish after ranking"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(child.wait().unwrap().success());
    assert!(out.join("report.html").exists());
    let mut got: Vec<(String, String, String)> =
        std::fs::read_to_string(out.join("round1/pairs.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let s = |k: &str| v[k].as_str().unwrap().to_string();
                (s("prompt"), s("chosen"), s("rejected"))
            })
            .filter(|(_, c, r)| c != r)
            .collect();
    let mut expected = expected;
    got.sort();
    expected.sort();
    assert_eq!(
        got, expected,
        "the reward model's pairs are exactly the person's rankings"
    );
    let _ = std::fs::remove_dir_all(&out);
}
