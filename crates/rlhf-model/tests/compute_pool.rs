//! `kernels::on_compute_pool`: work runs on a thread of the pool, with the same bits as on the
//! calling thread; the pool's other threads spin while it runs and stop when it returns (or
//! panics), not at all under `RLHF_SPIN=0`; concurrent callers all finish.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rlhf_model::kernels::on_compute_pool;

mod common;

/// The tests measure the process's CPU time and set `RLHF_SPIN`: one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: the 12th and 13th after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// CPU seconds the whole process uses while the calling thread sleeps `ms` milliseconds.
fn cpu_during_sleep(ms: u64) -> f64 {
    let c0 = cpu_secs();
    std::thread::sleep(Duration::from_millis(ms));
    cpu_secs() - c0
}

fn pool_threads() -> usize {
    on_compute_pool(rayon::current_num_threads)
}

#[test]
fn work_runs_on_a_pool_thread_and_nested_calls_stay_there() {
    let _g = lock();
    let (outer, inner) = on_compute_pool(|| {
        let outer = rayon::current_thread_index();
        (outer, on_compute_pool(rayon::current_thread_index))
    });
    assert!(outer.is_some(), "f must run on a thread of the pool");
    assert_eq!(outer, inner, "a nested call runs where it is");
    assert_eq!(
        on_compute_pool(|| 6 * 7),
        42,
        "the value comes back to the caller"
    );
    assert_eq!(
        pool_threads(),
        rayon::current_num_threads(),
        "the pool has rayon's usual number of threads"
    );
}

#[test]
#[cfg(target_os = "linux")]
fn other_threads_spin_while_work_runs_and_stop_after() {
    let _g = lock();
    if pool_threads() < 2 {
        eprintln!("skipped: the pool has one thread, so nothing spins");
        return;
    }
    std::env::remove_var("RLHF_SPIN");
    // While `f` sleeps, another thread of the pool spins: about one CPU-second per second.
    let busy = on_compute_pool(|| cpu_during_sleep(400));
    assert!(
        busy > 0.25,
        "the pool's other threads should spin while f runs: {busy:.2} CPU-s in 0.4 s"
    );
    // Once it returns they stop.
    std::thread::sleep(Duration::from_millis(50));
    let idle = cpu_during_sleep(400);
    assert!(
        idle < 0.1,
        "spinning went on after return: {idle:.2} CPU-s in 0.4 s"
    );
    // Also after a panic, which reaches the caller.
    let r = std::panic::catch_unwind(|| on_compute_pool(|| panic!("on purpose")));
    assert!(r.is_err(), "the panic reaches the caller");
    std::thread::sleep(Duration::from_millis(50));
    let idle = cpu_during_sleep(400);
    assert!(
        idle < 0.1,
        "spinning went on after a panic: {idle:.2} CPU-s in 0.4 s"
    );
    // And the next call spins again (the panic left no caller counted as running).
    let busy = on_compute_pool(|| cpu_during_sleep(400));
    assert!(busy > 0.25, "no spinning after a panic: {busy:.2} CPU-s");
    // RLHF_SPIN=0: the idle threads sleep.
    std::env::set_var("RLHF_SPIN", "0");
    let quiet = on_compute_pool(|| cpu_during_sleep(400));
    std::env::remove_var("RLHF_SPIN");
    assert!(
        quiet < 0.1,
        "RLHF_SPIN=0 still spun: {quiet:.2} CPU-s in 0.4 s"
    );
}

/// Several threads call at once, each with nested parallel work, many times: all finish (a
/// spinning thread caught inside another caller's work must not wait on it in a cycle), with
/// the right sums.
#[test]
fn concurrent_callers_all_finish() {
    use rayon::prelude::*;
    let _g = lock();
    std::env::remove_var("RLHF_SPIN");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for rep in 0..40u64 {
                        let s: u64 = on_compute_pool(|| {
                            (0..20_000u64)
                                .into_par_iter()
                                .map(|i| {
                                    let (a, b) = rayon::join(|| i * t, || i + rep);
                                    a + b
                                })
                                .sum()
                        });
                        let n = 20_000u64;
                        let want = t * n * (n - 1) / 2 + n * (n - 1) / 2 + rep * n;
                        assert_eq!(s, want);
                    }
                })
            })
            .collect();
        let ok = handles.into_iter().all(|h| h.join().is_ok());
        let _ = tx.send(ok);
    });
    let t0 = Instant::now();
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(ok) => assert!(ok, "a caller's sums were wrong"),
        Err(_) => panic!("concurrent callers did not finish in {:?}", t0.elapsed()),
    }
}

/// A training step's loss and gradients on the pool are bit for bit those on the calling
/// thread: the kernels split work by the thread count, not by which thread runs them.
#[test]
fn same_bits_on_the_pool_as_on_the_calling_thread() {
    let _g = lock();
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": 512, "n_positions": 128,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "tie_word_embeddings": true});
    let model = rlhf_model::CausalLM::random(cfg, 0).unwrap();
    let (b, t) = (4, 32);
    let (x, y) = common::token_batch(b, t);
    let step = || {
        let h = model.hidden(&x, &vec![vec![1u8; t]; b]).unwrap();
        let h2 = h.reshape((b * t, model.hidden_size())).unwrap();
        let loss = model
            .head_logprobs(&h2, &y, 1.0)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = model
            .params
            .iter()
            .map(|p| {
                let g = grads.get(p.var().as_tensor()).unwrap();
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap().to_bits(), g)
    };
    let here = step();
    let pooled = on_compute_pool(step);
    assert_eq!(here.0, pooled.0, "loss bits differ");
    assert!(here.1 == pooled.1, "gradients differ");
}
