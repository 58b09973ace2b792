//! Word expansion as BuildKit's `shell` lexer does it (`Lex.ProcessWord`/`ProcessWords`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Where variables come from.
pub trait EnvGetter {
    fn get(&self, key: &str) -> Option<String>;
}

impl EnvGetter for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

impl EnvGetter for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// An ordered list of pairs; a later pair overrides an earlier one.
impl EnvGetter for [(String, String)] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
}

impl EnvGetter for Vec<(String, String)> {
    fn get(&self, key: &str) -> Option<String> {
        EnvGetter::get(self.as_slice(), key)
    }
}

/// An expansion error, worded like BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShellError(pub String);

/// The result of an expansion with the variable names it looked up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expansion {
    pub value: String,
    /// Variables that were set when looked up.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up but not set.
    pub unmatched: BTreeSet<String>,
}

/// The lexer; `escape` is the Dockerfile's escape character (`\` or `` ` ``).
#[derive(Debug, Clone)]
pub struct Lex {
    pub escape: char,
    /// Keep quotes in the output (BuildKit's RawQuotes).
    pub raw_quotes: bool,
    /// Leave `$VAR` of unset variables as written (BuildKit's SkipUnsetEnv).
    pub skip_unset_env: bool,
}

impl Lex {
    pub fn new(escape: char) -> Self {
        Lex { escape, raw_quotes: false, skip_unset_env: false }
    }

    /// Expands one word: quotes removed, variables expanded, white space kept.
    pub fn process_word(&self, _word: &str, _env: &dyn EnvGetter) -> Result<String, ShellError> {
        todo!()
    }

    /// Like [`Lex::process_word`], also reporting which variables were used.
    pub fn process_word_with_matches(&self, _word: &str, _env: &dyn EnvGetter) -> Result<Expansion, ShellError> {
        todo!()
    }

    /// Expands and splits into words on unquoted white space (including white space that
    /// came from an unquoted variable).
    pub fn process_words(&self, _word: &str, _env: &dyn EnvGetter) -> Result<Vec<String>, ShellError> {
        todo!()
    }
}
