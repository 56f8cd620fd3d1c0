//! Lineages and tags: forking a lineage from any version, listing lineages,
//! renaming and deleting them, and naming versions with tags.
//!
//! A fork writes one object, the first entry of the new lineage, which
//! refers to the existing version: no data or metadata is copied, so forking
//! costs the same whatever the size of the volume. Tags are objects under
//! `volumes/<volume>/tags/<tag>` created with create-if-absent, so a tag
//! always names the version it was first given.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::format::checkpoint::{frame, unframe, ObjectType};
use crate::ids::{LineageName, VersionId, VolumeName};
use crate::object_store::list_all;
use crate::session::{Access, OnConflict, RetryAdvice, SessionBase, SyncOptions, SyncOutcome};
use crate::store::{entry_seq, lineage_prefix, now_ns, version_key, EntryKind, Store, VersionInfo};

/// A lineage as `chalk volume lineages` shows it.
#[derive(Clone, Debug)]
pub struct LineageSummary {
    pub name: LineageName,
    /// Entries in the lineage, the forked-from version included.
    pub entries: u64,
    pub head: VersionInfo,
    /// The version a forked lineage started from; `None` for `main`.
    pub forked_from: Option<VersionId>,
}

#[derive(Serialize, Deserialize)]
struct TagRecord {
    version: String,
    created_at_ns: i64,
}

fn tag_key(volume: &VolumeName, tag: &str) -> String {
    format!("volumes/{volume}/tags/{tag}")
}

/// Names a new lineage `fork-` plus eight characters of a fresh id.
pub fn auto_lineage_name() -> LineageName {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    LineageName::new(&format!("fork-{}", &id[id.len() - 8..])).expect("generated names are valid")
}

impl Store {
    /// Creates lineage `name` (or an automatic `fork-xxxxxxxx`) whose first
    /// version is `from`.
    pub fn fork(&self, volume: &VolumeName, from: VersionId, name: Option<LineageName>) -> Result<(LineageName, VersionInfo)> {
        let version = self.resolve_version(volume, &from.to_string())?;
        let name = name.unwrap_or_else(auto_lineage_name);
        if !self.publish_entry(volume, &name, 1, &version, EntryKind::Fork)? {
            return Err(EngineError::exists("lineage", format!("{name} of volume {volume}")));
        }
        tracing::info!(volume = %volume, lineage = %name, version = %version.id, "forked lineage");
        Ok((name, version))
    }

    /// Lists the lineages of a volume by name.
    pub fn lineages(&self, volume: &VolumeName) -> Result<Vec<LineageSummary>> {
        if !self.volume_exists(volume)? {
            return Err(EngineError::not_found("volume", volume.as_str()));
        }
        let prefix = format!("volumes/{volume}/lineages/");
        let keys = list_all(self.objects().as_ref(), &prefix)?;
        let mut out: Vec<LineageSummary> = Vec::new();
        let mut index = 0;
        while index < keys.len() {
            let name = keys[index].key[prefix.len()..].split('/').next().unwrap_or_default().to_owned();
            let group: Vec<&str> = keys[index..]
                .iter()
                .take_while(|k| k.key[prefix.len()..].split('/').next() == Some(name.as_str()))
                .map(|k| k.key.as_str())
                .collect();
            index += group.len();
            let lineage = LineageName::new(&name)?;
            let first = self.version_at_key(group[0])?;
            let head = self.version_at_key(group[group.len() - 1])?;
            let forked_from = (first.lineage != lineage).then_some(first.id);
            out.push(LineageSummary { name: lineage, entries: group.len() as u64, head, forked_from });
        }
        Ok(out)
    }

    /// Renames a lineage: its entries are copied under the new name, each
    /// with create-if-absent, and then removed from the old one.
    pub fn rename_lineage(&self, volume: &VolumeName, from: &LineageName, to: &LineageName) -> Result<()> {
        if from.as_str() == LineageName::MAIN {
            return Err(EngineError::NotPermitted(format!(
                "renaming lineage main of volume {volume}; fork it under the new name instead"
            )));
        }
        let keys = list_all(self.objects().as_ref(), &lineage_prefix(volume, from))?;
        if keys.is_empty() {
            return Err(self.lineage_not_found(volume, from));
        }
        if self.head_opt(volume, to)?.is_some() {
            return Err(EngineError::exists("lineage", format!("{to} of volume {volume}")));
        }
        for key in &keys {
            let bytes = self.read_object(&key.key)?;
            let seq = entry_seq(&key.key)?;
            if !self.objects().put_if_absent(&version_key(volume, to, seq), &bytes)? {
                return Err(EngineError::exists("lineage", format!("{to} of volume {volume}")));
            }
        }
        for key in keys.iter().rev() {
            self.objects().delete(&key.key)?;
        }
        Ok(())
    }

    /// Deletes a lineage's entries. Its versions stay readable by id and tag
    /// until `gc` removes what no lineage or tag refers to. `main` cannot be deleted.
    pub fn delete_lineage(&self, volume: &VolumeName, lineage: &LineageName) -> Result<()> {
        if lineage.as_str() == LineageName::MAIN {
            return Err(EngineError::NotPermitted(format!(
                "deleting lineage main of volume {volume}; delete the volume instead"
            )));
        }
        let keys = list_all(self.objects().as_ref(), &lineage_prefix(volume, lineage))?;
        if keys.is_empty() {
            return Err(self.lineage_not_found(volume, lineage));
        }
        for key in keys.iter().rev() {
            self.objects().delete(&key.key)?;
        }
        Ok(())
    }

    /// Gives a version a tag; a tag that exists is never moved.
    pub fn tag(&self, volume: &VolumeName, version: VersionId, tag: &str) -> Result<()> {
        let valid = !tag.is_empty()
            && tag.len() <= 63
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !tag.starts_with(['.', '-'])
            && tag.parse::<VersionId>().is_err();
        if !valid {
            return Err(EngineError::InvalidName {
                kind: "tag",
                name: tag.to_owned(),
                reason: "use 1 to 63 ASCII letters, digits, '-', '_' or '.', not starting with '.' or '-', and not a version id",
            });
        }
        self.resolve_version(volume, &version.to_string())?;
        let record = TagRecord { version: version.to_string(), created_at_ns: now_ns() };
        let bytes = frame(ObjectType::TagRecord, &serde_json::to_vec(&record).expect("serializable"));
        if !self.objects().put_if_absent(&tag_key(volume, tag), &bytes)? {
            let existing = self.tag_target(volume, tag)?.map(|v| v.to_string()).unwrap_or_default();
            return Err(EngineError::exists("tag", format!("{tag} of volume {volume} (it names version {existing})")));
        }
        Ok(())
    }

    /// The version a tag names, if the tag exists.
    pub fn tag_target(&self, volume: &VolumeName, tag: &str) -> Result<Option<VersionId>> {
        if tag.contains('/') || tag.is_empty() || tag.starts_with('.') {
            return Ok(None);
        }
        let key = tag_key(volume, tag);
        let Some(bytes) = self.objects().get(&key)? else { return Ok(None) };
        let corrupt = |detail: String| EngineError::CorruptObject { key: key.clone(), detail };
        let payload = unframe(ObjectType::TagRecord, &bytes).map_err(corrupt)?;
        let record: TagRecord = serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(record.version.parse()?))
    }

    /// Tags of a volume with the versions they name, by tag.
    pub fn tags(&self, volume: &VolumeName) -> Result<Vec<(String, VersionId)>> {
        let prefix = format!("volumes/{volume}/tags/");
        let mut out = Vec::new();
        for object in list_all(self.objects().as_ref(), &prefix)? {
            let tag = &object.key[prefix.len()..];
            if let Some(version) = self.tag_target(volume, tag)? {
                out.push((tag.to_owned(), version));
            }
        }
        Ok(out)
    }
}

impl Store {
    /// Publishes the content of `version` onto lineage `onto`. When the
    /// lineage's head is `version` or one of its ancestors, `version` itself
    /// becomes the head (a fast-forward). Otherwise the changes from the
    /// newest common ancestor to `version` are applied to the head as a new
    /// version, by the rules of a sync onto a moved head. Paths changed on
    /// both sides are a conflict: the result is an [`EngineError::Conflict`]
    /// that lists them, and nothing is published.
    pub fn promote(self: &Arc<Self>, volume: &VolumeName, version: VersionId, onto: &LineageName) -> Result<VersionInfo> {
        let source = self.resolve_version(volume, &version.to_string())?;
        let (seq, head) = self.head_entry(volume, onto)?;
        if head.id == source.id {
            return Ok(source);
        }
        let mut cursor = source.parent;
        let mut fast_forward = false;
        while let Some(id) = cursor {
            if id == head.id {
                fast_forward = true;
                break;
            }
            cursor = self.resolve_version(volume, &id.to_string())?.parent;
        }
        if !fast_forward {
            return self.promote_by_rebase(volume, &source, onto);
        }
        if !self.publish_entry(volume, onto, seq + 1, &source, EntryKind::Promote)? {
            return Err(EngineError::HeadMoved {
                volume: volume.to_string(),
                lineage: onto.to_string(),
                base: head.id.to_string(),
                head: self.head(volume, onto)?.id.to_string(),
            });
        }
        tracing::info!(volume = %volume, lineage = %onto, version = %source.id, "promoted version");
        Ok(source)
    }

    /// Promotes `source` onto a lineage that is not its ancestor line.
    fn promote_by_rebase(self: &Arc<Self>, volume: &VolumeName, source: &VersionInfo, onto: &LineageName) -> Result<VersionInfo> {
        let (base_seq, base) = self.common_ancestor(volume, source, onto)?;
        let session = self.open_session(volume, SessionBase::Version(base.id), Access::Writable)?;
        let source_root = self.load_checkpoint(volume, source.id)?;
        session.stage_version(&source_root, onto.clone(), base_seq)?;
        let options = SyncOptions {
            message: Some(format!("promote {} onto {onto}", source.id)),
            on_conflict: OnConflict::Error,
            // The session ends with the promote.
            retry: RetryAdvice::Repeat(format!("promote version {} again", source.id)),
        };
        let synced = session.sync_with(&options).map_err(|err| match err {
            EngineError::Conflict { volume, lineage, head, paths, .. } => {
                EngineError::Conflict { volume, lineage, head, paths, promoted: Some(source.id.to_string()) }
            }
            other => other,
        })?;
        let published = match synced {
            SyncOutcome::Published(info) => info,
            // The head already contains every change of `source`.
            SyncOutcome::NothingToPublish { .. } => return self.head(volume, onto),
        };
        tracing::info!(volume = %volume, lineage = %onto, source = %source.id, version = %published.id, "promoted version by rebase");
        Ok(published)
    }

    /// The newest version of `version`'s ancestry that is an entry of
    /// `lineage`, with its sequence number there.
    fn common_ancestor(&self, volume: &VolumeName, version: &VersionInfo, lineage: &LineageName) -> Result<(u64, VersionInfo)> {
        let mut entries: HashMap<VersionId, u64> = HashMap::new();
        for object in list_all(self.objects().as_ref(), &lineage_prefix(volume, lineage))? {
            let seq = entry_seq(&object.key)?;
            entries.insert(self.version_at_key(&object.key)?.id, seq);
        }
        let mut cursor = Some(version.clone());
        while let Some(candidate) = cursor {
            if let Some(seq) = entries.get(&candidate.id) {
                return Ok((*seq, candidate));
            }
            cursor = match candidate.parent {
                Some(parent) => Some(self.resolve_version(volume, &parent.to_string())?),
                None => None,
            };
        }
        Err(EngineError::InvalidArgument(format!(
            "version {} of volume {volume} shares no history with lineage {lineage}, so it cannot be promoted there",
            version.id
        )))
    }
}
