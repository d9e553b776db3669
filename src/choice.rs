//! Closed sets of values that are written as words: on the command line, in `config.json` and in
//! messages. Each such enum lists its values once ([`Choice::ALL`] with [`Choice::name`]); parsing,
//! printing, serde and the command line's list of accepted values all come from that list.

/// An enum whose values are spelled as fixed words.
pub trait Choice: Sized + Copy + PartialEq + 'static {
    /// What the values are, for messages ("loss", "architecture").
    const WHAT: &'static str;
    /// Every value, in the order help texts list them.
    const ALL: &'static [Self];
    /// The value's word.
    fn name(self) -> &'static str;

    /// Every value's word.
    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|c| c.name()).collect()
    }

    /// The value spelled `word`, or an error listing the accepted words.
    fn parse_name(word: &str) -> Result<Self, UnknownChoice> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.name() == word)
            .ok_or_else(|| UnknownChoice {
                what: Self::WHAT,
                given: word.to_string(),
                expected: Self::names().join(", "),
            })
    }
}

/// A word that is none of a [`Choice`]'s values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}': expected one of {expected}")]
pub struct UnknownChoice {
    pub what: &'static str,
    pub given: String,
    pub expected: String,
}

/// Implements `FromStr`, `Display` and string serde for a [`Choice`].
#[macro_export]
macro_rules! choice_traits {
    ($t:ty) => {
        impl std::str::FromStr for $t {
            type Err = $crate::choice::UnknownChoice;
            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                <$t as $crate::choice::Choice>::parse_name(s)
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::choice::Choice::name(*self))
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str($crate::choice::Choice::name(*self))
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let word = String::deserialize(d)?;
                <$t as $crate::choice::Choice>::parse_name(&word).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `names` as "a, b or c", for help texts.
pub fn listing(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}
