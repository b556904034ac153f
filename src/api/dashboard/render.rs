//! The dashboard's HTML: one self-contained page (inline style and SVG, no script, nothing fetched
//! from elsewhere), Italian labels, every text from data escaped.
use std::fmt::Write;

use super::data::{Count, Dashboard, Grid, Listing, SubscriptionHealth, label_of};
use super::filters::{Filters, all_regions, region_name};
use super::svg::{PALETTE, stacked_bars};
use crate::auth::{Principal, Role};

/// HTML-escape text for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;background:#f5f6f8}
header{background:#0b3d63;color:#fff;padding:.8rem 1.5rem;display:flex;justify-content:space-between;align-items:center}
header h1{font-size:1.25rem;margin:0}
header form{display:inline}
header button{background:#fff;color:#0b3d63;border:0;padding:.3rem .8rem;border-radius:4px;cursor:pointer}
main{padding:1rem 1.5rem;max-width:1200px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:1rem;margin-bottom:1rem;overflow-x:auto}
h2{font-size:1.1rem;margin:.2rem 0 .6rem}
p.nota{color:#555;font-size:.85rem;margin:.3rem 0}
table{border-collapse:collapse;font-size:.85rem;margin-top:.5rem}
th,td{border:1px solid #dde1e6;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td.testo{text-align:left;white-space:normal}
a.n{font-weight:600;color:#0b3d63;text-decoration:none}
a.n:hover{text-decoration:underline}
a.zero{color:#8a8f98;font-weight:400}
.filtri label{margin-right:1rem}
.grafico{max-width:100%;height:auto}
.legenda span{display:inline-block;margin-right:1rem;font-size:.85rem}
.legenda i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:middle}
.ok{color:#1a7f37}.attenzione{color:#9a6700}.errore{color:#cf222e;font-weight:600}
.grande{font-size:1.8rem}
.avviso{background:#fff4e5;border:1px solid #f0c36d;padding:.6rem 1rem;border-radius:4px}
"#;

/// A whole page around `body`.
pub fn page(title: &str, header_extra: &str, body: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="it"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} — Sentinella</title><style>{STYLE}</style></head>
<body><header><h1>Sentinella · {}</h1><div>{header_extra}</div></header><main>{body}</main></body></html>"#,
        escape(title),
        escape(title)
    )
}

/// A number that links to its search (`key` names it for tests and tools: `data-n`).
fn number(key: &str, c: &Count) -> String {
    format!(
        r#"<a class="n{}" data-n="{}" href="{}" title="Ricerca FHIR: {}">{}</a>"#,
        if c.n == 0 { " zero" } else { "" },
        escape(key),
        escape(&c.href),
        escape(&c.href),
        c.n
    )
}

fn legend(grid: &Grid) -> String {
    let mut s = String::from(r#"<div class="legenda">"#);
    for (k, series) in grid.series.iter().enumerate() {
        let _ = write!(
            s,
            r#"<span><i style="background:{}"></i>{}</span>"#,
            PALETTE[k % PALETTE.len()],
            escape(&series.label)
        );
    }
    s.push_str("</div>");
    s
}

/// The month grid as a table: a row per series, a column per month, and the period's total.
fn grid_table(prefix: &str, grid: &Grid, first_header: &str) -> String {
    let mut s = format!("<table><thead><tr><th>{}</th>", escape(first_header));
    for m in &grid.months {
        let _ = write!(s, "<th>{}</th>", escape(&m.label()));
    }
    s.push_str("<th>Totale</th></tr></thead><tbody>");
    for series in &grid.series {
        let _ = write!(s, "<tr><td>{}</td>", escape(&series.label));
        for (m, c) in grid.months.iter().zip(&series.cells) {
            let _ = write!(
                s,
                "<td>{}</td>",
                number(&format!("{prefix}/{}/{}", series.code, m.key()), c)
            );
        }
        let _ = write!(
            s,
            "<td>{}</td></tr>",
            number(&format!("{prefix}/{}/totale", series.code), &series.total)
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn filter_form(f: &Filters, viewer: &Principal) -> String {
    let regions: Vec<(String, String)> = match viewer.role {
        Role::Region if !viewer.development => viewer
            .regions
            .iter()
            .map(|r| (r.clone(), region_name(r).unwrap_or(r).to_string()))
            .collect(),
        _ => all_regions(),
    };
    let mut options = String::from(r#"<option value="">Tutte le regioni visibili</option>"#);
    for (code, name) in regions {
        let _ = write!(
            options,
            r#"<option value="{}"{}>{} ({})</option>"#,
            escape(&code),
            if f.region.as_deref() == Some(code.as_str()) {
                " selected"
            } else {
                ""
            },
            escape(&name),
            escape(&code)
        );
    }
    format!(
        r#"<section class="filtri"><form method="get" action="/dashboard">
<label>Regione <select name="regione">{options}</select></label>
<label>Da <input type="month" name="da" value="{}" required></label>
<label>A <input type="month" name="a" value="{}" required></label>
<button type="submit">Aggiorna</button></form>
<p class="nota">Periodo di al massimo {} mesi. I mesi sono quelli del calendario italiano (Europe/Rome) e si riferiscono alla data di notifica.</p></section>"#,
        f.from.key(),
        f.to.key(),
        super::filters::MAX_MONTHS
    )
}

/// `05/12/2026 10:30` (Italian time) of a FHIR dateTime; the text itself when it is not one.
pub fn italian_time(text: &str) -> String {
    match text.parse::<jiff::Timestamp>() {
        Ok(t) => t
            .to_zoned(crate::surveillance::calendar::rome())
            .strftime("%d/%m/%Y %H:%M")
            .to_string(),
        Err(_) => text.to_string(),
    }
}

fn italian_micros(us: i64) -> String {
    if us <= 0 {
        return "mai".into();
    }
    match jiff::Timestamp::from_microsecond(us) {
        Ok(t) => t
            .to_zoned(crate::surveillance::calendar::rome())
            .strftime("%d/%m/%Y %H:%M:%S")
            .to_string(),
        Err(_) => String::new(),
    }
}

fn deadlines(d: &Dashboard) -> String {
    let mut s = format!(
        r#"<section id="scadenze"><h2>Scadenze D.M. 15/12/1990</h2>
<p>Notifiche con scadenza ancora aperta: <span class="grande">{}</span></p>
<p class="nota">Notifiche di classe I–IV non ritirate la cui scadenza (12 ore classe I, 48 ore classe II, 24 ore classe IV dalla registrazione della diagnosi) non è ancora passata, in ordine di scadenza{}.</p>"#,
        number("scadenze/aperte", &d.open_deadlines.count),
        shown_of(&d.open_deadlines)
    );
    if !d.open_deadlines.rows.is_empty() {
        s.push_str("<table><thead><tr><th>Scadenza</th><th>Classe</th><th>Malattia</th><th>ASL</th><th>Notifica</th></tr></thead><tbody>");
        for r in &d.open_deadlines.rows {
            let _ = write!(
                s,
                r#"<tr><td>{}</td><td class="testo">{}</td><td class="testo">{}</td><td class="testo">{}</td><td class="testo">{}</td></tr>"#,
                escape(&italian_time(&r.deadline)),
                escape(label_of(&r.category)),
                escape(&r.disease),
                escape(&r.asl),
                escape(&r.id)
            );
        }
        s.push_str("</tbody></table>");
    }
    s.push_str(r#"<h2 style="margin-top:1rem">Segnalazioni in ritardo nel periodo</h2><table><thead><tr><th>Classe</th><th>In ritardo</th></tr></thead><tbody>"#);
    for ((label, c), code) in d
        .late
        .iter()
        .zip(["classe-1", "classe-2", "classe-3", "classe-4"])
    {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(label),
            number(&format!("ritardo/{code}"), c)
        );
    }
    s.push_str(r#"</tbody></table><p class="nota">Casi la cui prima segnalazione è arrivata dopo la scadenza di legge (estensione in-ritardo).</p></section>"#);
    s
}

fn shown_of<T>(l: &Listing<T>) -> String {
    if (l.rows.len() as i64) < l.count.n {
        format!(" (ne sono elencate {} su {})", l.rows.len(), l.count.n)
    } else {
        String::new()
    }
}

fn outbreaks(d: &Dashboard) -> String {
    let mut s = format!(
        r#"<section id="focolai"><h2>Focolai attivi</h2>
<p>Focolai non ritirati notificati nel periodo: <span class="grande">{}</span></p>
<p class="nota">Due o più casi di classe IV o V della stessa malattia nella stessa comunità entro la finestra del focolaio{}.</p>"#,
        number("focolai/attivi", &d.outbreaks.count),
        shown_of(&d.outbreaks)
    );
    if !d.outbreaks.rows.is_empty() {
        s.push_str("<table><thead><tr><th>Malattia</th><th>Comunità</th><th>Tipo</th><th>Casi</th><th>Inizio</th><th>Durata (giorni)</th><th>Notifica</th></tr></thead><tbody>");
        for r in &d.outbreaks.rows {
            let _ = write!(
                s,
                r#"<tr><td class="testo">{}</td><td class="testo">{}</td><td class="testo">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="testo">{}</td></tr>"#,
                escape(&r.disease),
                escape(&r.community),
                escape(&r.community_kind),
                r.cases.map(|n| n.to_string()).unwrap_or_default(),
                escape(&crate::surveillance::dm1990::notification::italian_date(
                    &r.first_onset
                )),
                r.days.map(|n| n.to_string()).unwrap_or_default(),
                escape(&r.id)
            );
        }
        s.push_str("</tbody></table>");
    }
    s.push_str("</section>");
    s
}

fn status_label(status: &str) -> (&'static str, &'static str) {
    match status {
        "requested" => ("in attesa di attivazione", "attenzione"),
        "active" => ("attiva", "ok"),
        "error" => ("in errore", "errore"),
        "off" => ("disattivata", ""),
        _ => ("sconosciuto", "attenzione"),
    }
}

fn subscription_row(h: &SubscriptionHealth) -> String {
    let r = &h.row;
    let pending = (r.events_count - r.delivered_count).max(0);
    let (label, class) = status_label(&r.status);
    let class = if r.status == "active" && (r.attempts > 0 || pending > 0) {
        "attenzione"
    } else {
        class
    };
    let pending_c = Count {
        n: pending,
        href: h.status_href.clone(),
    };
    let topic = r.topic.rsplit('/').next().unwrap_or(&r.topic);
    let error: String = r
        .last_error
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    format!(
        r#"<tr><td class="testo"><a href="{}">{}</a></td><td class="testo">{}</td><td class="testo">{}</td><td class="{class}">{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td class="testo">{}</td></tr>"#,
        escape(&h.href),
        escape(&r.id),
        escape(topic),
        escape(if r.owner.is_empty() { "—" } else { &r.owner }),
        escape(label),
        r.events_count,
        r.delivered_count,
        number(&format!("sottoscrizione/{}/in-coda", r.id), &pending_c),
        if r.unnumbered { " (+ da numerare)" } else { "" },
        r.attempts,
        escape(&italian_micros(r.last_sent_at)),
        escape(&error)
    )
}

fn subscriptions(d: &Dashboard) -> String {
    let Some(l) = &d.subscriptions else {
        return String::new();
    };
    let mut s = format!(
        r#"<section id="sottoscrizioni"><h2>Stato di consegna delle sottoscrizioni</h2>
<p>Sottoscrizioni: <span class="grande">{}</span></p>
<p class="nota">«In coda»: eventi prodotti e non ancora confermati dal destinatario (il link apre lo stato <code>$status</code> della sottoscrizione){}.</p>"#,
        number("sottoscrizioni/totale", &l.count),
        shown_of(l)
    );
    if !l.rows.is_empty() {
        s.push_str("<table><thead><tr><th>Sottoscrizione</th><th>Argomento</th><th>Cliente</th><th>Stato</th><th>Eventi</th><th>Consegnati</th><th>In coda</th><th>Tentativi falliti</th><th>Ultimo invio</th><th>Ultimo errore</th></tr></thead><tbody>");
        for h in &l.rows {
            s.push_str(&subscription_row(h));
        }
        s.push_str("</tbody></table>");
    }
    s.push_str("</section>");
    s
}

/// Who is looking, and the logout button when the page came with a session cookie.
pub fn viewer_header(viewer: &Principal, cookie_session: bool) -> String {
    let who = if viewer.development {
        "modalità sviluppo (nessun file di accesso)".to_string()
    } else {
        let role = match viewer.role {
            Role::Region => format!(
                "regione {}",
                viewer
                    .regions
                    .iter()
                    .map(|r| region_name(r).unwrap_or(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Role::Ministry => "ministero".to_string(),
            Role::Admin => "amministratore".to_string(),
            other => format!("{other:?}"),
        };
        format!("{} ({role})", viewer.id)
    };
    let logout = if cookie_session {
        r#" <form method="post" action="/dashboard/logout"><button type="submit">Esci</button></form>"#
    } else {
        ""
    };
    format!(r#"<span id="utente">{}</span>{logout}"#, escape(&who))
}

pub fn dashboard(d: &Dashboard, f: &Filters, viewer: &Principal, cookie_session: bool) -> String {
    let area = match &f.region {
        Some(r) => format!("regione {} ({r})", region_name(r).unwrap_or(r)),
        None => "tutte le regioni visibili".to_string(),
    };
    let mut body = filter_form(f, viewer);
    let _ = write!(
        body,
        r#"<p class="nota" id="ambito">Dati: {}, da {} a {}. Ogni numero apre la ricerca FHIR che lo ha prodotto (con lo stesso token di accesso, il campo <code>total</code> della risposta è quel numero).</p>"#,
        escape(&area),
        escape(&f.from.label()),
        escape(&f.to.label())
    );
    let _ = write!(
        body,
        r#"<section id="casi"><h2>Casi notificati per categoria e mese</h2>{}{}{}<p class="nota">Notifiche di caso non ritirate, per mese di notifica. La classe IV è indirizzata alle sole ASL: non compare filtrando per regione.</p></section>"#,
        stacked_bars(&d.cases, "Casi notificati per categoria e mese", false),
        legend(&d.cases),
        grid_table("casi", &d.cases, "Categoria")
    );
    let _ = write!(
        body,
        r#"<section id="cre"><h2>Epicurva CRE per specie e mese</h2>{}{}{}<p class="nota">Casi di batteriemia da enterobatteri resistenti ai carbapenemi non ritirati, per specie e mese di notifica.</p></section>"#,
        stacked_bars(&d.cre, "Epicurva CRE per specie e mese", true),
        legend(&d.cre),
        grid_table("cre", &d.cre, "Specie")
    );
    body.push_str(&deadlines(d));
    body.push_str(&outbreaks(d));
    body.push_str(&subscriptions(d));
    page(
        "Cruscotto di sorveglianza",
        &viewer_header(viewer, cookie_session),
        &body,
    )
}

/// A page that only says something (an error, a refusal).
pub fn message(title: &str, text: &str, link: Option<(&str, &str)>) -> String {
    let link = link
        .map(|(href, label)| format!(r#"<p><a href="{}">{}</a></p>"#, escape(href), escape(label)))
        .unwrap_or_default();
    page(
        title,
        "",
        &format!(
            r#"<section><p class="avviso" id="messaggio">{}</p>{link}</section>"#,
            escape(text)
        ),
    )
}

/// The login form; `error` is shown above it.
pub fn login(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="avviso" id="messaggio">{}</p>"#, escape(e)))
        .unwrap_or_default();
    page(
        "Accesso al cruscotto",
        "",
        &format!(
            r#"<section>{error}<form method="post" action="/dashboard/login">
<p><label for="token">Token di accesso</label></p>
<p><input type="password" id="token" name="token" autocomplete="off" size="60" required></p>
<p><button type="submit">Accedi</button></p></form>
<p class="nota">Incollare il token di accesso del proprio client (lo stesso usato con l'API FHIR: un token statico del file di accesso o un access token SMART). Il token resta in un cookie di sessione valido solo per il cruscotto.</p></section>"#
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn times_are_shown_in_italy() {
        assert_eq!(italian_time("2026-12-05T09:30:00Z"), "05/12/2026 10:30");
        assert_eq!(italian_time("<x>"), "<x>");
    }
}
