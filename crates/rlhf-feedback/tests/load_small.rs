//! A small version of `benches/load.rs`: concurrent annotators over loopback HTTP; asserts no
//! judgement is lost or duplicated and no item is over-assigned.
mod common;
#[path = "common/load.rs"]
mod load;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_http_annotators_zero_lost_dup_overassigned() {
    for url in common::backends("load").await {
        let r = load::run_load(&url, 12, 240, 3).await;
        eprintln!(
            "{url}: {} accepted / {} expected in {:.2?}, p95 {:.1} ms",
            r.accepted,
            r.expected,
            r.wall,
            r.percentile(95.0)
        );
        assert_eq!(r.errors, 0);
        assert_eq!(r.accepted, r.expected, "every item reached its overlap");
        assert_eq!(r.stored, r.accepted, "zero lost");
        assert_eq!(r.duplicates, 0, "zero duplicated");
        assert_eq!(r.over_assigned, 0, "zero over-assigned");
        assert_eq!(r.without_judgement, 0);
    }
}
