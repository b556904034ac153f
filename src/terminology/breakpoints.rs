//! EUCAST clinical breakpoints (terminology/eucast-breakpoints.json): interpreting an MIC or an
//! inhibition-zone diameter that came without the laboratory's S/I/R.
use serde::Deserialize;
use serde_json::Value;

/// EUCAST categories: S susceptible, I susceptible with increased exposure, R resistant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sir {
    S,
    I,
    R,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Breakpoint {
    pub agent: String,
    #[serde(default)]
    pub indication: Option<String>,
    pub mic_susceptible_le: f64,
    pub mic_resistant_gt: f64,
    pub zone_susceptible_ge: f64,
    pub zone_resistant_lt: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakpointTable {
    pub version: String,
    #[serde(default)]
    pub published: Option<String>,
    pub breakpoints: Vec<Breakpoint>,
}

pub struct Breakpoints {
    /// Oldest first, as the file lists them.
    pub tables: Vec<BreakpointTable>,
}

/// A measured value with the comparator the laboratory gave (`<=0.125`, `>16`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub value: f64,
    pub comparator: Option<Comparator>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparator {
    Lt,
    Le,
    Ge,
    Gt,
}

impl Comparator {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "<" => Some(Comparator::Lt),
            "<=" => Some(Comparator::Le),
            ">=" => Some(Comparator::Ge),
            ">" => Some(Comparator::Gt),
            _ => None,
        }
    }
}

impl Measured {
    /// The interval the true value lies in: (low, high, low open, high open).
    fn interval(&self) -> (f64, f64, bool, bool) {
        let v = self.value;
        match self.comparator {
            None => (v, v, false, false),
            Some(Comparator::Lt) => (f64::NEG_INFINITY, v, true, true),
            Some(Comparator::Le) => (f64::NEG_INFINITY, v, true, false),
            Some(Comparator::Ge) => (v, f64::INFINITY, false, true),
            Some(Comparator::Gt) => (v, f64::INFINITY, true, true),
        }
    }

    /// Every possible true value is > `x`.
    fn all_above(&self, x: f64) -> bool {
        let (lo, _, lo_open, _) = self.interval();
        lo > x || (lo == x && lo_open)
    }
    /// Every possible true value is <= `x`.
    fn all_at_most(&self, x: f64) -> bool {
        let (_, hi, _, _) = self.interval();
        hi <= x
    }
    /// Every possible true value is < `x`.
    fn all_below(&self, x: f64) -> bool {
        let (_, hi, _, hi_open) = self.interval();
        hi < x || (hi == x && hi_open)
    }
    /// Every possible true value is >= `x`.
    fn all_at_least(&self, x: f64) -> bool {
        let (lo, _, _, _) = self.interval();
        lo >= x
    }
}

impl Breakpoint {
    /// MIC in mg/L: S if ≤ the S breakpoint, R if > the R breakpoint, I between; `None` when the
    /// comparator leaves the category open (e.g. `>1` against S ≤ 2, R > 8).
    pub fn interpret_mic(&self, m: Measured) -> Option<Sir> {
        if m.all_above(self.mic_resistant_gt) {
            Some(Sir::R)
        } else if m.all_at_most(self.mic_susceptible_le) {
            Some(Sir::S)
        } else if m.all_above(self.mic_susceptible_le) && m.all_at_most(self.mic_resistant_gt) {
            Some(Sir::I)
        } else {
            None
        }
    }

    /// Zone diameter in mm: S if ≥ the S breakpoint, R if < the R breakpoint, I between.
    pub fn interpret_zone(&self, m: Measured) -> Option<Sir> {
        if m.all_below(self.zone_resistant_lt) {
            Some(Sir::R)
        } else if m.all_at_least(self.zone_susceptible_ge) {
            Some(Sir::S)
        } else if m.all_at_least(self.zone_resistant_lt) && m.all_below(self.zone_susceptible_ge) {
            Some(Sir::I)
        } else {
            None
        }
    }
}

impl Breakpoints {
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let tables: Vec<BreakpointTable> = serde_json::from_value(v["tables"].clone())
            .map_err(|e| format!("terminology/eucast-breakpoints.json: {e}"))?;
        if tables.is_empty() {
            return Err("terminology/eucast-breakpoints.json has no tables".into());
        }
        Ok(Breakpoints { tables })
    }

    /// The table of `version`, or the newest when `None`.
    pub fn table(&self, version: Option<&str>) -> Option<&BreakpointTable> {
        match version {
            Some(v) => self.tables.iter().find(|t| t.version == v),
            None => self.tables.last(),
        }
    }

    pub fn versions(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.version.as_str()).collect()
    }
}

impl BreakpointTable {
    /// The non-meningitis breakpoint of an agent (ETP, IPM, MEM).
    pub fn for_agent(&self, agent: &str) -> Option<&Breakpoint> {
        self.breakpoints
            .iter()
            .filter(|b| b.agent == agent)
            .find(|b| {
                b.indication
                    .as_deref()
                    .is_none_or(|i| i == "non-meningitis")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Breakpoint {
        Breakpoint {
            agent: "MEM".into(),
            indication: None,
            mic_susceptible_le: 2.0,
            mic_resistant_gt: 8.0,
            zone_susceptible_ge: 22.0,
            zone_resistant_lt: 16.0,
        }
    }

    fn m(value: f64, c: Option<&str>) -> Measured {
        Measured {
            value,
            comparator: c.and_then(Comparator::parse),
        }
    }

    #[test]
    fn mic_at_and_around_the_breakpoints() {
        let b = mem();
        assert_eq!(b.interpret_mic(m(2.0, None)), Some(Sir::S));
        assert_eq!(b.interpret_mic(m(4.0, None)), Some(Sir::I));
        assert_eq!(b.interpret_mic(m(8.0, None)), Some(Sir::I));
        assert_eq!(b.interpret_mic(m(16.0, None)), Some(Sir::R));
        assert_eq!(b.interpret_mic(m(8.0, Some(">"))), Some(Sir::R));
        assert_eq!(b.interpret_mic(m(0.125, Some("<="))), Some(Sir::S));
        assert_eq!(b.interpret_mic(m(1.0, Some(">"))), None);
    }

    #[test]
    fn zone_at_and_around_the_breakpoints() {
        let b = mem();
        assert_eq!(b.interpret_zone(m(22.0, None)), Some(Sir::S));
        assert_eq!(b.interpret_zone(m(21.0, None)), Some(Sir::I));
        assert_eq!(b.interpret_zone(m(16.0, None)), Some(Sir::I));
        assert_eq!(b.interpret_zone(m(15.0, None)), Some(Sir::R));
        assert_eq!(b.interpret_zone(m(6.0, Some("<="))), Some(Sir::R));
    }
}
