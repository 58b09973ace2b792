//! Build-check warnings from the whole lowering (BuildKit's lint rules): named by rule,
//! worded as BuildKit, with the line, and never an error.

use strata_dag::Platform;
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};

struct FakeResolver;

impl ImageResolver for FakeResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
        let mut config = strata_dag::image::ImageConfig::default();
        config.config.env = vec!["PATH=/bin".into(), "HOME=/root".into()];
        if reference == "with-shell" {
            config.config.shell = vec!["/bin/bash".into(), "-c".into()];
        }
        Ok(ResolvedImage {
            pinned: format!(
                "{reference}@{}",
                strata_dag::Digest::of(reference.as_bytes())
            ),
            config,
        })
    }
}

fn warnings(text: &str) -> Vec<(String, String, usize)> {
    let opts = ConvertOptions::default();
    convert(text, &opts, &FakeResolver)
        .unwrap()
        .warnings
        .into_iter()
        .map(|w| (w.rule, w.message, w.location.map_or(0, |l| l.start_line)))
        .collect()
}

fn w(rule: &str, message: &str, line: usize) -> (String, String, usize) {
    (rule.into(), message.into(), line)
}

#[test]
fn json_args_recommended_unless_a_shell_is_chosen() {
    assert_eq!(
        warnings("FROM busybox\nCMD echo hi\nENTRYPOINT [\"sh\"]\n"),
        vec![w(
            "JSONArgsRecommended",
            "JSON arguments recommended for CMD to prevent unintended behavior related to OS signals",
            2
        )]
    );
    // The instruction as written.
    assert_eq!(
        warnings("from busybox\nentrypoint run\n"),
        vec![w(
            "JSONArgsRecommended",
            "JSON arguments recommended for entrypoint to prevent unintended behavior related to OS signals",
            2
        )]
    );
    assert_eq!(
        warnings("FROM busybox\nSHELL [\"/bin/ash\", \"-c\"]\nCMD echo hi\n"),
        vec![]
    );
    assert_eq!(warnings("FROM with-shell\nCMD echo hi\n"), vec![]);
}

#[test]
fn undefined_var_with_suggestion() {
    assert_eq!(
        warnings("FROM busybox\nARG DECLARED\nENV A=$HOEM/$DECLARED\nWORKDIR $NOWHERE\nRUN echo $UNSET_IN_RUN\n"),
        vec![
            w(
                "UndefinedVar",
                "Usage of undefined variable '$HOEM' (did you mean $HOME?)",
                3
            ),
            w("UndefinedVar", "Usage of undefined variable '$NOWHERE'", 4),
        ]
    );
    // Set variables and ARG defaults are not reported.
    assert_eq!(
        warnings("FROM busybox\nARG X=${UNDEF_DEFAULT:-1}\nENV B=$X\nLABEL l=$HOME\n"),
        vec![]
    );
}

#[test]
fn parse_tree_rules_come_through_convert() {
    let got = warnings("FROM busybox AS Build\nMAINTAINER me\nRUN a \\\n\n  b\n");
    assert_eq!(
        got,
        vec![
            w("NoEmptyContinuation", "Empty continuation line", 5),
            w(
                "StageNameCasing",
                "Stage name 'Build' should be lowercase",
                1
            ),
            w(
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label",
                2
            ),
        ]
    );
}
