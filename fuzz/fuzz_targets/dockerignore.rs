//! `.dockerignore` reading, pattern compilation and matching. The input is the ignore
//! file; its last line doubles as the path matched against it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_frontend::dockerignore::{legacy_matches, read_ignore_file, PatternMatcher};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let patterns = read_ignore_file(text);
    let path = text.rsplit('\n').next().unwrap_or_default();
    let paths = [path, "a/b/c", "foo.go", "dir/sub/file.txt", ".git", "", "/"];
    if let Ok(pm) = PatternMatcher::new(&patterns) {
        for p in paths {
            let _ = pm.matches_or_parent_matches(p);
            let _ = pm.matches_single_parent(p);
            let _ = pm.may_match_below(p);
            let _ = pm.matches_using_parent_result(p, true);
            let (_, info) = pm.matches_using_parent_results(p, &Default::default());
            let _ = pm.matches_using_parent_results(p, &info);
        }
        let _ = pm.patterns();
    }
    for p in paths {
        let _ = legacy_matches(p, &patterns);
    }
});
