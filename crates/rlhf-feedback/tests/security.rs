//! HTTP-level security tests against a real server on 127.0.0.1 (SQLite, and PostgreSQL when
//! RLHF_TEST_PG_URL is set).
mod common;

use common::*;
use rlhf_feedback::store::*;
use rlhf_feedback::web::{spawn, ServerConfig};

#[tokio::test]
async fn access_control_csrf_escaping_and_rate_limit() {
    for url in backends("sec").await {
        let s = store(&url).await;
        let p = s.create_project(&spec("sec", 3, 2, 600)).await.unwrap();
        let mut r = rows(3, 3);
        r[0].prompt = "<img src=x onerror=alert(1)> what is 2+2?".into();
        s.import_candidates(p.id, &r).await.unwrap();
        s.add_user("admin", "admin-password", Role::Admin)
            .await
            .unwrap();
        s.add_user("alice", "alice-password", Role::Annotator)
            .await
            .unwrap();
        s.add_user("bob", "bob-password", Role::Annotator)
            .await
            .unwrap();
        let admin_key = s.create_api_key("admin", "test").await.unwrap();
        let alice_key = s.create_api_key("alice", "test").await.unwrap();
        let (addr, _h) = spawn(s.clone(), "127.0.0.1:0", ServerConfig::default())
            .await
            .unwrap();
        let base = format!("http://{addr}");

        // Signed out: redirected to the login page.
        let mut anon = Client::new(&base);
        assert_eq!(anon.get("/").await.status, 303);
        let r = anon.get("/admin").await;
        assert_eq!((r.status, r.location.as_deref()), (303, Some("/login")));
        // Login form without (or with a wrong) CSRF token.
        let r = anon
            .post_form(
                "/login",
                &[("username", "alice"), ("password", "alice-password")],
            )
            .await;
        assert_eq!(r.status, 403);
        let r = anon
            .post_form(
                "/login",
                &[
                    ("csrf", "nope"),
                    ("username", "alice"),
                    ("password", "alice-password"),
                ],
            )
            .await;
        assert_eq!(r.status, 403);

        let mut alice = Client::new(&base);
        let raw = alice
            .http
            .get(format!("{base}/login"))
            .send()
            .await
            .unwrap();
        let sc = raw
            .headers()
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            sc.contains("HttpOnly") && sc.contains("SameSite=Strict"),
            "{sc}"
        );
        assert!(raw.headers().get("content-security-policy").is_some());
        let r = alice.login("alice", "alice-password").await;
        assert_eq!(r.status, 303, "{}", r.body);
        assert!(alice.cookies.contains_key("rlhf_session"));
        let page = alice.get(&format!("/p/{}/annotate", p.id)).await;
        assert_eq!(page.status, 200);
        assert!(
            page.body.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "prompt is escaped"
        );
        assert!(!page.body.contains("<img src=x"));
        let aid = assignment_of(&page.body).unwrap();
        let csrf = csrf_of(&page.body).unwrap();

        // Bob may not see or submit Alice's task.
        let mut bob = Client::new(&base);
        assert_eq!(bob.login("bob", "bob-password").await.status, 303);
        let bob_page = bob.get(&format!("/p/{}/annotate", p.id)).await;
        let bob_csrf = csrf_of(&bob_page.body).unwrap();
        assert_eq!(bob.get(&format!("/a/{aid}")).await.status, 403);
        let r = bob
            .post_form(
                &format!("/a/{aid}"),
                &[
                    ("csrf", &bob_csrf),
                    ("action", "submit"),
                    ("rank_0", "1"),
                    ("rank_1", "2"),
                    ("rank_2", "3"),
                ],
            )
            .await;
        assert_eq!(r.status, 403);

        // Admin pages are closed to annotators.
        assert_eq!(alice.get("/admin").await.status, 403);
        assert_eq!(alice.get(&format!("/admin/p/{}", p.id)).await.status, 403);
        assert_eq!(
            alice
                .get(&format!("/admin/p/{}/export?format=pairs", p.id))
                .await
                .status,
            403
        );
        let r = alice
            .post_form(
                "/admin/users",
                &[
                    ("csrf", &csrf),
                    ("username", "mallory"),
                    ("password", "mallory-pass"),
                    ("role", "admin"),
                ],
            )
            .await;
        assert_eq!(r.status, 403);
        assert!(s.user_by_name("mallory").await.is_err());

        // Forms without / with a wrong CSRF token are refused.
        let ranks = [
            ("action", "submit"),
            ("rank_0", "1"),
            ("rank_1", "2"),
            ("rank_2", "2"),
        ];
        assert_eq!(
            alice.post_form(&format!("/a/{aid}"), &ranks).await.status,
            403
        );
        let mut wrong = vec![("csrf", "0000")];
        wrong.extend_from_slice(&ranks);
        assert_eq!(
            alice.post_form(&format!("/a/{aid}"), &wrong).await.status,
            403
        );
        // Missing rank: 422 with the page re-rendered.
        let r = alice
            .post_form(
                &format!("/a/{aid}"),
                &[("csrf", &csrf), ("action", "submit"), ("rank_0", "1")],
            )
            .await;
        assert_eq!(r.status, 422);

        // SQL-ish and HTML-ish critique: stored verbatim, rendered escaped.
        let evil = "<script>alert('x')</script>'); DROP TABLE users; --";
        let mut ok = vec![
            ("csrf", csrf.as_str()),
            ("critique", evil),
            ("flag_0_harmful", "on"),
        ];
        ok.extend_from_slice(&ranks);
        let r = alice.post_form(&format!("/a/{aid}"), &ok).await;
        assert_eq!(r.status, 303, "{}", r.body);
        assert_eq!(s.list_users().await.unwrap().len(), 3, "users table intact");
        let mut admin = Client::new(&base);
        assert_eq!(admin.login("admin", "admin-password").await.status, 303);
        let dash = admin.get(&format!("/admin/p/{}", p.id)).await;
        assert_eq!(dash.status, 200);
        assert!(
            dash.body
                .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
            "critique escaped"
        );
        assert!(!dash.body.contains("<script>alert"));

        // JSON API: bearer keys only.
        let http = reqwest::Client::new();
        let api = |path: &str| format!("{base}/api/projects/{}/{path}", p.id);
        assert_eq!(
            http.get(format!("{base}/api/projects"))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            http.get(format!("{base}/api/projects"))
                .bearer_auth("rlhf_wrong")
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        let with_cookie = http
            .get(api("export"))
            .header(
                "cookie",
                format!("rlhf_session={}", admin.cookies["rlhf_session"]),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(with_cookie.status(), 401, "the API ignores session cookies");
        assert_eq!(
            http.get(api("export"))
                .bearer_auth(&alice_key)
                .send()
                .await
                .unwrap()
                .status(),
            403
        );
        assert_eq!(
            http.get(api("stats"))
                .bearer_auth(&alice_key)
                .send()
                .await
                .unwrap()
                .status(),
            403
        );
        let r = http
            .get(api("export?format=pairs&mode=annotators"))
            .bearer_auth(&admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap().lines().count(), 2);
        // Alice's key cannot submit Bob's assignment.
        let bob_aid = assignment_of(&bob_page.body).unwrap();
        let r = http
            .post(format!("{base}/api/assignments/{bob_aid}/judgement"))
            .bearer_auth(&alice_key)
            .json(&serde_json::json!({"tiers": [[0], [1], [2]]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);

        // Login rate limit: 10 failures, then 429 even with the right password.
        let mut m = Client::new(&base);
        for _ in 0..10 {
            assert_eq!(m.login("bob", "wrong-password").await.status, 401);
        }
        assert_eq!(m.login("bob", "wrong-password").await.status, 429);
        assert_eq!(m.login("bob", "bob-password").await.status, 429);
    }
}
