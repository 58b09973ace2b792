//! User-facing errors that point at the Dockerfile line, as BuildKit prints them.

use std::fmt::Write;

/// Renders `message` with the lines `start..=end` of `source` and two lines of context:
///
/// ```text
/// Dockerfile:3
/// --------------------
///    2 |     RUN true
///    3 | >>> COPY missing.txt /
/// --------------------
/// ERROR: ...
/// ```
pub fn render(file: &str, source: &str, start: usize, end: usize, message: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    if start == 0 || start > lines.len() {
        let _ = write!(out, "{file}: {message}");
        return out;
    }
    let end = end.clamp(start, lines.len());
    let first = start.saturating_sub(2).max(1);
    let last = (end + 1).min(lines.len());
    let _ = writeln!(out, "{file}:{start}");
    let _ = writeln!(out, "--------------------");
    for n in first..=last {
        let marker = if n >= start && n <= end { ">>>" } else { "   " };
        let _ = writeln!(out, "{n:>4} | {marker} {}", lines[n - 1]);
    }
    let _ = writeln!(out, "--------------------");
    let _ = write!(out, "ERROR: {file}:{start}: {message}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_at_the_line() {
        let src = "FROM a\nRUN true\nCOPY x /\nCMD y\n";
        let out = render("Dockerfile", src, 3, 3, "boom");
        assert!(out.contains("   3 | >>> COPY x /"), "{out}");
        assert!(out.contains("   2 |     RUN true"), "{out}");
        assert!(out.ends_with("ERROR: Dockerfile:3: boom"), "{out}");
    }
}
