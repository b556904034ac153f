//! The FHIRPath subset that the cheap R4 invariants are written in: paths, `$this`, `%resource`,
//! string / number / boolean literals, `= != < > <= >= + | and or xor implies`, and the functions
//! `exists empty not count where all hasValue select first startsWith contains length`.
//! An invariant using anything else does not compile and is not checked (counted at start).
//! Hand-written: no maintained FHIRPath crate builds with our toolchain (shared/DEPENDENCIES.md).
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Str(String),
    Num(f64),
    Bool(bool),
    This,
    Resource,
    /// A member of each item of the input (`input.name`).
    Member(Box<Expr>, String),
    Call(Box<Expr>, String, Vec<Expr>),
    Bin(String, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Op(String),
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == '$' || ch == '%' {
            let start = i;
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch == '`' {
            let end = c[i + 1..].iter().position(|&x| x == '`')? + i + 1;
            out.push(Tok::Ident(c[i + 1..end].iter().collect()));
            i = end + 1;
        } else if ch == '\'' {
            let mut lit = String::new();
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' && i + 1 < c.len() {
                    i += 1;
                }
                lit.push(c[i]);
                i += 1;
            }
            if i >= c.len() {
                return None;
            }
            i += 1;
            out.push(Tok::Str(lit));
        } else if ch.is_ascii_digit() {
            let start = i;
            while i < c.len() && (c[i].is_ascii_digit() || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num(
                c[start..i].iter().collect::<String>().parse().ok()?,
            ));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if ["!=", "<=", ">="].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else if "=<>+|().,".contains(ch) {
                out.push(Tok::Op(ch.to_string()));
                i += 1;
            } else {
                return None;
            }
        }
    }
    Some(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

const LEVELS: &[&[&str]] = &[
    &["implies"],
    &["or", "xor"],
    &["and"],
    &["=", "!="],
    &["<", ">", "<=", ">="],
    &["|"],
    &["+"],
];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn op_at(&self, ops: &[&str]) -> Option<String> {
        match self.peek()? {
            Tok::Op(o) | Tok::Ident(o) if ops.contains(&o.as_str()) => Some(o.clone()),
            _ => None,
        }
    }

    fn eat(&mut self, op: &str) -> Option<()> {
        (self.op_at(&[op])? == op).then(|| self.pos += 1)
    }

    fn binary(&mut self, level: usize) -> Option<Expr> {
        if level == LEVELS.len() {
            return self.term();
        }
        let mut left = self.binary(level + 1)?;
        while let Some(op) = self.op_at(LEVELS[level]) {
            self.pos += 1;
            let right = self.binary(level + 1)?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
        Some(left)
    }

    fn args(&mut self) -> Option<Vec<Expr>> {
        let mut args = Vec::new();
        if self.eat(")").is_some() {
            return Some(args);
        }
        loop {
            args.push(self.binary(0)?);
            if self.eat(")").is_some() {
                return Some(args);
            }
            self.eat(",")?;
        }
    }

    /// `name` or `name(args)` applied to `input`.
    fn invocation(&mut self, input: Expr) -> Option<Expr> {
        let Some(Tok::Ident(name)) = self.peek().cloned() else {
            return None;
        };
        self.pos += 1;
        if self.eat("(").is_some() {
            let args = self.args()?;
            Some(Expr::Call(Box::new(input), name, args))
        } else {
            Some(Expr::Member(Box::new(input), name))
        }
    }

    fn term(&mut self) -> Option<Expr> {
        let mut e = match self.peek()?.clone() {
            Tok::Str(s) => {
                self.pos += 1;
                Expr::Str(s)
            }
            Tok::Num(n) => {
                self.pos += 1;
                Expr::Num(n)
            }
            Tok::Op(o) if o == "(" => {
                self.pos += 1;
                let inner = self.binary(0)?;
                self.eat(")")?;
                inner
            }
            Tok::Ident(id) if id == "true" || id == "false" => {
                self.pos += 1;
                Expr::Bool(id == "true")
            }
            Tok::Ident(id) if id == "$this" => {
                self.pos += 1;
                Expr::This
            }
            Tok::Ident(id) if id == "%resource" => {
                self.pos += 1;
                Expr::Resource
            }
            Tok::Ident(id) if id.starts_with(['$', '%']) => return None,
            Tok::Ident(_) => self.invocation(Expr::This)?,
            Tok::Op(_) => return None,
        };
        while self.eat(".").is_some() {
            e = self.invocation(e)?;
        }
        Some(e)
    }
}

const FUNCTIONS: &[&str] = &[
    "exists",
    "empty",
    "not",
    "count",
    "where",
    "all",
    "hasValue",
    "select",
    "first",
    "startsWith",
    "contains",
    "length",
];

fn supported(e: &Expr) -> bool {
    match e {
        Expr::Call(input, name, args) => {
            FUNCTIONS.contains(&name.as_str()) && supported(input) && args.iter().all(supported)
        }
        Expr::Member(input, _) => supported(input),
        Expr::Bin(_, l, r) => supported(l) && supported(r),
        _ => true,
    }
}

/// Compile an expression; `None` when it is outside the subset.
pub fn compile(expression: &str) -> Option<Expr> {
    let mut p = Parser {
        toks: tokenize(expression)?,
        pos: 0,
    };
    let e = p.binary(0)?;
    (p.pos == p.toks.len() && supported(&e)).then_some(e)
}

#[derive(Debug, Clone, PartialEq)]
enum Item<'a> {
    Node(&'a Value),
    Str(String),
    Num(f64),
    Bool(bool),
}

impl Item<'_> {
    fn normalised(&self) -> Item<'static> {
        match self {
            Item::Node(Value::String(s)) => Item::Str(s.clone()),
            Item::Node(Value::Bool(b)) => Item::Bool(*b),
            Item::Node(Value::Number(n)) => Item::Num(n.to_string().parse().unwrap_or(f64::NAN)),
            Item::Node(other) => Item::Str(other.to_string()),
            Item::Str(s) => Item::Str(s.clone()),
            Item::Num(n) => Item::Num(*n),
            Item::Bool(b) => Item::Bool(*b),
        }
    }
}

/// The context an invariant runs in; `suffixes` are the type names that end choice keys.
pub struct Ctx<'a> {
    pub resource: &'a Value,
    pub suffixes: &'a dyn Fn(&str) -> bool,
}

/// Singleton boolean of a collection: empty → None (unknown).
fn truth(c: &[Item]) -> Option<bool> {
    match c {
        [] => None,
        [one] => Some(match one.normalised() {
            Item::Bool(b) => b,
            _ => true,
        }),
        _ => Some(true),
    }
}

fn boolean<'a>(b: Option<bool>) -> Vec<Item<'a>> {
    b.map(|b| vec![Item::Bool(b)]).unwrap_or_default()
}

fn eval<'a>(e: &Expr, input: &[Item<'a>], ctx: &Ctx<'a>) -> Vec<Item<'a>> {
    match e {
        Expr::Str(s) => vec![Item::Str(s.clone())],
        Expr::Num(n) => vec![Item::Num(*n)],
        Expr::Bool(b) => vec![Item::Bool(*b)],
        Expr::This => input.to_vec(),
        Expr::Resource => vec![Item::Node(ctx.resource)],
        Expr::Member(inner, name) => {
            let mut out = Vec::new();
            for item in eval(inner, input, ctx) {
                let Item::Node(Value::Object(o)) = item else {
                    continue;
                };
                for (k, v) in o {
                    if k == name
                        || k.strip_prefix(name.as_str())
                            .is_some_and(|rest| (ctx.suffixes)(rest))
                    {
                        match v {
                            Value::Array(a) => out.extend(a.iter().map(Item::Node)),
                            Value::Null => {}
                            v => out.push(Item::Node(v)),
                        }
                    }
                }
            }
            out
        }
        Expr::Call(inner, name, args) => {
            let coll = eval(inner, input, ctx);
            let each = |arg: &Expr, item: &Item<'a>| eval(arg, std::slice::from_ref(item), ctx);
            match (name.as_str(), args.as_slice()) {
                ("exists", []) => vec![Item::Bool(!coll.is_empty())],
                ("exists", [c]) => vec![Item::Bool(
                    coll.iter().any(|i| truth(&each(c, i)) == Some(true)),
                )],
                ("empty", []) => vec![Item::Bool(coll.is_empty())],
                ("not", []) => boolean(truth(&coll).map(|b| !b)),
                ("count", []) => vec![Item::Num(coll.len() as f64)],
                ("where", [c]) => coll
                    .into_iter()
                    .filter(|i| truth(&each(c, i)) == Some(true))
                    .collect(),
                ("all", [c]) => vec![Item::Bool(
                    coll.iter().all(|i| truth(&each(c, i)) == Some(true)),
                )],
                ("select", [c]) => coll.iter().flat_map(|i| each(c, i)).collect(),
                ("first", []) => coll.into_iter().take(1).collect(),
                ("hasValue", []) => {
                    vec![Item::Bool(
                        matches!(coll.as_slice(), [Item::Node(v)] if !v.is_object() && !v.is_array()),
                    )]
                }
                ("startsWith" | "contains", [arg]) => {
                    let (Some(Item::Str(s)), Some(Item::Str(p))) = (
                        coll.first().map(Item::normalised),
                        eval(arg, input, ctx).first().map(Item::normalised),
                    ) else {
                        return vec![];
                    };
                    vec![Item::Bool(if name == "startsWith" {
                        s.starts_with(&p)
                    } else {
                        s.contains(&p)
                    })]
                }
                ("length", []) => match coll.first().map(Item::normalised) {
                    Some(Item::Str(s)) => vec![Item::Num(s.chars().count() as f64)],
                    _ => vec![],
                },
                _ => vec![],
            }
        }
        Expr::Bin(op, l, r) => {
            let (a, b) = (eval(l, input, ctx), eval(r, input, ctx));
            match op.as_str() {
                "and" => boolean(match (truth(&a), truth(&b)) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }),
                "or" => boolean(match (truth(&a), truth(&b)) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                }),
                "xor" => boolean(truth(&a).zip(truth(&b)).map(|(x, y)| x != y)),
                "implies" => boolean(match (truth(&a), truth(&b)) {
                    (Some(false), _) | (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                }),
                "|" => {
                    let mut out = a;
                    for i in b {
                        if !out.contains(&i) {
                            out.push(i);
                        }
                    }
                    out
                }
                _ => {
                    let (Some(x), Some(y)) = (single(&a), single(&b)) else {
                        return vec![];
                    };
                    compare(op, x, y)
                }
            }
        }
    }
}

fn single(c: &[Item]) -> Option<Item<'static>> {
    match c {
        [one] => Some(one.normalised()),
        _ => None,
    }
}

fn compare<'a>(op: &str, x: Item<'static>, y: Item<'static>) -> Vec<Item<'a>> {
    use std::cmp::Ordering;
    let ord = match (&x, &y) {
        (Item::Num(a), Item::Num(b)) => a.partial_cmp(b),
        // dates and times compare as instants, not as text (time zones)
        (Item::Str(a), Item::Str(b)) if op != "=" && op != "!=" => {
            match (
                super::datetime::parse_range(a),
                super::datetime::parse_range(b),
            ) {
                (Some(ra), Some(rb)) => Some(ra.start.cmp(&rb.start)),
                _ => Some(a.cmp(b)),
            }
        }
        (Item::Str(a), Item::Str(b)) => Some(a.cmp(b)),
        (Item::Bool(a), Item::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    };
    let r = match (op, ord) {
        ("+", _) => {
            return match (x, y) {
                (Item::Num(a), Item::Num(b)) => vec![Item::Num(a + b)],
                (Item::Str(a), Item::Str(b)) => vec![Item::Str(a + &b)],
                _ => vec![],
            };
        }
        ("=", o) => o == Some(Ordering::Equal),
        ("!=", o) => o != Some(Ordering::Equal),
        (_, None) => return vec![],
        ("<", Some(o)) => o == Ordering::Less,
        (">", Some(o)) => o == Ordering::Greater,
        ("<=", Some(o)) => o != Ordering::Greater,
        (">=", Some(o)) => o != Ordering::Less,
        _ => return vec![],
    };
    vec![Item::Bool(r)]
}

/// Evaluate an invariant on one element: `Some(false)` is a violation; unknown counts as satisfied.
pub fn holds(e: &Expr, element: &Value, ctx: &Ctx) -> bool {
    truth(&eval(e, &[Item::Node(element)], ctx)) != Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(expr: &str, element: Value) -> bool {
        let e = compile(expr).unwrap_or_else(|| panic!("{expr} compiles"));
        let suffixes = |s: &str| ["Quantity", "String", "DateTime"].contains(&s);
        holds(
            &e,
            &element,
            &Ctx {
                resource: &element,
                suffixes: &suffixes,
            },
        )
    }

    #[test]
    fn r4_invariants_of_the_served_types() {
        let obs6 = "dataAbsentReason.empty() or value.empty()";
        assert!(check(obs6, json!({"valueString": "x"})));
        assert!(!check(
            obs6,
            json!({"valueString": "x", "dataAbsentReason": {"text": "n/a"}})
        ));
        let pat1 = "name.exists() or telecom.exists() or address.exists() or organization.exists()";
        assert!(!check(pat1, json!({})));
        let org1 = "(identifier.count() + name.count()) > 0";
        assert!(check(org1, json!({"name": "ASL"})));
        assert!(!check(org1, json!({"active": true})));
        let con5 = "verificationStatus.coding.where(system='http://terminology.hl7.org/CodeSystem/condition-ver-status' and code='entered-in-error').empty() or clinicalStatus.empty()";
        let eie = json!({"verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "entered-in-error"}]}, "clinicalStatus": {"text": "active"}});
        assert!(!check(con5, eie));
        assert!(check(
            "extension.exists() != value.exists()",
            json!({"url": "x", "valueString": "a"})
        ));
        let per1 = "start.hasValue().not() or end.hasValue().not() or (start <= end)";
        assert!(check(
            per1,
            json!({"start": "2024-01-01T10:00:00+01:00", "end": "2024-01-01T09:30:00Z"})
        ));
        assert!(!check(
            per1,
            json!({"start": "2024-01-02", "end": "2024-01-01"})
        ));
        assert!(!check(
            "extension.exists() != value.exists()",
            json!({"url": "x"})
        ));
    }

    #[test]
    fn outside_the_subset_does_not_compile() {
        assert!(
            compile("contained.where(('#'+id in %resource.descendants().reference).not()).empty()")
                .is_none()
        );
        assert!(compile("hasValue() or (children().count() > id.count())").is_none());
        assert!(compile("reference.matches('^#')").is_none());
    }
}
