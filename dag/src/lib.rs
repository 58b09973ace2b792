//! The build graph as pure data.
//!
//! A [`Definition`] is a Merkle DAG of [`Node`]s. A node's [`Digest`] is the sha256 of its
//! canonical JSON bytes, which include its inputs' digests, so equal definitions have equal
//! digests across processes and machines. Display names and other metadata live in
//! [`NodeMeta`], outside the digests, so renaming a step never breaks the cache.

pub mod image;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A `sha256:<hex>` content digest.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// Wraps a string already in `algorithm:hex` form; `None` when it is not sha256.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Digest(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part, without `sha256:`.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(_, h)| h)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which output of which node an edge reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Input {
    pub digest: Digest,
    pub output: u32,
}

/// Target platform of a node (`linux/amd64`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

/// One build step. Scratch is not an op: it is the absence of an input.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Source(SourceOp),
    Exec(ExecOp),
    File(FileOp),
    /// Layers the inputs on top of each other, first at the bottom.
    Merge,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceOp {
    /// A registry image pinned by manifest digest: `reference` is `host/repo@sha256:...`.
    Image { reference: String },
    /// A directory given by the client (`context`, ...), filtered by `.dockerignore` rules.
    /// The bytes of the files are not part of the digest; the solver hashes the content
    /// it reads when computing cache keys.
    Local {
        name: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude: Vec<String>,
        /// Extra salt, e.g. the session so that different contexts never share a vertex.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        shared_key: String,
    },
}

/// A process run over input 0 as root filesystem (or scratch when there is no input).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct ExecOp {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `USER` as written (`name`, `uid`, `name:group`, ...); empty = root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "Network::is_default")]
    pub network: Network,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ExecMount>,
    /// Index of the input that is the root filesystem; `None` = scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_input: Option<u32>,
    /// `RUN --security=insecure`: all capabilities; needs the `security.insecure`
    /// entitlement (`--allow security.insecure`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    #[default]
    Host,
    None,
    Default,
}

impl Network {
    fn is_default(&self) -> bool {
        *self == Network::Host
    }
}

/// A `RUN --mount`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecMount {
    pub target: String,
    pub kind: ExecMountKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecMountKind {
    /// A read-only (or rw with discarded writes) view of `source` in input `input`.
    Bind {
        input: Option<u32>,
        source: String,
        readwrite: bool,
    },
    /// A persistent directory shared by every build that names the same `id`; when it is
    /// created, it starts as a copy of `source` in input `from` (empty when `None`).
    Cache {
        id: String,
        sharing: String,
        mode: u32,
        uid: u32,
        gid: u32,
        readonly: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<u32>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        source: String,
    },
    Tmpfs {
        size: Option<u64>,
    },
    Secret {
        id: String,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
        env: Option<String>,
    },
    Ssh {
        id: String,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// File actions applied in order over input 0 (or scratch).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileOp {
    /// Index of the input that is the destination's base; `None` = scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_input: Option<u32>,
    pub actions: Vec<FileAction>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAction {
    Copy(CopyAction),
    Mkdir {
        path: String,
        mode: u32,
        owner: Option<Owner>,
        make_parents: bool,
    },
    Mkfile {
        path: String,
        mode: u32,
        owner: Option<Owner>,
        data: Vec<u8>,
    },
    Rm {
        path: String,
        allow_not_found: bool,
    },
}

/// `COPY`/`ADD` of one source path (or wildcard) into `dest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CopyAction {
    /// The input the source is read from (a local context or another node).
    pub src_input: u32,
    /// Path in the source, relative to its root; may contain wildcards when `allow_wildcard`.
    pub src: String,
    /// Absolute destination path; a trailing `/` means "into this directory".
    pub dest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Follow a symlink named by `src` itself (not links inside directories).
    pub follow_symlinks: bool,
    /// Copy the contents of a source directory rather than the directory itself.
    pub dir_contents_only: bool,
    pub allow_wildcard: bool,
    /// A wildcard that matches nothing is not an error.
    pub allow_empty_wildcard: bool,
    /// Create missing parents of `dest`.
    pub create_dest_path: bool,
    /// `ADD`: unpack a local tar archive into `dest`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attempt_unpack: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// An owner as resolved against the destination's /etc/passwd and /etc/group
/// when the action runs (`--chown=name:group`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub user: UserSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<UserSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserSpec {
    Id(u32),
    Name(String),
}

/// A vertex: an op and the edges it reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub inputs: Vec<Input>,
    pub op: Op,
    #[serde(default)]
    pub platform: Platform,
}

impl Node {
    /// The canonical bytes a node is identified by. serde_json writes struct fields in
    /// declaration order and the types hold no maps, so the bytes are stable.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serializing these plain types cannot fail: no maps with non-string keys, no I/O.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.canonical_bytes())
    }
}

/// What the progress display and error messages say about a node; not part of digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// `[stage 2/5] RUN make`, `[internal] load build context`, ...
    pub description: String,
    /// Skip the cache lookup for this node (`--no-cache`, `--no-cache-filter`).
    #[serde(default)]
    pub ignore_cache: bool,
    /// Where in the Dockerfile the node comes from, for error messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<SourceLocation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLocation {
    pub file: String,
    pub start_line: usize,
    pub end_line: usize,
}

/// A topologically ordered DAG (every node after its inputs) with one root edge.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Definition {
    pub nodes: Vec<Node>,
    pub metadata: BTreeMap<Digest, NodeMeta>,
    /// `None` when the build result is scratch (an empty filesystem).
    pub root: Option<Input>,
}

/// Builds a [`Definition`], deduplicating equal nodes.
#[derive(Default)]
pub struct DefinitionBuilder {
    def: Definition,
    seen: BTreeMap<Digest, usize>,
}

impl DefinitionBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` (once, however often it is added) and returns the edge to its output 0.
    /// Inputs must have been added before.
    pub fn add(&mut self, node: Node, meta: NodeMeta) -> Input {
        let digest = node.digest();
        if !self.seen.contains_key(&digest) {
            self.seen.insert(digest.clone(), self.def.nodes.len());
            self.def.nodes.push(node);
            self.def.metadata.insert(digest.clone(), meta);
        } else if meta.ignore_cache {
            if let Some(m) = self.def.metadata.get_mut(&digest) {
                m.ignore_cache = true;
            }
        }
        Input { digest, output: 0 }
    }

    pub fn finish(mut self, root: Option<Input>) -> Definition {
        self.def.root = root;
        self.def
    }
}

impl Definition {
    pub fn node(&self, digest: &Digest) -> Option<&Node> {
        self.nodes.iter().find(|n| &n.digest() == digest)
    }

    /// A stable text dump: one line per node, `digest op inputs`, for goldens and
    /// `strata debug dag`.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let d = node.digest();
            let desc = self
                .metadata
                .get(&d)
                .map(|m| m.description.as_str())
                .unwrap_or("");
            let inputs: Vec<String> = node
                .inputs
                .iter()
                .map(|i| format!("{}:{}", &i.digest.hex()[..12], i.output))
                .collect();
            let op = serde_json::to_string(&node.op).unwrap_or_default();
            out.push_str(&format!(
                "{} {desc}\n  inputs: [{}]\n  op: {op}\n",
                &d.hex()[..12],
                inputs.join(", ")
            ));
        }
        if let Some(root) = &self.root {
            out.push_str(&format!(
                "root: {}:{}\n",
                &root.digest.hex()[..12],
                root.output
            ));
        } else {
            out.push_str("root: scratch\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(args: &[&str], input: Option<Input>) -> Node {
        Node {
            inputs: input.into_iter().collect(),
            op: Op::Exec(ExecOp {
                args: args.iter().map(|s| s.to_string()).collect(),
                cwd: "/".into(),
                rootfs_input: Some(0),
                ..Default::default()
            }),
            platform: Platform::default(),
        }
    }

    #[test]
    fn digest_depends_on_inputs_and_definition_not_metadata() {
        let mut b = DefinitionBuilder::new();
        let src = b.add(
            Node {
                inputs: vec![],
                op: Op::Source(SourceOp::Image {
                    reference: "r@sha256:00".into(),
                }),
                platform: Platform::default(),
            },
            NodeMeta::default(),
        );
        let a = exec(&["sh", "-c", "true"], Some(src.clone()));
        let a2 = exec(&["sh", "-c", "true"], Some(src.clone()));
        assert_eq!(a.digest(), a2.digest());
        let other = exec(&["sh", "-c", "false"], Some(src.clone()));
        assert_ne!(a.digest(), other.digest());
        let first = b.add(
            a.clone(),
            NodeMeta {
                description: "one".into(),
                ..Default::default()
            },
        );
        let again = b.add(
            a2,
            NodeMeta {
                description: "two".into(),
                ..Default::default()
            },
        );
        assert_eq!(first, again);
        let def = b.finish(Some(first));
        assert_eq!(def.nodes.len(), 2);
    }

    #[test]
    fn digest_parse_rejects_malformed() {
        assert!(Digest::parse("sha256:abc").is_none());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_none());
    }
}
