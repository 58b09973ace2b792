//! OCI distribution client: the only crate that speaks HTTP.
//!
//! Resolves references (tag -> manifest, index -> the platform's manifest), streams
//! verified blobs, and pushes blobs (skipping those the registry has) and manifests.
//! Auth: `~/.docker/config.json`, basic, and bearer-token challenges. Plain HTTP is used for
//! loopback registries and those configured insecure.

mod auth;
mod reference;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use strata_dag::{Digest, Platform};

pub use auth::{docker_config_dir, parse_challenges, Challenge, Credentials};
pub use reference::{DOCKER_HUB, DOCKER_HUB_API};

/// Manifest media types this client understands.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST
    }

    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs are read into memory; anything larger is not a sane config.
const MAX_CONFIG_BYTES: u64 = 32 << 20;
/// Nested indexes deeper than this are treated as malformed.
const MAX_INDEX_DEPTH: usize = 3;
/// Retries after the first attempt on 5xx/429 answers and connection errors.
const RETRIES: u32 = 3;

/// `registry/repository[:tag][@digest]`, normalised like docker (`busybox` ->
/// `docker.io/library/busybox:latest`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A resolved image: the platform's manifest and its config, as raw bytes and parsed.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest: oci_spec::image::ImageManifest,
    pub config_bytes: Vec<u8>,
    pub config: oci_spec::image::ImageConfiguration,
}

#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    /// Registries (`host:port`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid reference {0:?}")]
    InvalidReference(String),
    #[error("{reference}: not found")]
    NotFound { reference: String },
    #[error(
        "{reference}: authentication required (run `strata login {}`)",
        login_host(.reference)
    )]
    Unauthorized { reference: String },
    #[error("login to {registry}: invalid username or password")]
    LoginFailed { registry: String },
    #[error("{reference}: no manifest for platform {platform}")]
    NoPlatform { reference: String, platform: String },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{action}: {message}")]
    Http { action: String, message: String },
    /// Content that is not what the protocol promises (bad media type, missing field).
    #[error("{action}: {message}")]
    Invalid { action: String, message: String },
    #[error("{action}")]
    Json {
        action: String,
        #[source]
        source: serde_json::Error,
    },
    /// Connection-level failure (refused, reset, TLS, timeout) after retries.
    #[error("{action}")]
    Transport {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses an image config, accepting what the OCI spec allows but `oci_spec` 0.7 rejects:
/// a missing or null `history` (and `rootfs.diff_ids`). Docker schema2 configs parse too;
/// fields oci_spec does not model (`Healthcheck`, `Shell`, `OnBuild`) are only in the raw
/// bytes.
pub fn parse_image_config(
    bytes: &[u8],
) -> Result<oci_spec::image::ImageConfiguration, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(obj) = value.as_object_mut() {
        let history = obj.entry("history").or_insert(serde_json::Value::Null);
        if history.is_null() {
            *history = serde_json::json!([]);
        }
        let rootfs = obj.entry("rootfs").or_insert(serde_json::Value::Null);
        if rootfs.is_null() {
            *rootfs = serde_json::json!({"type": "layers", "diff_ids": []});
        }
        if let Some(r) = rootfs.as_object_mut() {
            let ids = r.entry("diff_ids").or_insert(serde_json::Value::Null);
            if ids.is_null() {
                *ids = serde_json::json!([]);
            }
        }
    }
    serde_json::from_value(value)
}

/// The host part of a reference string, for the `strata login` hint.
fn login_host(reference: &str) -> &str {
    reference.split('/').next().unwrap_or(reference)
}

/// Verifies `user`/`pass` against `registry` and stores them in docker's config file.
pub fn login(registry: &str, user: &str, pass: &str) -> Result<(), Error> {
    Client::new(ClientConfig::default()).login(registry, user, pass)
}

/// Forgets stored credentials for `registry`; returns whether there were any.
pub fn logout(registry: &str) -> Result<bool, Error> {
    Client::new(ClientConfig::default()).logout(registry)
}

/// What a request needs for auth: whose repository, which actions, and extra scopes.
struct Scope {
    /// For error messages.
    what: String,
    registry: String,
    repository: String,
    push: bool,
    extra: Option<String>,
}

impl Scope {
    fn new(reference: &Reference, push: bool) -> Self {
        Scope {
            what: reference.to_string(),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            push,
            extra: None,
        }
    }

    fn own(&self) -> String {
        let actions = if self.push { "pull,push" } else { "pull" };
        format!("repository:{}:{actions}", self.repository)
    }
}

enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    Stream {
        open: &'a mut dyn FnMut() -> std::io::Result<Box<dyn Read>>,
        len: u64,
    },
}

/// Why one upload attempt failed, and whether trying again may help.
enum Failure {
    Retry(Error),
    Fatal(Error),
}

pub struct Client {
    config: ClientConfig,
    agent: ureq::Agent,
    docker_config: Option<PathBuf>,
    retry_delay: Duration,
    requests: AtomicU64,
    /// `Authorization` values by (registry, repository); basic auth under an empty repository.
    auth_cache: Mutex<HashMap<(String, String), String>>,
    credentials: Mutex<HashMap<String, Option<Credentials>>>,
}

impl Client {
    pub fn new(config: ClientConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .redirects(5)
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            config,
            agent,
            docker_config: None,
            retry_delay: Duration::from_millis(200),
            requests: AtomicU64::new(0),
            auth_cache: Mutex::new(HashMap::new()),
            credentials: Mutex::new(HashMap::new()),
        }
    }

    /// Reads and writes credentials in `dir/config.json` instead of `$DOCKER_CONFIG` or
    /// `~/.docker`.
    pub fn with_docker_config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.docker_config = Some(dir.into());
        self
    }

    /// First delay of the exponential retry backoff (doubling each retry; default 200 ms).
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// HTTP requests sent so far, including retries and token fetches (redirect hops that
    /// ureq follows inside one request are not counted separately).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Resolves `reference` to the manifest for `platform` and fetches its config.
    pub fn resolve(&self, reference: &Reference, platform: &Platform) -> Result<Resolved, Error> {
        let (mut bytes, mut media_type, mut digest) = self.fetch_manifest(reference)?;
        let mut depth = 0;
        while media_types::is_index(&media_type) {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(Error::Invalid {
                    action: format!("resolve {reference}"),
                    message: "indexes nested too deeply".into(),
                });
            }
            let chosen = select_platform(reference, &bytes, platform)?;
            (bytes, media_type, digest) =
                self.get_manifest(reference, chosen.as_str(), Some(&chosen))?;
        }
        if !media_types::is_manifest(&media_type) {
            return Err(Error::Invalid {
                action: format!("resolve {reference}"),
                message: format!("unsupported manifest media type {media_type:?}"),
            });
        }
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                action: format!("parse manifest {digest} of {reference}"),
                source,
            })?;
        let config_digest = oci_digest(reference, manifest.config().digest())?;
        let config_bytes = self.fetch_blob_bytes(
            reference,
            &config_digest,
            manifest.config().size(),
            MAX_CONFIG_BYTES,
        )?;
        let config = parse_image_config(&config_bytes).map_err(|source| Error::Json {
            action: format!("parse image config {config_digest} of {reference}"),
            source,
        })?;
        check_config_platform(reference, &config, platform)?;
        Ok(Resolved {
            manifest_digest: digest,
            manifest_media_type: media_type,
            manifest_bytes: bytes,
            manifest,
            config_bytes,
            config,
        })
    }

    /// Fetches the manifest (or index) the reference names, by digest when it has one.
    /// Returns its bytes, media type and sha256 digest, verified against the reference's
    /// digest when pinned.
    pub fn fetch_manifest(
        &self,
        reference: &Reference,
    ) -> Result<(Vec<u8>, String, Digest), Error> {
        self.get_manifest(
            reference,
            &reference.manifest_target(),
            reference.digest.as_ref(),
        )
    }

    fn get_manifest(
        &self,
        reference: &Reference,
        target: &str,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, String, Digest), Error> {
        let shown = match expected {
            Some(d) => reference.with_digest(d.clone()).to_string(),
            None => reference.to_string(),
        };
        let action = format!("fetch manifest {shown}");
        let url = format!(
            "{}/v2/{}/manifests/{target}",
            self.base_url(&reference.registry),
            reference.repository
        );
        let accept = [
            media_types::OCI_MANIFEST,
            media_types::OCI_INDEX,
            media_types::DOCKER_MANIFEST,
            media_types::DOCKER_LIST,
        ]
        .join(", ");
        let resp = self.send(
            &Scope::new(reference, false),
            "GET",
            &url,
            &[("Accept", &accept)],
            &mut Body::Empty,
            RETRIES,
            &action,
        )?;
        match resp.status() {
            200 => {}
            404 => return Err(Error::NotFound { reference: shown }),
            _ => return Err(status_error(&action, resp)),
        }
        let header_type = resp.content_type().to_string();
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Io {
                action: format!("read manifest {shown}"),
                source,
            })?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::Invalid {
                action,
                message: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        // The Docker-Content-Digest header is only a hint: the bytes decide.
        let digest = Digest::of(&bytes);
        if let Some(want) = expected {
            if *want != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {shown}"),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let media_type = manifest_media_type(&header_type, &bytes);
        Ok((bytes, media_type, digest))
    }

    /// Whether the reference's repository has blob `digest`.
    pub fn blob_exists(&self, reference: &Reference, digest: &Digest) -> Result<bool, Error> {
        self.blob_exists_scoped(reference, digest, false)
    }

    fn blob_exists_scoped(
        &self,
        reference: &Reference,
        digest: &Digest,
        push: bool,
    ) -> Result<bool, Error> {
        let action = format!("check blob {digest} in {reference}");
        let url = self.blob_url(reference, digest);
        let resp = self.send(
            &Scope::new(reference, push),
            "HEAD",
            &url,
            &[],
            &mut Body::Empty,
            RETRIES,
            &action,
        )?;
        match resp.status() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error(&action, resp)),
        }
    }

    /// Streams blob `digest` of `reference`'s repository into `out`, verifying its digest
    /// (and size when given). Returns the byte count.
    pub fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        out: &mut dyn Write,
    ) -> Result<u64, Error> {
        let action = format!("fetch blob {digest} of {reference}");
        let url = self.blob_url(reference, digest);
        let resp = self.send(
            &Scope::new(reference, false),
            "GET",
            &url,
            &[],
            &mut Body::Empty,
            RETRIES,
            &action,
        )?;
        match resp.status() {
            200 => {}
            404 => {
                return Err(Error::NotFound {
                    reference: reference.with_digest(digest.clone()).to_string(),
                })
            }
            _ => return Err(status_error(&action, resp)),
        }
        let mut reader = resp.into_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        action: format!("read blob {digest} of {reference}"),
                        source,
                    })
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|source| Error::Io {
                action: format!("write blob {digest} of {reference}"),
                source,
            })?;
            total += n as u64;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest.as_str() {
            return Err(Error::DigestMismatch {
                what: format!("blob of {reference}"),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(total)
    }

    /// Fetches a small blob into memory, checking its size against the descriptor.
    fn fetch_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        max: u64,
    ) -> Result<Vec<u8>, Error> {
        if size > max {
            return Err(Error::Invalid {
                action: format!("fetch blob {digest} of {reference}"),
                message: format!("size {size} exceeds the {max}-byte limit"),
            });
        }
        let mut out = LimitedVec {
            buf: Vec::with_capacity(usize::try_from(size).unwrap_or(0)),
            max,
        };
        self.fetch_blob(reference, digest, &mut out)?;
        if out.buf.len() as u64 != size {
            return Err(Error::Invalid {
                action: format!("fetch blob {digest} of {reference}"),
                message: format!("expected {size} bytes, got {}", out.buf.len()),
            });
        }
        Ok(out.buf)
    }

    /// Uploads a blob unless the repository has it already. `open` is called for each
    /// upload attempt. Returns whether bytes were uploaded.
    pub fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        open: &mut dyn FnMut() -> std::io::Result<Box<dyn Read>>,
    ) -> Result<bool, Error> {
        if self.blob_exists_scoped(reference, digest, true)? {
            return Ok(false);
        }
        let mut attempt = 0;
        loop {
            match self.upload_once(reference, digest, size, open) {
                Ok(()) => return Ok(true),
                Err(Failure::Retry(_)) if attempt < RETRIES => {
                    self.backoff(attempt);
                    attempt += 1;
                }
                Err(Failure::Retry(e) | Failure::Fatal(e)) => return Err(e),
            }
        }
    }

    /// One monolithic upload: POST to start a session, PUT the bytes to its location.
    fn upload_once(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        open: &mut dyn FnMut() -> std::io::Result<Box<dyn Read>>,
    ) -> Result<(), Failure> {
        let scope = Scope::new(reference, true);
        let action = format!("start upload of blob {digest} to {reference}");
        let start_url = format!(
            "{}/v2/{}/blobs/uploads/",
            self.base_url(&reference.registry),
            reference.repository
        );
        let resp = self
            .send(
                &scope,
                "POST",
                &start_url,
                &[],
                &mut Body::Bytes(&[]),
                0,
                &action,
            )
            .map_err(classify)?;
        if resp.status() != 202 {
            return Err(classify_status(&action, resp));
        }
        let location = resp
            .header("Location")
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                Failure::Fatal(Error::Http {
                    action: action.clone(),
                    message: "HTTP 202 without a Location header".into(),
                })
            })?;
        let mut put_url = self.resolve_location(&reference.registry, &start_url, location);
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str("digest=");
        put_url.push_str(&digest.as_str().replace(':', "%3A"));

        let action = format!("upload blob {digest} to {reference}");
        let resp = self
            .send(
                &scope,
                "PUT",
                &put_url,
                &[("Content-Type", "application/octet-stream")],
                &mut Body::Stream { open, len: size },
                0,
                &action,
            )
            .map_err(classify)?;
        if !(200..300).contains(&resp.status()) {
            return Err(classify_status(&action, resp));
        }
        drain(resp);
        Ok(())
    }

    /// Asks the registry to link blob `digest` from `from_repository` (same registry) into
    /// the reference's repository without uploading. Returns false when the registry did
    /// not mount it (it then opened an upload session, which is left to expire).
    pub fn mount_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        from_repository: &str,
    ) -> Result<bool, Error> {
        let action = format!("mount blob {digest} from {from_repository} into {reference}");
        let mut scope = Scope::new(reference, true);
        scope.extra = Some(format!("repository:{from_repository}:pull"));
        let url = format!(
            "{}/v2/{}/blobs/uploads/?mount={}&from={}",
            self.base_url(&reference.registry),
            reference.repository,
            digest.as_str().replace(':', "%3A"),
            from_repository.replace('/', "%2F"),
        );
        let resp = self.send(
            &scope,
            "POST",
            &url,
            &[],
            &mut Body::Bytes(&[]),
            RETRIES,
            &action,
        )?;
        match resp.status() {
            201 => {
                drain(resp);
                Ok(true)
            }
            202 => {
                drain(resp);
                Ok(false)
            }
            _ => Err(status_error(&action, resp)),
        }
    }

    /// Puts a manifest under the reference's tag (or its digest) and returns its digest.
    pub fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, Error> {
        let digest = Digest::of(bytes);
        if let Some(want) = &reference.digest {
            if *want != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest pushed as {reference}"),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let target = match &reference.tag {
            Some(t) => t.clone(),
            None => digest.to_string(),
        };
        let action = format!("push manifest {reference}");
        let url = format!(
            "{}/v2/{}/manifests/{target}",
            self.base_url(&reference.registry),
            reference.repository
        );
        let resp = self.send(
            &Scope::new(reference, true),
            "PUT",
            &url,
            &[("Content-Type", media_type)],
            &mut Body::Bytes(bytes),
            RETRIES,
            &action,
        )?;
        if !(200..300).contains(&resp.status()) {
            return Err(status_error(&action, resp));
        }
        drain(resp);
        Ok(digest)
    }

    /// Verifies `user`/`pass` against `registry`'s `/v2/` endpoint (basic or bearer
    /// challenge) and stores them in docker's config file.
    pub fn login(&self, registry: &str, user: &str, pass: &str) -> Result<(), Error> {
        let registry = auth::normalise_registry(registry);
        let creds = Credentials {
            username: user.to_string(),
            password: pass.to_string(),
        };
        let action = format!("log in to {registry}");
        let url = format!("{}/v2/", self.base_url(&registry));
        let resp = self.execute(&|| self.agent.get(&url), &mut Body::Empty, RETRIES, &action)?;
        match resp.status() {
            200 => drain(resp),
            401 => {
                let challenges = challenges_of(&resp);
                drain(resp);
                if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
                    self.fetch_token(bearer, &[], Some(&creds), &registry)
                        .map_err(|e| match e {
                            Error::Unauthorized { .. } => Error::LoginFailed {
                                registry: registry.clone(),
                            },
                            e => e,
                        })?;
                } else if challenges.iter().any(|c| c.scheme == "basic") {
                    let header = creds.basic_header();
                    let resp = self.execute(
                        &|| self.agent.get(&url).set("Authorization", &header),
                        &mut Body::Empty,
                        RETRIES,
                        &action,
                    )?;
                    match resp.status() {
                        200 => drain(resp),
                        401 | 403 => return Err(Error::LoginFailed { registry }),
                        _ => return Err(status_error(&action, resp)),
                    }
                } else {
                    return Err(Error::Http {
                        action,
                        message: "HTTP 401 without a supported WWW-Authenticate challenge".into(),
                    });
                }
            }
            _ => return Err(status_error(&action, resp)),
        }
        let dir = self.config_dir().ok_or_else(|| Error::Invalid {
            action: format!("store credentials for {registry}"),
            message: "no docker config directory (neither DOCKER_CONFIG nor HOME is set)".into(),
        })?;
        auth::store_credentials(&dir, &registry, user, pass)?;
        self.forget(&registry);
        Ok(())
    }

    /// Removes `registry`'s credentials from docker's config file; returns whether there
    /// were any.
    pub fn logout(&self, registry: &str) -> Result<bool, Error> {
        let registry = auth::normalise_registry(registry);
        self.forget(&registry);
        match self.config_dir() {
            Some(dir) => auth::remove_credentials(&dir, &registry),
            None => Ok(false),
        }
    }

    fn forget(&self, registry: &str) {
        lock(&self.credentials).remove(registry);
        lock(&self.auth_cache).retain(|(r, _), _| r != registry);
    }

    fn config_dir(&self) -> Option<PathBuf> {
        self.docker_config.clone().or_else(docker_config_dir)
    }

    fn lookup_credentials(&self, registry: &str) -> Result<Option<Credentials>, Error> {
        if let Some(c) = lock(&self.credentials).get(registry) {
            return Ok(c.clone());
        }
        let found = match self.config_dir() {
            Some(dir) => auth::lookup_credentials(&dir, registry)?,
            None => None,
        };
        lock(&self.credentials).insert(registry.to_string(), found.clone());
        Ok(found)
    }

    fn base_url(&self, registry: &str) -> String {
        let (host, _) = reference::split_host_port(registry);
        let plain = reference::is_loopback(registry)
            || self
                .config
                .insecure
                .iter()
                .any(|i| i == registry || i == host);
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}", reference::api_host(registry))
    }

    fn blob_url(&self, reference: &Reference, digest: &Digest) -> String {
        format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url(&reference.registry),
            reference.repository
        )
    }

    /// Upload locations may be absolute, host-relative or (rarely) relative to the POST URL.
    fn resolve_location(&self, registry: &str, start_url: &str, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base_url(registry))
        } else {
            format!("{start_url}{location}")
        }
    }

    fn backoff(&self, attempt: u32) {
        std::thread::sleep(self.retry_delay.saturating_mul(1 << attempt.min(8)));
    }

    /// Sends a request with the cached `Authorization`, answering one 401 by authenticating
    /// per its challenge and trying again. Returns any other answer for the caller to judge.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        scope: &Scope,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &mut Body<'_>,
        retries: u32,
        action: &str,
    ) -> Result<ureq::Response, Error> {
        let mut authenticated = false;
        loop {
            let auth = self.cached_auth(scope);
            let build = || {
                let mut req = self.agent.request(method, url);
                for (k, v) in headers {
                    req = req.set(k, v);
                }
                if let Some(a) = &auth {
                    req = req.set("Authorization", a);
                }
                req
            };
            let resp = self.execute(&build, body, retries, action)?;
            if resp.status() != 401 {
                return Ok(resp);
            }
            let challenges = challenges_of(&resp);
            drain(resp);
            if authenticated {
                return Err(Error::Unauthorized {
                    reference: scope.what.clone(),
                });
            }
            authenticated = true;
            self.authenticate(scope, &challenges, auth.as_deref())?;
        }
    }

    /// Sends one request, retrying connection errors and 5xx/429 answers with backoff.
    fn execute(
        &self,
        build: &dyn Fn() -> ureq::Request,
        body: &mut Body<'_>,
        retries: u32,
        action: &str,
    ) -> Result<ureq::Response, Error> {
        let mut attempt = 0;
        loop {
            let req = build();
            let result = match body {
                Body::Empty => {
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    req.call()
                }
                Body::Bytes(b) => {
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    req.send_bytes(b)
                }
                Body::Stream { open, len } => {
                    let reader = open().map_err(|source| Error::Io {
                        action: format!("{action}: open content"),
                        source,
                    })?;
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    req.set("Content-Length", &len.to_string()).send(reader)
                }
            };
            match result {
                Ok(resp) | Err(ureq::Error::Status(_, resp)) => {
                    let s = resp.status();
                    if !(s >= 500 || s == 429) || attempt >= retries {
                        return Ok(resp);
                    }
                    drain(resp);
                }
                Err(ureq::Error::Transport(t)) => {
                    if attempt >= retries {
                        return Err(Error::Transport {
                            action: action.to_string(),
                            source: Box::new(t),
                        });
                    }
                }
            }
            self.backoff(attempt);
            attempt += 1;
        }
    }

    fn cached_auth(&self, scope: &Scope) -> Option<String> {
        let cache = lock(&self.auth_cache);
        cache
            .get(&(scope.registry.clone(), scope.repository.clone()))
            .or_else(|| cache.get(&(scope.registry.clone(), String::new())))
            .cloned()
    }

    fn authenticate(
        &self,
        scope: &Scope,
        challenges: &[Challenge],
        sent: Option<&str>,
    ) -> Result<(), Error> {
        let creds = self.lookup_credentials(&scope.registry)?;
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let mut scopes: Vec<String> = bearer
                .param("scope")
                .map(|s| s.split(' ').map(String::from).collect())
                .unwrap_or_default();
            for s in std::iter::once(scope.own()).chain(scope.extra.clone()) {
                if !scopes.contains(&s) {
                    scopes.push(s);
                }
            }
            let token = self.fetch_token(bearer, &scopes, creds.as_ref(), &scope.what)?;
            lock(&self.auth_cache).insert(
                (scope.registry.clone(), scope.repository.clone()),
                format!("Bearer {token}"),
            );
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let unauthorized = || Error::Unauthorized {
                reference: scope.what.clone(),
            };
            let header = creds.ok_or_else(unauthorized)?.basic_header();
            if sent == Some(header.as_str()) {
                return Err(unauthorized());
            }
            lock(&self.auth_cache).insert((scope.registry.clone(), String::new()), header);
            return Ok(());
        }
        Err(Error::Unauthorized {
            reference: scope.what.clone(),
        })
    }

    /// Gets a bearer token from the challenge's realm, sending basic credentials when known.
    fn fetch_token(
        &self,
        challenge: &Challenge,
        scopes: &[String],
        creds: Option<&Credentials>,
        what: &str,
    ) -> Result<String, Error> {
        let action = format!("get token for {what}");
        let realm = challenge
            .param("realm")
            .filter(|r| r.starts_with("http://") || r.starts_with("https://"))
            .ok_or_else(|| Error::Http {
                action: action.clone(),
                message: "bearer challenge without an http(s) realm".into(),
            })?;
        let basic = creds.map(Credentials::basic_header);
        let build = || {
            let mut req = self.agent.get(realm);
            if let Some(service) = challenge.param("service") {
                req = req.query("service", service);
            }
            for s in scopes {
                req = req.query("scope", s);
            }
            if let (Some(b), Some(c)) = (&basic, creds) {
                req = req.query("account", &c.username).set("Authorization", b);
            }
            req
        };
        let resp = self.execute(&build, &mut Body::Empty, RETRIES, &action)?;
        match resp.status() {
            200 => {}
            401 | 403 => {
                drain(resp);
                return Err(Error::Unauthorized {
                    reference: what.to_string(),
                });
            }
            _ => return Err(status_error(&action, resp)),
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Io {
                action: action.clone(),
                source,
            })?;
        let parsed: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                action: action.clone(),
                source,
            })?;
        parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| Error::Invalid {
                action,
                message: "token response has neither token nor access_token".into(),
            })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves only cache entries behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn challenges_of(resp: &ureq::Response) -> Vec<Challenge> {
    resp.all("www-authenticate")
        .into_iter()
        .flat_map(parse_challenges)
        .collect()
}

/// Reads what is left of a response so its connection can be reused.
fn drain(resp: ureq::Response) {
    let _ = std::io::copy(&mut resp.into_reader().take(1 << 20), &mut std::io::sink());
}

/// An error naming the action, the HTTP status and the registry's error codes.
fn status_error(action: &str, resp: ureq::Response) -> Error {
    let status = resp.status();
    let text = resp.status_text().to_string();
    let mut body = Vec::new();
    let _ = resp.into_reader().take(8192).read_to_end(&mut body);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body)
            .chars()
            .take(200)
            .collect::<String>()
            .trim()
            .to_string(),
    };
    let message = if detail.is_empty() {
        format!("HTTP {status} {text}")
    } else {
        format!("HTTP {status} {text}: {detail}")
    };
    Error::Http {
        action: action.to_string(),
        message,
    }
}

fn classify(e: Error) -> Failure {
    match e {
        Error::Transport { .. } => Failure::Retry(e),
        e => Failure::Fatal(e),
    }
}

fn classify_status(action: &str, resp: ureq::Response) -> Failure {
    let s = resp.status();
    let e = status_error(action, resp);
    if s >= 500 || s == 429 {
        Failure::Retry(e)
    } else {
        Failure::Fatal(e)
    }
}

/// The manifest's media type: the Content-Type when it is specific, else the body's
/// `mediaType`, else guessed from its shape.
fn manifest_media_type(header: &str, bytes: &[u8]) -> String {
    let header = header.trim();
    if !header.is_empty()
        && header != "application/json"
        && header != "text/plain"
        && header != "application/octet-stream"
    {
        return header.to_string();
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) if !m.is_empty() => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => media_types::OCI_INDEX.to_string(),
        _ => media_types::OCI_MANIFEST.to_string(),
    }
}

fn oci_digest(reference: &Reference, d: &oci_spec::image::Digest) -> Result<Digest, Error> {
    let s = d.to_string();
    Digest::parse(&s).ok_or_else(|| Error::Invalid {
        action: format!("resolve {reference}"),
        message: format!("unsupported digest {s:?} (only sha256 is supported)"),
    })
}

fn platform_string(p: &Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

fn normalise_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

/// The variant a platform implies when none is written (containerd's normalisation).
fn normalise_variant(arch: &str, variant: Option<&str>) -> Option<String> {
    let variant = variant.filter(|v| !v.is_empty());
    match (arch, variant) {
        ("arm64", None | Some("8")) => Some("v8".into()),
        ("arm", None | Some("7")) => Some("v7".into()),
        ("amd64", Some("v1")) => None,
        (_, v) => v.map(String::from),
    }
}

/// Picks the index entry whose platform matches `want`.
fn select_platform(reference: &Reference, bytes: &[u8], want: &Platform) -> Result<Digest, Error> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        #[serde(default)]
        platform: Option<EntryPlatform>,
    }
    #[derive(serde::Deserialize)]
    struct EntryPlatform {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        variant: Option<String>,
    }
    let index: Index = serde_json::from_slice(bytes).map_err(|source| Error::Json {
        action: format!("parse index of {reference}"),
        source,
    })?;
    let want_arch = normalise_arch(&want.architecture);
    let want_variant = normalise_variant(want_arch, want.variant.as_deref());
    let chosen = index.manifests.iter().find(|e| {
        e.platform.as_ref().is_some_and(|p| {
            let arch = normalise_arch(&p.architecture);
            p.os == want.os
                && arch == want_arch
                && normalise_variant(arch, p.variant.as_deref()) == want_variant
        })
    });
    let Some(entry) = chosen else {
        return Err(Error::NoPlatform {
            reference: reference.to_string(),
            platform: platform_string(want),
        });
    };
    Digest::parse(&entry.digest).ok_or_else(|| Error::Invalid {
        action: format!("resolve {reference}"),
        message: format!("index entry has unsupported digest {:?}", entry.digest),
    })
}

/// A single-platform image must be for the wanted OS and architecture.
fn check_config_platform(
    reference: &Reference,
    config: &oci_spec::image::ImageConfiguration,
    want: &Platform,
) -> Result<(), Error> {
    let os = config.os().to_string();
    let arch = config.architecture().to_string();
    let os_ok = os.is_empty() || os == want.os;
    let arch_ok = arch.is_empty() || normalise_arch(&arch) == normalise_arch(&want.architecture);
    if os_ok && arch_ok {
        Ok(())
    } else {
        Err(Error::NoPlatform {
            reference: reference.to_string(),
            platform: format!("{} (image is {os}/{arch})", platform_string(want)),
        })
    }
}

/// A `Vec` writer that refuses to grow past `max` bytes.
struct LimitedVec {
    buf: Vec<u8>,
    max: u64,
}

impl Write for LimitedVec {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if (self.buf.len() + data.len()) as u64 > self.max {
            return Err(std::io::Error::other(format!(
                "content exceeds the {}-byte limit",
                self.max
            )));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Client>();
        assert_send_sync::<Error>();
    }

    #[test]
    fn unauthorized_message_suggests_login() {
        let e = Error::Unauthorized {
            reference: "127.0.0.1:5001/busybox:latest".into(),
        };
        assert_eq!(
            e.to_string(),
            "127.0.0.1:5001/busybox:latest: authentication required (run `strata login 127.0.0.1:5001`)"
        );
    }

    #[test]
    fn platform_selection() {
        let index = br#"{"manifests":[
            {"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"arm","variant":"v6"}},
            {"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","platform":{"os":"unknown","architecture":"unknown"}},
            {"digest":"sha256:4444444444444444444444444444444444444444444444444444444444444444","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:5555555555555555555555555555555555555555555555555555555555555555","platform":{"os":"linux","architecture":"arm","variant":"v7"}}
        ]}"#;
        let r = Reference::parse("x").unwrap_or_else(|e| panic!("{e}"));
        let pick = |arch: &str, variant: Option<&str>| {
            let p = Platform {
                os: "linux".into(),
                architecture: arch.into(),
                variant: variant.map(String::from),
            };
            select_platform(&r, index, &p).map(|d| d.hex()[..1].to_string())
        };
        assert_eq!(pick("amd64", None).ok().as_deref(), Some("4"));
        assert_eq!(pick("arm64", None).ok().as_deref(), Some("2"));
        assert_eq!(pick("arm", None).ok().as_deref(), Some("5"));
        assert_eq!(pick("arm", Some("v6")).ok().as_deref(), Some("1"));
        assert!(matches!(
            pick("s390x", None),
            Err(Error::NoPlatform { platform, .. }) if platform == "linux/s390x"
        ));
        assert!(matches!(
            select_platform(&r, b"{not json", &Platform::default()),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn lenient_config_parsing() {
        let c = parse_image_config(
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":null}}"#,
        );
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        assert!(c.history().is_empty());
        assert!(c.rootfs().diff_ids().is_empty());
        // Docker's Go-map fields and nulls.
        let c = parse_image_config(
            br#"{"architecture":"amd64","os":"linux","config":{"ExposedPorts":{"80/tcp":{}},"Volumes":null,"Env":null,"Healthcheck":{"Test":["NONE"]}},"rootfs":{"type":"layers","diff_ids":[]},"history":null,"container_config":{}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let cfg = c.config().clone().unwrap_or_default();
        assert_eq!(
            cfg.exposed_ports().clone(),
            Some(vec!["80/tcp".to_string()])
        );
        assert!(parse_image_config(b"[1,2]").is_err());
        assert!(
            parse_image_config(br#"{"os":"linux"}"#).is_err(),
            "architecture is required"
        );
    }

    #[test]
    fn media_type_detection() {
        assert_eq!(
            manifest_media_type(media_types::DOCKER_LIST, b"{}"),
            media_types::DOCKER_LIST
        );
        assert_eq!(
            manifest_media_type(
                "application/json",
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            media_types::DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type("", br#"{"manifests":[]}"#),
            media_types::OCI_INDEX
        );
        assert_eq!(
            manifest_media_type("", b"garbage"),
            media_types::OCI_MANIFEST
        );
    }

    #[test]
    fn upload_locations() {
        let c = Client::new(ClientConfig {
            insecure: vec!["reg.internal:5000".into()],
        });
        let start = "http://reg.internal:5000/v2/a/blobs/uploads/";
        assert_eq!(
            c.resolve_location(
                "reg.internal:5000",
                start,
                "/v2/a/blobs/uploads/u1?_state=x"
            ),
            "http://reg.internal:5000/v2/a/blobs/uploads/u1?_state=x"
        );
        assert_eq!(
            c.resolve_location("reg.internal:5000", start, "https://cdn.example/u"),
            "https://cdn.example/u"
        );
        assert_eq!(
            c.resolve_location("reg.internal:5000", start, "u2"),
            "http://reg.internal:5000/v2/a/blobs/uploads/u2"
        );
        assert_eq!(c.base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(c.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base_url("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(c.base_url("ghcr.io"), "https://ghcr.io");
    }
}
