//! The stored summaries: once a period is over, each Measure's report for every area of its levels
//! is computed and stored under an id made of the Measure, the area and the period, so that a
//! second run (a restart, another process, a late correction) finds it and makes a new version
//! only when a count changed, never a second report.
use std::time::Duration;

use serde_json::{Value, json};

use super::MeasureError;
use super::definition::{Level, MeasureDef, Periodicity, measures};
use super::evaluate::{Detail, Period, Subject, evaluate};
use crate::fhir::datetime::now_micros;
use crate::store::{NewVersion, SharedStore};
use crate::subscriptions::dispatch::Dispatcher;
use crate::surveillance::calendar::rome;
use crate::terminology::{CANON, Terminology};

/// A period whose reports are stored: a month (`2026-01`) or a year (`2026`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Month(i16, i8),
    Year(i16),
}

impl Due {
    pub fn parse(text: &str) -> Option<Due> {
        let (y, m) = match text.split_once('-') {
            Some((y, m)) if m.len() == 2 => (y, Some(m)),
            None => (text, None),
            _ => return None,
        };
        if y.len() != 4 {
            return None;
        }
        let y: i16 = y.parse().ok()?;
        let due = match m {
            Some(m) => Due::Month(y, m.parse().ok()?),
            None => Due::Year(y),
        };
        due.period().map(|_| due)
    }

    pub fn label(&self) -> String {
        match self {
            Due::Month(y, m) => format!("{y:04}-{m:02}"),
            Due::Year(y) => format!("{y:04}"),
        }
    }

    fn period(&self) -> Option<Period> {
        match *self {
            Due::Month(y, m) => Period::month(y, m),
            Due::Year(y) => Period::year(y),
        }
    }

    fn periodicity(&self) -> Periodicity {
        match self {
            Due::Month(..) => Periodicity::Month,
            Due::Year(_) => Periodicity::Year,
        }
    }

    /// The month and the year that ended last, in Italy, at `now` (µs).
    pub fn last_ended(now: i64) -> (Due, Due) {
        let today = jiff::Timestamp::from_microsecond(now)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(rome())
            .date();
        let first = today.first_of_month();
        let last_month = first.yesterday().unwrap_or(first);
        (
            Due::Month(last_month.year(), last_month.month()),
            Due::Year(today.year() - 1),
        )
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Generated {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
}

fn areas(level: Level) -> Vec<Subject> {
    let kind = match level {
        Level::Asl => "asl",
        Level::Region => "regione",
    };
    let url = format!("{CANON}/CodeSystem/{kind}");
    Terminology::get()
        .resources
        .iter()
        .filter(|r| r["resourceType"] == "CodeSystem" && r["url"] == url)
        .flat_map(|cs| cs["concept"].as_array().into_iter().flatten())
        .filter_map(|c| c["code"].as_str())
        .map(|code| Subject::of(kind, code))
        .collect()
}

/// The id of a stored report: `{measure}-{asl|regione}-{code}-{period}`.
pub fn report_id(m: &MeasureDef, subject: &Subject, due: Due) -> String {
    format!("{}-{}-{}-{}", m.id, subject.kind, subject.code, due.label())
}

/// The stored form of a summary report.
fn stored(mut report: Value, id: &str, subject: &Subject) -> Value {
    report["id"] = json!(id);
    report["identifier"] = json!([{"system": format!("{CANON}/sid/riepilogo"), "value": id}]);
    if let Some(region) = &subject.region {
        let mut coding = json!({"system": format!("{CANON}/CodeSystem/regione"), "code": region});
        if let Some(d) = Terminology::get().display(&format!("{CANON}/CodeSystem/regione"), region)
        {
            coding["display"] = json!(d);
        }
        report["extension"] = json!([{
            "url": format!("{CANON}/StructureDefinition/regione-riepilogo"),
            "valueCoding": coding
        }]);
    }
    report
}

/// What two versions of a report say, when they were computed aside.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.shift_remove("meta");
        o.shift_remove("date");
    }
    v
}

/// Compute and store every report due for `due`: one transaction, the reports' ids locked, each
/// written only when new or changed (with the subscription events of the change).
pub async fn generate(
    store: &SharedStore,
    dispatcher: &Dispatcher,
    due: Due,
) -> Result<Generated, MeasureError> {
    let Some(period) = due.period() else {
        return Ok(Generated::default());
    };
    // computed before the transaction: reads only, outside the writer's critical section
    let computed_at = now_micros();
    let mut reports = Vec::new();
    for m in measures()
        .iter()
        .filter(|m| m.periodicity == due.periodicity())
    {
        for level in &m.levels {
            for subject in areas(*level) {
                let r =
                    evaluate(store.as_ref(), m, &period, Some(&subject), Detail::Summary).await?;
                let id = report_id(m, &subject, due);
                reports.push((id.clone(), stored(r, &id, &subject)));
            }
        }
    }
    let mut done = Generated::default();
    let mut tx = store.begin().await?;
    let locks: Vec<String> = reports
        .iter()
        .map(|(id, _)| format!("measure-report:{id}"))
        .collect();
    tx.lock_all(&locks).await?;
    let mut changed = false;
    for (id, body) in reports {
        let current = tx.current("MeasureReport", &id).await?;
        let old: Option<Value> = current
            .as_ref()
            .filter(|c| !c.deleted)
            .and_then(|c| c.body.as_deref())
            .and_then(|b| serde_json::from_str(b).ok());
        // the same counts, or counts another run computed after this one started (a run that
        // read the register before a correction must not overwrite one that read it after)
        if old.as_ref().is_some_and(|o| content(o) == content(&body))
            || current
                .as_ref()
                .is_some_and(|c| c.last_updated >= computed_at)
        {
            done.unchanged += 1;
            continue;
        }
        let (version, method) = match &current {
            Some(c) => (c.version_id + 1, "PUT"),
            None => (1, "POST"),
        };
        let v = NewVersion::stamped(body, "MeasureReport", &id, version, method);
        tx.write(&v).await?;
        dispatcher
            .on_write(
                tx.as_mut(),
                "MeasureReport",
                &id,
                version,
                old.as_ref(),
                v.resource.as_deref(),
            )
            .await?;
        changed = true;
        if version == 1 {
            done.created += 1;
        } else {
            done.updated += 1;
        }
    }
    tx.commit().await?;
    if changed {
        store.durable().await;
        dispatcher.wake();
    }
    Ok(done)
}

/// How far back the first run looks for changed cases: further than any gap between two runs of
/// a server that was up (a case changes only through a running server).
const FIRST_LOOK_BACK_US: i64 = 35 * 86_400_000_000;
/// Runs overlap by this much, so that a change committed while a run started is not missed.
const OVERLAP_US: i64 = 10 * 60_000_000;

/// The periods a run stores: the month and the year that ended last, and every ended month (and
/// its year) whose cases changed since `since` (µs): a late notification (tuberculosis after its
/// cultures) or a corrected onset changes an old report.
pub async fn due_periods(
    store: &SharedStore,
    now: i64,
    since: i64,
) -> Result<Vec<Due>, MeasureError> {
    let (month, year) = Due::last_ended(now);
    let (Due::Month(ly, lm), Due::Year(last_year)) = (month, year) else {
        return Ok(vec![month, year]);
    };
    // (year, month or 0 for the whole year)
    let mut dues = std::collections::BTreeSet::from([(ly, lm), (last_year, 0)]);
    for ym in store.register_months_changed(since).await? {
        let (y, m) = ((ym / 100) as i16, (ym % 100) as i8);
        if (y, m) <= (ly, lm) {
            dues.insert((y, m));
        }
        if y <= last_year {
            dues.insert((y, 0));
        }
    }
    Ok(dues
        .into_iter()
        .map(|(y, m)| {
            if m == 0 {
                Due::Year(y)
            } else {
                Due::Month(y, m)
            }
        })
        .collect())
}

/// Store the reports of the periods due, now and every `every`, for as long as the process runs
/// (a restart or a second process only finds them stored).
pub fn spawn_schedule(store: SharedStore, dispatcher: std::sync::Arc<Dispatcher>, every: Duration) {
    tokio::spawn(async move {
        let mut since = now_micros() - FIRST_LOOK_BACK_US;
        loop {
            let started = now_micros();
            let mut all_stored = true;
            let dues = due_periods(&store, started, since)
                .await
                .unwrap_or_else(|e| {
                    all_stored = false;
                    tracing::warn!(error = %e, "periodic summaries: changed periods not read");
                    let (month, year) = Due::last_ended(started);
                    vec![month, year]
                });
            for due in dues {
                match generate(&store, &dispatcher, due).await {
                    Ok(g) if g.created + g.updated > 0 => tracing::info!(
                        period = %due.label(),
                        created = g.created,
                        updated = g.updated,
                        "periodic summaries stored"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        all_stored = false;
                        tracing::warn!(period = %due.label(), error = %e, "periodic summaries not stored; retried at the next run");
                    }
                }
            }
            // after a failure the same changes are looked for again
            if all_stored {
                since = started - OVERLAP_US;
            }
            tokio::time::sleep(every).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_ended_month_and_year_are_italian() {
        // 23:30 UTC on 31 January is already 1 February in Rome: January has ended
        let t = crate::surveillance::calendar::italian_instant("2026-01-31T23:30:00Z").unwrap();
        assert_eq!(Due::last_ended(t), (Due::Month(2026, 1), Due::Year(2025)));
        let t = crate::surveillance::calendar::italian_instant("2026-01-31T22:30:00Z").unwrap();
        assert_eq!(Due::last_ended(t), (Due::Month(2025, 12), Due::Year(2025)));
    }

    #[tokio::test]
    async fn a_late_or_moved_case_makes_its_old_periods_due_again() {
        let path = std::env::temp_dir().join(format!(
            "sentinella-due-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let store = crate::store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let case = |day| crate::store::RegisteredCase {
            case_id: "tb-1".into(),
            family: "dm-1990".into(),
            category: "classe-3".into(),
            disease: "010-018".into(),
            code: "011.93".into(),
            day,
            age: Some(40),
            sex: "female".into(),
            comune: None,
            province: None,
            asl: Some("030321".into()),
            region: Some("030".into()),
            active: true,
            refs: vec!["Communication/tb-1".into()],
        };
        let now = crate::surveillance::calendar::italian_instant("2026-12-03T10:00:00Z").unwrap();
        let before = now_micros();
        // a tuberculosis case with onset in March 2025, notified now (its cultures took months)
        let mut tx = store.begin().await.unwrap();
        tx.register_case(&case(20250310)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            due_periods(&store, now, before).await.unwrap(),
            [Due::Year(2025), Due::Month(2025, 3), Due::Month(2026, 11)]
        );
        // its onset corrected to February 2026: both months are due, the old one too
        let before = now_micros();
        let mut tx = store.begin().await.unwrap();
        tx.register_case(&case(20260214)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            due_periods(&store, now, before).await.unwrap(),
            [
                Due::Year(2025),
                Due::Month(2025, 3),
                Due::Month(2026, 2),
                Due::Month(2026, 11)
            ]
        );
        // nothing changed since: the last ended month and year only
        assert_eq!(
            due_periods(&store, now, now_micros()).await.unwrap(),
            [Due::Year(2025), Due::Month(2026, 11)]
        );
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[test]
    fn periods_are_months_or_years() {
        assert_eq!(Due::parse("2026-01"), Some(Due::Month(2026, 1)));
        assert_eq!(Due::parse("2026"), Some(Due::Year(2026)));
        assert_eq!(Due::parse("2026-13"), None);
        assert_eq!(Due::parse("26-01"), None);
        assert_eq!(Due::parse("2026-1"), None);
    }
}
