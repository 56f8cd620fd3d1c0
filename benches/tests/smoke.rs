//! Smoke test of the `chalk-benches` harness on the small tree.
//!
//! It runs the harness binary with one repetition and `--output` set to a
//! temporary directory, so the committed results and docs stay untouched. The
//! harness mounts Chalk, bindfs and rclone through FUSE and drops the page
//! cache, so this test needs `/dev/fuse`, `fusermount3`, root, and bindfs,
//! rclone and fio (scripts/setup.sh installs them). It builds no
//! `chalk` binary: run `cargo build --release -p chalk-tools` first, or set
//! CHALK_BIN.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Systems of the read workloads R1 to R7, in the order the harness runs them.
const READ_SYSTEMS: [&str; 6] = ["native", "chalk-ro", "chalk-rw", "bindfs", "rclone-off", "rclone-full"];
/// Systems of the write workloads R8 and W2.
const WRITE_SYSTEMS: [&str; 5] = ["native", "chalk-rw", "bindfs", "rclone-off", "rclone-full"];

/// Peers and the program each needs.
const PEER_PROGRAMS: [(&str, &str); 3] = [("bindfs", "bindfs"), ("rclone-off", "rclone"), ("rclone-full", "rclone")];

fn program_exists(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Every workload and system the harness must report. Outside CI a peer
/// whose program is missing is left out, as the harness skips it; in CI
/// every peer must run.
fn expected_records() -> Vec<(&'static str, &'static str)> {
    let in_ci = std::env::var_os("CI").is_some_and(|value| !value.is_empty());
    let installed = |system: &str| {
        PEER_PROGRAMS
            .iter()
            .find(|(peer, _)| *peer == system)
            .is_none_or(|(_, program)| in_ci || program_exists(program))
    };
    let mut records = vec![("P1", "native"), ("P1", "chalk-put"), ("R0", "native"), ("R0", "chalk-ro")];
    for workload in ["R1", "R2", "R3", "R4", "R5", "R6", "R7"] {
        records.extend(READ_SYSTEMS.iter().filter(|s| installed(s)).map(|&s| (workload, s)));
    }
    records.extend(WRITE_SYSTEMS.iter().filter(|s| installed(s)).map(|&s| ("R8", s)));
    records.extend([("W1", "native"), ("W1", "chalk-rw")]);
    records.extend(WRITE_SYSTEMS.iter().filter(|s| installed(s)).map(|&s| ("W2", s)));
    records
}

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
    let expected = expected_records();
    assert_eq!(records.len(), expected.len(), "unexpected records in latest.json: {text}");

    for (workload, system) in expected {
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
        if !matches!(workload, "R5" | "R7") {
            assert!(field("bytes") > 0.0, "{workload}/{system} counts no bytes: {record}");
        }
        if system == "native" {
            assert_eq!(field("ratio_to_baseline"), 1.0, "native ratio of {workload}: {record}");
            assert_eq!(field("ratio_to_native"), 1.0, "native ratio of {workload}: {record}");
        } else {
            assert!(
                field("ratio_to_native") > 0.0,
                "{workload}/{system} ratio is not positive: {record}"
            );
        }
        let has_peers = !matches!(workload, "P1" | "R0" | "W1") && PEER_PROGRAMS.iter().any(|(_, p)| program_exists(p));
        if has_peers {
            assert!(
                field("ratio_to_best_peer") > 0.0,
                "{workload}/{system} has no ratio to the best peer: {record}"
            );
        }
    }

    let chart_path = output_dir.path().join("benchmarks.svg");
    let chart = fs::read_to_string(&chart_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}\n{}", chart_path.display(), describe(&output)));
    assert!(chart.starts_with("<svg"), "{} is not an SVG document", chart_path.display());
    assert!(chart.contains("R1 chalk-ro"), "the chart has no bar for R1 chalk-ro");
    assert!(chart.trim_end().ends_with("</svg>"), "{} is truncated", chart_path.display());

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
