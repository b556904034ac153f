//! The codice fiscale: structure, check character and omocodia (DOMAIN.md §3).
//!
//! Sixteen characters: surname (3 letters), name (3), year (2 digits), month (letter), day (2 digits,
//! +40 for women), place (letter + 3 digits), check letter. When two people would share a code the
//! Agenzia delle Entrate replaces digits, from the right, with letters (omocodia: 0-9 → L M N P Q R
//! S T U V); all such variants name the same person. Hand-written: no maintained crate does this.

/// 1-based positions whose digits omocodia may replace with letters.
const OMOCODIA_POSITIONS: [usize; 7] = [7, 8, 10, 11, 13, 14, 15];
const OMOCODIA_LETTERS: &[u8; 10] = b"LMNPQRSTUV";
const MONTHS: &[u8; 12] = b"ABCDEHLMPRST";
/// Values of characters in odd positions (1st, 3rd, …) for the check character, 0-9 then A-Z.
const ODD_DIGITS: [u32; 10] = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21];
const ODD_LETTERS: [u32; 26] = [
    1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodiceFiscaleError {
    #[error("a codice fiscale has 16 characters, this one has {0}")]
    Length(usize),
    #[error("character {position} ('{found}') must be {expected}")]
    Character {
        position: usize,
        found: char,
        expected: &'static str,
    },
    #[error("the month letter '{0}' is not one of A B C D E H L M P R S T")]
    Month(char),
    #[error("the day {0} is not 1-31 (men) or 41-71 (women)")]
    Day(u32),
    #[error("the check character is '{found}' but the first 15 characters give '{expected}'")]
    Check { expected: char, found: char },
}

/// A valid codice fiscale, upper case as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodiceFiscale(String);

fn is_omocodia_position(position: usize) -> bool {
    OMOCODIA_POSITIONS.contains(&position)
}

/// The digit a character stands for at an omocodia position (a digit, or its replacement letter).
fn digit_value(c: u8) -> Option<u32> {
    match c {
        b'0'..=b'9' => Some((c - b'0') as u32),
        _ => OMOCODIA_LETTERS
            .iter()
            .position(|&l| l == c)
            .map(|p| p as u32),
    }
}

/// The check character of the first 15 characters.
fn check_character(first15: &[u8]) -> char {
    let sum: u32 = first15
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let odd = i % 2 == 0; // 1-based odd positions
            match (c.is_ascii_digit(), odd) {
                (true, true) => ODD_DIGITS[(c - b'0') as usize],
                (true, false) => (c - b'0') as u32,
                (false, true) => ODD_LETTERS[(c - b'A') as usize],
                (false, false) => (c - b'A') as u32,
            }
        })
        .sum();
    (b'A' + (sum % 26) as u8) as char
}

impl CodiceFiscale {
    /// Parse and validate: structure, month, day and check character. Case-insensitive.
    pub fn parse(input: &str) -> Result<Self, CodiceFiscaleError> {
        let upper = input.trim().to_ascii_uppercase();
        let b = upper.as_bytes();
        if b.len() != 16 || !upper.is_ascii() {
            return Err(CodiceFiscaleError::Length(upper.chars().count()));
        }
        for (i, &c) in b[..15].iter().enumerate() {
            let position = i + 1;
            let ok = if is_omocodia_position(position) {
                digit_value(c).is_some()
            } else {
                c.is_ascii_uppercase()
            };
            if !ok {
                let expected = if is_omocodia_position(position) {
                    "a digit (or L-V for omocodia)"
                } else {
                    "a letter"
                };
                return Err(CodiceFiscaleError::Character {
                    position,
                    found: c as char,
                    expected,
                });
            }
        }
        if !b[15].is_ascii_uppercase() {
            return Err(CodiceFiscaleError::Character {
                position: 16,
                found: b[15] as char,
                expected: "a letter",
            });
        }
        if !MONTHS.contains(&b[8]) {
            return Err(CodiceFiscaleError::Month(b[8] as char));
        }
        let day = digit_value(b[9]).unwrap_or(0) * 10 + digit_value(b[10]).unwrap_or(0);
        if !(1..=31).contains(&day) && !(41..=71).contains(&day) {
            return Err(CodiceFiscaleError::Day(day));
        }
        let expected = check_character(&b[..15]);
        if expected != b[15] as char {
            return Err(CodiceFiscaleError::Check {
                expected,
                found: b[15] as char,
            });
        }
        Ok(CodiceFiscale(upper))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Complete 15 characters (upper case, already well formed) with their check character:
    /// for tools and test data that need valid codes.
    pub fn complete(first15: &str) -> Option<Self> {
        let upper = first15.to_ascii_uppercase();
        if upper.len() != 15 || !upper.is_ascii() {
            return None;
        }
        let check = check_character(upper.as_bytes());
        Self::parse(&format!("{upper}{check}")).ok()
    }

    /// The person's identity: the first 15 characters with omocodia letters turned back into
    /// digits. Every omocodia variant of one person has the same identity.
    pub fn identity(&self) -> String {
        self.0.as_bytes()[..15]
            .iter()
            .enumerate()
            .map(
                |(i, &c)| match (is_omocodia_position(i + 1), digit_value(c)) {
                    (true, Some(d)) => char::from_digit(d, 10).unwrap_or('0'),
                    _ => c as char,
                },
            )
            .collect()
    }

    /// True for a woman (day + 40).
    pub fn is_female(&self) -> bool {
        let b = self.0.as_bytes();
        digit_value(b[9]).unwrap_or(0) >= 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Turn digits into omocodia letters from the right, `n` of them, and fix the check character.
    fn omocodic(cf: &str, n: usize) -> String {
        let mut b = cf.as_bytes()[..15].to_vec();
        for &p in OMOCODIA_POSITIONS.iter().rev().take(n) {
            b[p - 1] = OMOCODIA_LETTERS[(b[p - 1] - b'0') as usize];
        }
        let check = check_character(&b);
        String::from_utf8(b).unwrap() + &check.to_string()
    }

    #[test]
    fn codice_fiscale_check_character_is_validated() {
        assert!(CodiceFiscale::parse("RSSMRA85T10A562S").is_ok());
        assert!(CodiceFiscale::parse("RSSMRA85M01H501Q").is_ok());
        assert_eq!(
            CodiceFiscale::parse("RSSMRA85T10A562T"),
            Err(CodiceFiscaleError::Check {
                expected: 'S',
                found: 'T'
            })
        );
        assert_eq!(
            CodiceFiscale::parse("RSSMRA85T10A562"),
            Err(CodiceFiscaleError::Length(15))
        );
        assert!(matches!(
            CodiceFiscale::parse("RSSMRA85Z10A562S"),
            Err(CodiceFiscaleError::Month('Z'))
        ));
        assert!(matches!(
            CodiceFiscale::parse("RSSMRA85T99A562S"),
            Err(CodiceFiscaleError::Day(99))
        ));
        assert!(matches!(
            CodiceFiscale::parse("R5SMRA85T10A562S"),
            Err(CodiceFiscaleError::Character { position: 2, .. })
        ));
    }

    #[test]
    fn codice_fiscale_is_case_insensitive() {
        let lower = CodiceFiscale::parse("rssmra85t10a562s").unwrap();
        assert_eq!(lower.as_str(), "RSSMRA85T10A562S");
    }

    #[test]
    fn codice_fiscale_omocodia_variants_are_the_same_person() {
        let base = CodiceFiscale::parse("RSSMRA85T10A562S").unwrap();
        for n in 1..=7 {
            let variant = omocodic("RSSMRA85T10A562S", n);
            let parsed =
                CodiceFiscale::parse(&variant).unwrap_or_else(|e| panic!("{variant}: {e}"));
            assert_ne!(parsed.as_str(), base.as_str());
            assert_eq!(parsed.identity(), base.identity(), "{variant}");
        }
        assert_eq!(base.identity(), "RSSMRA85T10A562");
        // a woman's day is +40
        assert!(
            CodiceFiscale::parse(&omocodic("BNCLRA90A41F205I", 0))
                .unwrap()
                .is_female()
        );
    }
}
