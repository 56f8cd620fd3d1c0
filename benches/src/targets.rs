//! The speed targets of the R and W workloads, checked against one run.

use std::fmt::Write as _;

use crate::{significant, Samples, System};

/// One target: `system` must reach at least `min_ratio` of the speed of the
/// fastest of `against` in the same repetition (median over repetitions).
struct Target {
    workload: &'static str,
    system: System,
    against: &'static [System],
    /// How the docs name `against`.
    against_name: &'static str,
    min_ratio: f64,
}

const RCLONE: &[System] = &[System::RcloneOff, System::RcloneFull];

const TARGETS: [Target; 11] = [
    Target { workload: "R1", system: System::ChalkReadOnly, against: &[System::Native], against_name: "native", min_ratio: 0.9 },
    Target { workload: "R2", system: System::ChalkReadOnly, against: &[System::Native], against_name: "native", min_ratio: 0.7 },
    Target { workload: "R3", system: System::ChalkReadOnly, against: &[System::Bindfs], against_name: "bindfs", min_ratio: 3.0 },
    Target { workload: "R3", system: System::ChalkReadOnly, against: RCLONE, against_name: "the faster rclone mode", min_ratio: 10.0 },
    Target { workload: "R4", system: System::ChalkReadOnly, against: &[System::Bindfs], against_name: "bindfs", min_ratio: 1.3 },
    Target { workload: "R5", system: System::ChalkReadOnly, against: &[System::Native], against_name: "native", min_ratio: 0.5 },
    Target { workload: "R7", system: System::ChalkReadOnly, against: &[System::Native], against_name: "native", min_ratio: 0.5 },
    Target { workload: "R8", system: System::ChalkWritable, against: &[System::Bindfs], against_name: "bindfs", min_ratio: 1.5 },
    Target { workload: "W1", system: System::ChalkWritable, against: &[System::Native], against_name: "fio", min_ratio: 0.85 },
    Target { workload: "W2", system: System::ChalkWritable, against: &[System::Native], against_name: "native", min_ratio: 0.5 },
    // R6 has no target; it is listed so that its ratio shows next to the others.
    Target { workload: "R6", system: System::ChalkReadOnly, against: &[System::Native], against_name: "native", min_ratio: 0.0 },
];

/// Builds a Markdown table of every target whose workload ran: the target,
/// the measured ratio and whether it was met, or by how much it was missed.
/// Returns an empty string when no targeted workload ran.
pub(crate) fn targets_table(samples: &[Samples]) -> String {
    let mut rows = String::new();
    for target in &TARGETS {
        let Some(entry) = samples.iter().find(|entry| entry.workload.id() == target.workload) else {
            continue;
        };
        let measured = entry.ratio_to_fastest(target.system, target.against);
        let goal = match target.min_ratio {
            0.0 => "none".to_owned(),
            ratio => format!("at least {ratio}x {}", target.against_name),
        };
        let outcome = match measured {
            None => format!("not measured: {} did not run", target.against_name),
            Some(_) if target.min_ratio == 0.0 => String::new(),
            Some(ratio) if ratio >= target.min_ratio => "met".to_owned(),
            Some(ratio) => format!("missed: {:.0}% short", (1.0 - ratio / target.min_ratio) * 100.0),
        };
        let measured = measured.map_or_else(|| "-".to_owned(), |ratio| format!("{}x", significant(ratio)));
        let _ = writeln!(
            rows,
            "| {} | {} | {goal} | {measured} | {outcome} |",
            target.workload,
            target.system.as_str()
        );
    }
    if rows.is_empty() {
        return rows;
    }
    format!("| workload | system | target | measured | outcome |\n| --- | --- | --- | ---: | --- |\n{rows}")
}
