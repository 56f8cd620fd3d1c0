//! HTTP-level tests of `chalk dashboard`: a real dashboard process on
//! 127.0.0.1, a store filled through the CLI, and a plain HTTP client.

#[path = "support/dashboard.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use serde_json::Value;
use support::{png, pseudo_random_bytes, read_body, send, Dashboard, Home, Part};

const CSV: &[u8] = b"name,count\nalpha,1\n\"beta, quoted\",2\n";
const JSON_DOC: &[u8] = br#"[{"id": 1, "tags": ["a"]}, {"id": 2, "note": "x"}]"#;
const HTML_FILE: &[u8] = b"<html><script>alert(1)</script></html>";

/// Creates a volume `vol` with text, CSV, JSON, binary, image and HTML files.
fn sample_store() -> (Home, Vec<u8>, Vec<u8>) {
    let home = Home::new("chalk-dash-http-");
    home.ok(&["volume", "create", "vol"]);
    let image = png(8, 8, |x, y| [(x * 30) as u8, (y * 30) as u8, 128]);
    let blob = pseudo_random_bytes(100_000, 7);
    home.put_tree(
        "vol",
        "first",
        &[
            ("data/hello.txt", b"hello\nworld\n"),
            ("data/table.csv", CSV),
            ("data/doc.json", JSON_DOC),
            ("data/nested/deep.txt", b"deep\n"),
            ("blob.bin", &blob),
            ("image.png", &image),
            ("page.html", HTML_FILE),
        ],
        "/",
    );
    (home, image, blob)
}

fn status_and_json(response: ureq::Response) -> (u16, Value) {
    let status = response.status();
    let body = response.into_string().unwrap();
    let value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({status}): {body}"));
    (status, value)
}

fn error_message(value: &Value) -> String {
    value["error"].as_str().unwrap_or_else(|| panic!("no error message in {value}")).to_owned()
}

#[test]
fn token_is_required_everywhere() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let paths = [
        "/",
        "/assets/app.js",
        "/assets/app.css",
        "/metrics",
        "/api/volumes",
        "/api/volumes/vol/lineages",
        "/api/volumes/vol/versions",
        "/api/volumes/vol/tree",
        "/api/volumes/vol/preview?path=data/hello.txt",
        "/api/volumes/vol/raw?path=image.png",
        "/api/volumes/vol/download?path=blob.bin",
        "/api/volumes/vol/diff?a=x&b=y",
        "/api/volumes/vol/diff/text?a=x&b=y&path=a",
        "/no/such/page",
    ];
    let wrong = "0".repeat(64);
    for path in paths {
        let missing = dashboard.get_bare(path, &[]);
        assert_eq!(missing.status(), 401, "{path} without a token");
        let body = missing.into_string().unwrap();
        assert!(body.contains("token"), "{path}: 401 body does not explain the token: {body}");

        let bearer = dashboard.get_bare(path, &[("Authorization", &format!("Bearer {wrong}"))]);
        assert_eq!(bearer.status(), 403, "{path} with a wrong bearer token");

        let cookie = dashboard.get_bare(path, &[("Cookie", &format!("chalk_dashboard_{}={wrong}", dashboard.port))]);
        assert_eq!(cookie.status(), 403, "{path} with a wrong cookie");

        let separator = if path.contains('?') { '&' } else { '?' };
        let query = dashboard.get_bare(&format!("{path}{separator}token={wrong}"), &[]);
        assert_eq!(query.status(), 403, "{path} with a wrong query token");
    }
    // A browser without the token gets the log-in page.
    let page = dashboard.get_bare("/", &[("Accept", "text/html")]);
    assert_eq!(page.status(), 401);
    assert!(page.into_string().unwrap().contains("name=\"token\""));

    let upload = ureq::AgentBuilder::new().build().post(&dashboard.url("/api/volumes/vol/upload"));
    let (content_type, body) = support::multipart(&[Part::File("x.txt", b"x")]);
    let response = send(upload.set("Content-Type", &content_type), &body);
    assert_eq!(response.status(), 401, "upload without a token");
    assert_eq!(home.versions("vol").len(), 2, "a rejected upload created a version");
}

#[test]
fn query_token_sets_cookie_and_redirects() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let response = dashboard.get_bare(&format!("/?x=1&token={}", dashboard.token), &[]);
    assert_eq!(response.status(), 303);
    assert_eq!(response.header("location"), Some("/?x=1"), "the redirect must drop the token and keep the rest");
    let cookie = response.header("set-cookie").expect("a cookie").to_owned();
    let cookie_name = format!("chalk_dashboard_{}", dashboard.port);
    assert!(cookie.starts_with(&format!("{cookie_name}={};", dashboard.token)), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");

    let page = dashboard.get_bare("/", &[("Cookie", &format!("other=1; {cookie_name}={}", dashboard.token))]);
    assert_eq!(page.status(), 200);
    let csp = page.header("content-security-policy").expect("CSP header").to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    let html = page.into_string().unwrap();
    assert!(html.contains("/assets/app.js"));

    // An API request with ?token= gets its response directly, with the cookie.
    let api = dashboard.get_bare(&format!("/api/volumes?token={}", dashboard.token), &[]);
    assert_eq!(api.status(), 200);
    assert!(api.header("set-cookie").is_some());
}

#[test]
fn upload_from_other_origin_is_rejected() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let before = home.versions("vol").len();
    let cookie = format!("chalk_dashboard_{}={}", dashboard.port, dashboard.token);
    let (content_type, body) = support::multipart(&[Part::Text("path", "csrf.txt"), Part::File("csrf.txt", b"x")]);
    let post = |origin: &str| {
        let request = ureq::post(&dashboard.url("/api/volumes/vol/upload"))
            .set("Cookie", &cookie)
            .set("Content-Type", &content_type)
            .set("Origin", origin);
        send(request, &body)
    };
    // Another port of 127.0.0.1 is the same site, so the browser sends the SameSite=Strict cookie.
    for origin in ["http://127.0.0.1:1", "http://localhost", "null"] {
        let (status, body) = status_and_json(post(origin));
        assert_eq!(status, 403, "{origin}: {body}");
        assert!(error_message(&body).contains(origin), "{origin}: {body}");
    }
    assert_eq!(home.versions("vol").len(), before, "a cross-origin upload created a version");

    // The dashboard's own page sends its own origin.
    let (status, body) = status_and_json(post(&dashboard.base));
    assert_eq!(status, 200, "{body}");
    assert_eq!(home.versions("vol").len(), before + 1);
}

#[test]
fn api_rejections_are_json() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);

    let (status, body) = status_and_json(dashboard.get("/api/volumes/vol/diff?b=x"));
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("missing field `a`"), "{body}");

    let request = ureq::post(&dashboard.url("/api/volumes/vol/upload"))
        .set("Authorization", &format!("Bearer {}", dashboard.token))
        .set("Content-Type", "text/plain");
    let (status, body) = status_and_json(send(request, b"not multipart"));
    assert!((400..500).contains(&status), "{status}: {body}");
    assert!(error_message(&body).contains("multipart"), "{body}");

    let request = ureq::delete(&dashboard.url("/api/volumes/vol/tree")).set("Authorization", &format!("Bearer {}", dashboard.token));
    let response = send(request, b"");
    assert_eq!(response.header("allow").map(str::to_owned).as_deref().map(|v| v.contains("GET")), Some(true));
    let (status, body) = status_and_json(response);
    assert_eq!(status, 405, "{body}");
    assert!(error_message(&body).contains("DELETE is not allowed"), "{body}");

    // A 416 of a download stays a plain-text body next to its Content-Range.
    let response = dashboard.get_with("/api/volumes/vol/download?path=blob.bin", &[("Range", "bytes=999999-")]);
    assert_eq!(response.status(), 416);
    assert!(response.header("content-range").is_some());
}

#[test]
fn concurrent_uploads_all_publish() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let before = home.versions("vol").len();
    let data = pseudo_random_bytes(8 << 20, 3);
    let results: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let uploads: Vec<_> = (0..4)
            .map(|i| {
                let (dashboard, data) = (&dashboard, &data);
                scope.spawn(move || {
                    // Into an existing folder: uploads that each created a new folder would conflict.
                    let path = format!("data/parallel-{i}.bin");
                    status_and_json(dashboard.upload("vol", "", &[Part::Text("path", &path), Part::File("x.bin", data)]))
                })
            })
            .collect();
        uploads.into_iter().map(|upload| upload.join().unwrap()).collect()
    });
    for (status, body) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(home.versions("vol").len(), before + 4);
    let tree = dashboard.json("/api/volumes/vol/tree?path=data");
    let names: Vec<&str> = tree["entries"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    for i in 0..4 {
        assert!(names.contains(&format!("parallel-{i}.bin").as_str()), "{names:?}");
    }
}

#[test]
fn volumes_tree_and_previews() {
    let (home, _, blob) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);

    let volumes = dashboard.json("/api/volumes");
    let list = volumes["volumes"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "vol");
    assert_eq!(list[0]["files"], 7);
    let total = 12 + CSV.len() + JSON_DOC.len() + 5 + blob.len() + HTML_FILE.len() + png(8, 8, |_, _| [0; 3]).len();
    assert_eq!(list[0]["bytes"], total as u64);
    let head = list[0]["latest_version"]["id"].as_str().unwrap().to_owned();

    let root = dashboard.json("/api/volumes/vol/tree");
    assert_eq!(root["version"]["id"], head.as_str());
    assert_eq!(root["type"], "dir");
    let names: Vec<&str> = root["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["blob.bin", "data", "image.png", "page.html"]);
    let blob_entry = &root["entries"][0];
    assert_eq!(blob_entry["size"], 100_000);
    assert_eq!(blob_entry["type"], "file");
    assert!(blob_entry["mtime"].as_str().unwrap().ends_with('Z'));

    let data = dashboard.json("/api/volumes/vol/tree?path=/data/");
    assert_eq!(data["path"], "data");
    let paths: Vec<&str> = data["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["data/doc.json", "data/hello.txt", "data/nested", "data/table.csv"]);

    let text = dashboard.json("/api/volumes/vol/preview?path=data/hello.txt");
    assert_eq!(text["kind"], "text");
    assert_eq!(text["text"], "hello\nworld\n");
    assert_eq!(text["truncated"], false);

    let csv = dashboard.json("/api/volumes/vol/preview?path=data/table.csv");
    assert_eq!(csv["kind"], "table");
    assert_eq!(csv["columns"], serde_json::json!(["name", "count"]));
    assert_eq!(csv["rows"], serde_json::json!([["alpha", "1"], ["beta, quoted", "2"]]));

    let json = dashboard.json("/api/volumes/vol/preview?path=data/doc.json");
    assert_eq!(json["kind"], "table");
    assert_eq!(json["columns"], serde_json::json!(["id", "tags", "note"]));
    assert_eq!(json["rows"][0], serde_json::json!([1, "[\"a\"]", null]));

    let binary = dashboard.json("/api/volumes/vol/preview?path=blob.bin");
    assert_eq!(binary["kind"], "binary");
    assert_eq!(binary["truncated"], false);
    let first_row = binary["hex"].as_str().unwrap().lines().next().unwrap().to_owned();
    assert!(first_row.starts_with(&format!("00000000  {:02x} {:02x}", blob[0], blob[1])), "{first_row}");

    let image = dashboard.json("/api/volumes/vol/preview?path=image.png");
    assert_eq!(image["kind"], "image");
    assert_eq!(image["content_type"], "image/png");

    // HTML is previewed as text, never as a page.
    let html = dashboard.json("/api/volumes/vol/preview?path=page.html");
    assert_eq!(html["kind"], "text");

    let (status, missing) = status_and_json(dashboard.get("/api/volumes/vol/tree?path=nope"));
    assert_eq!(status, 404);
    assert!(error_message(&missing).contains("nope"));
    let (status, missing) = status_and_json(dashboard.get("/api/volumes/other/tree"));
    assert_eq!(status, 404);
    assert!(error_message(&missing).contains("chalk volume create other"));
    let (status, bad) = status_and_json(dashboard.get("/api/volumes/vol/tree?path=../etc"));
    assert_eq!(status, 400);
    assert!(error_message(&bad).contains("'..' is not allowed"));
    let (status, _) = status_and_json(dashboard.get("/api/volumes/vol/preview?path=data"));
    assert_eq!(status, 400);
}

#[test]
fn byte_order_mark_tables() {
    let home = Home::new("chalk-dash-http-");
    home.ok(&["volume", "create", "vol"]);
    let files: [(&str, &[u8]); 3] = [
        ("excel.csv", b"\xef\xbb\xbfh1,h2\n1,2\n"),
        ("excel.tsv", b"\xef\xbb\xbfh1\th2\n1\t2\n"),
        ("doc.json", b"\xef\xbb\xbf[{\"h1\": 1, \"h2\": 2}]"),
    ];
    home.put_tree("vol", "bom", &files, "/");
    let dashboard = Dashboard::start(&home, &[]);
    for (name, _) in files {
        let preview = dashboard.json(&format!("/api/volumes/vol/preview?path={name}"));
        assert_eq!(preview["kind"], "table", "{name}: {preview}");
        assert_eq!(preview["columns"], serde_json::json!(["h1", "h2"]), "{name}");
    }
}

#[test]
fn large_text_preview_is_truncated() {
    let home = Home::new("chalk-dash-http-");
    home.ok(&["volume", "create", "vol"]);
    let line = "0123456789abcdef".repeat(4) + "\n";
    let big = line.repeat(8192);
    home.put_tree("vol", "big", &[("big.txt", big.as_bytes())], "/");
    let dashboard = Dashboard::start(&home, &[]);
    let preview = dashboard.json("/api/volumes/vol/preview?path=big.txt");
    assert_eq!(preview["kind"], "text");
    assert_eq!(preview["truncated"], true);
    assert_eq!(preview["size"], big.len() as u64);
    assert_eq!(preview["preview_bytes"], 256 * 1024);
    assert_eq!(preview["text"].as_str().unwrap().len(), 256 * 1024);
}

#[test]
fn download_streams_with_ranges() {
    let (home, image, blob) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);

    let whole = dashboard.get("/api/volumes/vol/download?path=blob.bin");
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.header("content-length"), Some("100000"));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(whole.header("content-type"), Some("application/octet-stream"));
    assert!(whole.header("content-disposition").unwrap().starts_with("attachment; filename=\"blob.bin\""));
    assert!(whole.header("content-security-policy").unwrap().starts_with("sandbox"));
    assert_eq!(whole.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(whole.header("cache-control"), Some("no-cache"), "the head of a lineage moves");
    let etag = whole.header("etag").unwrap().to_owned();
    assert!(read_body(whole) == blob, "downloaded bytes differ");

    let cases: [(&str, usize, usize); 4] =
        [("bytes=10-19", 10, 19), ("bytes=99990-", 99_990, 99_999), ("bytes=-5", 99_995, 99_999), ("bytes=50000-999999", 50_000, 99_999)];
    for (range, first, last) in cases {
        let part = dashboard.get_with("/api/volumes/vol/download?path=blob.bin", &[("Range", range)]);
        assert_eq!(part.status(), 206, "{range}");
        assert_eq!(part.header("content-range").unwrap(), format!("bytes {first}-{last}/100000"), "{range}");
        assert_eq!(part.header("content-length").unwrap(), (last - first + 1).to_string(), "{range}");
        assert!(read_body(part) == blob[first..=last], "{range}: wrong bytes");
    }

    let outside = dashboard.get_with("/api/volumes/vol/download?path=blob.bin", &[("Range", "bytes=100000-")]);
    assert_eq!(outside.status(), 416);
    assert_eq!(outside.header("content-range"), Some("bytes */100000"));

    // If-Range with a stale validator sends the whole file.
    let stale = dashboard.get_with("/api/volumes/vol/download?path=blob.bin", &[("Range", "bytes=0-9"), ("If-Range", "\"old\"")]);
    assert_eq!(stale.status(), 200);
    let fresh = dashboard.get_with("/api/volumes/vol/download?path=blob.bin", &[("Range", "bytes=0-9"), ("If-Range", &etag)]);
    assert_eq!(fresh.status(), 206);

    let head = dashboard.json("/api/volumes/vol/tree")["version"]["id"].as_str().unwrap().to_owned();
    let pinned = dashboard.get(&format!("/api/volumes/vol/download?version={head}&path=blob.bin"));
    assert_eq!(pinned.header("cache-control"), Some("private, max-age=31536000, immutable"));

    // The raw endpoint shows a PNG inline but sends HTML as an inert attachment.
    let raw_image = dashboard.get("/api/volumes/vol/raw?path=image.png");
    assert_eq!(raw_image.status(), 200);
    assert_eq!(raw_image.header("content-type"), Some("image/png"));
    assert_eq!(raw_image.header("content-disposition"), Some("inline"));
    assert!(read_body(raw_image) == image);
    let raw_html = dashboard.get("/api/volumes/vol/raw?path=page.html");
    assert_eq!(raw_html.status(), 200);
    assert_eq!(raw_html.header("content-type"), Some("application/octet-stream"));
    assert!(raw_html.header("content-disposition").unwrap().starts_with("attachment"));
    assert!(raw_html.header("content-security-policy").unwrap().starts_with("sandbox"));
}

#[test]
fn directory_download_is_a_tar_stream() {
    let (home, image, blob) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);

    let response = dashboard.get("/api/volumes/vol/download?path=data");
    assert_eq!(response.status(), 200);
    assert_eq!(response.header("content-type"), Some("application/x-tar"));
    assert!(response.header("content-disposition").unwrap().contains("filename=\"data.tar\""));
    let bytes = read_body(response);
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut files = std::collections::BTreeMap::new();
    let mut dirs = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if entry.header().entry_type().is_dir() {
            dirs.push(path.trim_end_matches('/').to_owned());
        } else {
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            files.insert(path, content);
        }
    }
    assert_eq!(dirs, ["data", "data/nested"]);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["data/doc.json", "data/hello.txt", "data/nested/deep.txt", "data/table.csv"]);
    assert_eq!(files["data/hello.txt"], b"hello\nworld\n");
    assert_eq!(files["data/table.csv"], CSV);

    // The root goes out under the volume's name.
    let root = read_body(dashboard.get("/api/volumes/vol/download"));
    let mut archive = tar::Archive::new(root.as_slice());
    let mut found = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        found.insert(path, content);
    }
    assert!(found["vol/blob.bin"] == blob);
    assert!(found["vol/image.png"] == image);
    assert_eq!(found["vol/data/nested/deep.txt"], b"deep\n");
}

#[test]
fn symlinks_in_downloads() {
    let home = Home::new("chalk-dash-http-");
    home.ok(&["volume", "create", "vol"]);
    let local = home.path().join("local/links");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("target.txt"), b"target\n").unwrap();
    std::os::unix::fs::symlink("target.txt", local.join("link")).unwrap();
    home.ok(&["volume", "put", "vol", local.to_str().unwrap(), "/"]);
    let dashboard = Dashboard::start(&home, &[]);

    let (status, body) = status_and_json(dashboard.get("/api/volumes/vol/download?path=link"));
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("symbolic link to target.txt"), "{body}");

    let bytes = dashboard.bytes("/api/volumes/vol/download");
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut link_target = None;
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == "vol/link" {
            assert!(entry.header().entry_type().is_symlink());
            link_target = entry.link_name().unwrap().map(|t| t.to_string_lossy().into_owned());
        }
    }
    assert_eq!(link_target.as_deref(), Some("target.txt"));
}

#[test]
fn upload_creates_one_version() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let before = home.versions("vol").len();
    let big = pseudo_random_bytes(3 << 20, 11);
    let response = dashboard.upload(
        "vol",
        "?dir=incoming",
        &[
            Part::Text("message", "from the test"),
            Part::Text("path", "folder/a.txt"),
            Part::File("a.txt", b"first file\n"),
            Part::Text("path", "folder/sub/big.bin"),
            Part::File("big.bin", &big),
            Part::File("plain.txt", b"named by its file name\n"),
        ],
    );
    let (status, body) = status_and_json(response);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["files"], 3);
    assert_eq!(body["bytes"], (11 + big.len() + 23) as u64);
    assert_eq!(body["version"]["message"], "from the test");
    let versions = home.versions("vol");
    assert_eq!(versions.len(), before + 1, "one upload must create exactly one version");
    let new_id = body["version"]["id"].as_str().unwrap();
    assert_eq!(versions.last().unwrap()["id"], new_id);

    let tree = dashboard.json("/api/volumes/vol/tree?path=incoming");
    let paths: Vec<&str> = tree["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["incoming/folder", "incoming/plain.txt"]);
    let downloaded = dashboard.bytes(&format!("/api/volumes/vol/download?version={new_id}&path=incoming/folder/sub/big.bin"));
    assert!(downloaded == big, "uploaded and downloaded bytes differ");

    // The previous version does not have the upload.
    let parent = body["version"]["parent"].as_str().unwrap();
    let (status, _) = status_and_json(dashboard.get(&format!("/api/volumes/vol/tree?version={parent}&path=incoming")));
    assert_eq!(status, 404);

    // An upload onto a forked lineage moves that lineage only.
    home.ok(&["volume", "fork", "vol", "--from", new_id, "--lineage", "side"]);
    let (status, body) = status_and_json(dashboard.upload("vol", "?lineage=side", &[Part::File("side.txt", b"side\n")]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"]["lineage"], "side");
    let main_head = dashboard.json("/api/volumes/vol/tree");
    assert_eq!(main_head["version"]["id"], new_id);
    let side_head = dashboard.json("/api/volumes/vol/tree?lineage=side");
    assert_eq!(side_head["version"]["id"], body["version"]["id"]);

    let metrics = dashboard.get("/metrics").into_string().unwrap();
    assert!(metrics.contains("chalk_dashboard_uploads_total 2"), "{metrics}");
}

#[test]
fn upload_rejects_bad_paths() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let before = home.versions("vol").len();
    let long_name = "n".repeat(256);
    let cases: [(&str, Vec<Part>, &str); 7] = [
        ("parent in path", vec![Part::Text("path", "../evil.txt"), Part::File("evil.txt", b"x")], "'..' is not allowed"),
        ("parent deeper", vec![Part::Text("path", "a/../../evil.txt"), Part::File("evil.txt", b"x")], "'..' is not allowed"),
        ("parent in file name", vec![Part::File("../evil.txt", b"x")], "'..' is not allowed"),
        ("name too long", vec![Part::Text("path", &long_name), Part::File("x", b"x")], "longer than 255 bytes"),
        ("NUL in name", vec![Part::Text("path", "a\0b"), Part::File("x", b"x")], "NUL"),
        ("empty name", vec![Part::Text("path", "/"), Part::File("x", b"x")], "names no file"),
        ("trailing slash", vec![Part::Text("path", "reports/"), Part::File("x", b"x")], "ends in '/'"),
    ];
    for (case, parts, expected) in cases {
        // A good file first: a rejected path later in the body must discard it too.
        let mut all = vec![Part::Text("path", "good.txt"), Part::File("good.txt", b"good")];
        all.extend(parts);
        let (status, body) = status_and_json(dashboard.upload("vol", "", &all));
        assert_eq!(status, 400, "{case}: {body}");
        let message = error_message(&body);
        assert!(message.contains(expected), "{case}: {message}");
        assert!(message.contains("rejected upload path"), "{case}: {message}");
    }
    let (status, body) = status_and_json(dashboard.upload("vol", "?dir=../up", &[Part::File("x.txt", b"x")]));
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("'..' is not allowed"));

    let (status, body) = status_and_json(dashboard.upload("vol", "", &[Part::Text("message", "no files")]));
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("no files"));

    // A file where a directory exists is an engine error with the path.
    let (status, body) = status_and_json(dashboard.upload("vol", "", &[Part::Text("path", "data"), Part::File("data", b"x")]));
    assert_eq!(status, 409, "{body}");
    assert!(error_message(&body).contains("data"));

    assert_eq!(home.versions("vol").len(), before, "a rejected upload created a version");
    let tree = dashboard.json("/api/volumes/vol/tree");
    assert!(!tree["entries"].as_array().unwrap().iter().any(|e| e["name"] == "good.txt"), "a rejected upload left a file");
}

#[test]
fn upload_dir_error_names_dir() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    for dir in ["../up", "a/../../up"] {
        let query = format!("?dir={}", dir.replace('/', "%2F"));
        let (status, body) = status_and_json(dashboard.upload("vol", &query, &[Part::File("x.txt", b"x")]));
        assert_eq!(status, 400, "{dir}: {body}");
        let message = error_message(&body);
        assert!(message.contains(&format!("rejected upload dir {dir:?}")), "{dir}: {message}");
        assert!(!message.contains("probe"), "{dir}: {message}");
    }
}

/// Writes a whole request in one write and reads the response until the
/// server closes. One write lets the server read the whole request before it
/// responds, so closing does not reset the connection and lose the response.
fn raw_exchange(dashboard: &Dashboard, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", dashboard.port)).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn upload_head(dashboard: &Dashboard, content_type: &str, length_header: &str) -> String {
    format!(
        "POST /api/volumes/vol/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: {content_type}\r\n{length_header}\r\nConnection: close\r\n\r\n",
        dashboard.token
    )
}

#[test]
fn oversized_upload_is_413() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &["--max-upload-bytes", "4096"]);
    let before = home.versions("vol").len();
    let (content_type, body) = support::multipart(&[Part::File("big.bin", &pseudo_random_bytes(6000, 3))]);

    // A declared length over the limit is rejected before any body is sent.
    let head = upload_head(&dashboard, &content_type, &format!("Content-Length: {}", body.len()));
    let response = raw_exchange(&dashboard, head.as_bytes());
    assert!(response.starts_with("HTTP/1.1 413"), "declared length over the limit: {response}");
    assert!(response.contains("--max-upload-bytes"), "{response}");

    // A chunked body declares no length, so the limit applies while it streams.
    let mut request = upload_head(&dashboard, &content_type, "Transfer-Encoding: chunked").into_bytes();
    for chunk in body.chunks(1000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = raw_exchange(&dashboard, &request);
    assert!(response.starts_with("HTTP/1.1 413"), "chunked upload over the limit: {response}");
    assert!(response.contains("--max-upload-bytes"), "{response}");
    assert_eq!(home.versions("vol").len(), before, "an upload over the limit created a version");

    // A small upload still works.
    let (status, body) = status_and_json(dashboard.upload("vol", "", &[Part::File("small.txt", b"small")]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(home.versions("vol").len(), before + 1);
}

#[test]
fn diff_lists_changes_and_text_hunks() {
    let home = Home::new("chalk-dash-http-");
    home.ok(&["volume", "create", "vol"]);
    home.put_tree("vol", "v1", &[("a.txt", b"one\ntwo\nthree\n"), ("b.txt", b"bee\n"), ("bin.dat", b"\x00\x01")], "/");
    home.put_tree("vol", "v2", &[("a.txt", b"one\n2\nthree\n"), ("c.txt", b"sea\n")], "/");
    home.ok(&["volume", "rm", "vol", "b.txt"]);
    home.put_tree("vol", "v3", &[("bin.dat", b"\x00\x02")], "/");
    let versions = home.versions("vol");
    let first = versions[1]["id"].as_str().unwrap();
    let last = versions.last().unwrap()["id"].as_str().unwrap();
    let dashboard = Dashboard::start(&home, &[]);

    let diff = dashboard.json(&format!("/api/volumes/vol/diff?a={first}&b={last}"));
    let changes: Vec<(String, String)> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap().to_owned(), c["change"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [("a.txt", "modified"), ("b.txt", "removed"), ("bin.dat", "modified"), ("c.txt", "added")];
    let expected: Vec<(String, String)> = expected.iter().map(|(p, c)| (p.to_string(), c.to_string())).collect();
    assert_eq!(changes, expected);
    assert_eq!(diff["changes"][0]["text_diff"], true);

    let text = dashboard.json(&format!("/api/volumes/vol/diff/text?a={first}&b={last}&path=a.txt"));
    let lines: Vec<(String, String)> = text["hunks"][0]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["tag"].as_str().unwrap().to_owned(), l["text"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [("equal", "one"), ("delete", "two"), ("insert", "2"), ("equal", "three")];
    let expected: Vec<(String, String)> = expected.iter().map(|(t, s)| (t.to_string(), s.to_string())).collect();
    assert_eq!(lines, expected);

    // A removed file diffs against nothing.
    let removed = dashboard.json(&format!("/api/volumes/vol/diff/text?a={first}&b={last}&path=b.txt"));
    assert_eq!(removed["hunks"][0]["lines"][0]["tag"], "delete");

    let (status, body) = status_and_json(dashboard.get(&format!("/api/volumes/vol/diff/text?a={first}&b={last}&path=bin.dat")));
    assert_eq!(status, 422);
    assert!(error_message(&body).contains("not UTF-8 text"));

    let same = dashboard.json(&format!("/api/volumes/vol/diff?a={last}&b={last}"));
    assert_eq!(same["changes"].as_array().unwrap().len(), 0);

    let (status, body) = status_and_json(dashboard.get(&format!("/api/volumes/vol/diff?a=zzzz&b={last}")));
    assert_eq!(status, 404);
    assert!(error_message(&body).contains("zzzz"));
}

#[test]
fn versions_and_lineages() {
    let (home, _, _) = sample_store();
    home.put_tree("vol", "second", &[("more.txt", b"more\n")], "/");
    let versions = home.versions("vol");
    let first_put = versions[1]["id"].as_str().unwrap();
    home.ok(&["volume", "fork", "vol", "--from", first_put, "--lineage", "experiment"]);
    home.ok(&["volume", "tag", "vol", first_put, "baseline"]);
    let dashboard = Dashboard::start(&home, &[]);

    let lineages = dashboard.json("/api/volumes/vol/lineages");
    let names: Vec<&str> = lineages["lineages"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["experiment", "main"]);
    assert_eq!(lineages["lineages"][0]["forked_from"], first_put);
    assert_eq!(lineages["tags"][0]["tag"], "baseline");

    let main = dashboard.json("/api/volumes/vol/versions?lineage=main");
    let main_versions = main["versions"].as_array().unwrap();
    assert_eq!(main_versions.len(), 3);
    assert_eq!(main_versions[2]["parent"], first_put);
    let all = dashboard.json("/api/volumes/vol/versions");
    assert_eq!(all["versions"].as_array().unwrap().len(), 3);

    // An older version by id, prefix and tag shows the older tree.
    for name in [first_put, &first_put[..12], "baseline"] {
        let tree = dashboard.json(&format!("/api/volumes/vol/tree?version={name}"));
        assert_eq!(tree["version"]["id"], first_put, "{name}");
        assert!(!tree["entries"].as_array().unwrap().iter().any(|e| e["name"] == "more.txt"), "{name}");
    }
    let (status, body) = status_and_json(dashboard.get("/api/volumes/vol/versions?lineage=nope"));
    assert_eq!(status, 404);
    assert!(error_message(&body).contains("nope"));
    let (status, _) = status_and_json(dashboard.get("/api/volumes/bad%20name/versions"));
    assert_eq!(status, 400);
}

#[test]
fn metrics_and_method_checks() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    // No endpoint but upload takes a POST.
    let request = ureq::AgentBuilder::new()
        .build()
        .post(&dashboard.url("/api/volumes"))
        .set("Authorization", &format!("Bearer {}", dashboard.token));
    let response = send(request, b"{}");
    assert_eq!(response.status(), 405);
    let metrics = dashboard.get("/metrics");
    assert_eq!(metrics.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    let text = metrics.into_string().unwrap();
    assert!(text.contains("# TYPE chalk_dashboard_requests counter"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn metrics_need_bearer_token() {
    let (home, _, _) = sample_store();
    let dashboard = Dashboard::start(&home, &[]);
    let missing = dashboard.get_bare("/metrics", &[]);
    assert_eq!(missing.status(), 401);
    let wrong = dashboard.get_bare("/metrics", &[("Authorization", &format!("Bearer {}", "0".repeat(64)))]);
    assert_eq!(wrong.status(), 403);

    // A read through the API moves the engine's counters in the same registry.
    let blob = dashboard.bytes("/api/volumes/vol/raw?path=blob.bin");
    assert!(!blob.is_empty());
    let response = dashboard.get_bare("/metrics", &[("Authorization", &format!("Bearer {}", dashboard.token))]);
    assert_eq!(response.status(), 200);
    let text = response.into_string().unwrap();
    let rejected = text.lines().find(|line| line.starts_with("chalk_dashboard_rejected_requests_total ")).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(rejected, "chalk_dashboard_rejected_requests_total 2");
    let gets = text
        .lines()
        .find(|line| line.starts_with("chalk_object_store_requests_total{operation=\"get\"} "))
        .unwrap_or_else(|| panic!("no object store GET count in {text}"));
    let count: u64 = gets.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count > 0, "{gets}");
    assert!(text.contains("chalk_cache_hits_total{tier=\"memory\"}"), "{text}");
}
