//! Shared by the dashboard tests: a store in a temporary directory filled
//! through the `chalk` CLI, and a real `chalk dashboard` process on
//! 127.0.0.1 whose printed URL and token the tests parse.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

pub fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    [target.join("release/chalk"), target.join("debug/chalk")]
        .into_iter()
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("chalk binary not found; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN")
}

/// A store under /var/tmp (the engine uses O_DIRECT, which tmpfs lacks).
pub struct Home {
    pub dir: TempDir,
}

impl Home {
    pub fn new(prefix: &str) -> Home {
        Home { dir: tempfile::Builder::new().prefix(prefix).tempdir_in("/var/tmp").expect("temporary directory under /var/tmp") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(chalk_binary())
            .env("CHALK_HOME", self.path().join("store"))
            .env_remove("CHALK_STORE")
            .args(args)
            .output()
            .expect("failed to run chalk")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "chalk {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Writes `files` (relative path, bytes) under a fresh local directory
    /// and puts its contents at `remote` of `volume` as one version.
    pub fn put_tree(&self, volume: &str, name: &str, files: &[(&str, &[u8])], remote: &str) {
        let local = self.path().join("local").join(name);
        for (path, bytes) in files {
            let file = local.join(path);
            fs::create_dir_all(file.parent().expect("files have a parent")).unwrap();
            fs::write(&file, bytes).unwrap();
        }
        self.ok(&["volume", "put", volume, local.to_str().unwrap(), remote]);
    }

    pub fn versions(&self, volume: &str) -> Vec<serde_json::Value> {
        let text = self.ok(&["volume", "versions", volume, "--all", "--json"]);
        serde_json::from_str::<serde_json::Value>(&text).unwrap().as_array().unwrap().clone()
    }
}

/// A running `chalk dashboard`, killed on drop.
pub struct Dashboard {
    child: Child,
    /// `http://127.0.0.1:PORT` without a trailing slash.
    pub base: String,
    pub token: String,
    pub port: u16,
}

impl Dashboard {
    pub fn start(home: &Home, extra_args: &[&str]) -> Dashboard {
        let mut child = Command::new(chalk_binary())
            .env("CHALK_HOME", home.path().join("store"))
            .env_remove("CHALK_STORE")
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("failed to start chalk dashboard");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("http://") {
                    let _ = sender.send(line);
                }
            }
        });
        let line = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chalk dashboard printed no URL within 30 s");
            }
        };
        let url = line.trim();
        let (base, token) = url.split_once("/?token=").unwrap_or_else(|| panic!("URL without a token: {url}"));
        let port = base.rsplit(':').next().unwrap().parse().unwrap();
        assert!(base.starts_with("http://127.0.0.1:"), "dashboard not on loopback: {base}");
        Dashboard { child, base: base.to_owned(), token: token.to_owned(), port }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    pub fn login_url(&self) -> String {
        format!("{}/?token={}", self.base, self.token)
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(60)).build()
    }

    /// Sends a GET with the token as a bearer header and returns the response, whatever its status.
    pub fn get(&self, path_and_query: &str) -> ureq::Response {
        call(Self::agent().get(&self.url(path_and_query)).set("Authorization", &format!("Bearer {}", self.token)))
    }

    pub fn get_with(&self, path_and_query: &str, headers: &[(&str, &str)]) -> ureq::Response {
        let mut request = Self::agent().get(&self.url(path_and_query)).set("Authorization", &format!("Bearer {}", self.token));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        call(request)
    }

    /// Sends a GET without credentials, with only the given headers.
    pub fn get_bare(&self, path_and_query: &str, headers: &[(&str, &str)]) -> ureq::Response {
        let mut request = Self::agent().get(&self.url(path_and_query));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        call(request)
    }

    pub fn json(&self, path_and_query: &str) -> serde_json::Value {
        let response = self.get(path_and_query);
        let status = response.status();
        let body = response.into_string().unwrap();
        assert_eq!(status, 200, "GET {path_and_query}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn bytes(&self, path_and_query: &str) -> Vec<u8> {
        let response = self.get(path_and_query);
        assert_eq!(response.status(), 200, "GET {path_and_query}");
        read_body(response)
    }

    /// Posts a multipart upload with the bearer token.
    pub fn upload(&self, volume: &str, query: &str, parts: &[Part]) -> ureq::Response {
        let (content_type, body) = multipart(parts);
        let url = self.url(&format!("/api/volumes/{volume}/upload{query}"));
        let request = Self::agent()
            .post(&url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", &content_type);
        send(request, &body)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn call(request: ureq::Request) -> ureq::Response {
    match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(err) => panic!("HTTP request failed: {err}"),
    }
}

pub fn send(request: ureq::Request, body: &[u8]) -> ureq::Response {
    match request.send_bytes(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(err) => panic!("HTTP request failed: {err}"),
    }
}

pub fn read_body(response: ureq::Response) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    bytes
}

/// One part of a multipart body: a text field, or a file with a file name.
pub enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a [u8]),
}

pub fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = "chalk-test-boundary-7d1f0c";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
                body.extend_from_slice(value.as_bytes());
            }
            Part::File(file_name, bytes) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                        .as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Encodes an RGB image as a PNG with one stored (uncompressed) zlib block.
pub fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0);
        for x in 0..width {
            raw.extend_from_slice(&pixel(x, y));
        }
    }
    assert!(raw.len() <= 65_535, "one stored deflate block holds at most 65535 bytes");
    let mut zlib = vec![0x78, 0x01, 0x01];
    zlib.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    zlib.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    zlib.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for byte in &raw {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &header);
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    out
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
