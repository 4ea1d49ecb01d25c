//! Server-rendered HTML: layout, pages, the stylesheet and the small ranking script.
//!
//! Everything user-supplied goes through [`esc`]. Pages work without JavaScript; `rank.js`
//! adds drag-to-rank (with ties) and keyboard shortcuts on top of the plain `<select>`s.

use crate::store::{FeedbackNote, Flag, Guidelines, Project, QualityReport, Task, User};

/// HTML-escape text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// Render guideline Markdown; raw HTML in the source is shown as text, not interpreted.
pub fn markdown(md: &str) -> String {
    use pulldown_cmark::{Event, Parser};
    let parser = Parser::new(md).map(|e| match e {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        e => e,
    });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, parser);
    out
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) => format!("{x:.digits$}"),
        None => "—".into(),
    }
}

/// Page layout. `user` shows the account bar; `csrf` is needed for the logout form.
pub fn page(title: &str, user: Option<(&User, &str)>, body: &str) -> String {
    let nav = match user {
        Some((u, csrf)) => {
            let admin = if u.role == crate::store::Role::Admin {
                r#"<a href="/admin">Admin</a>"#
            } else {
                ""
            };
            format!(
                r#"<nav><a href="/">Projects</a>{admin}<span class="who">{name}</span>
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{csrf}"><button class="link">Sign out</button></form></nav>"#,
                name = esc(&u.username),
                csrf = esc(csrf)
            )
        }
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · RLHF Feedback</title><link rel="stylesheet" href="/static/app.css"></head>
<body><header class="top"><a class="brand" href="/"><span class="logo">◆</span> RLHF Feedback</a>{nav}</header>
<main>{body}</main><script src="/static/rank.js" defer></script></body></html>"#,
        title = esc(title)
    )
}

pub fn login_page(csrf: &str, error: Option<&str>) -> String {
    let err = error
        .map(|e| format!(r#"<p class="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    page(
        "Sign in",
        None,
        &format!(
            r#"<section class="card narrow"><h1>Sign in</h1>{err}
<form method="post" action="/login" class="stack">
<input type="hidden" name="csrf" value="{csrf}">
<label>Username<input name="username" autocomplete="username" required autofocus></label>
<label>Password<input name="password" type="password" autocomplete="current-password" required></label>
<button class="primary" type="submit">Sign in</button></form></section>"#,
            csrf = esc(csrf)
        ),
    )
}

/// Annotator home: projects with progress.
pub fn home_page(user: &User, csrf: &str, projects: &[(Project, i64, i64)]) -> String {
    let mut rows = String::new();
    for (p, done, total) in projects {
        let pct = if *total > 0 { done * 100 / total } else { 100 };
        let action = if done < total {
            format!(
                r#"<a class="button primary" href="/p/{}/annotate">Start annotating</a>"#,
                p.id
            )
        } else {
            r#"<span class="muted">All done — thank you!</span>"#.to_string()
        };
        rows.push_str(&format!(
            r#"<li class="card project"><div><h2>{name}</h2><p class="muted">{k} candidates per prompt · <a href="/p/{id}/guidelines">Guidelines</a></p>
<div class="progress"><div style="width:{pct}%"></div></div><p class="muted small">{done} of {total}</p></div>{action}</li>"#,
            name = esc(&p.name),
            k = p.k,
            id = p.id
        ));
    }
    if rows.is_empty() {
        rows = r#"<li class="card muted">No projects yet.</li>"#.into();
    }
    page(
        "Projects",
        Some((user, csrf)),
        &format!(r#"<h1>Your projects</h1><ul class="plain">{rows}</ul>"#),
    )
}

/// The annotation page for one task.
pub fn task_page(
    user: &User,
    csrf: &str,
    project: &Project,
    task: &Task,
    rendered_at: i64,
    error: Option<&str>,
) -> String {
    let k = task.candidates.len();
    let mut cards = String::new();
    for (pos, (label, text)) in task.candidates.iter().enumerate() {
        let mut opts = String::from(r#"<option value="">—</option>"#);
        for r in 1..=k {
            opts.push_str(&format!(r#"<option value="{r}">{r}</option>"#));
        }
        let mut flags = String::new();
        for f in Flag::ALL {
            flags.push_str(&format!(
                r#"<label class="flag"><input type="checkbox" name="flag_{pos}_{v}"> {l}</label>"#,
                v = f.as_str(),
                l = f.label()
            ));
        }
        cards.push_str(&format!(
            r#"<div class="cand" data-pos="{pos}" tabindex="0" aria-label="Candidate {label}">
<div class="cand-head"><span class="badge">{label}</span><span class="grip" aria-hidden="true">⠿</span>
<label class="rank">Rank <select name="rank_{pos}" class="rank-select" data-label="{label}">{opts}</select></label></div>
<div class="cand-text">{text}</div><div class="flags">{flags}</div></div>"#,
            text = esc(text)
        ));
    }
    let err = error
        .map(|e| format!(r#"<p class="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    let pct = if task.total > 0 {
        task.done * 100 / task.total
    } else {
        0
    };
    let body = format!(
        r#"<div class="taskbar"><div><span class="muted">{pname}</span>
<span class="count"><strong>{n}</strong> of {total}</span></div>
<div class="progress wide"><div style="width:{pct}%"></div></div>
<a class="button ghost" href="/p/{pid}/guidelines" target="_blank" rel="noopener">Guidelines v{gv}</a></div>
{err}
<form method="post" action="/a/{aid}" id="task-form" class="task">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="rendered_at" value="{rendered_at}">
<section class="card prompt"><h2>Prompt</h2><div class="prompt-text">{prompt}</div></section>
<section class="rank-area"><div class="hint">Rank the responses from best (1) to worst. Give equal ranks for ties.
<span class="js-only">Drag cards onto each other to tie them, or between rows to order them.</span></div>
<div id="ranker">{cards}</div></section>
<section class="card"><label>Critique (optional)<textarea name="critique" rows="3" placeholder="What made the best answer better? Anything wrong in the others?"></textarea></label></section>
<div class="actions">
<button class="primary" type="submit" name="action" value="submit" id="submit-btn">Submit ranking <kbd>Ctrl+Enter</kbd></button>
<div class="secondary-actions"><label class="reason">Reason
<select name="reason"><option>Prompt is unclear</option><option>Outside my expertise</option><option>All responses are unusable</option><option>Other</option></select></label>
<input name="reason_text" placeholder="Details (optional)" class="reason-text">
<button type="submit" name="action" value="skip" class="secondary" id="skip-btn">Skip</button>
<button type="submit" name="action" value="all_bad" class="danger" id="allbad-btn">All bad</button></div></div>
</form>
<details class="card help"><summary>Keyboard shortcuts</summary><ul>
<li><kbd>↑</kbd>/<kbd>↓</kbd> or <kbd>j</kbd>/<kbd>k</kbd>: move between responses</li>
<li><kbd>1</kbd>…<kbd>9</kbd>: give the focused response that rank (same number = tie); <kbd>0</kbd> clears</li>
<li><kbd>Ctrl</kbd>+<kbd>Enter</kbd>: submit · <kbd>g</kbd>: guidelines</li></ul></details>"#,
        pname = esc(&project.name),
        n = task.done + 1,
        total = task.total.max(task.done + 1),
        pid = project.id,
        gv = task.guideline_version,
        aid = task.assignment_id,
        csrf = esc(csrf),
        prompt = esc(&task.prompt),
    );
    page(
        &format!("Task · {}", project.name),
        Some((user, csrf)),
        &body,
    )
}

pub fn done_page(user: &User, csrf: &str, project: &Project, done: i64) -> String {
    page(
        "All done",
        Some((user, csrf)),
        &format!(
            r#"<section class="card narrow center"><h1>All done 🎉</h1><p>You have judged {done} items in <strong>{}</strong>. Nothing else needs you right now.</p>
<a class="button primary" href="/">Back to projects</a></section>"#,
            esc(&project.name)
        ),
    )
}

pub fn guidelines_page(user: &User, csrf: &str, project: &Project, g: &Guidelines) -> String {
    page(
        "Guidelines",
        Some((user, csrf)),
        &format!(
            r#"<section class="card prose"><p class="muted">{} · version {}</p>{}</section>"#,
            esc(&project.name),
            g.version,
            markdown(&g.body)
        ),
    )
}

pub fn message_page(user: Option<(&User, &str)>, title: &str, msg: &str) -> String {
    page(
        title,
        user,
        &format!(
            r#"<section class="card narrow"><h1>{}</h1><p>{}</p><a class="button" href="/">Home</a></section>"#,
            esc(title),
            esc(msg)
        ),
    )
}

/// Admin overview: projects, users, forms.
pub fn admin_page(
    user: &User,
    csrf: &str,
    projects: &[Project],
    users: &[User],
    flash: Option<&str>,
) -> String {
    let mut prows = String::new();
    for p in projects {
        prows.push_str(&format!(
            r#"<tr><td><a href="/admin/p/{id}">{name}</a></td><td>{k}</td><td>{o}</td><td>{g:.2}</td><td>{l}s</td></tr>"#,
            id = p.id,
            name = esc(&p.name),
            k = p.k,
            o = p.overlap,
            g = p.gold_rate,
            l = p.lease_secs
        ));
    }
    let mut urows = String::new();
    for u in users {
        urows.push_str(&format!(
            "<tr><td>{}</td><td><span class=\"pill\">{}</span></td></tr>",
            esc(&u.username),
            u.role.as_str()
        ));
    }
    let flash = flash
        .map(|f| format!(r#"<p class="notice">{}</p>"#, esc(f)))
        .unwrap_or_default();
    let csrf_e = esc(csrf);
    page(
        "Admin",
        Some((user, csrf)),
        &format!(
            r#"<h1>Administration</h1>{flash}
<div class="grid2"><section class="card"><h2>Projects</h2><table><thead><tr><th>Name</th><th>K</th><th>Overlap</th><th>Gold rate</th><th>Lease</th></tr></thead><tbody>{prows}</tbody></table>
<h3>New project</h3><form method="post" action="/admin/projects" class="stack compact"><input type="hidden" name="csrf" value="{csrf_e}">
<label>Name<input name="name" required></label><div class="row">
<label>K<input name="k" type="number" min="2" max="9" value="4"></label><label>Overlap<input name="overlap" type="number" min="1" value="3"></label>
<label>Gold rate<input name="gold_rate" type="number" step="0.01" min="0" max="1" value="0.1"></label><label>Lease (s)<input name="lease_secs" type="number" min="1" value="1800"></label></div>
<label>Guidelines (Markdown)<textarea name="guidelines" rows="4"></textarea></label><button class="primary">Create project</button></form></section>
<section class="card"><h2>People</h2><table><thead><tr><th>User</th><th>Role</th></tr></thead><tbody>{urows}</tbody></table>
<h3>Add user</h3><form method="post" action="/admin/users" class="stack compact"><input type="hidden" name="csrf" value="{csrf_e}">
<label>Username<input name="username" required></label><label>Password<input name="password" type="password" minlength="8" required></label>
<label>Role<select name="role"><option value="annotator">annotator</option><option value="admin">admin</option></select></label><button class="primary">Add user</button></form></section></div>"#
        ),
    )
}

/// Per-project dashboard with the quality numbers.
pub fn dashboard_page(
    user: &User,
    csrf: &str,
    project: &Project,
    rep: &QualityReport,
    notes: &[FeedbackNote],
    g: &Guidelines,
    flash: Option<&str>,
) -> String {
    let mut rows = String::new();
    for a in &rep.annotators {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td></tr>",
            esc(&a.username),
            a.judgements,
            a.skips,
            a.all_bad,
            a.gold_accuracy.map(|x| format!("{:.0}%", x * 100.0)).unwrap_or("—".into()),
            fmt_opt(a.tau_b_vs_consensus, 2),
            fmt_opt(a.median_seconds, 1),
            fmt_opt(a.per_hour, 1),
            a.late
        ));
    }
    if rows.is_empty() {
        rows = r#"<tr><td colspan="9" class="muted">No judgements yet.</td></tr>"#.into();
    }
    let mut nrows = String::new();
    for n in notes {
        let flags: Vec<String> = n
            .flags
            .iter()
            .flat_map(|(c, fs)| fs.iter().map(move |f| format!("#{c}: {}", f.label())))
            .collect();
        let kind = if n.skip {
            "skip"
        } else if n.all_bad {
            "all bad"
        } else {
            "ranked"
        };
        nrows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td><span class=pill>{}</span></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&n.annotator),
            n.item_id,
            kind,
            esc(n.reason.as_deref().unwrap_or("")),
            esc(n.critique.as_deref().unwrap_or("")),
            esc(&flags.join(", "))
        ));
    }
    let flash = flash
        .map(|f| format!(r#"<p class="notice">{}</p>"#, esc(f)))
        .unwrap_or_default();
    let csrf_e = esc(csrf);
    let pct = if rep.items > 0 {
        rep.complete_items * 100 / rep.items
    } else {
        0
    };
    page(
        &format!("Dashboard · {}", project.name),
        Some((user, csrf)),
        &format!(
            r#"<h1>{name} <span class="muted small">K={k} · overlap {o} · gold rate {gr:.2}</span></h1>{flash}
<div class="stats">
<div class="stat"><div class="v">{ci} / {items}</div><div class="l">items complete</div><div class="progress"><div style="width:{pct}%"></div></div></div>
<div class="stat"><div class="v">{nj}</div><div class="l">judgements · {al} active leases</div></div>
<div class="stat"><div class="v">{alpha}</div><div class="l">Krippendorff's α (ordinal)</div></div>
<div class="stat"><div class="v">{kappa}</div><div class="l">Fleiss' κ (pairs)</div></div>
<div class="stat"><div class="v">{med}</div><div class="l">median seconds / item</div></div></div>
<section class="card"><h2>Annotators</h2><table><thead><tr><th>Annotator</th><th class=num>Judged</th><th class=num>Skips</th><th class=num>All bad</th><th class=num>Gold acc.</th><th class=num>τ-b vs consensus</th><th class=num>Median s</th><th class=num>Per hour</th><th class=num>Late</th></tr></thead><tbody>{rows}</tbody></table></section>
<div class="grid2"><section class="card"><h2>Export</h2><p class="muted">JSONL for <code>rlhf reward</code> / <code>rlhf dpo</code>.</p><div class="buttons">
<a class="button" href="/admin/p/{id}/export?format=pairs&amp;mode=consensus">Pairs (consensus)</a>
<a class="button" href="/admin/p/{id}/export?format=pairs&amp;mode=annotators">Pairs (per annotator)</a>
<a class="button" href="/admin/p/{id}/export?format=rankings&amp;mode=consensus">Rankings (consensus)</a></div>
<h3>Import candidates (JSONL)</h3><form method="post" action="/admin/p/{id}/import" class="stack compact"><input type="hidden" name="csrf" value="{csrf_e}">
<textarea name="jsonl" rows="3" placeholder='{{"prompt": "...", "completions": ["...", "..."], "meta": {{}}}}'></textarea><button>Import</button></form></section>
<section class="card"><h2>Guidelines <span class="muted small">v{gv}</span></h2><form method="post" action="/admin/p/{id}/guidelines" class="stack compact"><input type="hidden" name="csrf" value="{csrf_e}">
<textarea name="body" rows="6">{gbody}</textarea><button>Publish new version</button></form></section></div>
<section class="card"><h2>Critiques, flags and reasons</h2><table><thead><tr><th>Annotator</th><th>Item</th><th>Kind</th><th>Reason</th><th>Critique</th><th>Flags</th></tr></thead><tbody>{nrows}</tbody></table></section>"#,
            name = esc(&project.name),
            k = project.k,
            o = project.overlap,
            gr = project.gold_rate,
            id = project.id,
            ci = rep.complete_items,
            items = rep.items,
            nj = rep.judgements,
            al = rep.active_leases,
            alpha = fmt_opt(rep.alpha_ordinal, 3),
            kappa = fmt_opt(rep.fleiss_kappa_pairs, 3),
            med = fmt_opt(rep.median_seconds, 1),
            gv = g.version,
            gbody = esc(&g.body),
        ),
    )
}

pub const APP_CSS: &str = r#"
:root{--bg:#f5f6fa;--card:#fff;--ink:#1f2433;--muted:#6b7280;--line:#e3e6ee;--brand:#4f46e5;--brand-d:#4338ca;--ok:#059669;--bad:#dc2626;--warn:#d97706;--radius:12px}
*{box-sizing:border-box}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;background:var(--bg);color:var(--ink)}
a{color:var(--brand)}
header.top{display:flex;align-items:center;justify-content:space-between;padding:.7rem 1.5rem;background:#fff;border-bottom:1px solid var(--line);position:sticky;top:0;z-index:5}
.brand{font-weight:700;color:var(--ink);text-decoration:none;font-size:1.05rem}.logo{color:var(--brand)}
nav{display:flex;gap:1.1rem;align-items:center}nav a{text-decoration:none;color:var(--ink)}nav a:hover{color:var(--brand)}
.who{color:var(--muted)}
main{max-width:1100px;margin:1.5rem auto;padding:0 1.25rem}
h1{font-size:1.5rem;margin:.2rem 0 1rem}h2{font-size:1.1rem;margin:0 0 .6rem}h3{font-size:1rem;margin:1.2rem 0 .5rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:var(--radius);padding:1.1rem 1.3rem;margin-bottom:1rem;box-shadow:0 1px 2px rgba(16,24,40,.04)}
.narrow{max-width:420px;margin:3rem auto}.center{text-align:center}
.muted{color:var(--muted)}.small{font-size:.85rem;font-weight:400}
.alert{background:#fef2f2;color:#991b1b;border:1px solid #fecaca;padding:.6rem .8rem;border-radius:8px}
.notice{background:#ecfdf5;color:#065f46;border:1px solid #a7f3d0;padding:.6rem .8rem;border-radius:8px}
.stack{display:flex;flex-direction:column;gap:.8rem}.stack.compact{gap:.55rem}
label{display:flex;flex-direction:column;gap:.25rem;font-weight:600;font-size:.88rem}
input,select,textarea{font:inherit;padding:.5rem .65rem;border:1px solid #cfd4df;border-radius:8px;background:#fff;color:var(--ink)}
textarea{resize:vertical;font-weight:400}
input:focus,select:focus,textarea:focus,.cand:focus{outline:3px solid rgba(79,70,229,.25);border-color:var(--brand)}
button,.button{font:inherit;font-weight:600;display:inline-flex;align-items:center;gap:.4rem;padding:.55rem 1rem;border-radius:8px;border:1px solid #cfd4df;background:#fff;color:var(--ink);cursor:pointer;text-decoration:none}
button:hover,.button:hover{border-color:var(--brand);color:var(--brand)}
.primary{background:var(--brand);border-color:var(--brand);color:#fff}.primary:hover{background:var(--brand-d);color:#fff}
.secondary{background:#f3f4f6}.danger{color:var(--bad);border-color:#fecaca;background:#fff5f5}.danger:hover{border-color:var(--bad);color:var(--bad)}
.ghost{border-color:transparent;background:#eef0ff;color:var(--brand)}
button.link{border:none;background:none;padding:0;color:var(--muted);font-weight:400}
form.inline{display:inline}
kbd{font:12px ui-monospace,monospace;background:rgba(0,0,0,.08);border-radius:4px;padding:.05rem .35rem}
.primary kbd{background:rgba(255,255,255,.2)}
.progress{height:8px;background:#e8eaf3;border-radius:99px;overflow:hidden;margin:.4rem 0}.progress div{height:100%;background:linear-gradient(90deg,#6366f1,#4f46e5);border-radius:99px}
.taskbar{display:flex;align-items:center;gap:1rem;margin-bottom:1rem}.taskbar .wide{flex:1}.count{margin-left:.6rem;font-size:1.05rem}
.prompt-text,.cand-text{white-space:pre-wrap;word-wrap:break-word}
.prompt{border-left:4px solid var(--brand)}.prompt-text{font-size:1.05rem}
.hint{color:var(--muted);margin:.3rem 0 .7rem}.js-only{display:none}.js .js-only{display:inline}
#ranker{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:.8rem}
.js #ranker{display:flex;flex-direction:column;gap:.5rem}
.cand{background:#fff;border:1px solid var(--line);border-radius:var(--radius);padding:.8rem 1rem;transition:box-shadow .15s,border-color .15s}
.cand:hover{box-shadow:0 4px 14px rgba(16,24,40,.08)}
.cand-head{display:flex;align-items:center;gap:.6rem;margin-bottom:.4rem}
.badge{display:inline-grid;place-items:center;width:1.9rem;height:1.9rem;border-radius:50%;background:#eef0ff;color:var(--brand);font-weight:700}
.grip{display:none;color:#a0a6b5;cursor:grab;font-size:1.2rem}.js .grip{display:inline}
.rank{flex-direction:row;align-items:center;margin-left:auto;font-weight:500;color:var(--muted)}.rank select{padding:.25rem .4rem}
.flags{display:flex;gap:.9rem;margin-top:.5rem;flex-wrap:wrap}.flag{flex-direction:row;align-items:center;gap:.3rem;font-weight:400;font-size:.82rem;color:var(--muted)}
.tier{display:flex;flex-direction:column;gap:.4rem;border:2px dashed transparent;border-radius:14px;padding:.35rem .35rem .35rem 3.2rem;position:relative;background:#fafbff}
.tier::before{content:attr(data-label);position:absolute;left:.6rem;top:.7rem;font-weight:700;color:var(--brand);font-size:.85rem}
.tier.tied{border-color:#c7d2fe;background:#f1f3ff}.tier.tied::after{content:"tie";position:absolute;left:.6rem;top:2.1rem;font-size:.72rem;font-weight:600;color:#6366f1;background:#e0e7ff;border-radius:99px;padding:0 .4rem}
.tier.unranked{background:transparent;border-color:#e5e7eb}.tier.unranked::before{color:#9ca3af}
.tier.over{border-color:var(--brand);background:#eef0ff}
.gap{height:6px;border-radius:6px;transition:height .1s}.dragging .gap{height:18px;background:#eef0ff}.gap.over{height:34px;background:#c7d2fe}
.cand.drag{opacity:.45}
.actions{display:flex;justify-content:space-between;align-items:flex-end;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.secondary-actions{display:flex;gap:.5rem;align-items:flex-end;flex-wrap:wrap}.reason{font-weight:500;color:var(--muted)}.reason-text{width:13rem}
.help ul{margin:.4rem 0 0;padding-left:1.2rem;color:var(--muted)}
ul.plain{list-style:none;padding:0}.project{display:flex;justify-content:space-between;align-items:center;gap:1rem}.project>div{flex:1}
table{width:100%;border-collapse:collapse;font-size:.92rem}th,td{text-align:left;padding:.45rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}th{color:var(--muted);font-weight:600;font-size:.8rem;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.pill{background:#eef0ff;color:var(--brand);border-radius:99px;padding:.05rem .55rem;font-size:.8rem}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:1rem}@media(max-width:800px){.grid2{grid-template-columns:1fr}}
.row{display:flex;gap:.5rem}.row label{flex:1}.row input{width:100%}
.stats{display:grid;grid-template-columns:repeat(5,1fr);gap:.8rem;margin-bottom:1rem}@media(max-width:900px){.stats{grid-template-columns:repeat(2,1fr)}}
.stat{background:#fff;border:1px solid var(--line);border-radius:var(--radius);padding:.9rem 1rem}.stat .v{font-size:1.5rem;font-weight:700}.stat .l{color:var(--muted);font-size:.82rem}
.buttons{display:flex;gap:.5rem;flex-wrap:wrap}
.prose{max-width:760px}.prose h1,.prose h2{margin-top:1rem}
code{background:#f1f2f6;padding:.05rem .3rem;border-radius:4px}
"#;

pub const RANK_JS: &str = r#"(function(){
'use strict';
var ranker=document.getElementById('ranker');
var form=document.getElementById('task-form');
document.documentElement.classList.add('js');
document.addEventListener('keydown',function(e){
  var t=e.target.tagName;
  if(form&&(e.ctrlKey||e.metaKey)&&e.key==='Enter'){e.preventDefault();var b=document.getElementById('submit-btn');if(form.requestSubmit){form.requestSubmit(b);}else{b.click();}return;}
  if(t==='INPUT'||t==='TEXTAREA'||t==='SELECT')return;
  if(e.key==='g'){var g=document.querySelector('a[href$="/guidelines"]');if(g){window.open(g.href,'_blank');}}
});
if(!ranker)return;
var cards=Array.prototype.slice.call(ranker.querySelectorAll('.cand'));
var k=cards.length;
function sel(c){return c.querySelector('.rank-select');}
function tiers(){
  var by={},un=[];
  cards.forEach(function(c){var v=sel(c).value;if(v){(by[v]=by[v]||[]).push(c);}else{un.push(c);}});
  var keys=Object.keys(by).map(Number).sort(function(a,b){return a-b;});
  return {ranked:keys.map(function(r){return by[r];}),unranked:un};
}
function write(ranked){ // dense ranks 1..m
  cards.forEach(function(c){sel(c).value='';});
  ranked.forEach(function(tier,i){tier.forEach(function(c){sel(c).value=String(i+1);});});
  render();
}
function gap(index){
  var g=document.createElement('div');g.className='gap';g.dataset.index=index;
  g.addEventListener('dragover',function(e){e.preventDefault();g.classList.add('over');});
  g.addEventListener('dragleave',function(){g.classList.remove('over');});
  g.addEventListener('drop',function(e){e.preventDefault();g.classList.remove('over');moveTo(dragged,index,false);});
  return g;
}
var dragged=null;
function moveTo(card,index,tie){
  if(!card)return;
  var t=tiers().ranked.map(function(x){return x.filter(function(c){return c!==card;});});
  // keep indices stable: count removed-empty tiers before index
  var kept=[],newIndex=index;
  t.forEach(function(x,i){if(x.length){kept.push(x);}else if(i<index){newIndex--;}});
  if(tie&&kept[newIndex]){kept[newIndex].push(card);}else{kept.splice(newIndex,0,[card]);}
  write(kept);
  card.focus();
}
function tierBox(list,index,label,unranked){
  var d=document.createElement('div');
  d.className='tier'+(list.length>1&&!unranked?' tied':'')+(unranked?' unranked':'');
  d.dataset.label=label;
  list.forEach(function(c){d.appendChild(c);});
  if(!unranked){
    d.addEventListener('dragover',function(e){e.preventDefault();d.classList.add('over');});
    d.addEventListener('dragleave',function(){d.classList.remove('over');});
    d.addEventListener('drop',function(e){e.preventDefault();d.classList.remove('over');moveTo(dragged,index,true);});
  }
  return d;
}
function render(){
  var t=tiers();
  while(ranker.firstChild)ranker.removeChild(ranker.firstChild);
  ranker.appendChild(gap(0));
  t.ranked.forEach(function(list,i){
    ranker.appendChild(tierBox(list,i,'#'+(i+1),false));
    ranker.appendChild(gap(i+1));
  });
  if(t.unranked.length){ranker.appendChild(tierBox(t.unranked,-1,'?',true));}
}
cards.forEach(function(c){
  c.setAttribute('draggable','true');
  c.addEventListener('dragstart',function(e){dragged=c;c.classList.add('drag');ranker.classList.add('dragging');e.dataTransfer.effectAllowed='move';e.dataTransfer.setData('text/plain',c.dataset.pos);});
  c.addEventListener('dragend',function(){c.classList.remove('drag');ranker.classList.remove('dragging');dragged=null;});
  sel(c).addEventListener('change',function(){render();c.focus();});
  c.addEventListener('keydown',function(e){
    if(e.target.tagName==='SELECT'||e.target.tagName==='INPUT')return;
    var i=cards.indexOf(c);var order=Array.prototype.slice.call(ranker.querySelectorAll('.cand'));var j=order.indexOf(c);
    if(e.key==='ArrowDown'||e.key==='j'){e.preventDefault();if(order[j+1])order[j+1].focus();}
    else if(e.key==='ArrowUp'||e.key==='k'){e.preventDefault();if(order[j-1])order[j-1].focus();}
    else if(/^[1-9]$/.test(e.key)&&Number(e.key)<=k){e.preventDefault();sel(cards[i]).value=e.key;render();c.focus();}
    else if(e.key==='0'||e.key==='Backspace'){e.preventDefault();sel(c).value='';render();c.focus();}
  });
});
render();
})();
"#;
