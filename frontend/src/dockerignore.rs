//! `.dockerignore` with moby's patternmatcher semantics (not gitignore's).

/// A bad pattern, with its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid .dockerignore pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

/// Reads a `.dockerignore` file (ignorefile.ReadAll): BOM, comments, `!`, cleaning.
pub fn read_ignore_file(_contents: &str) -> Vec<String> {
    todo!()
}

/// Compiled patterns (patternmatcher.New).
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    _private: (),
}

impl PatternMatcher {
    pub fn new(_patterns: &[String]) -> Result<Self, PatternError> {
        todo!()
    }

    /// Whether `path` (relative to the context, `/`-separated) is excluded: the last
    /// pattern that matches it or one of its parent dirs wins (MatchesOrParentMatches).
    pub fn matches_or_parent_matches(&self, _path: &str) -> bool {
        todo!()
    }

    /// Whether any pattern is a `!` exception.
    pub fn has_exclusions(&self) -> bool {
        todo!()
    }

    /// Whether a walk must still descend into the excluded directory `dir` because a `!`
    /// pattern may re-include something below it.
    pub fn may_match_below(&self, _dir: &str) -> bool {
        todo!()
    }
}
