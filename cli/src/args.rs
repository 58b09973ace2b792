//! Command-line arguments (clap derive), with docker buildx's flag names and meanings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "strata", version, about = "A Dockerfile build engine")]
pub struct Cli {
    /// Store directory (content, snapshots, cache, images).
    #[arg(
        long,
        global = true,
        env = "STRATA_ROOT",
        default_value = "/var/lib/strata"
    )]
    pub root: PathBuf,
    /// Registries (host:port) to reach over plain HTTP, besides loopback ones.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build an image from a Dockerfile.
    Build(Box<BuildArgs>),
    /// List images in the local store.
    Images,
    /// Remove images from the local store.
    Rmi {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Log in to a registry (credentials go to ~/.docker/config.json).
    Login {
        registry: String,
        #[arg(short, long)]
        username: String,
        #[arg(short, long)]
        password: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Log out from a registry.
    Logout { registry: String },
    /// Remove build cache: unreferenced snapshots, blobs and cache records.
    Prune {
        /// Remove all build cache, not only unreferenced data.
        #[arg(short, long)]
        all: bool,
        /// Remove least recently used cache until the build cache takes at most SIZE
        /// (`10GB`, `512mb`; an explicit 0 keeps nothing).
        #[arg(long, value_name = "SIZE")]
        keep_storage: Option<String>,
        /// Only remove cache last used longer ago than this (`until=24h`).
        #[arg(long = "filter", value_name = "FILTER")]
        filters: Vec<String>,
        /// List every removed blob and count removed cache records.
        #[arg(long)]
        verbose: bool,
        /// Accepted for docker compatibility; prune never asks.
        #[arg(short, long)]
        force: bool,
    },
    /// Show the store's disk usage: snapshots, cache records, blobs, images.
    Du {
        /// One block per snapshot with its parent, records and blobs.
        #[arg(long)]
        verbose: bool,
    },
    /// Create a tag TARGET that refers to the image SOURCE.
    Tag { source: String, target: String },
    /// Print an image's config JSON as stored.
    Inspect { name: String },
    /// Show the history of an image.
    History {
        name: String,
        /// Do not truncate output.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Save images to a `docker load` tar archive (stdout without -o).
    Save {
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Load images from a `docker save` tar archive (stdin without -i).
    Load {
        #[arg(short, long)]
        input: Option<PathBuf>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Push an image of the local store to the registry its name names.
    Push { name: String },
    /// Pull an image into the local store (layers are unpacked when a build uses them).
    Pull {
        name: String,
        #[arg(long)]
        platform: Option<String>,
    },
    /// Inspect the frontend's work.
    Debug {
        #[command(subcommand)]
        what: DebugCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Print the parse tree in BuildKit's Node.Dump() format.
    Ast { file: PathBuf },
    /// Print the lowered build graph with digests.
    Dag {
        file: PathBuf,
        #[arg(long = "build-arg", value_name = "KEY=VALUE")]
        build_args: Vec<String>,
        #[arg(long)]
        target: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Plain,
    Tty,
    Quiet,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Name and optionally a tag (name:tag).
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    pub tags: Vec<String>,
    /// Name of the Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Set build-time variables.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Set the target build stage to build.
    #[arg(long)]
    pub target: Option<String>,
    /// Do not use cache when building the image.
    #[arg(long)]
    pub no_cache: bool,
    /// Do not cache specified stages.
    #[arg(long, value_delimiter = ',')]
    pub no_cache_filter: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Output destination (type=oci|docker|local|tar|image|registry,dest=...).
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,
    /// Shorthand for --output=type=registry.
    #[arg(long)]
    pub push: bool,
    /// Shorthand for --output=type=docker (here: the local image store).
    #[arg(long)]
    pub load: bool,
    /// Run at most N steps at once (a hard bound). Default: at most as many CPU-busy steps
    /// as there are cores; a RUN step that is nearly idle (sleeping, waiting on the
    /// network) holds no slot, so further steps start next to it.
    #[arg(long)]
    pub max_parallelism: Option<usize>,
    /// Write the image ID to the file.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Write build result metadata to the file.
    #[arg(long)]
    pub metadata_file: Option<PathBuf>,
    /// Suppress the build output and print the image ID on success.
    #[arg(short, long)]
    pub quiet: bool,
    /// Set the target platform (only linux/amd64 is built).
    #[arg(long)]
    pub platform: Option<String>,
    /// Secret to expose to the build (id=mysecret[,src=/local/secret|,env=VAR]).
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// SSH agent socket to expose to the build (default|<id>[=<socket>]).
    #[arg(long = "ssh", value_name = "SPEC")]
    pub ssh: Vec<String>,
    /// Allow an extra privileged entitlement (security.insecure).
    #[arg(long = "allow", value_name = "ENTITLEMENT", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Export the build cache (type=registry,ref=REF[,mode=min|max][,compression=gzip|zstd],
    /// type=local,dest=DIR[,mode=..], or type=inline).
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,
    /// Import a build cache (type=registry,ref=REF, type=local,src=DIR, or an image with
    /// an inline cache).
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,
    /// Build context directory.
    pub context: PathBuf,
}
