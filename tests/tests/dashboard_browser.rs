//! The dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven through WebDriver. The test logs in with the
//! token, browses into a folder, previews a text file and an image,
//! downloads a file, uploads files by drop, by the file picker and by the
//! folder picker, switches to an older version, and compares two versions.
//! Each page is saved as a PNG under `$CARGO_TARGET_DIR/dashboard-screenshots/`.
//!
//! Without Chromium the test skips with a message, unless
//! `CHALK_TEST_BROWSER=required` (set by scripts/test.sh), where it fails.

#[path = "support/dashboard.rs"]
mod support;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::{png, Dashboard, Home};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Key of an element reference in W3C WebDriver responses.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for one step; CI runs this test beside others on two cores.
const WAIT: Duration = Duration::from_secs(60);

/// A chromedriver process on a free port of 127.0.0.1, killed on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Driver {
    fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("failed to start chromedriver");
        let driver = Driver { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(response) = ureq::get(&format!("{}/status", driver.base)).call() {
                let status: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
                if status["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver was not ready within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session with a headless Chromium; deleted on drop.
struct Browser<'a> {
    driver: &'a Driver,
    session: String,
    shots: PathBuf,
    shot_count: usize,
}

fn webdriver_call(method: &str, url: &str, body: Option<Value>) -> Value {
    let request = ureq::request(method, url).timeout(Duration::from_secs(120));
    let result = match body {
        Some(body) => request.set("Content-Type", "application/json").send_string(&body.to_string()),
        None => request.call(),
    };
    let (status, text) = match result {
        Ok(response) => (response.status(), response.into_string().unwrap()),
        Err(ureq::Error::Status(status, response)) => (status, response.into_string().unwrap_or_default()),
        Err(err) => panic!("WebDriver {method} {url} failed: {err}"),
    };
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver {method} {url}: {status} {text}"));
    assert_eq!(status, 200, "WebDriver {method} {url}: {}", value["value"]["message"]);
    value["value"].clone()
}

impl<'a> Browser<'a> {
    fn open(driver: &'a Driver, downloads: &Path, shots: PathBuf) -> Browser<'a> {
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
                    "prefs": {
                        "download.default_directory": downloads.to_str().unwrap(),
                        "download.prompt_for_download": false,
                    },
                },
            }}
        });
        let value = webdriver_call("POST", &format!("{}/session", driver.base), Some(capabilities));
        let session = value["sessionId"].as_str().expect("a session id").to_owned();
        let browser = Browser { driver, session, shots, shot_count: 0 };
        // Headless Chromium saves downloads only into a directory set by this command.
        let params = json!({ "cmd": "Browser.setDownloadBehavior", "params": { "behavior": "allow", "downloadPath": downloads.to_str().unwrap() } });
        webdriver_call("POST", &browser.url("/goog/cdp/execute"), Some(params));
        browser
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.driver.base, self.session)
    }

    fn go(&self, url: &str) {
        webdriver_call("POST", &self.url("/url"), Some(json!({ "url": url })));
    }

    fn script(&self, script: &str, args: Value) -> Value {
        webdriver_call("POST", &self.url("/execute/sync"), Some(json!({ "script": script, "args": args })))
    }

    /// Waits until `script` returns a truthy value and returns it.
    fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.script(script, args.clone());
            let truthy = !matches!(value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0);
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                self.screenshot("timeout");
                let body = self.script("return document.body.innerText", json!([]));
                panic!("timed out after {WAIT:?} waiting for {what}; the page shows:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the app to finish rendering and for `selector` to match.
    fn wait_for_selector(&self, selector: &str) -> String {
        self.wait_for(
            &format!("`{selector}`"),
            "return document.body.dataset.ready !== 'false' && document.querySelector(arguments[0]) !== null",
            json!([selector]),
        );
        self.element(selector)
    }

    fn element(&self, selector: &str) -> String {
        let value = webdriver_call("POST", &self.url("/element"), Some(json!({ "using": "css selector", "value": selector })));
        value[ELEMENT_KEY].as_str().expect("an element reference").to_owned()
    }

    fn click(&self, selector: &str) {
        let element = self.wait_for_selector(selector);
        webdriver_call("POST", &self.url(&format!("/element/{element}/click")), Some(json!({})));
    }

    fn type_into(&self, selector: &str, text: &str) {
        let element = self.wait_for_selector(selector);
        webdriver_call("POST", &self.url(&format!("/element/{element}/value")), Some(json!({ "text": text })));
    }

    fn text(&self, selector: &str) -> String {
        let element = self.wait_for_selector(selector);
        webdriver_call("GET", &self.url(&format!("/element/{element}/text")), None).as_str().unwrap_or_default().to_owned()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let data = webdriver_call("GET", &self.url("/screenshot"), None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap()).unwrap();
        let path = self.shots.join(format!("{:02}-{name}.png", self.shot_count));
        fs::write(&path, bytes).unwrap();
        println!("screenshot: {}", path.display());
        path
    }

    fn shot(&mut self, name: &str) {
        self.shot_count += 1;
        self.screenshot(name);
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.driver.base, self.session)).call();
    }
}

fn screenshot_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let dir = target.join("dashboard-screenshots");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Returns false (after saying so loudly) when the test must skip.
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "{} not installed; install Debian's chromium and chromium-driver (scripts/setup.sh does)",
        missing.join(" and ")
    );
    if std::env::var("CHALK_TEST_BROWSER").as_deref() == Ok("required") {
        panic!("CHALK_TEST_BROWSER=required but {message}");
    }
    eprintln!("\n=== SKIPPED: the dashboard browser test did not run: {message} ===\n");
    false
}

/// Waits for a finished download named `name` in `dir` and returns its bytes.
fn wait_for_download(dir: &Path, name: &str) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let path = dir.join(name);
    loop {
        let partial = fs::read_dir(dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
        if path.exists() && !partial {
            return fs::read(&path).unwrap();
        }
        let found: Vec<String> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(Instant::now() < deadline, "download of {name} did not finish in {WAIT:?}; the directory holds {found:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_in_chromium() {
    if !browser_available() {
        return;
    }
    let home = Home::new("chalk-dash-browser-");
    home.ok(&["volume", "create", "vol"]);
    let readme = "# Chalk\n\nline two of the readme\nline three\n";
    let picture = png(96, 64, |x, y| [(x * 2) as u8, (y * 3) as u8, 200]);
    home.put_tree(
        "vol",
        "v1",
        &[("docs/readme.txt", readme.as_bytes()), ("docs/picture.png", &picture), ("table.csv", b"a,b\n1,2\n3,4\n")],
        "/",
    );
    home.put_tree("vol", "v2", &[("docs/notes.txt", b"added in the second version\n")], "/");
    let versions = home.versions("vol");
    let first_put = versions[1]["id"].as_str().unwrap().to_owned();

    let dashboard = Dashboard::start(&home, &[]);
    let downloads = home.path().join("downloads");
    fs::create_dir_all(&downloads).unwrap();
    let upload_file = home.path().join("uploaded.txt");
    fs::write(&upload_file, "uploaded from Chromium\n").unwrap();

    let driver = Driver::start();
    let mut browser = Browser::open(&driver, &downloads, screenshot_dir());

    // 1. Without the token the log-in page shows; entering it logs in.
    browser.go(&dashboard.url("/"));
    browser.wait_for("the log-in form", "return document.querySelector('#token') !== null", json!([]));
    assert!(browser.text("#login-message").contains("missing access token"));
    browser.shot("login");
    browser.type_into("#token", &dashboard.token);
    browser.click("#login-button");
    browser.wait_for_selector("#volumes-table tr[data-volume='vol']");
    browser.shot("volumes");

    // 2. Browse into a folder.
    browser.click("#volumes-table tr[data-volume='vol'] a");
    browser.click("#tree-table tr[data-path='docs'] a");
    browser.wait_for_selector("#tree-table tr[data-path='docs/readme.txt']");
    assert!(browser.text("#breadcrumbs").contains("docs"));
    assert!(browser.text("#tree-table").contains("notes.txt"));
    let order = "return Array.from(document.querySelectorAll('#tree-table tbody tr')).map(r => r.dataset.path)";
    let by_name = json!(["docs/notes.txt", "docs/picture.png", "docs/readme.txt"]);
    assert_eq!(browser.script(order, json!([])), by_name);
    browser.click("#tree-table th[data-sort='size']");
    let by_size = json!(["docs/notes.txt", "docs/readme.txt", "docs/picture.png"]);
    assert_eq!(browser.script(order, json!([])), by_size);
    browser.shot("folder");

    // 3. Preview a text file, with line numbers.
    browser.click("#tree-table tr[data-path='docs/readme.txt'] a");
    let preview = browser.text("#preview-text");
    assert!(preview.contains("line two of the readme"), "{preview}");
    assert!(preview.contains('4'), "line numbers missing: {preview}");
    browser.shot("text-preview");

    // 4. Preview an image: it must load and decode to its real size.
    browser.go(&dashboard.url("/#/file/vol?path=docs/picture.png"));
    browser.wait_for_selector("#preview-image");
    let size = browser.wait_for(
        "the image to load",
        "const img = document.querySelector('#preview-image'); return img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight]",
        json!([]),
    );
    assert_eq!(size, json!([96, 64]));
    let page = browser.text("main");
    assert!(!page.contains("null"), "the image preview shows stray text: {page}");
    browser.shot("image-preview");

    // 5. Download the image and compare its bytes.
    browser.click("#download-link");
    let downloaded = wait_for_download(&downloads, "picture.png");
    assert!(downloaded == picture, "downloaded bytes differ from the uploaded picture");

    // 6. Drop a file on the upload area of the docs folder.
    browser.go(&dashboard.url("/#/tree/vol?path=docs"));
    browser.wait_for_selector("#dropzone");
    let drop = "const transfer = new DataTransfer(); \
                transfer.items.add(new File(['dropped on the page\\n'], 'dropped.txt', { type: 'text/plain' })); \
                document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));";
    browser.script(drop, json!([]));
    browser.wait_for_selector("#tree-table tr[data-path='docs/dropped.txt']");
    assert_eq!(home.versions("vol").len(), 4, "the drop must create exactly one version");
    let dropped = dashboard.bytes("/api/volumes/vol/download?path=docs/dropped.txt");
    assert_eq!(dropped, b"dropped on the page\n");

    // 7. Upload a file from the root with the file picker and see the new version.
    browser.go(&dashboard.url("/#/tree/vol"));
    browser.wait_for_selector("#tree-table tr[data-path='docs']");
    let before = browser.script("return document.querySelector('#current-version').dataset.version", json!([]));
    browser.type_into("#upload-input", upload_file.to_str().unwrap());
    let status = browser.wait_for(
        "the upload to finish",
        "const s = document.querySelector('#upload-status'); return document.body.dataset.ready === 'true' && s && /Uploaded|failed/.test(s.textContent) && s.textContent",
        json!([]),
    );
    assert!(status.as_str().unwrap().starts_with("Uploaded 1 file(s) as version"), "{status}");
    browser.wait_for_selector("#tree-table tr[data-path='uploaded.txt']");
    let after = browser.script("return document.querySelector('#current-version').dataset.version", json!([]));
    assert_ne!(before, after, "the tree still shows the version from before the upload");
    let versions = home.versions("vol");
    assert_eq!(versions.len(), 5, "the upload must create exactly one version");
    assert_eq!(versions.last().unwrap()["id"], after);
    browser.shot("uploaded");

    // 8. Upload a folder with the folder picker: one version, paths kept.
    let folder = home.path().join("batch");
    fs::create_dir_all(folder.join("inner")).unwrap();
    fs::write(folder.join("one.txt"), "one\n").unwrap();
    fs::write(folder.join("inner/two.txt"), "two\n").unwrap();
    browser.type_into("#upload-folder-input", folder.to_str().unwrap());
    browser.wait_for_selector("#tree-table tr[data-path='batch']");
    assert_eq!(home.versions("vol").len(), 6, "a folder upload must create exactly one version");
    assert_eq!(dashboard.bytes("/api/volumes/vol/download?path=batch/inner/two.txt"), b"two\n");
    assert_eq!(dashboard.bytes("/api/volumes/vol/download?path=batch/one.txt"), b"one\n");

    // 9. Switch to an older version and see the old tree.
    browser.click(&format!("#version-select option[value='{first_put}']"));
    browser.wait_for(
        "the old version's tree",
        "return document.body.dataset.ready === 'true' && document.querySelector('#current-version')?.dataset.version === arguments[0]",
        json!([first_put]),
    );
    let tree = browser.text("#tree-table");
    assert!(!tree.contains("uploaded.txt"), "the old tree shows the upload: {tree}");
    assert!(tree.contains("table.csv"), "{tree}");
    browser.click("#tree-table tr[data-path='docs'] a");
    browser.wait_for_selector("#tree-table tr[data-path='docs/readme.txt']");
    let old_docs = browser.text("#tree-table");
    assert!(!old_docs.contains("notes.txt"), "the old docs folder shows a later file: {old_docs}");
    assert!(!old_docs.contains("dropped.txt"), "the old docs folder shows a later file: {old_docs}");
    browser.shot("old-version");

    // 10. The versions timeline and the diff of the file upload against its parent.
    browser.go(&dashboard.url("/#/versions/vol"));
    browser.wait_for_selector("section[data-lineage='main'] .timeline li");
    browser.shot("versions");
    browser.click("section[data-lineage='main'] .timeline li:nth-child(2) a.diff-parent");
    browser.wait_for_selector("#diff-table tr[data-path='uploaded.txt'][data-change='added']");
    browser.click("#diff-table tr[data-path='uploaded.txt'] button.show-text-diff");
    browser.wait_for_selector("#diff-table table.text-diff tr.insert");
    assert!(browser.text("#diff-table").contains("uploaded from Chromium"));
    browser.shot("diff");
}
