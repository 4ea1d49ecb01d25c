//! Library-level tests of the storage rules (SQLite, and PostgreSQL when RLHF_TEST_PG_URL is set).
mod common;

use common::*;
use rlhf_feedback::store::*;

fn rank(tiers: Vec<Vec<usize>>) -> Judgement {
    Judgement {
        tiers,
        seconds_spent: 5.0,
        ..Default::default()
    }
}

#[tokio::test]
async fn overlap_skip_and_exports() {
    for url in backends("overlap").await {
        let s = store(&url).await;
        let p = s.create_project(&spec("p", 3, 2, 600)).await.unwrap();
        assert_eq!(s.import_candidates(p.id, &rows(2, 3)).await.unwrap(), 2);
        let a = s
            .add_user("alice", "password-a", Role::Annotator)
            .await
            .unwrap();
        let b = s
            .add_user("bob", "password-b", Role::Annotator)
            .await
            .unwrap();
        let c = s
            .add_user("carol", "password-c", Role::Annotator)
            .await
            .unwrap();

        let ta = s.next_task(a.id, p.id).await.unwrap().unwrap();
        let tb = s.next_task(b.id, p.id).await.unwrap().unwrap();
        let tc = s.next_task(c.id, p.id).await.unwrap().unwrap();
        assert_eq!(ta.item_id, tb.item_id, "overlap 2: a and b share item 1");
        assert_ne!(tc.item_id, ta.item_id, "item 1 is full, carol gets item 2");
        // Same lease again, same deterministic order.
        let ta2 = s.next_task(a.id, p.id).await.unwrap().unwrap();
        assert_eq!(ta2.assignment_id, ta.assignment_id);
        assert_eq!(ta2.order, ta.order);
        assert_eq!(ta.candidates[0].0, "A");
        assert_eq!((ta.done, ta.total), (0, 2));

        // Someone else's assignment: forbidden, both to view and to submit.
        assert!(matches!(
            s.task(b.id, ta.assignment_id).await,
            Err(FeedbackError::Forbidden)
        ));
        assert!(matches!(
            s.submit_judgement(b.id, ta.assignment_id, &rank(vec![vec![0], vec![1, 2]]))
                .await,
            Err(FeedbackError::Forbidden)
        ));
        // Invalid rankings.
        assert!(matches!(
            s.submit_judgement(a.id, ta.assignment_id, &rank(vec![vec![0], vec![1]]))
                .await,
            Err(FeedbackError::Invalid(_))
        ));
        assert!(
            matches!(
                s.submit_judgement(
                    a.id,
                    ta.assignment_id,
                    &Judgement {
                        skip: true,
                        ..Default::default()
                    }
                )
                .await,
                Err(FeedbackError::Invalid(_))
            ),
            "skip needs a reason"
        );

        s.submit_judgement(a.id, ta.assignment_id, &rank(vec![vec![0], vec![2, 1]]))
            .await
            .unwrap();
        assert!(
            matches!(
                s.submit_judgement(a.id, ta.assignment_id, &rank(vec![vec![0], vec![2, 1]]))
                    .await,
                Err(FeedbackError::Conflict(_))
            ),
            "no duplicate submissions"
        );
        s.submit_judgement(b.id, tb.assignment_id, &rank(vec![vec![0], vec![1, 2]]))
            .await
            .unwrap();
        let skip = Judgement {
            skip: true,
            reason: Some("Outside my expertise".into()),
            ..Default::default()
        };
        s.submit_judgement(c.id, tc.assignment_id, &skip)
            .await
            .unwrap();
        assert!(
            s.next_task(c.id, p.id).await.unwrap().is_none(),
            "carol skipped item 2 and item 1 is full"
        );
        let ta3 = s.next_task(a.id, p.id).await.unwrap().unwrap();
        assert_eq!(
            ta3.item_id, tc.item_id,
            "the skipped item goes to someone else"
        );
        assert_eq!((ta3.done, ta3.total), (1, 2));
        let bad = Judgement {
            all_bad: true,
            reason: Some("All responses are unusable".into()),
            critique: Some("<b>nope</b>".into()),
            ..Default::default()
        };
        s.submit_judgement(a.id, ta3.assignment_id, &bad)
            .await
            .unwrap();

        let prompt0 = "Prompt number 0".to_string();
        let cand = |c: usize| format!("item 0 completion {c}");
        let pairs = s
            .export_pairs(p.id, ExportMode::Consensus(ConsensusMethod::BradleyTerry))
            .await
            .unwrap();
        let mut got: Vec<(String, String, String)> = pairs
            .into_iter()
            .map(|r| (r.prompt, r.chosen, r.rejected))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (prompt0.clone(), cand(0), cand(1)),
                (prompt0.clone(), cand(0), cand(2))
            ]
        );
        let rp = s
            .export_pairs(p.id, ExportMode::Consensus(ConsensusMethod::RankedPairs))
            .await
            .unwrap();
        assert_eq!(rp.len(), 2);
        let per = s
            .export_pairs(p.id, ExportMode::PerAnnotator)
            .await
            .unwrap();
        assert_eq!(per.len(), 4);
        assert_eq!(
            per.iter()
                .filter(|r| r.annotator.as_deref() == Some("alice"))
                .count(),
            2
        );
        let rk = s
            .export_rankings(p.id, ExportMode::Consensus(ConsensusMethod::BradleyTerry))
            .await
            .unwrap();
        assert_eq!(rk.len(), 2, "item 1 and the all-bad item 2");
        assert_eq!(rk[0].ranking, vec![vec![0], vec![1, 2]]);
        assert_eq!(rk[1].ranking, vec![vec![0, 1, 2]]);

        let rep = s.agreement_report(p.id).await.unwrap();
        assert_eq!(rep.judgements, 4);
        assert_eq!(rep.complete_items, 1);
        assert_eq!(rep.annotators.len(), 3);
        let integ = s.integrity(p.id).await.unwrap();
        assert_eq!(
            (
                integ.over_assigned_items,
                integ.duplicate_judgements,
                integ.submitted_without_judgement
            ),
            (0, 0, 0)
        );
    }
}

#[tokio::test]
async fn late_submissions_kept_only_if_needed() {
    for url in backends("late").await {
        let s = store(&url).await;
        let p = s.create_project(&spec("late", 2, 1, 600)).await.unwrap();
        s.import_candidates(p.id, &rows(2, 2)).await.unwrap();
        let a = s
            .add_user("alice", "password-a", Role::Annotator)
            .await
            .unwrap();
        let b = s
            .add_user("bob", "password-b", Role::Annotator)
            .await
            .unwrap();

        let t1 = s.next_task(a.id, p.id).await.unwrap().unwrap();
        s.expire_lease(t1.assignment_id).await.unwrap();
        let tb = s.next_task(b.id, p.id).await.unwrap().unwrap();
        assert_eq!(tb.item_id, t1.item_id, "expired lease is reassigned");
        let late = s
            .submit_judgement(a.id, t1.assignment_id, &rank(vec![vec![0], vec![1]]))
            .await;
        assert!(
            matches!(late, Err(FeedbackError::Conflict(_))),
            "item no longer needs alice: {late:?}"
        );
        s.submit_judgement(b.id, tb.assignment_id, &rank(vec![vec![1], vec![0]]))
            .await
            .unwrap();

        let t2 = s.next_task(a.id, p.id).await.unwrap().unwrap();
        assert_ne!(t2.item_id, t1.item_id);
        s.expire_lease(t2.assignment_id).await.unwrap();
        let o = s
            .submit_judgement(a.id, t2.assignment_id, &rank(vec![vec![0], vec![1]]))
            .await
            .unwrap();
        assert!(o.late, "late but still needed: kept and flagged");
        assert!(s.next_task(b.id, p.id).await.unwrap().is_none());
        let i = s.integrity(p.id).await.unwrap();
        assert_eq!(
            (i.over_assigned_items, i.duplicate_judgements, i.judgements),
            (0, 0, 2)
        );
    }
}

#[tokio::test]
async fn gold_items_mixed_in_and_scored() {
    for url in backends("gold").await {
        let s = store(&url).await;
        let mut sp = spec("gold", 3, 1, 600);
        sp.gold_rate = 1.0;
        let p = s.create_project(&sp).await.unwrap();
        let mut r = rows(2, 3);
        r[1].gold_ranking = Some(vec![vec![2], vec![0], vec![1]]);
        s.import_candidates(p.id, &r).await.unwrap();
        let a = s
            .add_user("alice", "password-a", Role::Annotator)
            .await
            .unwrap();
        let t = s.next_task(a.id, p.id).await.unwrap().unwrap();
        assert!(t.is_gold, "gold rate 1.0 serves the gold item first");
        // Two of three gold pairs right (2>0, 2>1), one wrong (1 above 0).
        s.submit_judgement(
            a.id,
            t.assignment_id,
            &rank(vec![vec![2], vec![1], vec![0]]),
        )
        .await
        .unwrap();
        let t = s.next_task(a.id, p.id).await.unwrap().unwrap();
        assert!(!t.is_gold);
        s.submit_judgement(
            a.id,
            t.assignment_id,
            &rank(vec![vec![0], vec![1], vec![2]]),
        )
        .await
        .unwrap();
        assert!(s.next_task(a.id, p.id).await.unwrap().is_none());
        let rep = s.agreement_report(p.id).await.unwrap();
        let acc = rep.annotators[0].gold_accuracy.unwrap();
        assert!((acc - 2.0 / 3.0).abs() < 1e-9, "{acc}");
        // Gold items are not exported.
        let pairs = s
            .export_pairs(p.id, ExportMode::PerAnnotator)
            .await
            .unwrap();
        assert_eq!(pairs.len(), 3);
        assert!(pairs.iter().all(|p| p.prompt == "Prompt number 0"));
    }
}

#[tokio::test]
async fn concurrent_library_annotators_never_over_assign() {
    for url in backends("conc").await {
        let s = store(&url).await;
        let p = s.create_project(&spec("conc", 3, 3, 600)).await.unwrap();
        s.import_candidates(p.id, &rows(20, 3)).await.unwrap();
        // Annotator u skips the items with (item + u) % 7 == 0 and ranks the others.
        let judge = |item: i64, u: i64| {
            if (item + u) % 7 == 0 {
                Judgement {
                    skip: true,
                    reason: Some("x".into()),
                    ..Default::default()
                }
            } else {
                rank(vec![vec![0], vec![1, 2]])
            }
        };
        let mut handles = Vec::new();
        let mut users = Vec::new();
        for u in 0..8 {
            let user = s
                .add_user(&format!("u{u}"), "password-x", Role::Annotator)
                .await
                .unwrap();
            users.push(user.id);
            let s = s.clone();
            let pid = p.id;
            handles.push(tokio::spawn(async move {
                let mut n = 0;
                while let Some(t) = s.next_task(user.id, pid).await.unwrap() {
                    let j = judge(t.item_id, u);
                    s.submit_judgement(user.id, t.assignment_id, &j)
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        // A worker stops at its first "nothing for you", which may come while another holds
        // the last lease of an item that it then skips: that item goes back to the pool with
        // no one left polling (a real annotator keeps the page open and gets it later). So
        // the annotators come back, one at a time, until none gets anything.
        loop {
            let mut more = 0;
            for (u, &uid) in users.iter().enumerate() {
                while let Some(t) = s.next_task(uid, p.id).await.unwrap() {
                    let j = judge(t.item_id, u as i64);
                    s.submit_judgement(uid, t.assignment_id, &j).await.unwrap();
                    more += 1;
                }
            }
            if more == 0 {
                break;
            }
            total += more;
        }
        let i = s.integrity(p.id).await.unwrap();
        assert_eq!(i.over_assigned_items, 0);
        assert_eq!(i.duplicate_judgements, 0);
        assert_eq!(i.submitted_without_judgement, 0);
        assert_eq!(i.judgements, total);
        let rep = s.agreement_report(p.id).await.unwrap();
        assert_eq!(rep.complete_items, 20, "every item reached overlap 3");
    }
}
