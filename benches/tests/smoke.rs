//! Smoke test of the `chalk-benches` harness on the small tree.
//!
//! It runs the harness binary with one repetition and `--output` set to a
//! temporary directory, so the committed results and docs stay untouched. The
//! harness mounts a version through FUSE, so this test needs `/dev/fuse`,
//! `fusermount3` and root (or FUSE permissions for the user). It builds no
//! `chalk` binary: run `cargo build --release -p chalk-tools` first, or set
//! CHALK_BIN.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Every workload and system the harness reports.
const EXPECTED_RECORDS: [(&str, &str); 4] = [
    ("P1", "native"),
    ("P1", "chalk-put"),
    ("R0", "native"),
    ("R0", "chalk-ro"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent directory")
        .to_owned()
}

/// Path of the release `chalk` binary that the harness will run.
fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHALK_BIN={} is not a file", path.display());
        return path;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join("release/chalk");
    assert!(
        path.is_file(),
        "chalk binary not found at {}. Run `cargo build --release -p chalk-tools` first, or set CHALK_BIN",
        path.display()
    );
    path
}

fn run_harness(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chalk-benches"))
        .args(args)
        .env("CHALK_BIN", chalk_binary())
        .stdin(Stdio::null())
        .output()
        .expect("starting the chalk-benches binary")
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Returns the contents of `path`, or `None` if it does not exist.
fn read_optional(path: &Path) -> Option<Vec<u8>> {
    fs::read(path).ok()
}

#[test]
fn small_run_reports_every_record() {
    let output_dir = tempfile::tempdir().expect("creating a temporary output directory");
    let output_arg = output_dir.path().to_str().expect("temporary paths are UTF-8");
    let docs = workspace_root().join("docs/benchmarks.md");
    let committed_results = workspace_root().join("benches/results/latest.json");
    let docs_before = read_optional(&docs);
    let results_before = read_optional(&committed_results);

    let output = run_harness(&["--size", "small", "--reps", "1", "--output", output_arg]);
    assert!(output.status.success(), "chalk-benches failed: {}", describe(&output));

    let json_path = output_dir.path().join("latest.json");
    let text = fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}\n{}", json_path.display(), describe(&output)));
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).expect("latest.json is a JSON list");
    assert_eq!(
        records.len(),
        EXPECTED_RECORDS.len(),
        "unexpected records in latest.json: {text}"
    );

    for (workload, system) in EXPECTED_RECORDS {
        let matching: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["workload"] == workload && r["system"] == system)
            .collect();
        assert_eq!(matching.len(), 1, "expected one {workload}/{system} record in {text}");
        let record = matching[0];
        let field = |name: &str| -> f64 {
            record[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{workload}/{system} has no numeric {name:?}: {record}"))
        };

        assert_eq!(record["unit"], "s", "{workload}/{system} unit");
        assert_eq!(record["reps"], 1, "{workload}/{system} reps");
        assert!(
            field("median") > 0.0,
            "{workload}/{system} median is not positive: {record}"
        );
        assert!(
            field("min") <= field("median"),
            "{workload}/{system} min exceeds the median: {record}"
        );
        assert!(
            field("median") <= field("max"),
            "{workload}/{system} median exceeds the max: {record}"
        );
        assert!(field("files") > 0.0, "{workload}/{system} counts no files: {record}");
        assert!(field("bytes") > 0.0, "{workload}/{system} counts no bytes: {record}");
        if system == "native" {
            assert_eq!(field("ratio_to_baseline"), 1.0, "native ratio of {workload}: {record}");
        } else {
            assert!(
                field("ratio_to_baseline") > 0.0,
                "{workload}/{system} ratio is not positive: {record}"
            );
        }
    }

    assert!(
        read_optional(&docs) == docs_before,
        "--output must leave {} unchanged",
        docs.display()
    );
    assert!(
        read_optional(&committed_results) == results_before,
        "--output must leave {} unchanged",
        committed_results.display()
    );
}

#[test]
fn unknown_workload_is_rejected() {
    let output = run_harness(&["Z9", "--size", "small", "--reps", "1", "--output", "/nonexistent"]);
    assert!(
        !output.status.success(),
        "chalk-benches accepted workload Z9: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown workload \"Z9\""),
        "stderr does not name the workload: {stderr}"
    );
    assert!(
        stderr.contains("P1, R0"),
        "stderr does not list the known workloads: {stderr}"
    );
}
