//! BuildKit's build checks (`frontend/dockerfile/linter`): warnings that do not stop the
//! build, each named by its rule and worded as BuildKit words it. The checks that need
//! only the parse tree live here; the ones that need the lowering state (the stage's
//! shell for `JSONArgsRecommended`) are raised in [`crate::convert`].

use std::collections::{BTreeSet, HashSet};

use crate::convert::Warning;
use crate::instructions::{Dockerfile, Location};
use crate::parser::{go_to_lower, go_to_upper, Node, ParseResult};
use crate::shell::{EnvGetter, Lex};

pub const NO_EMPTY_CONTINUATION: &str = "NoEmptyContinuation";
pub const MAINTAINER_DEPRECATED: &str = "MaintainerDeprecated";
pub const STAGE_NAME_CASING: &str = "StageNameCasing";
pub const FROM_AS_CASING: &str = "FromAsCasing";
pub const CONSISTENT_INSTRUCTION_CASING: &str = "ConsistentInstructionCasing";
pub const DUPLICATE_STAGE_NAME: &str = "DuplicateStageName";
pub const RESERVED_STAGE_NAME: &str = "ReservedStageName";
pub const JSON_ARGS_RECOMMENDED: &str = "JSONArgsRecommended";
pub const LEGACY_KEY_VALUE_FORMAT: &str = "LegacyKeyValueFormat";
pub const REDUNDANT_TARGET_PLATFORM: &str = "RedundantTargetPlatform";
pub const UNDEFINED_ARG_IN_FROM: &str = "UndefinedArgInFrom";

/// The `# check=` directive / `BUILDKIT_DOCKERFILE_CHECK` (BuildKit's `ParseLintOptions`):
/// `skip=all|Rule1,Rule2;error=true|false` (`experimental=` is accepted; no experimental
/// rules are implemented).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckConfig {
    pub skip_all: bool,
    pub skip: Vec<String>,
    pub error: bool,
}

impl CheckConfig {
    pub fn parse(s: &str) -> Result<CheckConfig, String> {
        let mut cfg = CheckConfig::default();
        let s = s.trim();
        if s.is_empty() {
            return Ok(cfg);
        }
        for part in s.splitn(3, ';') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("invalid check option \"{part}\""));
            };
            let v = v.trim();
            match k.trim() {
                "skip" if v == "all" => cfg.skip_all = true,
                "skip" => cfg.skip = v.split(',').map(|r| r.trim().to_string()).collect(),
                "experimental" => {}
                // Go's strconv.ParseBool.
                "error" => {
                    cfg.error = match v {
                        "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
                        "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
                        _ => {
                            return Err(format!(
                                "failed to parse check option \"{part}\": strconv.ParseBool: parsing \"{v}\": invalid syntax"
                            ))
                        }
                    }
                }
                other => return Err(format!("invalid check option \"{other}\"")),
            }
        }
        Ok(cfg)
    }

    pub fn skips(&self, rule: &str) -> bool {
        self.skip_all || self.skip.iter().any(|r| r == rule)
    }

    /// BuildKit's `Linter.Error`: with `error=true`, any warning fails the build.
    pub fn error_for(&self, warnings: &[Warning]) -> Option<String> {
        if !self.error || warnings.is_empty() {
            return None;
        }
        let rules: BTreeSet<&str> = warnings.iter().map(|w| w.rule.as_str()).collect();
        Some(format!(
            "lint violation found for rules: {}",
            rules.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

/// BuildKit's `RuleJSONArgsRecommended.Format`.
pub fn json_args_recommended(instruction: &str) -> String {
    format!(
        "JSON arguments recommended for {instruction} to prevent unintended behavior related to OS signals"
    )
}

fn warn(rule: &str, message: String, node: &Node) -> Warning {
    Warning {
        rule: rule.to_string(),
        message,
        location: Some(Location {
            start_line: node.start_line,
            end_line: node.end_line,
        }),
    }
}

/// The parse-tree checks, in the order BuildKit runs them: parser warnings, per-instruction
/// checks while typing the instructions, then stage names, casing and the FROM lines.
/// `global_args` are the predefined args plus the build args (what FROM lines may use
/// besides the declared global ARGs).
pub fn check(
    parsed: &ParseResult,
    df: &Dockerfile,
    global_args: &[(String, String)],
) -> Vec<Warning> {
    let mut out = Vec::new();
    for w in &parsed.warnings {
        out.push(Warning {
            rule: NO_EMPTY_CONTINUATION.into(),
            message: "Empty continuation line".into(),
            location: Some(Location {
                start_line: w.line,
                end_line: w.line,
            }),
        });
    }
    let nodes = &parsed.root.children;
    for node in nodes {
        match go_to_lower(&node.value).as_str() {
            "maintainer" => out.push(warn(
                MAINTAINER_DEPRECATED,
                "Maintainer instruction is deprecated in favor of using label".into(),
                node,
            )),
            "from" => check_from_casing(node, &mut out),
            _ => {}
        }
    }
    check_stage_names(nodes, &mut out);
    check_instruction_casing(nodes, &mut out);
    for node in nodes {
        if matches!(go_to_lower(&node.value).as_str(), "env" | "label") {
            check_legacy_key_value(node, &mut out);
        }
    }
    check_from_args(parsed, df, nodes, global_args, &mut out);
    out
}

fn args_of(node: &Node) -> Vec<&str> {
    node.args().iter().map(|a| a.value.as_str()).collect()
}

fn check_from_casing(node: &Node, out: &mut Vec<Warning>) {
    let args = args_of(node);
    if args.len() < 3 {
        return;
    }
    let name = args[2];
    if name != go_to_lower(name) {
        out.push(warn(
            STAGE_NAME_CASING,
            format!("Stage name '{name}' should be lowercase"),
            node,
        ));
    }
    let (from, as_kw) = (node.value.as_str(), args[1]);
    let matches = if from == go_to_lower(from) {
        as_kw == go_to_lower(as_kw)
    } else {
        as_kw == go_to_upper(as_kw)
    };
    if !matches {
        out.push(warn(
            FROM_AS_CASING,
            format!("'{as_kw}' and '{from}' keywords' casing do not match"),
            node,
        ));
    }
}

fn check_stage_names(nodes: &[Node], out: &mut Vec<Warning>) {
    let mut seen = HashSet::new();
    for node in nodes.iter().filter(|n| go_to_lower(&n.value) == "from") {
        let args = args_of(node);
        let Some(name) = args.get(2).map(|n| go_to_lower(n)) else {
            continue;
        };
        if name == "context" || name == "scratch" {
            out.push(warn(
                RESERVED_STAGE_NAME,
                format!("Stage name should not use the same name as reserved stage \"{name}\""),
                node,
            ));
        }
        if !seen.insert(name.clone()) {
            out.push(warn(
                DUPLICATE_STAGE_NAME,
                format!("Duplicate stage name \"{name}\", stage names should be unique"),
                node,
            ));
        }
    }
}

fn self_consistent(s: &str) -> bool {
    s == go_to_lower(s) || s == go_to_upper(s)
}

/// Instructions before the first FROM are not counted (BuildKit counts stages only).
fn check_instruction_casing(nodes: &[Node], out: &mut Vec<Warning>) {
    let first_from = nodes
        .iter()
        .position(|n| go_to_lower(&n.value) == "from")
        .unwrap_or(nodes.len());
    let in_stages = &nodes[first_from..];
    let (mut lower, mut upper) = (0usize, 0usize);
    for n in in_stages {
        if self_consistent(&n.value) {
            if n.value == go_to_lower(&n.value) {
                lower += 1;
            } else {
                upper += 1;
            }
        }
    }
    let majority_lower = lower > upper;
    for n in in_stages {
        let name = n.value.as_str();
        let correct = if majority_lower && go_to_lower(name) != name {
            "lowercase"
        } else if !majority_lower && go_to_upper(name) != name {
            "uppercase"
        } else {
            continue;
        };
        out.push(warn(
            CONSISTENT_INSTRUCTION_CASING,
            format!("Command '{name}' should match the case of the command majority ({correct})"),
            n,
        ));
    }
}

/// `ENV key value` / `LABEL key value`: the parser marks a pair without `=` with an
/// empty third word.
fn check_legacy_key_value(node: &Node, out: &mut Vec<Warning>) {
    let args = args_of(node);
    if args.chunks(3).any(|c| c.len() == 3 && c[2].is_empty()) {
        let name = node.value.as_str();
        out.push(warn(
            LEGACY_KEY_VALUE_FORMAT,
            format!(
                "\"{name} key=value\" should be used instead of legacy \"{name} key value\" format"
            ),
            node,
        ));
    }
}

/// `UndefinedArgInFrom` and `RedundantTargetPlatform` on every FROM line.
fn check_from_args(
    parsed: &ParseResult,
    df: &Dockerfile,
    nodes: &[Node],
    global_args: &[(String, String)],
    out: &mut Vec<Warning>,
) {
    let lex = Lex::new(parsed.escape);
    let mut env: Vec<(String, String)> = global_args.to_vec();
    let mut known: BTreeSet<String> = global_args.iter().map(|(k, _)| k.clone()).collect();
    for (decl, _) in &df.meta_args {
        known.insert(decl.name.clone());
        if let Some(default) = &decl.default {
            if env.get(&decl.name).is_none() {
                if let Ok(v) = lex.process_word(default, &env) {
                    env.push((decl.name.clone(), v));
                }
            }
        }
    }
    let candidates: Vec<&str> = known.iter().map(String::as_str).collect();
    for node in nodes.iter().filter(|n| go_to_lower(&n.value) == "from") {
        let mut words: Vec<&str> = args_of(node).into_iter().take(1).collect();
        let platform = node
            .flags
            .iter()
            .find_map(|f| f.strip_prefix("--platform="));
        words.extend(platform);
        for word in words {
            let Ok(m) = lex.process_word_with_matches(word, &env) else {
                continue;
            };
            for name in &m.unmatched {
                if known.contains(name) {
                    continue;
                }
                let mut msg = format!("FROM argument '{name}' is not declared");
                if let Some(s) = crate::suggest::search(name, &candidates, true) {
                    msg.push_str(&format!(" (did you mean {s}?)"));
                }
                out.push(warn(UNDEFINED_ARG_IN_FROM, msg, node));
            }
        }
        if let Some(p) = platform {
            if let Ok(m) = lex.process_word_with_matches(p, &env) {
                let only_target = m.matched.len() == 1
                    && m.unmatched.is_empty()
                    && m.matched.contains("TARGETPLATFORM");
                if only_target && env.get("TARGETPLATFORM").as_deref() == Some(m.value.as_str()) {
                    out.push(warn(
                        REDUNDANT_TARGET_PLATFORM,
                        format!("Setting platform to predefined {p} in FROM is redundant as this is the default behavior"),
                        node,
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint(text: &str) -> Vec<(String, String, usize)> {
        let parsed = crate::parser::parse(text).unwrap();
        let df = crate::instructions::from_parse_result(&parsed).unwrap();
        let globals = vec![("TARGETPLATFORM".to_string(), "linux/amd64".to_string())];
        check(&parsed, &df, &globals)
            .into_iter()
            .map(|w| (w.rule, w.message, w.location.unwrap().start_line))
            .collect()
    }

    #[test]
    fn maintainer_and_casing_rules_are_worded_like_buildkit() {
        let w = lint("FROM busybox as Builder\nMAINTAINER me\nRUN true\nrun true\n");
        assert!(w.contains(&(
            MAINTAINER_DEPRECATED.into(),
            "Maintainer instruction is deprecated in favor of using label".into(),
            2
        )));
        assert!(w.contains(&(
            STAGE_NAME_CASING.into(),
            "Stage name 'Builder' should be lowercase".into(),
            1
        )));
        assert!(w.contains(&(
            FROM_AS_CASING.into(),
            "'as' and 'FROM' keywords' casing do not match".into(),
            1
        )));
        assert!(w.contains(&(
            CONSISTENT_INSTRUCTION_CASING.into(),
            "Command 'run' should match the case of the command majority (uppercase)".into(),
            4
        )));
    }

    #[test]
    fn clean_dockerfile_has_no_warnings() {
        let w = lint("ARG BASE=busybox\nFROM $BASE AS build\nENV A=b\nLABEL x=y\nCMD [\"sh\"]\n");
        assert_eq!(w, vec![]);
    }

    #[test]
    fn from_args_and_platform() {
        let w = lint("ARG VERSION=1\nFROM --platform=$TARGETPLATFORM busybox:$VERSON\n");
        assert_eq!(
            w,
            vec![
                (
                    UNDEFINED_ARG_IN_FROM.into(),
                    "FROM argument 'VERSON' is not declared (did you mean VERSION?)".into(),
                    2
                ),
                (
                    REDUNDANT_TARGET_PLATFORM.into(),
                    "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior".into(),
                    2
                ),
            ]
        );
    }

    #[test]
    fn legacy_env_duplicate_and_reserved_names() {
        let w = lint("FROM a AS x\nENV A b\nFROM a AS x\nFROM a AS scratch\n");
        let rules: Vec<&str> = w.iter().map(|(r, _, _)| r.as_str()).collect();
        assert_eq!(
            rules,
            vec![
                DUPLICATE_STAGE_NAME,
                RESERVED_STAGE_NAME,
                LEGACY_KEY_VALUE_FORMAT
            ]
        );
        assert_eq!(
            w[2].1,
            "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format"
        );
    }

    #[test]
    fn check_options_parse_like_buildkit() {
        let c = CheckConfig::parse("skip=JSONArgsRecommended, StageNameCasing;error=true").unwrap();
        assert!(c.skips("StageNameCasing") && c.skips("JSONArgsRecommended"));
        assert!(!c.skips("MaintainerDeprecated"));
        assert!(c.error);
        assert!(CheckConfig::parse("skip=all").unwrap().skips("Anything"));
        assert_eq!(
            CheckConfig::parse("bogus").unwrap_err(),
            "invalid check option \"bogus\""
        );
        assert_eq!(
            CheckConfig::parse("speed=1").unwrap_err(),
            "invalid check option \"speed\""
        );
        assert!(CheckConfig::parse("error=maybe").is_err());
        let w = |rule: &str| Warning {
            rule: rule.into(),
            message: String::new(),
            location: None,
        };
        assert_eq!(
            c.error_for(&[w("B"), w("A"), w("B")]).unwrap(),
            "lint violation found for rules: A, B"
        );
        assert_eq!(c.error_for(&[]), None);
    }

    #[test]
    fn empty_continuation_lines_become_a_rule() {
        let w = lint("FROM a\nRUN a \\\n\n  b\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].0, NO_EMPTY_CONTINUATION);
        assert_eq!(w[0].1, "Empty continuation line");
    }
}
