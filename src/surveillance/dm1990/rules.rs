//! The D.M. 15/12/1990 rule set, read from `profiles/case-definition-dm-*.json`: the data an
//! epidemiologist edits (classes, codes, criteria, deadlines, recipients, outbreak window). This
//! file gives it types, classifies ICD-9-CM codes and decides whether a report's criteria hold.
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::terminology::Terminology;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSet {
    pub engine: String,
    pub url: String,
    pub version: String,
    pub name: String,
    pub validity: Validity,
    pub time_zone: String,
    pub verification_statuses: Verification,
    pub classes: Vec<Class>,
    pub outbreak: OutbreakRule,
    pub recipients: BTreeMap<String, Recipient>,
    /// Who gets a case whose ASL and region are both unknown.
    pub unrouted: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Validity {
    /// `YYYY-MM-DD`, inclusive
    pub from: String,
    /// `YYYY-MM-DD`, inclusive; `None`: open
    pub to: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Verification {
    pub sospetto: Vec<String>,
    pub confermato: Vec<String>,
    pub escluso: Vec<String>,
    pub errore: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Notify {
    /// Class I: the suspicion itself.
    OnSuspicion,
    /// When an option of criteria holds.
    OnCriteria,
    /// Every case (class IV).
    Always,
    /// Recorded only (class V).
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Class {
    pub class: u8,
    pub category: String,
    pub priority: String,
    pub notify: Notify,
    #[serde(default)]
    pub requires_confirmed: bool,
    #[serde(default)]
    pub sufficient: Vec<Opt>,
    pub deadline_hours: Option<i64>,
    pub recipients: Vec<String>,
    pub episode_days: Option<i64>,
    #[serde(default)]
    pub outbreaks: bool,
    pub diseases: Vec<Disease>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disease {
    /// The listed code (the disease's key), or a range name when `codes` lists several.
    pub code: String,
    #[serde(default)]
    pub codes: Vec<String>,
    pub name: String,
    /// Criteria that must all hold (class II table).
    #[serde(default)]
    pub criteria: Vec<String>,
    /// Alternatives replacing `criteria` + the class's `sufficient` (tuberculosis A–D).
    pub options: Option<Vec<Opt>>,
    /// Overrides the class's `sufficient` (an empty list: none).
    pub sufficient: Option<Vec<Opt>>,
    pub requires_confirmed: Option<bool>,
    pub option_system: Option<String>,
    #[serde(default)]
    pub wait_while_in_progress: Vec<String>,
    pub previous_treatment: Option<PreviousTreatment>,
    pub episode_days: Option<Option<i64>>,
    /// A catch-all entry (class V): the reported code is the disease, not the entry.
    #[serde(default)]
    pub by_reported_code: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousTreatment {
    pub new_episode: Vec<String>,
    pub not_notified_again: Vec<String>,
}

/// One way for criteria to hold: all of `all`, one of `any` (if given), `at_least` of a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Opt {
    pub label: String,
    #[serde(default)]
    pub all: Vec<String>,
    #[serde(default)]
    pub any: Vec<String>,
    pub at_least: Option<AtLeast>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AtLeast {
    pub count: usize,
    pub of: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutbreakRule {
    pub category: String,
    pub priority: String,
    pub minimum_cases: usize,
    pub window_days: i64,
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Recipient {
    pub system: String,
    pub value: String,
    pub display: String,
}

/// A classified code: its class and the listed disease it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Classified<'a> {
    pub class: &'a Class,
    pub disease: &'a Disease,
}

/// The result of one criterion in the evidence (`esito-criterio` codes).
pub type Results = BTreeMap<String, String>;

/// Whether an option holds on the results; `Some(missing)` when it does not.
fn option_holds(o: &Opt, results: &Results) -> Result<(), Vec<String>> {
    let positive = |c: &String| results.get(c).is_some_and(|r| r == "positivo");
    let mut missing: Vec<String> = o.all.iter().filter(|c| !positive(c)).cloned().collect();
    if !o.any.is_empty() && !o.any.iter().any(positive) {
        missing.push(o.any.join(" o "));
    }
    if let Some(a) = &o.at_least {
        let have = a.of.iter().filter(|c| positive(c)).count();
        if have < a.count {
            missing.push(format!("almeno {} tra {}", a.count, a.of.join(", ")));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

impl RuleSet {
    /// The rule sets, read once per process, for readers outside the write path (the
    /// CapabilityStatement, the dashboard's disease names); empty when `load_all` fails, which
    /// stops the server at start anyway.
    pub fn shared() -> &'static [RuleSet] {
        static SETS: std::sync::OnceLock<Vec<RuleSet>> = std::sync::OnceLock::new();
        SETS.get_or_init(|| RuleSet::load_all().unwrap_or_default())
    }

    pub fn load_all() -> Result<Vec<RuleSet>, String> {
        let mut out = Vec::new();
        for f in crate::fhir::profile::data_files("case-definition-") {
            let (name, v) = f;
            if v["engine"] != "dm-1990" {
                continue;
            }
            let set: RuleSet =
                serde_json::from_value(v).map_err(|e| format!("profiles/{name}: {e}"))?;
            set.check()?;
            out.push(set);
        }
        Ok(out)
    }

    /// Every code named must exist in ICD-9-CM (when loaded), every criterion in its CodeSystem.
    fn check(&self) -> Result<(), String> {
        let t = Terminology::get();
        let criteria = format!(
            "{}/CodeSystem/criterio-diagnostico",
            crate::terminology::CANON
        );
        for c in &self.classes {
            for d in &c.diseases {
                for code in d.listed_codes() {
                    if t.icd9.is_loaded() && !t.icd9.contains(code) {
                        return Err(format!("{}: ICD-9-CM code {code} does not exist", self.url));
                    }
                }
                for o in self.options_of(c, d) {
                    for crit in o
                        .all
                        .iter()
                        .chain(&o.any)
                        .chain(o.at_least.iter().flat_map(|a| &a.of))
                    {
                        if t.display(&criteria, crit).is_none()
                            && t.resources.iter().any(|r| r["url"] == criteria)
                        {
                            return Err(format!(
                                "{}: criterion {crit} is not in criterio-diagnostico",
                                self.url
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn canonical(&self) -> String {
        format!("{}|{}", self.url, self.version)
    }

    /// Is the rule set in force on this day (`YYYY-MM-DD`)?
    pub fn valid_on(&self, day: &str) -> bool {
        day >= self.validity.from.as_str() && self.validity.to.as_deref().is_none_or(|to| day <= to)
    }

    /// The listed entry a code belongs to: the most specific listed code among the code and its
    /// ancestors wins (070.30 → 070.3; 005.1 → class I, 005.0 → 005 in class IV).
    pub fn classify<'a>(&'a self, code: &str) -> Option<Classified<'a>> {
        let t = Terminology::get();
        let lineage = t.icd9.lineage(code);
        // without the code system, the dotted code and its 3-character category still classify
        let fallback: Vec<&str> = if lineage.is_empty() {
            let mut v = vec![code];
            if code.len() > 5 {
                v.push(&code[..code.len() - 1]);
            }
            if let Some((cat, _)) = code.split_once('.') {
                v.push(cat);
            }
            v
        } else {
            lineage
        };
        for ancestor in fallback {
            for class in &self.classes {
                for disease in &class.diseases {
                    if disease.listed_codes().any(|c| c == ancestor) {
                        return Some(Classified { class, disease });
                    }
                }
            }
        }
        None
    }

    /// The options of criteria of a disease: its own, or its criteria plus the class's sufficient ones.
    pub fn options_of(&self, class: &Class, disease: &Disease) -> Vec<Opt> {
        if let Some(o) = &disease.options {
            return o.clone();
        }
        let mut out = vec![Opt {
            label: "criteri".into(),
            all: disease.criteria.clone(),
            any: vec![],
            at_least: None,
        }];
        out.extend(
            disease
                .sufficient
                .clone()
                .unwrap_or_else(|| class.sufficient.clone()),
        );
        out
    }
}

impl Disease {
    /// The disease a reported code stands for (cases and outbreaks are per disease).
    pub fn key(&self, reported: &str) -> String {
        if self.by_reported_code {
            reported.to_string()
        } else {
            self.code.clone()
        }
    }

    pub fn listed_codes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.code.as_str()).chain(self.codes.iter().map(String::as_str))
    }

    pub fn episode_days(&self, class: &Class) -> Option<i64> {
        self.episode_days.unwrap_or(class.episode_days)
    }

    pub fn requires_confirmed(&self, class: &Class) -> bool {
        self.requires_confirmed.unwrap_or(class.requires_confirmed)
    }
}

/// The rule set in force on a day (`YYYY-MM-DD`): the one whose validity contains it; where two
/// overlap, the one that started last (a newer decree supersedes from its start).
pub fn in_force<'a>(sets: &'a [RuleSet], day: &str) -> Option<&'a RuleSet> {
    sets.iter()
        .filter(|s| s.valid_on(day))
        .max_by(|a, b| a.validity.from.cmp(&b.validity.from))
}

/// What the criteria say: held (by which options), waiting (for what), or no criteria apply.
#[derive(Debug, Clone, PartialEq)]
pub enum CriteriaOutcome {
    Held(Vec<String>),
    Waiting(Vec<String>),
}

/// Decide the criteria of a disease on the evidence's results.
pub fn decide_criteria(set: &RuleSet, c: Classified<'_>, results: &Results) -> CriteriaOutcome {
    let options = set.options_of(c.class, c.disease);
    let held: Vec<String> = options
        .iter()
        .filter(|o| option_holds(o, results).is_ok())
        .map(|o| o.label.clone())
        .collect();
    let in_progress: Vec<String> = c
        .disease
        .wait_while_in_progress
        .iter()
        .filter(|w| results.get(*w).is_some_and(|r| r == "in-corso"))
        .cloned()
        .collect();
    // a work-up still running waits (a positive result of the same criterion outranks it, so a
    // culture that already proved the case is never "in progress" here)
    if !held.is_empty() && in_progress.is_empty() {
        return CriteriaOutcome::Held(held);
    }
    if !in_progress.is_empty() {
        return CriteriaOutcome::Waiting(
            in_progress
                .iter()
                .map(|w| format!("{w} in corso"))
                .collect(),
        );
    }
    // the nearest option: the one missing least
    let missing = options
        .iter()
        .filter_map(|o| option_holds(o, results).err())
        .min_by_key(|m| m.len())
        .unwrap_or_default();
    CriteriaOutcome::Waiting(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm1990() -> RuleSet {
        RuleSet::load_all().unwrap().remove(0)
    }

    fn entry(set: &RuleSet, code: &str) -> Option<(u8, String)> {
        set.classify(code)
            .map(|c| (c.class.class, c.disease.key(code)))
    }

    #[test]
    fn resolution_005_1_is_class_i_and_other_005_class_iv() {
        let set = dm1990();
        assert_eq!(entry(&set, "005.1"), Some((1, "005.1".into())));
        assert_eq!(entry(&set, "005.0"), Some((4, "005".into())));
        assert_eq!(entry(&set, "005.89"), Some((4, "005".into())));
    }

    #[test]
    fn resolution_most_specific_listed_code_wins() {
        let set = dm1990();
        assert_eq!(entry(&set, "070.30"), Some((2, "070.3".into())));
        assert_eq!(entry(&set, "070.1"), Some((2, "070.1".into())));
        assert_eq!(entry(&set, "070.20"), Some((2, "070".into())));
        assert_eq!(entry(&set, "011.93"), Some((3, "010-018".into())));
        // class V: each other chapter-1 code is a disease of its own
        assert_eq!(entry(&set, "008.61"), Some((5, "008.61".into())));
        assert_eq!(entry(&set, "250.00"), None);
    }

    #[test]
    fn a_later_decree_sits_beside_this_one_and_the_date_picks_the_set() {
        let mut old = dm1990();
        old.validity.to = Some("2022-03-06".into());
        let mut newer = dm1990();
        newer.version = "premal".into();
        newer.validity.from = "2022-03-07".into();
        let sets = vec![old, newer];
        assert_eq!(in_force(&sets, "2021-12-31").unwrap().version, "1.0.0");
        assert_eq!(in_force(&sets, "2022-03-06").unwrap().version, "1.0.0");
        assert_eq!(in_force(&sets, "2022-03-07").unwrap().version, "premal");
        assert!(in_force(&sets, "1990-12-31").is_none());
    }

    #[test]
    fn tb_criteria_a_to_d() {
        let set = dm1990();
        let c = set.classify("011.90").unwrap();
        let results = |pairs: &[(&str, &str)]| -> Results {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let held = |r: &Results| match decide_criteria(&set, c, r) {
            CriteriaOutcome::Held(h) => h,
            CriteriaOutcome::Waiting(_) => vec![],
        };
        assert_eq!(held(&results(&[("coltura", "positivo")])), ["A"]);
        assert_eq!(
            held(&results(&[
                ("esame-diretto", "positivo"),
                ("imaging", "positivo")
            ])),
            ["B"]
        );
        assert_eq!(
            held(&results(&[
                ("clinica", "positivo"),
                ("imaging", "positivo"),
                ("mantoux", "positivo")
            ])),
            ["C"]
        );
        assert!(
            held(&results(&[
                ("clinica", "positivo"),
                ("mantoux", "positivo")
            ]))
            .is_empty()
        );
        assert_eq!(held(&results(&[("autopsia", "positivo")])), ["D"]);
        // a culture in progress waits, even when B holds
        let waiting = results(&[
            ("esame-diretto", "positivo"),
            ("clinica", "positivo"),
            ("coltura", "in-corso"),
        ]);
        assert!(matches!(
            decide_criteria(&set, c, &waiting),
            CriteriaOutcome::Waiting(_)
        ));
    }
}
