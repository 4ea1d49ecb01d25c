//! Load driver shared by `benches/load.rs` and the small load test: N concurrent annotators
//! lease and submit over loopback HTTP (JSON API, bearer keys) until no work is left.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use rlhf_feedback::store::{CandidateRow, ProjectSpec, Role, Store};
use rlhf_feedback::web::{spawn, ServerConfig};

pub struct LoadResult {
    pub expected: i64,
    pub accepted: i64,
    pub stored: i64,
    pub duplicates: i64,
    pub over_assigned: i64,
    pub without_judgement: i64,
    pub errors: i64,
    pub wall: Duration,
    pub latencies_ms: Vec<f64>,
}

impl LoadResult {
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return 0.0;
        }
        v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
    }
}

/// `annotators` concurrent clients, `judgements` in total (items = judgements / overlap).
pub async fn run_load(url: &str, annotators: usize, judgements: usize, overlap: u32) -> LoadResult {
    let store = Store::connect(url).await.unwrap();
    let k = 4;
    let p = store
        .create_project(&ProjectSpec {
            name: "load".into(),
            k,
            overlap,
            gold_rate: 0.0,
            lease_secs: 600,
            guidelines: "load test".into(),
        })
        .await
        .unwrap();
    let items = judgements / overlap as usize;
    let rows: Vec<CandidateRow> = (0..items)
        .map(|i| CandidateRow {
            prompt: format!("prompt {i}"),
            completions: (0..k).map(|c| format!("p{i} c{c}")).collect(),
            meta: serde_json::json!({}),
            gold_ranking: None,
        })
        .collect();
    store.import_candidates(p.id, &rows).await.unwrap();
    let mut keys = Vec::new();
    for a in 0..annotators {
        let name = format!("annotator{a}");
        store
            .add_user(&name, "load-password", Role::Annotator)
            .await
            .unwrap();
        keys.push(store.create_api_key(&name, "load").await.unwrap());
    }
    store
        .add_user("admin", "admin-password", Role::Admin)
        .await
        .unwrap();
    let admin_key = store.create_api_key("admin", "load").await.unwrap();
    let (addr, _h) = spawn(store.clone(), "127.0.0.1:0", ServerConfig::default())
        .await
        .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(annotators)
        .build()
        .unwrap();
    let start = Instant::now();
    let mut handles = Vec::new();
    for (a, key) in keys.into_iter().enumerate() {
        let http = http.clone();
        let base = base.clone();
        let pid = p.id;
        handles.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut lat) = (0i64, 0i64, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = http
                    .post(format!("{base}/api/projects/{pid}/next"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                if r.status() == 204 {
                    break;
                }
                if !r.status().is_success() {
                    errors += 1;
                    continue;
                }
                let task: serde_json::Value = r.json().await.unwrap();
                let aid = task["assignment_id"].as_i64().unwrap();
                // Rank by a per-annotator rotation, with a tie in the middle.
                let order: Vec<usize> = (0..4).map(|i| (i + a) % 4).collect();
                let tiers = serde_json::json!([[order[0]], [order[1], order[2]], [order[3]]]);
                let t0 = Instant::now();
                let r = http
                    .post(format!("{base}/api/assignments/{aid}/judgement"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({"tiers": tiers, "seconds_spent": 3.5}))
                    .send()
                    .await
                    .unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                if r.status().is_success() {
                    ok += 1;
                } else {
                    errors += 1;
                }
            }
            (ok, errors, lat)
        }));
    }
    let mut res = LoadResult {
        expected: (items * overlap as usize) as i64,
        accepted: 0,
        stored: 0,
        duplicates: 0,
        over_assigned: 0,
        without_judgement: 0,
        errors: 0,
        wall: Duration::ZERO,
        latencies_ms: Vec::new(),
    };
    for h in handles {
        let (ok, errors, lat) = h.await.unwrap();
        res.accepted += ok;
        res.errors += errors;
        res.latencies_ms.extend(lat);
    }
    res.wall = start.elapsed();
    let integ: serde_json::Value = http
        .get(format!("{base}/api/projects/{}/integrity", p.id))
        .bearer_auth(&admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res.stored = integ["judgements"].as_i64().unwrap();
    res.duplicates = integ["duplicate_judgements"].as_i64().unwrap();
    res.over_assigned = integ["over_assigned_items"].as_i64().unwrap();
    res.without_judgement = integ["submitted_without_judgement"].as_i64().unwrap();
    res
}
