//! `key=value[,key=value]` device options (`--disk`, `--net`, `--vsock`), split as Cloud
//! Hypervisor's OptionParser splits them: [`OptionParser::parse`] checks that every option is
//! one of the declared ones, then typed getters on [`Options`] check the values.

use std::collections::HashMap;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown option {0:?}")]
    Unknown(String),
    #[error("no {0}")]
    Missing(&'static str),
    #[error("bad {key} {value:?}")]
    Invalid { key: &'static str, value: String },
}

/// How an option is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A bare word: `ro`.
    Flag,
    /// `key=VALUE`, VALUE possibly empty.
    Value,
    /// `key=VALUE` with a non-empty VALUE; `key=` is not a spelling of it.
    NonEmpty,
}

/// The options one device accepts.
#[derive(Debug, Default)]
pub struct OptionParser {
    /// The first field, written without a key (a disk's path), when the device has one.
    positional: Option<&'static str>,
    known: Vec<(&'static str, Kind)>,
}

impl OptionParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The first field is `name`'s value and must not be empty.
    pub fn positional(mut self, name: &'static str) -> Self {
        self.positional = Some(name);
        self
    }

    pub fn flag(mut self, name: &'static str) -> Self {
        self.known.push((name, Kind::Flag));
        self
    }

    pub fn value(mut self, key: &'static str) -> Self {
        self.known.push((key, Kind::Value));
        self
    }

    pub fn non_empty(mut self, key: &'static str) -> Self {
        self.known.push((key, Kind::NonEmpty));
        self
    }

    /// Splits `spec` at commas into known options; a key given twice keeps its last value.
    pub fn parse<'a>(&self, spec: &'a str) -> Result<Options<'a>, OptionError> {
        let mut fields = spec.split(',');
        let mut values = HashMap::new();
        if let Some(name) = self.positional {
            let first = fields.next().filter(|f| !f.is_empty());
            values.insert(name, first.ok_or(OptionError::Missing(name))?);
        }
        for field in fields {
            let (key, value) = match field.split_once('=') {
                None => (self.lookup(field, |k| k == Kind::Flag), ""),
                Some((key, "")) => (self.lookup(key, |k| k == Kind::Value), ""),
                Some((key, value)) => (self.lookup(key, |k| k != Kind::Flag), value),
            };
            let key = key.ok_or_else(|| OptionError::Unknown(field.to_string()))?;
            values.insert(key, value);
        }
        Ok(Options { values })
    }

    /// The declared key spelled `key`, if its kind may be written so.
    fn lookup(&self, key: &str, written_as: impl Fn(Kind) -> bool) -> Option<&'static str> {
        self.known
            .iter()
            .find(|(k, kind)| *k == key && written_as(*kind))
            .map(|(k, _)| *k)
    }
}

/// The options of one spec, all of them known.
#[derive(Debug)]
pub struct Options<'a> {
    values: HashMap<&'static str, &'a str>,
}

impl<'a> Options<'a> {
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.get(key).copied()
    }

    pub fn is_set(&self, flag: &str) -> bool {
        self.values.contains_key(flag)
    }

    /// The value of `key` as a `T`, if given.
    pub fn convert<T: FromStr>(&self, key: &'static str) -> Result<Option<T>, OptionError> {
        self.get(key)
            .map(|value| {
                value.parse().map_err(|_| OptionError::Invalid {
                    key,
                    value: value.to_string(),
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> OptionParser {
        OptionParser::new()
            .positional("path")
            .flag("ro")
            .value("serial")
            .non_empty("tap")
    }

    #[test]
    fn known_options_parse() {
        let opts = parser().parse("/img,ro,serial=,tap=t0,tap=t1").unwrap();
        assert_eq!(opts.get("path"), Some("/img"));
        assert!(opts.is_set("ro"));
        assert_eq!(opts.get("serial"), Some(""));
        assert_eq!(opts.get("tap"), Some("t1"));
        let opts = parser().parse("/img").unwrap();
        assert!(!opts.is_set("ro"));
        assert_eq!(opts.get("serial"), None);
    }

    #[test]
    fn spelling_is_checked_first() {
        let unknown = |s: &str| Err(OptionError::Unknown(s.into()));
        assert_eq!(parser().parse("/i,rw").map(|_| ()), unknown("rw"));
        assert_eq!(parser().parse("/i,ro=1").map(|_| ()), unknown("ro=1"));
        assert_eq!(parser().parse("/i,serial").map(|_| ()), unknown("serial"));
        assert_eq!(parser().parse("/i,tap=").map(|_| ()), unknown("tap="));
        assert_eq!(
            parser().parse(",ro").map(|_| ()),
            Err(OptionError::Missing("path"))
        );
        let no_positional = OptionParser::new().flag("x");
        assert_eq!(no_positional.parse("").map(|_| ()), unknown(""));
    }

    #[test]
    fn convert_names_the_bad_value() {
        let p = OptionParser::new().value("cid");
        assert_eq!(p.parse("cid=7").unwrap().convert::<u64>("cid"), Ok(Some(7)));
        let err = p.parse("cid=x").unwrap().convert::<u64>("cid").unwrap_err();
        assert_eq!(err.to_string(), "bad cid \"x\"");
    }
}
