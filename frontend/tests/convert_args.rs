//! Predefined args: the platform args after a bare `ARG TARGETARCH`, and proxy build args
//! that reach RUN steps without being declared and without touching the definition or the
//! history (BuildKit's `llb.WithProxy`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use strata_dag::{ExecOp, Op, Platform};
use strata_frontend::convert::{convert, BuildPlan, ConvertOptions, ImageResolver, ResolvedImage};

/// Resolves every image and records the names it was asked for.
#[derive(Default)]
struct RecordingResolver {
    asked: Mutex<Vec<String>>,
}

impl ImageResolver for RecordingResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
        if let Ok(mut a) = self.asked.lock() {
            a.push(reference.to_string());
        }
        let mut config = strata_dag::image::ImageConfig::default();
        config.config.env = vec!["PATH=/bin".into()];
        Ok(ResolvedImage {
            pinned: format!(
                "{reference}@{}",
                strata_dag::Digest::of(reference.as_bytes())
            ),
            config,
        })
    }
}

fn plan(text: &str, args: &[(&str, &str)], platform: Platform) -> BuildPlan {
    let opts = ConvertOptions {
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        platform,
        dockerfile_name: "Dockerfile".into(),
        ..Default::default()
    };
    convert(text, &opts, &RecordingResolver::default()).unwrap()
}

fn execs(p: &BuildPlan) -> Vec<ExecOp> {
    p.definition
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Exec(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn arm64() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: Some("v8".into()),
    }
}

#[test]
fn platform_args_are_set_after_a_bare_arg() {
    let p = plan(
        "FROM busybox\nARG TARGETPLATFORM\nARG TARGETOS\nARG TARGETARCH\nARG TARGETVARIANT\n\
         ARG BUILDPLATFORM\nARG BUILDOS\nARG BUILDARCH\nRUN echo $TARGETARCH\n",
        &[],
        arm64(),
    );
    let run = &execs(&p)[0];
    for want in [
        "TARGETPLATFORM=linux/arm64/v8",
        "TARGETOS=linux",
        "TARGETARCH=arm64",
        "TARGETVARIANT=v8",
        "BUILDPLATFORM=linux/amd64",
        "BUILDOS=linux",
        "BUILDARCH=amd64",
    ] {
        assert!(run.env.iter().any(|e| e == want), "{want} in {:?}", run.env);
    }
    // History shows the declared args with their values, as BuildKit's `|N K=V` prefix.
    let last = p.image.history.last().unwrap();
    assert!(
        last.created_by.contains("TARGETARCH=arm64"),
        "{}",
        last.created_by
    );
}

#[test]
fn platform_args_are_not_in_scope_without_arg() {
    let p = plan("FROM busybox\nRUN echo $TARGETARCH\n", &[], arm64());
    assert!(!execs(&p)[0]
        .env
        .iter()
        .any(|e| e.starts_with("TARGETARCH=")));
}

#[test]
fn platform_args_expand_in_from_without_declaration() {
    let resolver = RecordingResolver::default();
    let opts = ConvertOptions {
        platform: arm64(),
        ..Default::default()
    };
    convert("FROM img:$TARGETOS-$TARGETARCH\n", &opts, &resolver).unwrap();
    assert_eq!(*resolver.asked.lock().unwrap(), vec!["img:linux-arm64"]);
}

#[test]
fn proxy_args_reach_run_without_changing_definition_or_history() {
    let text = "FROM busybox\nARG A=1\nRUN echo hi\n";
    let without = plan(text, &[], Platform::default());
    let with = plan(
        text,
        &[
            ("HTTP_PROXY", "http://proxy:3128"),
            ("no_proxy", "localhost"),
        ],
        Platform::default(),
    );
    assert_eq!(
        with.proxy_env,
        vec![
            ("HTTP_PROXY".to_string(), "http://proxy:3128".to_string()),
            ("no_proxy".to_string(), "localhost".to_string())
        ]
    );
    assert!(without.proxy_env.is_empty());
    // Same nodes, so the same cache keys; same history.
    assert_eq!(with.definition.dump(), without.definition.dump());
    assert_eq!(with.image.history, without.image.history);
    assert!(!execs(&with)[0].env.iter().any(|e| e.contains("proxy")));
    // Not reported as unused, unlike an undeclared ordinary arg.
    let other = plan(
        text,
        &[("HTTP_PROXY", "x"), ("B", "2")],
        Platform::default(),
    );
    assert_eq!(other.unused_build_args, vec!["B".to_string()]);
}

#[test]
fn declared_proxy_arg_is_an_ordinary_arg() {
    let p = plan(
        "FROM busybox\nARG HTTP_PROXY\nRUN echo hi\n",
        &[("HTTP_PROXY", "http://p")],
        Platform::default(),
    );
    assert!(execs(&p)[0].env.iter().any(|e| e == "HTTP_PROXY=http://p"));
}
