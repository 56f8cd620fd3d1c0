//! Paths given to the CLI and the SDK. The target asserts that normalising
//! returns no name that could leave the volume or split again, and
//! libFuzzer reports any panic.

#![no_main]

use chalk_engine::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let Ok(names) = normalize_path(path) else {
        return;
    };
    assert!(!path.contains('\0'), "a path with NUL was accepted");
    for name in &names {
        assert!(!name.is_empty(), "empty name from {path:?}");
        assert!(name.as_slice() != b".", "'.' name from {path:?}");
        assert!(name.as_slice() != b"..", "'..' name from {path:?}");
        assert!(!name.contains(&b'/'), "name with '/' from {path:?}");
        assert!(!name.contains(&0), "name with NUL from {path:?}");
        assert!(name.len() <= 255, "name longer than 255 bytes from {path:?}");
    }

    // Normalising the joined names again gives the same names.
    let joined = names.iter().map(|n| std::str::from_utf8(n).unwrap()).collect::<Vec<_>>().join("/");
    assert_eq!(normalize_path(&joined).unwrap(), names, "normalising {joined:?} again changed it");
});
