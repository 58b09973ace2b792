//! BuildKit's `suggest` package: "did you mean X?" hints for near misses.

use crate::parser::{go_to_lower, go_to_upper};

/// Edit distance in characters (agext/levenshtein with unit costs, as BuildKit's
/// `suggest` package uses).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// BuildKit's `suggest.Search`: the closest option within distance 2, or `None` when
/// `val` is itself an option (or nothing is close).
pub fn search(val: &str, options: &[&str], case_sensitive: bool) -> Option<String> {
    let val_cmp = if case_sensitive {
        val.to_string()
    } else {
        go_to_lower(val)
    };
    let mut best: Option<String> = None;
    let mut min_dist = 3;
    for opt in options {
        let opt_cmp = if case_sensitive {
            opt.to_string()
        } else {
            go_to_lower(opt)
        };
        if val_cmp == opt_cmp {
            return None;
        }
        let dist = levenshtein(&val_cmp, &opt_cmp);
        if dist < min_dist {
            min_dist = dist;
            // BuildKit's matchCase: an all-uppercase input gets an uppercase suggestion.
            best = Some(
                if !case_sensitive && val != go_to_lower(val) && val == go_to_upper(val) {
                    go_to_upper(&opt_cmp)
                } else {
                    opt_cmp
                },
            );
        }
    }
    best
}

/// BuildKit's `suggest.WrapError`: appends `(did you mean X?)` for a close option.
pub fn wrap_error(msg: String, val: &str, options: &[&str], case_sensitive: bool) -> String {
    match search(val, options, case_sensitive) {
        Some(m) => format!("{msg} (did you mean {m}?)"),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("héllo", "hello"), 1);
    }

    #[test]
    fn search_picks_closest_and_matches_case() {
        assert_eq!(
            search("cach", &["bind", "cache"], true).as_deref(),
            Some("cache")
        );
        assert_eq!(search("cache", &["bind", "cache"], true), None);
        assert_eq!(search("xyzzy", &["bind", "cache"], true), None);
        assert_eq!(
            search("RUNN", &["run", "from"], false).as_deref(),
            Some("RUN")
        );
        assert_eq!(
            search("Runn", &["run", "from"], false).as_deref(),
            Some("run")
        );
    }
}
