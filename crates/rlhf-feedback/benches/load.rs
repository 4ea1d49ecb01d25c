//! Load bench: 50 concurrent annotators submit 2,000 judgements in total over loopback HTTP.
//! Checks zero lost, zero duplicated, zero over-assigned, and prints latency percentiles.
//!
//! `cargo bench -p rlhf-feedback --bench load` (SQLite in a temp file); set
//! `RLHF_TEST_PG_URL=postgres://…/db` to also run against PostgreSQL.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/load.rs"]
mod load;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut failed = false;
        for url in common::backends("bench").await {
            let r = load::run_load(&url, 50, 2000, 4).await;
            let kind = url.split(':').next().unwrap();
            println!(
                "{kind}: {} judgements accepted ({} expected, {} stored) by 50 annotators in {:.2?} ({:.0}/s)",
                r.accepted,
                r.expected,
                r.stored,
                r.wall,
                r.accepted as f64 / r.wall.as_secs_f64()
            );
            println!(
                "{kind}: lost {} duplicated {} over-assigned {} errors {}",
                r.accepted - r.stored,
                r.duplicates,
                r.over_assigned,
                r.errors
            );
            println!(
                "{kind}: request latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms over {} requests",
                r.percentile(50.0),
                r.percentile(95.0),
                r.percentile(99.0),
                r.latencies_ms.len()
            );
            if r.accepted != r.expected || r.stored != r.accepted || r.duplicates != 0 || r.over_assigned != 0 || r.errors != 0 {
                failed = true;
            }
        }
        if failed {
            eprintln!("FAILED: invariant violated");
            std::process::exit(1);
        }
    });
}
