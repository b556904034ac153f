//! The Measures of `profiles/Measure-*.json`, read into what the evaluator needs: which cases a
//! summary counts (its population criteria), what its strata are made of (its stratifier
//! components), and for which periods and areas the server stores it.
//!
//! Criteria are written in a small language of our own (`text/x-sentinella-registro`) because
//! they select rows of the case register, not resources, and no FHIRPath or CQL engine in Rust
//! would read them: `FAMILY: CATEGORY[:DISEASE,…] …` for a population, a dimension of
//! `CodeSystem-dimensione-riepilogo` (and, for age bands, the CodeSystem of the bands) for a
//! stratifier component.
use std::sync::OnceLock;

use serde_json::Value;

use crate::terminology::{CANON, Terminology};

/// The criteria language of our Measures.
pub const LANGUAGE: &str = "text/x-sentinella-registro";

/// One age band: the first and the last age, in completed years (`None`: no upper limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub code: String,
    pub display: String,
    pub from: i32,
    pub to: Option<i32>,
}

/// Age bands as a CodeSystem defines them (property `eta-minima`, `eta-massima`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bands {
    pub system: String,
    pub bands: Vec<Band>,
}

/// The stratum code of a case whose age is not known.
pub const UNKNOWN: &str = "ignota";

impl Bands {
    fn load(system: &str) -> Result<Bands, String> {
        let cs = Terminology::get()
            .resources
            .iter()
            .find(|r| r["resourceType"] == "CodeSystem" && r["url"] == system)
            .ok_or_else(|| format!("age band CodeSystem {system} is not in terminology/"))?;
        let int = |c: &Value, name: &str| {
            c["property"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["code"] == name)
                .and_then(|p| p["valueInteger"].as_i64())
                .map(|v| v as i32)
        };
        let mut bands: Vec<Band> = cs["concept"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(Band {
                    code: c["code"].as_str()?.to_string(),
                    display: c["display"].as_str().unwrap_or_default().to_string(),
                    from: int(c, "eta-minima")?,
                    to: int(c, "eta-massima"),
                })
            })
            .collect();
        bands.sort_by_key(|b| b.from);
        // every recorded age (0–99) in exactly one band
        let mut next = 0;
        for b in &bands {
            if b.from != next || b.to.is_some_and(|t| t < b.from) {
                return Err(format!(
                    "{system}: the bands must cover every age from 0 without overlap; band {} starts at {} where {next} was expected",
                    b.code, b.from
                ));
            }
            next = b.to.map_or(i32::MAX, |t| t + 1);
        }
        if next <= 99 {
            return Err(format!("{system}: no band covers ages from {next} to 99"));
        }
        Ok(Bands {
            system: system.to_string(),
            bands,
        })
    }

    /// The band of an age (`ignota` without one).
    pub fn of(&self, age: Option<i32>) -> (&str, &str) {
        age.and_then(|a| {
            self.bands
                .iter()
                .find(|b| a >= b.from && b.to.is_none_or(|t| a <= t))
        })
        .map_or((UNKNOWN, "Età non nota"), |b| {
            (b.code.as_str(), b.display.as_str())
        })
    }
}

/// What a stratum is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum Dimension {
    /// The listed disease of the rule table (ICD-9-CM).
    Disease,
    /// The ICD-9-CM code reported.
    Code,
    AgeBand(Bands),
    Sex,
    Province,
    Asl,
    Region,
    /// CRE: the organism's ICD-9-CM code.
    Species,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// The code in `CodeSystem-dimensione-riepilogo`.
    pub code: String,
    pub dimension: Dimension,
}

/// One term of a population: a category, and (optionally) only these listed diseases of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub category: String,
    pub diseases: Option<Vec<String>>,
}

/// The period a stored report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Periodicity {
    Month,
    Year,
}

/// The areas a stored report is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Asl,
    Region,
}

#[derive(Debug, Clone)]
pub struct MeasureDef {
    pub id: String,
    pub url: String,
    pub resource: Value,
    pub family: String,
    pub terms: Vec<Term>,
    pub stratifier_code: String,
    pub components: Vec<Component>,
    pub periodicity: Periodicity,
    pub levels: Vec<Level>,
}

impl MeasureDef {
    /// Does the population take a case of this category and listed disease?
    pub fn counts(&self, category: &str, disease: &str) -> bool {
        self.terms.iter().any(|t| {
            t.category == category
                && t.diseases
                    .as_ref()
                    .is_none_or(|d| d.iter().any(|x| x == disease))
        })
    }

    fn parse(resource: Value) -> Result<MeasureDef, String> {
        let id = resource["id"].as_str().unwrap_or_default().to_string();
        let url = resource["url"].as_str().unwrap_or_default().to_string();
        let what = |e: &str| format!("profiles/Measure-{id}.json: {e}");
        let group = &resource["group"][0];
        let criteria = &group["population"][0]["criteria"];
        if criteria["language"] != LANGUAGE {
            return Err(what(&format!("population criteria must be in {LANGUAGE}")));
        }
        let expression = criteria["expression"].as_str().unwrap_or_default();
        let (family, terms) = expression
            .split_once(':')
            .ok_or_else(|| what("population criteria: FAMILY: CATEGORY[:DISEASE,…] …"))?;
        let terms: Vec<Term> = terms
            .split_whitespace()
            .map(|t| match t.split_once(':') {
                Some((c, d)) => Term {
                    category: c.to_string(),
                    diseases: Some(d.split(',').map(String::from).collect()),
                },
                None => Term {
                    category: t.to_string(),
                    diseases: None,
                },
            })
            .collect();
        if terms.is_empty() {
            return Err(what("the population names no category"));
        }
        let stratifier = &group["stratifier"][0];
        let mut components = Vec::new();
        for c in stratifier["component"].as_array().into_iter().flatten() {
            if c["criteria"]["language"] != LANGUAGE {
                return Err(what(&format!("stratifier criteria must be in {LANGUAGE}")));
            }
            let expr = c["criteria"]["expression"].as_str().unwrap_or_default();
            let mut words = expr.split_whitespace();
            let dimension = match words.next().unwrap_or_default() {
                "malattia" => Dimension::Disease,
                "codice" => Dimension::Code,
                "fascia-eta" => Dimension::AgeBand(Bands::load(
                    words
                        .next()
                        .ok_or_else(|| what("fascia-eta names no CodeSystem"))?,
                )?),
                "sesso" => Dimension::Sex,
                "provincia" => Dimension::Province,
                "asl" => Dimension::Asl,
                "regione" => Dimension::Region,
                "specie" => Dimension::Species,
                other => return Err(what(&format!("unknown stratifier dimension '{other}'"))),
            };
            let code = c["code"]["coding"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            components.push(Component { code, dimension });
        }
        let schedule = resource["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["url"] == format!("{CANON}/StructureDefinition/riepilogo-periodico"));
        let part = |name: &str| -> Vec<&str> {
            schedule
                .and_then(|s| s["extension"].as_array())
                .into_iter()
                .flatten()
                .filter(|e| e["url"] == name)
                .filter_map(|e| e["valueCode"].as_str())
                .collect()
        };
        let periodicity = match part("periodo").first().copied() {
            Some("anno") => Periodicity::Year,
            Some("mese") | None => Periodicity::Month,
            Some(other) => return Err(what(&format!("unknown periodo '{other}'"))),
        };
        let levels = part("livello")
            .into_iter()
            .map(|l| match l {
                "asl" => Ok(Level::Asl),
                "regione" => Ok(Level::Region),
                other => Err(what(&format!("unknown livello '{other}'"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(MeasureDef {
            id,
            url,
            family: family.trim().to_string(),
            terms,
            stratifier_code: stratifier["code"]["coding"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            components,
            periodicity,
            levels,
            resource,
        })
    }
}

/// Every Measure of `profiles/`, parsed once (the server loads them at start).
pub fn measures() -> &'static [MeasureDef] {
    static ALL: OnceLock<Vec<MeasureDef>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all: Vec<MeasureDef> = crate::fhir::profile::resources_of_kind("Measure")
            .into_iter()
            .map(|r| MeasureDef::parse(r).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    })
}

pub fn measure(id: &str) -> Option<&'static MeasureDef> {
    measures().iter().find(|m| m.id == id)
}

pub fn measure_by_url(url: &str) -> Option<&'static MeasureDef> {
    let url = url.split('|').next().unwrap_or(url);
    measures().iter().find(|m| m.url == url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_measure_file_loads() {
        let ids: Vec<&str> = measures().iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "classe-5-annuale",
                "cre-mensile",
                "modello-16",
                "modello-16-bis"
            ]
        );
        let m16 = measure("modello-16").unwrap();
        assert!(m16.counts("classe-2", "055"));
        assert!(m16.counts("classe-3", "010-018"));
        assert!(!m16.counts("classe-3", "042"));
        assert!(!m16.counts("classe-5", "088"));
        assert_eq!(m16.levels, [Level::Asl]);
        assert_eq!(
            measure("classe-5-annuale").unwrap().periodicity,
            Periodicity::Year
        );
    }

    #[test]
    fn default_age_bands_at_their_edges() {
        let bands = Bands::load(&format!("{CANON}/CodeSystem/fascia-eta")).unwrap();
        let band = |a| bands.of(Some(a)).0.to_string();
        assert_eq!(
            [0, 1, 4, 5, 9, 10, 14, 15, 24, 25, 64, 65, 99].map(band),
            [
                "0", "1-4", "1-4", "5-9", "5-9", "10-14", "10-14", "15-24", "15-24", "25-64",
                "25-64", "65+", "65+"
            ]
        );
        assert_eq!(bands.of(None).0, UNKNOWN);
    }
}
