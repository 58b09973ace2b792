//! Lowering of `RUN --mount`, `--security` and `--network`: graph shape and BuildKit's errors.

use strata_dag::{Definition, ExecMountKind, ExecOp, Op, Platform, SourceOp};
use strata_frontend::convert::{
    convert, ConvertError, ConvertOptions, ImageResolver, ResolvedImage,
};

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

fn lower(text: &str) -> Result<Definition, ConvertError> {
    let opts = ConvertOptions {
        dockerfile_name: "Dockerfile".into(),
        ..Default::default()
    };
    convert(text, &opts, &FakeResolver).map(|p| p.definition)
}

/// The root node's exec op and the ops of its inputs.
fn root_exec(def: &Definition) -> (ExecOp, Vec<Op>) {
    let root = def.root.as_ref().unwrap();
    let node = def
        .nodes
        .iter()
        .find(|n| n.digest() == root.digest)
        .unwrap();
    let Op::Exec(e) = &node.op else {
        panic!("root is not an exec: {:?}", node.op)
    };
    let inputs = node
        .inputs
        .iter()
        .map(|i| {
            def.nodes
                .iter()
                .find(|n| n.digest() == i.digest)
                .unwrap()
                .op
                .clone()
        })
        .collect();
    (e.clone(), inputs)
}

fn err(text: &str) -> (String, usize) {
    let e = lower(text).unwrap_err();
    (e.message, e.location.unwrap().start_line)
}

#[test]
fn mount_parse_errors_carry_the_line_and_buildkit_text() {
    let cases = [
        (
            "--mount=type=cach,target=/c",
            "unsupported mount type \"cach\" (did you mean cache?)",
        ),
        (
            "--mount=type=cache,tagret=/c",
            "unexpected key 'tagret' in 'tagret=/c' (did you mean target?)",
        ),
        (
            "--mount=type=bind,target=/c,uid=1",
            "uid not allowed for \"bind\" type mounts",
        ),
        ("--mount=type=cache,target=/", "invalid mount target \"/\""),
        ("--mount=type=ssh,src=x", "ssh does not support source"),
        (
            "--mount=type=secret,id=a,from=x",
            "secret mount should not have a from",
        ),
        ("--security=bogus", "security \"bogus\" is not valid"),
    ];
    for (flags, want) in cases {
        let text = format!("FROM busybox\nENV A=1\nRUN {flags} true\n");
        assert_eq!(err(&text), (want.to_string(), 3), "{flags}");
    }
    // Values are expanded with the step's environment before they are checked.
    assert_eq!(
        err("FROM busybox\nARG T=cach\nRUN --mount=type=$T,target=/c true\n"),
        (
            "unsupported mount type \"cach\" (did you mean cache?)".into(),
            3
        )
    );
}

#[test]
fn mounts_become_exec_mounts_with_their_inputs() {
    let def = lower(
        "FROM busybox AS tools\nRUN make\n\
         FROM busybox\nWORKDIR /w\nARG CACHE=/root/.cache\n\
         RUN --mount=type=bind,from=tools,source=/out,target=/t \
             --mount=target=src \
             --mount=type=cache,target=$CACHE,sharing=locked \
             --mount=type=tmpfs,target=/tmp,size=1m \
             --mount=type=secret,id=tok \
             --mount=type=secret,id=env,env=TOKEN \
             --mount=type=ssh \
             --mount=type=bind,from=other:1,target=/o,rw \
             true\n",
    )
    .unwrap();
    let (exec, inputs) = root_exec(&def);
    assert_eq!(exec.rootfs_input, Some(0));
    assert!(
        matches!(inputs[0], Op::File(_)),
        "rootfs is the WORKDIR'd base"
    );
    let m = &exec.mounts;
    assert_eq!(m.len(), 8);
    // From a stage: the stage's last node, read-only.
    let ExecMountKind::Bind {
        input: Some(i),
        source,
        readwrite: false,
    } = &m[0].kind
    else {
        panic!("{:?}", m[0])
    };
    assert_eq!((m[0].target.as_str(), source.as_str()), ("/t", "/out"));
    let Op::Exec(tools) = &inputs[*i as usize] else {
        panic!("{:?}", inputs[*i as usize])
    };
    assert!(tools.args.join(" ").contains("make"));
    // No from: the build context, target relative to WORKDIR.
    let ExecMountKind::Bind {
        input: Some(c),
        source,
        ..
    } = &m[1].kind
    else {
        panic!("{:?}", m[1])
    };
    assert_eq!((m[1].target.as_str(), source.as_str()), ("/w/src", "/"));
    assert!(matches!(
        inputs[*c as usize],
        Op::Source(SourceOp::Local { .. })
    ));
    // Cache: id defaults to the (expanded) target.
    assert_eq!(m[2].target, "/root/.cache");
    let ExecMountKind::Cache {
        id, sharing, mode, ..
    } = &m[2].kind
    else {
        panic!("{:?}", m[2])
    };
    assert_eq!(
        (id.as_str(), sharing.as_str(), *mode),
        ("/root/.cache", "locked", 0o755)
    );
    assert_eq!(
        m[3].kind,
        ExecMountKind::Tmpfs {
            size: Some(1 << 20)
        }
    );
    // Secrets: a file under /run/secrets by default; env-only has no target.
    assert_eq!(m[4].target, "/run/secrets/tok");
    assert!(
        matches!(&m[4].kind, ExecMountKind::Secret { id, mode: 0o400, env: None, .. } if id == "env" || id == "tok")
    );
    assert_eq!(m[5].target, "");
    assert!(matches!(&m[5].kind, ExecMountKind::Secret { env: Some(e), .. } if e == "TOKEN"));
    // ssh: BuildKit's default socket path, exported to the step.
    assert_eq!(m[6].target, "/run/buildkit/ssh_agent.0");
    assert!(exec
        .env
        .contains(&"SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0".to_string()));
    // From an image: an image source input, read-write.
    let ExecMountKind::Bind {
        input: Some(o),
        readwrite: true,
        ..
    } = &m[7].kind
    else {
        panic!("{:?}", m[7])
    };
    assert!(
        matches!(&inputs[*o as usize], Op::Source(SourceOp::Image { reference }) if reference.starts_with("other:1@"))
    );
    // Secret values never reach the graph: only ids do.
    assert!(!exec.env.iter().any(|e| e.starts_with("TOKEN=")));
}

#[test]
fn security_and_network_flags() {
    let def = lower("FROM busybox\nRUN --security=insecure --network=none true\n").unwrap();
    let (exec, _) = root_exec(&def);
    assert!(exec.insecure);
    assert_eq!(exec.network, strata_dag::Network::None);
    let plain = lower("FROM busybox\nRUN --security=sandbox true\n").unwrap();
    let (exec2, _) = root_exec(&plain);
    assert!(!exec2.insecure);
    // The insecure flag is part of the step's identity.
    assert_ne!(
        lower("FROM busybox\nRUN --security=insecure true\n")
            .unwrap()
            .root,
        lower("FROM busybox\nRUN true\n").unwrap().root
    );
}

#[test]
fn mounting_the_current_stage_is_refused() {
    let (msg, line) = err("FROM busybox AS a\nRUN --mount=from=a,target=/x true\n");
    assert_eq!(line, 2);
    assert_eq!(
        msg,
        "cannot mount from stage \"a\" to \"/x\", stage needs to be defined before current command"
    );
}
