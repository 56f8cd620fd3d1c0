//! Integration tests live in `tests/tests/`. This library holds only the
//! workload that the kill-and-recover test shares with its child process.

pub mod kill_workload;
