//! Protocol corners a real registry does not show on demand (bearer tokens, 5xx answers,
//! corrupt content, redirects), played by a tiny HTTP/1.1 server on 127.0.0.1.
//! Each server accepts connections for at most 30 s and answers at most 200 requests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_dag::{Digest, Platform};
use strata_registry::{media_types, Client, ClientConfig, Error, Reference};

#[derive(Clone, Debug)]
struct Req {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn resp(status: u16) -> Resp {
    Resp {
        status,
        headers: Vec::new(),
        body: Vec::new(),
    }
}

impl Resp {
    fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    fn body(mut self, b: &[u8]) -> Resp {
        self.body = b.to_vec();
        self
    }
}

type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

struct Server {
    addr: String,
    log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Server {
    fn requests(&self) -> Vec<Req> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

const MAX_REQUESTS: usize = 200;

fn serve(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"))
        .to_string();
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("nonblocking: {e}"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let handler: Arc<Handler> = Arc::new(handler);
    let count = Arc::new(AtomicUsize::new(0));
    {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (log, handler, count) = (log.clone(), handler.clone(), count.clone());
                        std::thread::spawn(move || connection(stream, &*handler, &log, &count));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }
    Server { addr, log, stop }
}

fn connection(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Req>>, count: &AtomicUsize) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req = Req {
            method,
            target,
            headers,
            body,
        };
        if count.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS {
            return;
        }
        let r = handler(&req);
        let head = req.method == "HEAD";
        if let Ok(mut l) = log.lock() {
            l.push(req);
        }
        let mut out = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
            r.status,
            r.body.len()
        );
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head {
            bytes.extend_from_slice(&r.body);
        }
        if writer.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// A one-layer image served by the fake registries.
struct Image {
    manifest: Vec<u8>,
    manifest_digest: Digest,
    config: Vec<u8>,
    config_digest: Digest,
    layer: Vec<u8>,
    layer_digest: Digest,
}

fn image() -> Image {
    let layer = b"not really a tarball, but content is content".to_vec();
    let layer_digest = Digest::of(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    )
    .into_bytes();
    let config_digest = Digest::of(&config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        media_types::OCI_MANIFEST,
        config.len(),
        layer.len()
    )
    .into_bytes();
    let manifest_digest = Digest::of(&manifest);
    Image {
        manifest,
        manifest_digest,
        config,
        config_digest,
        layer,
        layer_digest,
    }
}

/// Serves `img` under repository `team/app`, tag `v1`.
fn serve_image(img: &Image, req: &Req) -> Resp {
    let p = req.path();
    if p == "/v2/team/app/manifests/v1"
        || p == format!("/v2/team/app/manifests/{}", img.manifest_digest)
    {
        return resp(200)
            .header("Content-Type", media_types::OCI_MANIFEST)
            .body(&img.manifest);
    }
    for (d, b) in [
        (&img.config_digest, &img.config),
        (&img.layer_digest, &img.layer),
    ] {
        if p == format!("/v2/team/app/blobs/{d}") {
            return resp(200).body(b);
        }
    }
    resp(404)
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("parse {s}: {e}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn client(dir: &tempfile::TempDir) -> Client {
    Client::new(ClientConfig::default())
        .with_docker_config_dir(dir.path())
        .with_retry_delay(Duration::from_millis(5))
}

fn bearer_registry(require_basic: Option<&'static str>, field: &'static str) -> (Server, Image) {
    let img = image();
    let served = image();
    let addr_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let addr_in = addr_cell.clone();
    let server = serve(move |req| {
        let addr = addr_in.lock().map(|a| a.clone()).unwrap_or_default();
        if req.path() == "/token" {
            if let Some(basic) = require_basic {
                if req.header("authorization") != Some(basic) {
                    return resp(401);
                }
            }
            // `login` asks for a token without scope; pulls must ask for this one.
            if !req.target.contains("service=fake-registry")
                || (req.target.contains("scope=")
                    && !req.target.contains("scope=repository%3Ateam%2Fapp%3Apull"))
            {
                return resp(400);
            }
            return resp(200)
                .header("Content-Type", "application/json")
                .body(format!(r#"{{"{field}":"tok-123","expires_in":300}}"#).as_bytes());
        }
        if req.header("authorization") != Some("Bearer tok-123") {
            return resp(401).header(
                "WWW-Authenticate",
                &format!(
                    r#"Bearer realm="http://{addr}/token",service="fake-registry",scope="repository:team/app:pull""#
                ),
            );
        }
        serve_image(&served, req)
    });
    if let Ok(mut a) = addr_cell.lock() {
        *a = server.addr.clone();
    }
    (server, img)
}

#[test]
fn bearer_token_flow_anonymous() {
    let (server, img) = bearer_registry(None, "token");
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/team/app:v1", server.addr));
    let res = c
        .resolve(&reference, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.manifest_digest, img.manifest_digest);
    assert_eq!(res.config_bytes, img.config);
    let reqs = server.requests();
    let paths: Vec<&str> = reqs.iter().map(Req::path).collect();
    assert_eq!(
        paths,
        vec![
            "/v2/team/app/manifests/v1",
            "/token",
            "/v2/team/app/manifests/v1",
            &format!("/v2/team/app/blobs/{}", img.config_digest),
        ]
    );
    assert_eq!(
        reqs[1].header("authorization"),
        None,
        "anonymous token request"
    );
    assert_eq!(c.request_count(), 4);

    // The token is cached: fetching the layer costs one request.
    let mut out = Vec::new();
    c.fetch_blob(&reference, &img.layer_digest, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, img.layer);
    assert_eq!(c.request_count(), 5);
}

#[test]
fn bearer_token_flow_with_credentials() {
    // "dXNlcjpwYXNz" is base64("user:pass").
    let (server, img) = bearer_registry(Some("Basic dXNlcjpwYXNz"), "access_token");
    let reference = r(&format!("{}/team/app:v1", server.addr));

    let anonymous = tmp();
    match client(&anonymous).resolve(&reference, &Platform::default()) {
        Err(e @ Error::Unauthorized { .. }) => {
            assert!(e.to_string().contains("authentication required"), "{e}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    let dir = tmp();
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"dXNlcjpwYXNz"}}}}}}"#,
            server.addr
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let res = client(&dir)
        .resolve(&reference, &Platform::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.manifest_digest, img.manifest_digest);

    // `login` verifies through the token endpoint.
    let login_dir = tmp();
    match client(&login_dir).login(&server.addr, "user", "bad") {
        Err(Error::LoginFailed { .. }) => {}
        other => panic!("expected LoginFailed, got {other:?}"),
    }
    client(&login_dir)
        .login(&server.addr, "user", "pass")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(client(&login_dir)
        .resolve(&reference, &Platform::default())
        .is_ok());
}

#[test]
fn retries_5xx_and_reopens_the_upload() {
    let content = b"layer bytes to upload".to_vec();
    let digest = Digest::of(&content);
    let posts = Arc::new(AtomicUsize::new(0));
    let puts = Arc::new(AtomicUsize::new(0));
    let (p, q) = (posts.clone(), puts.clone());
    let server = serve(move |req| match (req.method.as_str(), req.path()) {
        ("HEAD", _) => resp(404),
        ("POST", "/v2/team/app/blobs/uploads/") => {
            if p.fetch_add(1, Ordering::Relaxed) == 0 {
                resp(500)
            } else {
                resp(202).header("Location", "/v2/team/app/blobs/uploads/u-1?_state=abc")
            }
        }
        ("PUT", "/v2/team/app/blobs/uploads/u-1") => {
            if q.fetch_add(1, Ordering::Relaxed) == 0 {
                resp(503)
            } else {
                resp(201)
            }
        }
        _ => resp(404),
    });
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/team/app:v1", server.addr));
    let mut opens = 0;
    let uploaded = c
        .push_blob(&reference, &digest, content.len() as u64, &mut || {
            opens += 1;
            Ok(Box::new(std::io::Cursor::new(content.clone())) as Box<dyn Read>)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(uploaded);
    assert_eq!(opens, 2, "the failed PUT's content is reopened");
    assert_eq!(posts.load(Ordering::Relaxed), 3);
    assert_eq!(puts.load(Ordering::Relaxed), 2);
    let reqs = server.requests();
    let last = reqs.last().unwrap_or_else(|| panic!("no requests"));
    assert_eq!(last.method, "PUT");
    assert_eq!(
        last.target,
        format!(
            "/v2/team/app/blobs/uploads/u-1?_state=abc&digest=sha256%3A{}",
            digest.hex()
        )
    );
    assert_eq!(last.body, content);
    assert_eq!(
        last.header("content-length"),
        Some(content.len().to_string().as_str())
    );
    assert_eq!(c.request_count(), 1 + 3 + 2);
}

#[test]
fn persistent_5xx_fails_naming_reference_and_status() {
    let server =
        serve(|_| resp(500).body(br#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#));
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/team/app:v1", server.addr));
    match c.resolve(&reference, &Platform::default()) {
        Err(e @ Error::Http { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&reference.to_string()), "{msg}");
            assert!(msg.contains("HTTP 500"), "{msg}");
            assert!(msg.contains("disk on fire"), "{msg}");
        }
        other => panic!("expected Http, got {other:?}"),
    }
    assert_eq!(c.request_count(), 4);
}

#[test]
fn corrupt_content_is_rejected() {
    let img = image();
    let served = image();
    let server = serve(move |req| {
        let p = req.path();
        if p == format!("/v2/team/app/blobs/{}", served.layer_digest) {
            return resp(200).body(b"tampered");
        }
        if p == format!("/v2/team/app/manifests/{}", served.manifest_digest) {
            return resp(200)
                .header("Content-Type", media_types::OCI_MANIFEST)
                .body(b"{\"schemaVersion\":2}");
        }
        if p == "/v2/team/app/manifests/garbage" {
            return resp(200)
                .header("Content-Type", media_types::OCI_MANIFEST)
                .body(b"{not json");
        }
        if p == "/v2/team/app/manifests/weird-auth" {
            return resp(401).header("WWW-Authenticate", "Bearer realm=\"unterminated, =,");
        }
        serve_image(&served, req)
    });
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/team/app:v1", server.addr));

    let mut out = Vec::new();
    match c.fetch_blob(&reference, &img.layer_digest, &mut out) {
        Err(Error::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, img.layer_digest.to_string());
            assert_eq!(actual, Digest::of(b"tampered").to_string());
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }

    // The same server serves intact blobs, which verify.
    match c.fetch_blob(&reference, &img.config_digest, &mut Vec::new()) {
        Ok(_) => {}
        other => panic!("config blob should verify, got {other:?}"),
    }

    let pinned = r(&format!("{}/team/app@{}", server.addr, img.manifest_digest));
    assert!(matches!(
        c.resolve(&pinned, &Platform::default()),
        Err(Error::DigestMismatch { .. })
    ));
    assert!(matches!(
        c.resolve(
            &r(&format!("{}/team/app:garbage", server.addr)),
            &Platform::default()
        ),
        Err(Error::Json { .. })
    ));
    assert!(matches!(
        c.resolve(
            &r(&format!("{}/team/app:weird-auth", server.addr)),
            &Platform::default()
        ),
        Err(Error::Http { .. } | Error::Unauthorized { .. })
    ));
}

#[test]
fn blob_redirects_are_followed() {
    let img = image();
    let served = image();
    let server = serve(move |req| {
        if req.path() == format!("/v2/team/app/blobs/{}", served.layer_digest) {
            return resp(307).header("Location", "/storage/layer?sig=1");
        }
        if req.path() == "/storage/layer" {
            return resp(200).body(&served.layer);
        }
        serve_image(&served, req)
    });
    let dir = tmp();
    let c = client(&dir);
    let reference = r(&format!("{}/team/app:v1", server.addr));
    let mut out = Vec::new();
    let n = c
        .fetch_blob(&reference, &img.layer_digest, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n as usize, img.layer.len());
    assert_eq!(out, img.layer);
    assert_eq!(server.requests().len(), 2);
}
