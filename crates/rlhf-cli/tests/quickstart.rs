//! The quickstart end to end (CI preset: a small but real run): interrupted with Ctrl-C after
//! SFT, re-run resumes without redoing SFT, and the result shows RLHF working — the PPO policy's
//! gold utility above SFT's, KL bounded, the reward model's accuracy below the ceiling that the
//! annotators' agreement sets.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rlhf"))
}

#[test]
fn quickstart_ci_preset_improves_gold_utility_and_resumes_after_ctrl_c() {
    let out = std::env::temp_dir().join(format!("rlhf-quickstart-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = [
        "quickstart",
        "--preset",
        "ci",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];

    // 1. Start, wait until SFT has finished, then Ctrl-C (SIGINT) mid-run.
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("RLHF_QUIET", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Like a foreground job in a terminal, the run gets SIGINT's default action even when this
    // test was started from a non-interactive shell's background job, which ignores SIGINT
    // and passes that on to its children.
    // SAFETY: `signal` is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while !out.join("sft/done.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "SFT did not finish in 15 minutes"
        );
        if let Some(st) = child.try_wait().unwrap() {
            panic!("quickstart exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let _ = child.wait();
    assert!(
        !out.join("report.html").exists(),
        "the run was not interrupted"
    );

    // 2. Run again: SFT is not redone, the rest completes.
    let o = Command::new(bin())
        .args(args)
        .env("RLHF_QUIET", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "quickstart failed:\n{log}");
    assert!(
        log.contains("== SFT: already done"),
        "SFT was redone:\n{log}"
    );
    // The summary table and the report show "–", not NaN, for the RM score of the SFT policy
    // (evaluated before any reward model exists).
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        !log.contains("NaN") && !html.contains("NaN"),
        "NaN in the summary or the report:\n{log}"
    );
    for chart in ["overoptimisation", "reward_vs_kl", "losses", "agreement"] {
        let svg = std::fs::read_to_string(out.join(format!("{chart}.svg"))).unwrap();
        // PNG copies at twice the SVG's size: signature, then IHDR width and height.
        let png = std::fs::read(out.join(format!("{chart}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{chart}.png");
        let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        let attr = |k: &str| -> u32 {
            let i = svg.find(&format!(" {k}=\"")).unwrap() + k.len() + 3;
            svg[i..].split('"').next().unwrap().parse().unwrap()
        };
        assert_eq!(
            (dim(16), dim(20)),
            (2 * attr("width"), 2 * attr("height")),
            "{chart}.png"
        );
    }

    // 3. What the report says.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // The resumed run's report still counts the SFT that the first run did.
    let stage_secs = r["stage_secs"].as_array().unwrap();
    assert!(
        stage_secs
            .iter()
            .any(|s| s[0] == "SFT" && s[1].as_f64().unwrap() > 0.0),
        "SFT's time lost on resume: {stage_secs:?}"
    );
    let total: f64 = stage_secs.iter().map(|s| s[1].as_f64().unwrap()).sum();
    assert!(r["wall_secs"].as_f64().unwrap() >= total * 0.999);
    let pols = r["policies"].as_array().unwrap();
    let gold = |name: &str, round: u64| {
        pols.iter()
            .find(|p| p["name"] == name && p["round"] == round)
            .map(|p| {
                (
                    p["gold_mean"].as_f64().unwrap(),
                    p["gold_se"].as_f64().unwrap(),
                    p["kl_to_sft"].as_f64().unwrap(),
                )
            })
            .unwrap()
    };
    let (sft, sft_se, _) = gold("SFT", 0);
    let (ppo, ppo_se, ppo_kl) = gold("PPO", 2);
    eprintln!(
        "gold utility: SFT {sft:.3}±{sft_se:.3}, PPO round 2 {ppo:.3}±{ppo_se:.3}, KL {ppo_kl:.2}"
    );
    assert!(
        ppo > sft + 2.0 * (sft_se.powi(2) + ppo_se.powi(2)).sqrt(),
        "PPO {ppo} is not clearly above SFT {sft}"
    );
    assert!(
        ppo_kl.is_finite() && ppo_kl < 60.0,
        "KL to SFT not bounded: {ppo_kl}"
    );
    let rounds = r["rounds"].as_array().unwrap();
    let last = rounds.last().unwrap();
    let acc = last["rm_heldout_acc"].as_f64().unwrap();
    let agreement = last["annotator_agreement"].as_f64().unwrap();
    // A judge who knew the true preference agrees with one annotator on (1 + √(2a − 1))/2 of
    // the pairs when two annotators agree on a (each flipping a share e: a = 1 − 2e(1 − e)).
    let ceiling = (1.0 + (2.0 * agreement - 1.0).max(0.0).sqrt()) / 2.0;
    eprintln!(
        "RM held-out accuracy {acc:.3}, annotator agreement {agreement:.3}, ceiling {ceiling:.3}"
    );
    assert!(
        acc > 0.6 && acc <= ceiling + 0.05,
        "RM accuracy {acc} vs ceiling {ceiling} (agreement {agreement})"
    );
    // The annotators are consistent: strongly on round 1's SFT samples (the same for every
    // code version), and above chance on every round. A later round's candidates come from the
    // previous round's policies, whose trajectories move with the last bits of the reward model
    // (PPO amplifies them), and candidates closer in quality are harder to rank alike.
    let alphas: Vec<f64> = rounds
        .iter()
        .map(|r| r["alpha"].as_f64().unwrap())
        .collect();
    eprintln!("Krippendorff α per round: {alphas:?}");
    assert!(alphas[0] > 0.7, "round 1: α {}", alphas[0]);
    assert!(alphas.iter().all(|&a| a > 0.3), "α per round: {alphas:?}");
    std::fs::remove_dir_all(&out).ok();
}
