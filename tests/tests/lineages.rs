//! The fork example of the product page, end to end: two writable mounts of
//! one version write different files and sync into two lineages, the base
//! version stays unchanged, and no data is copied.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

fn chalk_binary() -> PathBuf {
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

struct Home(TempDir);

impl Home {
    fn new() -> Home {
        Home(tempfile::Builder::new().prefix("chalk-lineage-").tempdir_in("/var/tmp").unwrap())
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(chalk_binary()).env("CHALK_HOME", self.0.path()).env_remove("CHALK_STORE").args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "chalk {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn objects_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| if e.file_type().unwrap().is_dir() { walk(&e.path()) } else { e.metadata().unwrap().len() })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.0.path().join("objects/volumes"))
    }
}

struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let done = Command::new("fusermount3").arg("-u").arg(&self.0).stderr(Stdio::null()).status();
        if !done.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).status();
        }
    }
}

fn mount(home: &Home, name: &str, args: &[&str]) -> MountGuard {
    let dir = home.0.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    let mut full = vec!["volume", "mount", "my-data", dir.to_str().unwrap()];
    full.extend_from_slice(args);
    full.push("--daemon");
    home.ok(&full);
    MountGuard(dir)
}

#[test]
fn fork_example_two_mounts_two_lineages() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    let model = home.0.path().join("model.bin");
    fs::write(&model, vec![5u8; 4 << 20]).unwrap();
    home.ok(&["volume", "put", "my-data", model.to_str().unwrap(), "models/latest.bin"]);
    let versions = home.json(&["volume", "versions", "my-data", "--json"]);
    let base = versions.as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_owned();
    let bytes_before = home.objects_bytes();

    let a = mount(&home, "a", &["--version", &base, "--writable"]);
    let b = mount(&home, "b", &["--version", &base, "--writable"]);
    fs::write(a.0.join("approach_a.txt"), b"result of approach a").unwrap();
    fs::write(b.0.join("approach_b.txt"), b"result of approach b").unwrap();
    assert!(!b.0.join("approach_a.txt").exists(), "writes leaked between sandboxes");
    let id_a = home.ok(&["volume", "sync", a.0.to_str().unwrap()]).trim().to_owned();
    let id_b = home.ok(&["volume", "sync", b.0.to_str().unwrap()]).trim().to_owned();
    assert_ne!(id_a, id_b);

    let lineages = home.json(&["volume", "lineages", "my-data", "--json"]);
    let lineages = lineages.as_array().unwrap();
    assert_eq!(lineages.len(), 3, "main and two forks: {lineages:?}");
    let heads: Vec<&str> = lineages.iter().map(|l| l["head"]["id"].as_str().unwrap()).collect();
    assert!(heads.contains(&id_a.as_str()) && heads.contains(&id_b.as_str()), "{heads:?}");
    for fork in lineages.iter().filter(|l| l["name"] != "main") {
        assert_eq!(fork["forked_from"].as_str(), Some(base.as_str()));
    }

    // The base version is unchanged and main did not move.
    let main_head = home.json(&["volume", "versions", "my-data", "--json"]);
    assert_eq!(main_head.as_array().unwrap().last().unwrap()["id"].as_str(), Some(base.as_str()));
    let listing = home.json(&["volume", "ls", "my-data", "--version", &base, "--json"]);
    let names: Vec<&str> = listing.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["models"]);

    // No data was copied: the store grew by the new files and metadata only.
    let growth = home.objects_bytes() - bytes_before;
    assert!(growth < 512 * 1024, "the store grew by {growth} bytes for two small files");

    // A version mount without --writable stays read-only.
    let ro = mount(&home, "ro", &["--version", &id_a]);
    let err = fs::write(ro.0.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::read(ro.0.join("approach_a.txt")).unwrap(), b"result of approach a");
}

#[test]
fn lineage_mount_follows_its_head() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    let base = home.json(&["volume", "versions", "my-data", "--json"]).as_array().unwrap()[0]["id"].as_str().unwrap().to_owned();
    home.ok(&["volume", "fork", "my-data", "--from", &base, "--lineage", "exp"]);
    let exp = mount(&home, "exp", &["--lineage", "exp"]);
    fs::write(exp.0.join("on-exp.txt"), b"exp").unwrap();
    home.ok(&["volume", "sync", exp.0.to_str().unwrap(), "--message", "first on exp"]);
    let versions = home.json(&["volume", "versions", "my-data", "--lineage", "exp", "--json"]);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1]["message"].as_str(), Some("first on exp"));
    assert_eq!(versions[1]["lineage"].as_str(), Some("exp"));
    let main = home.json(&["volume", "ls", "my-data", "--json"]);
    assert_eq!(main.as_array().unwrap().len(), 0, "the fork's write reached main");
    home.ok(&["volume", "tag", "my-data", versions[1]["id"].as_str().unwrap(), "winner"]);
    let tagged = home.json(&["volume", "ls", "my-data", "--version", "winner", "--json"]);
    assert_eq!(tagged.as_array().unwrap().len(), 1);
}

/// Mounts with extra environment for the mount process.
fn mount_with_env(home: &Home, name: &str, args: &[&str], env: &[(&str, &str)]) -> MountGuard {
    let dir = home.0.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    let mut command = Command::new(chalk_binary());
    command.env("CHALK_HOME", home.0.path()).env_remove("CHALK_STORE");
    command.args(["volume", "mount", "my-data", dir.to_str().unwrap()]).args(args).arg("--daemon");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "mount {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    MountGuard(dir)
}

fn put_text(home: &Home, path: &str, text: &str) {
    let local = home.0.path().join("upload.tmp");
    fs::write(&local, text).unwrap();
    home.ok(&["volume", "put", "my-data", local.to_str().unwrap(), path]);
}

/// Polls `check` for up to ten seconds.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn bad_follow_interval_fails_before_mounting() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    let dir = home.0.path().join("follow");
    fs::create_dir_all(&dir).unwrap();
    let _guard = MountGuard(dir.clone());
    let out = Command::new(chalk_binary())
        .env("CHALK_HOME", home.0.path())
        .env_remove("CHALK_STORE")
        .env("CHALK_FOLLOW_INTERVAL_MS", "abc")
        .args(["volume", "mount", "my-data", dir.to_str().unwrap(), "--follow", "--daemon"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a --follow mount with a bad interval reported success: {stderr}");
    assert!(stderr.contains("CHALK_FOLLOW_INTERVAL_MS=\"abc\""), "{stderr}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir.to_str().unwrap()), "the failed --follow mount is mounted");

    // Only --follow mounts read the variable, so other mounts keep working.
    let plain = mount_with_env(&home, "plain", &[], &[("CHALK_FOLLOW_INTERVAL_MS", "abc")]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    fs::write(plain.0.join("still-mounted.txt"), b"x").unwrap();
    assert_eq!(fs::read(plain.0.join("still-mounted.txt")).unwrap(), b"x");
}

#[test]
fn sync_of_follow_mount_is_rejected() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    let follow = mount_with_env(&home, "follow", &["--follow"], &[]);
    let out = home.run(&["volume", "sync", follow.0.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sync of a --follow mount succeeded: {stderr}");
    assert!(stderr.contains("is read-only"), "{stderr}");
    assert!(stderr.contains("--follow"), "{stderr}");
}

#[test]
fn follow_mount_shows_new_heads() {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    put_text(&home, "keep.txt", "keep");
    put_text(&home, "dir/edit.txt", "old");
    put_text(&home, "gone.txt", "bytes of a removed file");
    let follow = mount_with_env(&home, "follow", &["--follow"], &[("CHALK_FOLLOW_INTERVAL_MS", "100")]);

    // Read-only mounts cache names, attributes and pages for an hour, so
    // only an invalidation makes the new head's changes show.
    assert_eq!(fs::read(follow.0.join("dir/edit.txt")).unwrap(), b"old");
    assert!(!follow.0.join("dir/added.txt").exists());
    let mut open_gone = fs::File::open(follow.0.join("gone.txt")).unwrap();
    let err = fs::write(follow.0.join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // A lister that must never see the tree without keep.txt.
    let stop = Arc::new(AtomicBool::new(false));
    let lister = {
        let (stop, root) = (Arc::clone(&stop), follow.0.clone());
        std::thread::spawn(move || {
            let mut listings = 0;
            while !stop.load(Ordering::SeqCst) {
                let names: Vec<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
                assert!(names.iter().any(|n| n == "keep.txt"), "listing without keep.txt: {names:?}");
                listings += 1;
            }
            listings
        })
    };

    put_text(&home, "dir/edit.txt", "new and longer");
    put_text(&home, "dir/added.txt", "added");
    home.ok(&["volume", "rm", "my-data", "gone.txt"]);
    eventually("the follow mount shows the latest head", || {
        fs::read(follow.0.join("dir/edit.txt")).unwrap() == b"new and longer"
            && follow.0.join("dir/added.txt").exists()
            && !follow.0.join("gone.txt").exists()
    });
    stop.store(true, Ordering::SeqCst);
    assert!(lister.join().unwrap() > 0);

    // A file opened before it was removed keeps reading its bytes.
    let mut bytes = Vec::new();
    open_gone.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, b"bytes of a removed file");
}

#[test]
fn rebase_shows_other_writers_changes() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    put_text(&home, "shared.txt", "v1");
    let a = mount(&home, "a", &[]);
    let b = mount(&home, "b", &[]);

    fs::write(a.0.join("shared.txt"), b"version two from a").unwrap();
    fs::write(a.0.join("from-a.txt"), b"a").unwrap();
    home.ok(&["volume", "sync", a.0.to_str().unwrap()]);

    // B still builds on the old version: the kernel caches shared.txt's old
    // attributes and a negative entry for from-a.txt, for one second.
    assert_eq!(fs::read(b.0.join("shared.txt")).unwrap(), b"v1");
    assert!(!b.0.join("from-a.txt").exists());
    fs::write(b.0.join("from-b.txt"), b"b").unwrap();
    home.ok(&["volume", "sync", b.0.to_str().unwrap()]);

    // The rebase brought A's changes in, and B shows them at once.
    assert_eq!(fs::read(b.0.join("shared.txt")).unwrap(), b"version two from a");
    assert!(b.0.join("from-a.txt").exists());
    assert_eq!(fs::read(b.0.join("from-b.txt")).unwrap(), b"b");
}

#[test]
fn chalk_directory_shows_every_version() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    put_text(&home, "dir/f.txt", "first");
    let versions = home.json(&["volume", "versions", "my-data", "--json"]);
    let first = versions.as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_owned();
    home.ok(&["volume", "tag", "my-data", &first, "baseline"]);
    put_text(&home, "dir/f.txt", "second");
    let mount = mount(&home, "m", &[]);

    // Reachable by path, but not listed in the root.
    let root: Vec<_> = fs::read_dir(&mount.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(root, vec!["dir"]);
    let chalk = mount.0.join(".chalk");
    let mut listed: Vec<String> =
        fs::read_dir(chalk.join("versions")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    listed.sort();
    let all = home.json(&["volume", "versions", "my-data", "--all", "--json"]);
    let mut ids: Vec<String> = all.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(listed, ids);

    assert_eq!(fs::read(chalk.join("versions").join(&first).join("dir/f.txt")).unwrap(), b"first");
    assert_eq!(fs::read(chalk.join("tags/baseline/dir/f.txt")).unwrap(), b"first");
    assert_eq!(fs::read(mount.0.join("dir/f.txt")).unwrap(), b"second");

    // Read-only, and the name is reserved at the root of every volume.
    let err = fs::write(chalk.join("versions").join(&first).join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::write(chalk.join("note.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let local = home.0.path().join("upload.tmp");
    let out = home.run(&["volume", "put", "my-data", local.to_str().unwrap(), ".chalk/x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"), "{}", String::from_utf8_lossy(&out.stderr));

    // A sync publishes the mount's writes and nothing of `.chalk`.
    fs::write(mount.0.join("new.txt"), b"new").unwrap();
    home.ok(&["volume", "sync", mount.0.to_str().unwrap()]);
    let listing = home.json(&["volume", "ls", "my-data", "--json"]);
    let names: Vec<&str> = listing.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["dir", "new.txt"]);
}

#[test]
fn eight_mount_processes_sync_one_lineage() {
    let home = Home::new();
    home.ok(&["volume", "create", "my-data"]);
    put_text(&home, "shared.txt", "base");
    // Every mount starts from the same head before any of them syncs. Even
    // ones write only their own file; odd ones also rewrite shared.txt.
    let mounts: Vec<MountGuard> = (0..8).map(|i| mount(&home, &format!("m{i}"), &[])).collect();
    for (i, m) in mounts.iter().enumerate() {
        fs::write(m.0.join(format!("own-{i}.txt")), format!("writer {i}")).unwrap();
        if i % 2 == 1 {
            fs::write(m.0.join("shared.txt"), format!("shared from {i}")).unwrap();
        }
    }
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            mounts.iter().map(|m| scope.spawn(|| home.run(&["volume", "sync", m.0.to_str().unwrap()]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut published = Vec::new();
    let mut shared_winner = None;
    for (i, out) in outputs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            published.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
            if i % 2 == 1 {
                assert!(shared_winner.replace(i).is_none(), "two writers of shared.txt both published");
            }
        } else {
            assert!(i % 2 == 1, "writer {i} changed no shared path but failed: {stderr}");
            assert!(stderr.contains("shared.txt"), "writer {i} failed without naming shared.txt: {stderr}");
        }
    }
    let winner = shared_winner.expect("one writer of shared.txt publishes");
    assert_eq!(published.len(), 5, "four disjoint writers and one shared.txt writer");

    // Every accepted version is in the history, and the head has every accepted write.
    let history = home.json(&["volume", "versions", "my-data", "--json"]);
    let ids: Vec<&str> = history.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    for id in &published {
        assert!(ids.contains(&id.as_str()), "version {id} is missing from the history");
    }
    let check = home.0.path().join("check.txt");
    for i in (0..8).filter(|i| i % 2 == 0 || *i == winner) {
        home.ok(&["volume", "get", "my-data", &format!("own-{i}.txt"), check.to_str().unwrap()]);
        assert_eq!(fs::read_to_string(&check).unwrap(), format!("writer {i}"));
    }
    home.ok(&["volume", "get", "my-data", "shared.txt", check.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(&check).unwrap(), format!("shared from {winner}"));
    // A writer that lost keeps its writes in its mount.
    let loser = (1..8).step_by(2).find(|i| *i != winner).unwrap();
    assert_eq!(fs::read_to_string(mounts[loser].0.join("shared.txt")).unwrap(), format!("shared from {loser}"));
}
