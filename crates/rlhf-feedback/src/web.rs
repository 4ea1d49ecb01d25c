//! HTTP layer (axum): the annotator UI, admin pages and the JSON API.
//!
//! # Security model
//! * Browser pages use a session cookie `rlhf_session` (random 256-bit token; only its SHA-256 is
//!   stored) with `HttpOnly; SameSite=Strict` (plus `Secure` when configured). Every POST form
//!   carries a per-session CSRF token which must match; the login form uses a double-submit
//!   token (`rlhf_login` cookie == hidden field).
//! * Annotators can only open and submit their own assignments (403 otherwise); `/admin/*` needs
//!   the admin role (403 for annotators, redirect to the login page when signed out).
//! * `/api/*` accepts only `Authorization: Bearer <key>` (401 without a valid key, never the
//!   cookie). Keys carry their user's role; admin endpoints answer 403 to annotator keys.
//! * Failed logins are rate limited per client IP and per username (429).
//! * All user-supplied text is HTML-escaped on output; SQL is always parameterised; pages are
//!   sent with a strict Content-Security-Policy (scripts and styles from this origin only).
//!
//! # Routes
//! | route | who | what |
//! |---|---|---|
//! | `GET /login`, `POST /login`, `POST /logout` | anyone | sessions |
//! | `GET /` | signed in | projects with progress |
//! | `GET /p/{id}/annotate` | signed in | lease the next task and show it |
//! | `GET /a/{id}`, `POST /a/{id}` | the assignment's annotator | show / submit (action = submit, skip, all_bad) |
//! | `GET /p/{id}/guidelines` | signed in | current guidelines |
//! | `GET /admin`, `/admin/p/{id}` (dashboard), `/admin/p/{id}/export` | admin | |
//! | `POST /admin/projects`, `/admin/users`, `/admin/p/{id}/guidelines`, `/admin/p/{id}/import` | admin | |
//! | `GET /api/projects` | key | list |
//! | `POST /api/projects/{id}/next` | key | lease a task (204 when none) |
//! | `POST /api/assignments/{id}/judgement` | key (owner) | submit a [`Judgement`] |
//! | `POST /api/projects/{id}/import` | admin key | JSONL body |
//! | `GET /api/projects/{id}/export?format=pairs\|rankings&mode=consensus\|annotators&method=bradley_terry\|ranked_pairs` | admin key | JSONL |
//! | `GET /api/projects/{id}/stats`, `/api/projects/{id}/integrity` | admin key | JSON |

#![allow(clippy::result_large_err)] // handlers return `Result<_, Response>` by design

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;

use crate::html;
use crate::store::{
    now_ms, random_token, ConsensusMethod, ExportFormat, ExportMode, FeedbackError, Flag,
    Judgement, ProjectSpec, Role, Store, User,
};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Add `Secure` to cookies (serve behind HTTPS).
    pub secure_cookies: bool,
    pub session_ttl_secs: i64,
    /// Failed logins allowed per IP / per username within `login_window`.
    pub login_max_failures: usize,
    pub login_window: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            secure_cookies: false,
            session_ttl_secs: 12 * 3600,
            login_max_failures: 10,
            login_window: Duration::from_secs(300),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub cfg: ServerConfig,
    failures: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

/// Build the router (used by [`serve`] and by tests with `tower::ServiceExt::oneshot`).
pub fn router(store: Store, cfg: ServerConfig) -> Router {
    let state = AppState {
        store,
        cfg,
        failures: Arc::new(Mutex::new(HashMap::new())),
    };
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route(
            "/static/app.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    html::APP_CSS,
                )
            }),
        )
        .route(
            "/static/rank.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    html::RANK_JS,
                )
            }),
        )
        .route("/p/{pid}/annotate", get(annotate))
        .route("/p/{pid}/guidelines", get(guidelines))
        .route("/a/{aid}", get(show_assignment).post(submit_assignment))
        .route("/admin", get(admin_home))
        .route("/admin/projects", post(admin_create_project))
        .route("/admin/users", post(admin_add_user))
        .route("/admin/p/{pid}", get(admin_dashboard))
        .route("/admin/p/{pid}/guidelines", post(admin_guidelines))
        .route("/admin/p/{pid}/import", post(admin_import))
        .route("/admin/p/{pid}/export", get(admin_export))
        .route("/api/projects", get(api_projects))
        .route("/api/projects/{pid}/next", post(api_next))
        .route("/api/assignments/{aid}/judgement", post(api_submit))
        .route("/api/projects/{pid}/import", post(api_import))
        .route("/api/projects/{pid}/export", get(api_export))
        .route("/api/projects/{pid}/stats", get(api_stats))
        .route("/api/projects/{pid}/integrity", get(api_integrity))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// Bind `addr` and serve until Ctrl-C.
pub async fn serve(store: Store, addr: &str, cfg: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "rlhf feedback: listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(
        listener,
        router(store, cfg).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// Bind `addr` (e.g. `127.0.0.1:0`) and serve in a background task; returns the bound address.
pub async fn spawn(
    store: Store,
    addr: &str,
    cfg: ServerConfig,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(store, cfg).into_make_service_with_connect_info::<SocketAddr>();
    let h = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((local, h))
}

// ------------------------------------------------------------------ helpers

/// Client IP from the connection (falls back to "unknown", e.g. under `oneshot`).
pub struct ClientIp(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_else(|| "unknown".into()),
        ))
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(cfg: &ServerConfig, name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if cfg.secure_cookies { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap()
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn status_of(e: &FeedbackError) -> StatusCode {
    match e {
        FeedbackError::NotFound(_) => StatusCode::NOT_FOUND,
        FeedbackError::Forbidden => StatusCode::FORBIDDEN,
        FeedbackError::Conflict(_) => StatusCode::CONFLICT,
        FeedbackError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        FeedbackError::Db(_) | FeedbackError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn public_message(e: &FeedbackError) -> String {
    match e {
        FeedbackError::Db(_) | FeedbackError::Other(_) => {
            eprintln!("rlhf feedback: internal error: {e}");
            "internal error".into()
        }
        FeedbackError::Forbidden => "This is not yours to see.".into(),
        e => e.to_string(),
    }
}

/// An HTML error page.
fn page_err(user: Option<(&User, &str)>, e: &FeedbackError) -> Response {
    let code = status_of(e);
    (
        code,
        Html(html::message_page(
            user,
            code.canonical_reason().unwrap_or("Error"),
            &public_message(e),
        )),
    )
        .into_response()
}

fn api_err(e: &FeedbackError) -> Response {
    (
        status_of(e),
        Json(serde_json::json!({ "error": public_message(e) })),
    )
        .into_response()
}

fn forbidden_page() -> Response {
    (
        StatusCode::FORBIDDEN,
        Html(html::message_page(
            None,
            "Forbidden",
            "You do not have access to this page.",
        )),
    )
        .into_response()
}

struct Session {
    user: User,
    csrf: String,
}

/// The signed-in user, or a redirect to the login page.
async fn require_session(st: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(tok) = cookie(headers, "rlhf_session") else {
        return Err(Redirect::to("/login").into_response());
    };
    match st.store.session(&tok).await {
        Ok(Some((user, csrf))) => Ok(Session { user, csrf }),
        Ok(None) => Err(Redirect::to("/login").into_response()),
        Err(e) => Err(page_err(None, &e)),
    }
}

async fn require_admin(st: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    let s = require_session(st, headers).await?;
    if s.user.role != Role::Admin {
        return Err(forbidden_page());
    }
    Ok(s)
}

fn check_csrf(s: &Session, form: &HashMap<String, String>) -> Result<(), Response> {
    match form.get("csrf") {
        Some(t) if ct_eq(t, &s.csrf) => Ok(()),
        _ => Err((
            StatusCode::FORBIDDEN,
            Html(html::message_page(
                None,
                "Forbidden",
                "Missing or invalid CSRF token. Reload the page and try again.",
            )),
        )
            .into_response()),
    }
}

async fn api_user(st: &AppState, headers: &HeaderMap) -> Result<User, Response> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized = || {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({"error": "missing or invalid API key"})),
        )
            .into_response()
    };
    let Some(key) = key else {
        return Err(unauthorized());
    };
    match st.store.user_for_api_key(key).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(unauthorized()),
        Err(e) => Err(api_err(&e)),
    }
}

async fn api_admin(st: &AppState, headers: &HeaderMap) -> Result<User, Response> {
    let u = api_user(st, headers).await?;
    if u.role != Role::Admin {
        return Err((
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"error": "admin key required"})),
        )
            .into_response());
    }
    Ok(u)
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

// ------------------------------------------------------------------ sessions

async fn login_form(State(st): State<AppState>) -> Response {
    let t = random_token();
    (
        [(
            header::SET_COOKIE,
            set_cookie(&st.cfg, "rlhf_login", &t, 3600),
        )],
        Html(html::login_page(&t, None)),
    )
        .into_response()
}

fn too_many(st: &AppState, keys: &[String]) -> bool {
    let mut f = st.failures.lock().unwrap();
    let now = Instant::now();
    keys.iter().any(|k| {
        let v = f.entry(k.clone()).or_default();
        v.retain(|t| now.duration_since(*t) < st.cfg.login_window);
        v.len() >= st.cfg.login_max_failures
    })
}

fn record_failure(st: &AppState, keys: &[String]) {
    let mut f = st.failures.lock().unwrap();
    for k in keys {
        f.entry(k.clone()).or_default().push(Instant::now());
    }
}

async fn login(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let fresh = random_token();
    let relogin = |code: StatusCode, msg: &str| {
        (
            code,
            [(
                header::SET_COOKIE,
                set_cookie(&st.cfg, "rlhf_login", &fresh, 3600),
            )],
            Html(html::login_page(&fresh, Some(msg))),
        )
            .into_response()
    };
    let ok_csrf = match (cookie(&headers, "rlhf_login"), form.get("csrf")) {
        (Some(c), Some(f)) => ct_eq(&c, f),
        _ => false,
    };
    if !ok_csrf {
        return relogin(
            StatusCode::FORBIDDEN,
            "Your sign-in form expired. Please try again.",
        );
    }
    let username = form
        .get("username")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let password = form.get("password").cloned().unwrap_or_default();
    let keys = vec![format!("ip:{ip}"), format!("user:{username}")];
    if too_many(&st, &keys) {
        return relogin(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed attempts. Wait a few minutes and try again.",
        );
    }
    match st.store.verify_login(&username, &password).await {
        Ok(Some(u)) => match st.store.create_session(u.id, st.cfg.session_ttl_secs).await {
            Ok((tok, _)) => {
                let dest = if u.role == Role::Admin { "/admin" } else { "/" };
                let mut r = Redirect::to(dest).into_response();
                r.headers_mut().append(
                    header::SET_COOKIE,
                    set_cookie(&st.cfg, "rlhf_session", &tok, st.cfg.session_ttl_secs),
                );
                r.headers_mut()
                    .append(header::SET_COOKIE, set_cookie(&st.cfg, "rlhf_login", "", 0));
                r
            }
            Err(e) => page_err(None, &e),
        },
        Ok(None) => {
            record_failure(&st, &keys);
            relogin(StatusCode::UNAUTHORIZED, "Wrong username or password.")
        }
        Err(e) => page_err(None, &e),
    }
}

async fn logout(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    if let Some(tok) = cookie(&headers, "rlhf_session") {
        let _ = st.store.delete_session(&tok).await;
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&st.cfg, "rlhf_session", "", 0),
    );
    r
}

// ------------------------------------------------------------------ annotator pages

async fn home(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    let projects = match st.store.list_projects().await {
        Ok(p) => p,
        Err(e) => return page_err(Some((&s.user, &s.csrf)), &e),
    };
    let mut rows = Vec::new();
    for p in projects {
        let (done, total) = st
            .store
            .progress(s.user.id, p.id, false)
            .await
            .unwrap_or((0, 0));
        rows.push((p, done, total));
    }
    Html(html::home_page(&s.user, &s.csrf, &rows)).into_response()
}

async fn annotate(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    let u = Some((&s.user, s.csrf.as_str()));
    let project = match st.store.project(pid).await {
        Ok(p) => p,
        Err(e) => return page_err(u, &e),
    };
    match st.store.next_task(s.user.id, pid).await {
        Ok(Some(task)) => Html(html::task_page(
            &s.user,
            &s.csrf,
            &project,
            &task,
            now_ms(),
            None,
        ))
        .into_response(),
        Ok(None) => {
            let (done, _) = st
                .store
                .progress(s.user.id, pid, false)
                .await
                .unwrap_or((0, 0));
            Html(html::done_page(&s.user, &s.csrf, &project, done)).into_response()
        }
        Err(e) => page_err(u, &e),
    }
}

async fn show_assignment(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(aid): Path<i64>,
) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    let u = Some((&s.user, s.csrf.as_str()));
    match st.store.task(s.user.id, aid).await {
        Ok(task) => match st.store.project(task.project_id).await {
            Ok(p) => {
                Html(html::task_page(&s.user, &s.csrf, &p, &task, now_ms(), None)).into_response()
            }
            Err(e) => page_err(u, &e),
        },
        Err(e) => page_err(u, &e),
    }
}

/// Turn the task form into a [`Judgement`] (display positions → original indices).
fn judgement_from_form(
    form: &HashMap<String, String>,
    order: &[usize],
    lease_secs: i64,
) -> Result<Judgement, FeedbackError> {
    let action = form.get("action").map(String::as_str).unwrap_or("submit");
    let mut j = Judgement::default();
    let text = |k: &str| {
        form.get(k)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    match action {
        "submit" => {
            let mut by_rank: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for (pos, &orig) in order.iter().enumerate() {
                let r = form
                    .get(&format!("rank_{pos}"))
                    .map(|s| s.trim())
                    .unwrap_or("");
                if r.is_empty() {
                    return Err(FeedbackError::Invalid(format!(
                        "Give every response a rank (response {} has none).",
                        crate::store::label(pos)
                    )));
                }
                let r: u32 = r
                    .parse()
                    .map_err(|_| FeedbackError::Invalid("bad rank".into()))?;
                by_rank.entry(r).or_default().push(orig);
            }
            j.tiers = by_rank.into_values().collect();
        }
        "skip" => j.skip = true,
        "all_bad" => j.all_bad = true,
        _ => return Err(FeedbackError::Invalid("unknown action".into())),
    }
    if j.skip || j.all_bad {
        j.reason = match (text("reason"), text("reason_text")) {
            (Some(a), Some(b)) => Some(format!("{a}: {b}")),
            (a, b) => a.or(b),
        };
    }
    j.critique = text("critique");
    for (pos, &orig) in order.iter().enumerate() {
        let fl: Vec<Flag> = Flag::ALL
            .into_iter()
            .filter(|f| form.contains_key(&format!("flag_{pos}_{}", f.as_str())))
            .collect();
        if !fl.is_empty() {
            j.flags.insert(orig, fl);
        }
    }
    let rendered: i64 = form
        .get("rendered_at")
        .and_then(|s| s.parse().ok())
        .unwrap_or(now_ms());
    j.seconds_spent = ((now_ms() - rendered) as f64 / 1000.0).clamp(0.0, lease_secs as f64);
    Ok(j)
}

async fn submit_assignment(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(aid): Path<i64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    let u = Some((&s.user, s.csrf.as_str()));
    let task = match st.store.task(s.user.id, aid).await {
        Ok(t) => t,
        Err(e) => return page_err(u, &e),
    };
    let project = match st.store.project(task.project_id).await {
        Ok(p) => p,
        Err(e) => return page_err(u, &e),
    };
    let j = judgement_from_form(&form, &task.order, project.lease_secs);
    let res = match j {
        Ok(j) => st
            .store
            .submit_judgement(s.user.id, aid, &j)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => Redirect::to(&format!("/p/{}/annotate", project.id)).into_response(),
        Err(FeedbackError::Invalid(msg)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Html(html::task_page(
                &s.user,
                &s.csrf,
                &project,
                &task,
                now_ms(),
                Some(&msg),
            )),
        )
            .into_response(),
        Err(e) => page_err(u, &e),
    }
}

async fn guidelines(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
) -> Response {
    let s = tri!(require_session(&st, &headers).await);
    let u = Some((&s.user, s.csrf.as_str()));
    let p = match st.store.project(pid).await {
        Ok(p) => p,
        Err(e) => return page_err(u, &e),
    };
    match st.store.guidelines(pid).await {
        Ok(g) => Html(html::guidelines_page(&s.user, &s.csrf, &p, &g)).into_response(),
        Err(e) => page_err(u, &e),
    }
}

// ------------------------------------------------------------------ admin pages

#[derive(Deserialize)]
struct Msg {
    msg: Option<String>,
}

async fn admin_home(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Msg>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    let u = Some((&s.user, s.csrf.as_str()));
    let (projects, users) = match (st.store.list_projects().await, st.store.list_users().await) {
        (Ok(p), Ok(us)) => (p, us),
        (Err(e), _) | (_, Err(e)) => return page_err(u, &e),
    };
    Html(html::admin_page(
        &s.user,
        &s.csrf,
        &projects,
        &users,
        q.msg.as_deref(),
    ))
    .into_response()
}

fn redirect_msg(path: &str, msg: &str) -> Response {
    let enc: String = msg
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~ ".contains(&b) {
                if b == b' ' {
                    "+".to_string()
                } else {
                    (b as char).to_string()
                }
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Redirect::to(&format!("{path}?msg={enc}")).into_response()
}

async fn admin_create_project(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    let num = |k: &str, d: f64| {
        form.get(k)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(d)
    };
    let spec = ProjectSpec {
        name: form.get("name").cloned().unwrap_or_default(),
        k: num("k", 4.0) as u32,
        overlap: num("overlap", 3.0) as u32,
        gold_rate: num("gold_rate", 0.1),
        lease_secs: num("lease_secs", 1800.0) as i64,
        guidelines: form.get("guidelines").cloned().unwrap_or_default(),
    };
    match st.store.create_project(&spec).await {
        Ok(p) => redirect_msg(&format!("/admin/p/{}", p.id), "Project created."),
        Err(e) => redirect_msg("/admin", &public_message(&e)),
    }
}

async fn admin_add_user(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    let role = if form.get("role").map(String::as_str) == Some("admin") {
        Role::Admin
    } else {
        Role::Annotator
    };
    let r = st
        .store
        .add_user(
            form.get("username").map(String::as_str).unwrap_or(""),
            form.get("password").map(String::as_str).unwrap_or(""),
            role,
        )
        .await;
    match r {
        Ok(u) => redirect_msg("/admin", &format!("Added {}.", u.username)),
        Err(e) => redirect_msg("/admin", &public_message(&e)),
    }
}

async fn admin_dashboard(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    Query(q): Query<Msg>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    let u = Some((&s.user, s.csrf.as_str()));
    let r = async {
        let p = st.store.project(pid).await?;
        let rep = st.store.agreement_report(pid).await?;
        let notes = st.store.recent_feedback(pid, 50).await?;
        let g = st.store.guidelines(pid).await?;
        Ok::<_, FeedbackError>(html::dashboard_page(
            &s.user,
            &s.csrf,
            &p,
            &rep,
            &notes,
            &g,
            q.msg.as_deref(),
        ))
    }
    .await;
    match r {
        Ok(h) => Html(h).into_response(),
        Err(e) => page_err(u, &e),
    }
}

async fn admin_guidelines(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    match st
        .store
        .set_guidelines(pid, form.get("body").map(String::as_str).unwrap_or(""))
        .await
    {
        Ok(v) => redirect_msg(
            &format!("/admin/p/{pid}"),
            &format!("Published guidelines v{v}."),
        ),
        Err(e) => redirect_msg(&format!("/admin/p/{pid}"), &public_message(&e)),
    }
}

async fn admin_import(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    tri!(check_csrf(&s, &form));
    match st
        .store
        .import_jsonl(pid, form.get("jsonl").map(String::as_str).unwrap_or(""))
        .await
    {
        Ok(n) => redirect_msg(&format!("/admin/p/{pid}"), &format!("Imported {n} items.")),
        Err(e) => redirect_msg(&format!("/admin/p/{pid}"), &public_message(&e)),
    }
}

/// Query of the export endpoints.
#[derive(Deserialize)]
pub struct ExportQuery {
    pub format: Option<String>,
    pub mode: Option<String>,
    pub method: Option<String>,
}

fn parse_export(q: &ExportQuery) -> Result<(ExportFormat, ExportMode), FeedbackError> {
    let format = match q.format.as_deref().unwrap_or("pairs") {
        "pairs" => ExportFormat::Pairs,
        "rankings" => ExportFormat::Rankings,
        f => return Err(FeedbackError::Invalid(format!("unknown format {f}"))),
    };
    let method = match q.method.as_deref().unwrap_or("bradley_terry") {
        "bradley_terry" | "bt" => ConsensusMethod::BradleyTerry,
        "ranked_pairs" => ConsensusMethod::RankedPairs,
        m => return Err(FeedbackError::Invalid(format!("unknown method {m}"))),
    };
    let mode = match q.mode.as_deref().unwrap_or("consensus") {
        "consensus" => ExportMode::Consensus(method),
        "annotators" | "per_annotator" => ExportMode::PerAnnotator,
        m => return Err(FeedbackError::Invalid(format!("unknown mode {m}"))),
    };
    Ok((format, mode))
}

async fn export_body(st: &AppState, pid: i64, q: &ExportQuery) -> Result<String, FeedbackError> {
    let (format, mode) = parse_export(q)?;
    let mut buf = Vec::new();
    st.store.export_jsonl(pid, format, mode, &mut buf).await?;
    Ok(String::from_utf8(buf).unwrap_or_default())
}

async fn admin_export(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    Query(q): Query<ExportQuery>,
) -> Response {
    let s = tri!(require_admin(&st, &headers).await);
    match export_body(&st, pid, &q).await {
        Ok(b) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], b).into_response(),
        Err(e) => page_err(Some((&s.user, &s.csrf)), &e),
    }
}

// ------------------------------------------------------------------ JSON API

async fn api_projects(State(st): State<AppState>, headers: HeaderMap) -> Response {
    tri!(api_user(&st, &headers).await);
    match st.store.list_projects().await {
        Ok(p) => Json(p).into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_next(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
) -> Response {
    let u = tri!(api_user(&st, &headers).await);
    match st.store.next_task(u.id, pid).await {
        Ok(Some(t)) => Json(t).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_submit(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(aid): Path<i64>,
    body: axum::body::Bytes,
) -> Response {
    let u = tri!(api_user(&st, &headers).await);
    let j: Judgement = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(e) => return api_err(&FeedbackError::Invalid(e.to_string())),
    };
    match st.store.submit_judgement(u.id, aid, &j).await {
        Ok(o) => Json(o).into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_import(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    body: String,
) -> Response {
    tri!(api_admin(&st, &headers).await);
    match st.store.import_jsonl(pid, &body).await {
        Ok(n) => Json(serde_json::json!({ "imported": n })).into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_export(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
    Query(q): Query<ExportQuery>,
) -> Response {
    tri!(api_admin(&st, &headers).await);
    match export_body(&st, pid, &q).await {
        Ok(b) => ([(header::CONTENT_TYPE, "application/x-ndjson")], b).into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_stats(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
) -> Response {
    tri!(api_admin(&st, &headers).await);
    match st.store.agreement_report(pid).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => api_err(&e),
    }
}

async fn api_integrity(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(pid): Path<i64>,
) -> Response {
    tri!(api_admin(&st, &headers).await);
    match st.store.integrity(pid).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => api_err(&e),
    }
}
