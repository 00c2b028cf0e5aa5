//! Partial updates (AIP-134): merges the top-level fields named in an `update_mask` from a
//! request's resource into the stored one, for any prost-generated message.
//!
//! It works at the protobuf wire level, with the field names and numbers read once from the
//! encoded `FileDescriptorSet`, so it needs neither prost-reflect nor per-message code. It is not
//! a validator: it does not look inside fields (nested paths are refused) and it does not decide
//! which fields are output only; the caller names them with [`MessageFields::with_read_only`] and
//! validates the merged message as it validates a full replacement.

use std::collections::{HashMap, HashSet};

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// The field names and numbers of one message type, read from an encoded FileDescriptorSet.
#[derive(Clone, Debug)]
pub struct MessageFields {
    full_name: String,
    /// Both the proto name ("first_byte_timeout") and the JSON name ("firstByteTimeout").
    numbers: HashMap<String, u32>,
    read_only: HashSet<u32>,
}

impl MessageFields {
    /// Looks up `full_name` (e.g. "vaas.v1.Backend") in the encoded FileDescriptorSet `descriptor_set`.
    ///
    /// Returns `None` if the set does not decode or holds no such message; nested messages are
    /// named with their parents ("vaas.v1.Outer.Inner").
    pub fn from_descriptor_set(descriptor_set: &[u8], full_name: &str) -> Option<MessageFields> {
        let set = FileDescriptorSet::decode(descriptor_set).ok()?;
        let wanted = full_name.strip_prefix('.').unwrap_or(full_name);
        set.file.iter().find_map(|file| {
            file.message_type
                .iter()
                .find_map(|message| find_message(message, file.package(), wanted))
        })
    }

    /// Marks the fields `names` (proto names) as read-only: a mask naming them is refused.
    ///
    /// Returns `None` if a name is not a field, so that a typo fails at start-up rather than
    /// silently letting clients overwrite the field.
    pub fn with_read_only(mut self, names: &[&str]) -> Option<MessageFields> {
        for name in names {
            let number = *self.numbers.get(*name)?;
            self.read_only.insert(number);
        }
        Some(self)
    }

    /// Returns the full name of the message type, e.g. "vaas.v1.Backend".
    pub fn full_name(&self) -> &str {
        &self.full_name
    }

    /// Resolves one mask path to a field number, or says why it cannot be updated.
    fn number(&self, path: &str) -> Result<u32, MaskError> {
        let message = self.full_name.clone();
        if path.contains('.') {
            return Err(MaskError::NestedPath {
                path: path.to_owned(),
                message,
            });
        }
        let Some(&number) = self.numbers.get(path) else {
            return Err(MaskError::UnknownPath {
                path: path.to_owned(),
                message,
            });
        };
        if self.read_only.contains(&number) {
            return Err(MaskError::ReadOnlyPath {
                path: path.to_owned(),
            });
        }
        Ok(number)
    }
}

fn find_message(message: &DescriptorProto, scope: &str, wanted: &str) -> Option<MessageFields> {
    let full_name = match scope {
        "" => message.name().to_owned(),
        scope => format!("{scope}.{}", message.name()),
    };
    if full_name != wanted {
        return message
            .nested_type
            .iter()
            .find_map(|nested| find_message(nested, &full_name, wanted));
    }
    let mut numbers = HashMap::new();
    for field in &message.field {
        let Ok(number) = u32::try_from(field.number()) else {
            continue;
        };
        // protoc and protox fill json_name in; compute the default in case a set lacks it.
        let json = field
            .json_name
            .clone()
            .unwrap_or_else(|| json_name(field.name()));
        numbers.insert(json, number);
        numbers.insert(field.name().to_owned(), number);
    }
    Some(MessageFields {
        full_name,
        numbers,
        read_only: HashSet::new(),
    })
}

/// Returns protoc's default JSON name: underscores dropped, the letter after each capitalised.
fn json_name(name: &str) -> String {
    let mut json = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                json.extend(c.to_uppercase());
                upper = false;
            }
            c => json.push(c),
        }
    }
    json
}

/// Why a masked update cannot be merged.
///
/// The variants with a [`path`](MaskError::path) are the client's fault: their text is meant as
/// the reason of an INVALID_ARGUMENT field violation on "update_mask". The others mean a bug.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The path names no field of the message.
    #[error("\"update_mask\" path \"{path}\" is not a field of {message}")]
    UnknownPath {
        /// The path as sent.
        path: String,
        /// The full name of the message type.
        message: String,
    },
    /// The path names a field inside a field; only top-level fields can be replaced.
    #[error(
        "\"update_mask\" path \"{path}\" is nested: only top-level fields of {message} can be updated"
    )]
    NestedPath {
        /// The path as sent.
        path: String,
        /// The full name of the message type.
        message: String,
    },
    /// The path names a field that clients cannot change.
    #[error("\"update_mask\" path \"{path}\" is read-only")]
    ReadOnlyPath {
        /// The path as sent.
        path: String,
    },
    /// The mask holds "*" together with other paths.
    #[error("\"update_mask\" path \"*\" must be the only path")]
    WildcardNotAlone,
    /// An encoded message is not valid protobuf, or uses groups.
    #[error("malformed protobuf wire data at byte {offset}: {reason}")]
    Malformed {
        /// Where the bad record starts.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The merged bytes do not decode as the message.
    #[error("cannot decode the merged message")]
    Decode(#[from] prost::DecodeError),
}

impl MaskError {
    /// Returns the offending mask path for the client's errors, `None` for internal ones.
    pub fn path(&self) -> Option<&str> {
        match self {
            MaskError::UnknownPath { path, .. }
            | MaskError::NestedPath { path, .. }
            | MaskError::ReadOnlyPath { path } => Some(path),
            MaskError::WildcardNotAlone => Some("*"),
            MaskError::Malformed { .. } | MaskError::Decode(_) => None,
        }
    }
}

/// Returns `current` with the top-level fields named in `paths` replaced by those of `patch`.
///
/// An empty mask or the single path "*" replaces everything (the patch is returned). A masked
/// field unset in `patch` ends up unset. Paths are proto or JSON field names; duplicates are
/// allowed. Naming one member of a oneof replaces only that member.
pub fn merge<M: Message + Default>(
    current: &M,
    patch: &M,
    paths: &[String],
    fields: &MessageFields,
) -> Result<M, MaskError> {
    // M is not required to be Clone, so the full replacement is a re-decode of the patch.
    if paths.iter().all(|path| path == "*") {
        return Ok(M::decode(patch.encode_to_vec().as_slice())?);
    }
    let mut mask = HashSet::new();
    for path in paths {
        if path == "*" {
            return Err(MaskError::WildcardNotAlone);
        }
        mask.insert(fields.number(path)?);
    }
    let current = current.encode_to_vec();
    let patch = patch.encode_to_vec();
    // Masked fields come only from the patch and unmasked ones only from current, so decoding
    // (last singular value wins, repeated values append) can neither mix nor lose values.
    let mut merged = Vec::with_capacity(current.len() + patch.len());
    for (number, record) in records(&current)? {
        if !mask.contains(&number) {
            merged.extend_from_slice(record);
        }
    }
    for (number, record) in records(&patch)? {
        if mask.contains(&number) {
            merged.extend_from_slice(record);
        }
    }
    Ok(M::decode(merged.as_slice())?)
}

/// Splits an encoded message into its records: (field number, bytes from tag to end of value).
fn records(buf: &[u8]) -> Result<Vec<(u32, &[u8])>, MaskError> {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let malformed = |reason| MaskError::Malformed {
            offset: start,
            reason,
        };
        let tag = varint(buf, &mut pos).map_err(malformed)?;
        let number = u32::try_from(tag >> 3)
            .ok()
            .filter(|number| *number != 0)
            .ok_or(malformed("invalid field number"))?;
        let len = match tag & 7 {
            0 => varint(buf, &mut pos).map(|_| 0).map_err(malformed)?,
            1 => 8,
            2 => varint(buf, &mut pos)
                .and_then(|len| usize::try_from(len).map_err(|_| "length too large"))
                .map_err(malformed)?,
            5 => 4,
            3 | 4 => return Err(malformed("groups are not supported")),
            _ => return Err(malformed("invalid wire type")),
        };
        let end = pos.checked_add(len).filter(|end| *end <= buf.len());
        pos = end.ok_or(malformed("record runs past the end"))?;
        records.push((number, &buf[start..pos]));
    }
    Ok(records)
}

/// Reads one base-128 varint at `pos` and moves `pos` past it.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, &'static str> {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes")
}

#[cfg(test)]
mod tests {
    use prost_types::{Duration, FieldDescriptorProto, FileDescriptorProto};

    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Thing {
        #[prost(int64, tag = "1")]
        id: i64,
        #[prost(string, tag = "2")]
        name: String,
        #[prost(uint32, optional, tag = "3")]
        weight: Option<u32>,
        #[prost(string, repeated, tag = "4")]
        tags: Vec<String>,
        #[prost(message, optional, tag = "5")]
        first_byte_timeout: Option<Duration>,
        #[prost(bool, optional, tag = "6")]
        enabled: Option<bool>,
        #[prost(int64, repeated, packed = "true", tag = "7")]
        ids: Vec<i64>,
    }

    const NAMES: [&str; 7] = [
        "id",
        "name",
        "weight",
        "tags",
        "first_byte_timeout",
        "enabled",
        "ids",
    ];

    fn fields() -> MessageFields {
        let field = |(number, name): (usize, &&str)| FieldDescriptorProto {
            name: Some(name.to_string()),
            number: Some(number as i32 + 1),
            json_name: Some(json_name(name)),
            ..Default::default()
        };
        let inner = DescriptorProto {
            name: Some("Inner".into()),
            ..Default::default()
        };
        let thing = DescriptorProto {
            name: Some("Thing".into()),
            field: NAMES.iter().enumerate().map(field).collect(),
            nested_type: vec![inner],
            ..Default::default()
        };
        let file = FileDescriptorProto {
            package: Some("test".into()),
            message_type: vec![thing],
            ..Default::default()
        };
        let set = FileDescriptorSet { file: vec![file] }.encode_to_vec();
        assert!(MessageFields::from_descriptor_set(&set, "test.Thing.Inner").is_some());
        assert!(MessageFields::from_descriptor_set(&set, "test.Other").is_none());
        MessageFields::from_descriptor_set(&set, ".test.Thing").unwrap()
    }

    fn current() -> Thing {
        Thing {
            id: 1,
            name: "old".into(),
            weight: Some(10),
            tags: vec!["a".into(), "b".into()],
            first_byte_timeout: Some(Duration {
                seconds: 5,
                nanos: 0,
            }),
            enabled: Some(true),
            ids: vec![1, 2, 3],
        }
    }

    fn patch() -> Thing {
        Thing {
            id: 2,
            name: "new".into(),
            weight: Some(20),
            tags: vec!["c".into()],
            first_byte_timeout: Some(Duration {
                seconds: 0,
                nanos: 500,
            }),
            enabled: Some(false),
            ids: vec![9],
        }
    }

    fn mask(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|path| path.to_string()).collect()
    }

    #[test]
    fn only_masked_field_changes() {
        let merged = merge(&current(), &patch(), &mask(&["weight"]), &fields()).unwrap();
        assert_eq!(
            merged,
            Thing {
                weight: Some(20),
                ..current()
            }
        );
    }

    #[test]
    fn masked_field_absent_in_patch_is_cleared() {
        let patch = Thing {
            weight: None,
            first_byte_timeout: None,
            name: String::new(),
            ..patch()
        };
        let paths = mask(&["weight", "first_byte_timeout", "name"]);
        let merged = merge(&current(), &patch, &paths, &fields()).unwrap();
        let expected = Thing {
            weight: None,
            first_byte_timeout: None,
            name: String::new(),
            ..current()
        };
        assert_eq!(merged, expected);
    }

    #[test]
    fn repeated_fields_are_replaced_not_appended() {
        let merged = merge(&current(), &patch(), &mask(&["tags", "ids"]), &fields()).unwrap();
        assert_eq!(merged.tags, ["c"]);
        assert_eq!(merged.ids, [9]);
        assert_eq!(merged.name, "old");
    }

    #[test]
    fn json_names_and_duplicates_are_accepted() {
        let paths = mask(&[
            "firstByteTimeout",
            "first_byte_timeout",
            "enabled",
            "enabled",
        ]);
        let merged = merge(&current(), &patch(), &paths, &fields()).unwrap();
        let expected = Thing {
            first_byte_timeout: patch().first_byte_timeout,
            enabled: Some(false),
            ..current()
        };
        assert_eq!(merged, expected);
    }

    #[test]
    fn bad_paths_are_refused_naming_them() {
        let fields = fields().with_read_only(&["id"]).unwrap();
        let refuse =
            |path: &str| merge(&current(), &patch(), &mask(&["name", path]), &fields).unwrap_err();
        let unknown = refuse("weigth");
        assert_eq!(
            unknown.to_string(),
            r#""update_mask" path "weigth" is not a field of test.Thing"#
        );
        assert_eq!(unknown.path(), Some("weigth"));
        assert!(matches!(
            refuse("first_byte_timeout.seconds"),
            MaskError::NestedPath { .. }
        ));
        assert_eq!(
            refuse("id").to_string(),
            r#""update_mask" path "id" is read-only"#
        );
        assert!(matches!(refuse("*"), MaskError::WildcardNotAlone));
        assert!(fields.with_read_only(&["nope"]).is_none());
    }

    #[test]
    fn empty_mask_and_wildcard_return_the_patch() {
        for paths in [mask(&[]), mask(&["*"]), mask(&["*", "*"])] {
            assert_eq!(
                merge(&current(), &patch(), &paths, &fields()).unwrap(),
                patch()
            );
        }
    }

    #[test]
    fn groups_are_refused() {
        // Field 1 with wire type 3 (start group).
        let error = records(&[0x0b, 0x0c]).unwrap_err();
        assert!(matches!(error, MaskError::Malformed { offset: 0, .. }));
        assert_eq!(error.path(), None);
    }

    #[test]
    fn every_mask_takes_masked_fields_from_patch_only() {
        let (current, patch, fields) = (current(), patch(), fields());
        for bits in 0u32..1 << NAMES.len() {
            let masked = |i: usize| bits & (1 << i) != 0;
            let paths: Vec<String> = (0..NAMES.len())
                .filter(|i| masked(*i))
                .map(|i| NAMES[i].into())
                .collect();
            let merged = merge(&current, &patch, &paths, &fields).unwrap();
            // The empty mask (bits 0) is AIP-134's full replacement.
            let pick = |i: usize| {
                if bits == 0 || masked(i) {
                    &patch
                } else {
                    &current
                }
            };
            let expected = Thing {
                id: pick(0).id,
                name: pick(1).name.clone(),
                weight: pick(2).weight,
                tags: pick(3).tags.clone(),
                first_byte_timeout: pick(4).first_byte_timeout,
                enabled: pick(5).enabled,
                ids: pick(6).ids.clone(),
            };
            assert_eq!(merged, expected, "mask {paths:?}");
        }
    }
}
