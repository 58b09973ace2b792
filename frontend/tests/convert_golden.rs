//! Golden DAG dumps of the testdata Dockerfiles: an unexpected digest change here is a
//! cache-breaking change and must be deliberate.

use strata_dag::{Definition, Platform};
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};

struct FakeResolver;

impl ImageResolver for FakeResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
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

fn lower(text: &str) -> Definition {
    let opts = ConvertOptions {
        dockerfile_name: "Dockerfile".into(),
        ..Default::default()
    };
    convert(text, &opts, &FakeResolver).unwrap().definition
}

fn testdata(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../testdata/dag/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn golden_dag_dumps() {
    for name in ["multistage.Dockerfile", "heredoc.Dockerfile"] {
        let def = lower(&testdata(name));
        insta::assert_snapshot!(name, def.dump());
    }
}

#[test]
fn lowering_is_deterministic() {
    let text = testdata("multistage.Dockerfile");
    assert_eq!(lower(&text).dump(), lower(&text).dump());
}

#[test]
fn changing_a_run_line_changes_only_downstream_digests() {
    let text = testdata("multistage.Dockerfile");
    let a = lower(&text);
    let b = lower(&text.replace("make test", "make check"));
    let digests = |d: &Definition| d.nodes.iter().map(|n| n.digest()).collect::<Vec<_>>();
    let (da, db) = (digests(&a), digests(&b));
    assert_eq!(da.len(), db.len());
    // Nodes before the changed RUN keep their digests; it and everything after change.
    let changed = da.iter().position(|d| !db.contains(d)).unwrap();
    assert!(changed > 0);
    for d in &da[..changed] {
        assert!(db.contains(d));
    }
    let meta = &a.metadata[&da[changed]];
    assert!(
        meta.description.contains("make test"),
        "{}",
        meta.description
    );
    // The final stage's base image source is shared and unchanged.
    assert!(da.iter().filter(|d| db.contains(d)).count() >= 3);
}

#[test]
fn unreachable_stages_are_not_lowered() {
    let def = lower(&testdata("multistage.Dockerfile"));
    assert!(
        !def.dump().contains("nothing"),
        "the unused stage was lowered"
    );
}

#[test]
fn build_args_reach_only_steps_after_their_declaration() {
    let text = testdata("multistage.Dockerfile");
    let opts = |v: &str| ConvertOptions {
        build_args: [("VERSION".to_string(), v.to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let a = convert(&text, &opts("1"), &FakeResolver)
        .unwrap()
        .definition;
    let b = convert(&text, &opts("2"), &FakeResolver)
        .unwrap()
        .definition;
    let same: Vec<_> = a.nodes.iter().filter(|n| b.nodes.contains(n)).collect();
    // sources, WORKDIR and COPY . . are before ARG VERSION's first use, so they stay
    assert!(same.len() >= 4, "{}", a.dump());
    let run = a
        .nodes
        .iter()
        .find(|n| {
            a.metadata[&n.digest()]
                .description
                .contains("RUN make VERSION")
        })
        .unwrap();
    assert!(!b.nodes.contains(run));
}

#[test]
fn errors_carry_the_line() {
    let opts = ConvertOptions::default();
    let err = convert("FROM scratch\nCOPY --chmod=999 a /\n", &opts, &FakeResolver).unwrap_err();
    assert_eq!(err.location.map(|l| l.start_line), Some(2));
    assert!(
        err.message.contains("invalid chmod parameter"),
        "{}",
        err.message
    );
    let err = convert(
        "FROM scratch\nRUN --mount=type=cach,target=/x true\n",
        &opts,
        &FakeResolver,
    )
    .unwrap_err();
    assert_eq!(err.location.map(|l| l.start_line), Some(2));
    assert!(err.message.contains("mount type"), "{}", err.message);
    let err = convert(
        "FROM scratch\n",
        &ConvertOptions {
            target: Some("nope".into()),
            ..Default::default()
        },
        &FakeResolver,
    )
    .unwrap_err();
    assert_eq!(err.message, "target stage \"nope\" could not be found");
}
