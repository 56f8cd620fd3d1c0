//! Identifier newtypes: inode numbers, segment and version ids, and the
//! validated names of volumes and lineages.

use std::fmt;
use std::str::FromStr;

use ulid::Ulid;

use crate::error::{EngineError, Result};

/// Inode number inside one version's file tree. The root directory is 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Ulid);

        impl $name {
            /// Creates a new id that sorts after ids created earlier on this host.
            pub fn generate() -> Self {
                $name(Ulid::new())
            }

            pub fn to_u128(self) -> u128 {
                self.0 .0
            }

            pub fn from_u128(value: u128) -> Self {
                $name(Ulid(value))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.to_string().to_lowercase())
            }
        }

        impl FromStr for $name {
            type Err = EngineError;
            fn from_str(s: &str) -> Result<Self> {
                Ulid::from_string(&s.to_uppercase()).map($name).map_err(|e| EngineError::InvalidArgument(
                    format!("{} {s:?} is not a valid id ({e}); ids are 26 characters of Crockford base32", stringify!($name)),
                ))
            }
        }
    };
}

ulid_id!(
    /// Id of one segment file. Unique across hosts because it is a ULID.
    SegmentId
);
ulid_id!(
    /// Id of one version. Sorts by creation time; contains no `@` or `/`.
    VersionId
);
ulid_id!(
    /// Id of one session (a mount or a batch of puts).
    SessionId
);

fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else if name.starts_with('.') || name.starts_with('-') {
        Some("it must start with a letter, a digit or '_'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineError::InvalidName { kind, name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Validated volume name: 1 to 63 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: &str) -> Result<Self> {
        validate_name("volume", name)?;
        Ok(VolumeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validated lineage name, with the same rules as a volume name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineageName(String);

impl LineageName {
    pub const MAIN: &'static str = "main";

    pub fn new(name: &str) -> Result<Self> {
        validate_name("lineage", name)?;
        Ok(LineageName(name.to_owned()))
    }

    pub fn main() -> Self {
        LineageName(Self::MAIN.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LineageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_id_round_trips_lowercase() {
        let id = VersionId::generate();
        let text = id.to_string();
        assert!(!text.contains('@') && !text.contains('/'));
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<VersionId>().unwrap(), id);
    }

    #[test]
    fn volume_name_rejects_bad_names() {
        for bad in ["", "..", "a/b", ".hidden", "-x", "a b", &"x".repeat(64)] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(VolumeName::new("my-data_1.v2").is_ok());
    }

    #[test]
    fn invalid_name_message_quotes_only_the_name() {
        let volume = VolumeName::new("../x").unwrap_err().to_string();
        assert!(volume.starts_with("invalid volume name \"../x\": "), "{volume}");
        let lineage = LineageName::new("a b").unwrap_err().to_string();
        assert!(lineage.starts_with("invalid lineage name \"a b\": "), "{lineage}");
    }
}
