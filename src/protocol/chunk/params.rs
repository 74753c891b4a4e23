//! Chunk parameters of Resumable.js and Flow.js: merged from the URL query and the multipart text
//! fields, parsed, and checked against each other.
//!
//! The two clients speak the same protocol with different names (see `options::ParamNames`);
//! the only other difference is where the file's MIME type comes from, see [`ChunkParams::file_type`].

use super::options::{Flavor, ParamNames};
use crate::config::Limits;
use crate::upload::PartRef;

/// Longest identifier, file name and MIME type accepted, in bytes.
pub const MAX_IDENTIFIER: usize = 1024;
pub const MAX_FILE_NAME: usize = 1024;
pub const MAX_RELATIVE_PATH: usize = 4096;
pub const MAX_TYPE: usize = 255;

/// Name/value pairs as the request carried them: body fields first, then the query.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    body: Vec<(String, String)>,
    query: Vec<(String, String)>,
}

impl Fields {
    pub fn from_query(query: Option<&str>) -> Fields {
        Fields {
            body: Vec::new(),
            query: url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }

    pub fn push_body(&mut self, name: String, value: String) {
        self.body.push((name, value));
    }

    /// One value per name, the body's first: Resumable sends every parameter twice (URL and
    /// body) and the two must never be joined.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.body
            .iter()
            .chain(&self.query)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every name once, with its chosen value, in the order the client sent them.
    pub fn merged(&self) -> Vec<(String, String)> {
        let mut seen = std::collections::HashSet::new();
        self.body
            .iter()
            .chain(&self.query)
            .filter(|(name, _)| seen.insert(name.as_str()))
            .cloned()
            .collect()
    }
}

/// A chunk request's parameters, each valid on its own and consistent with the others.
#[derive(Debug, Clone)]
pub struct ChunkParams {
    pub part: PartRef,
    pub chunk_size: u64,
    pub total_size: u64,
    pub identifier: String,
    pub file_name: String,
    /// Resumable's `resumableType` (empty means unknown).
    pub type_param: Option<String>,
}

/// Why a request's parameters were refused; the message goes back to the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

fn invalid<T>(message: String) -> Result<T, ParamError> {
    Err(ParamError(message))
}

impl ChunkParams {
    pub fn parse(fields: &Fields, names: &ParamNames, limits: &Limits) -> Result<Self, ParamError> {
        let number = number(fields, &names.chunk_number)?;
        let chunk_size = number_field(fields, &names.chunk_size)?;
        let total_size = number_field(fields, &names.total_size)?;
        let identifier = required(fields, &names.identifier)?.to_string();
        check_identifier(&identifier, &names.identifier)?;
        let file_name = match &names.filename {
            Some(name) => {
                let value = required(fields, name)?;
                check_file_name(value, name)?;
                value.to_string()
            }
            None => "upload".to_string(),
        };
        if let Some(name) = &names.relative_path {
            if let Some(path) = fields.get(name) {
                check_relative_path(path, name)?;
            }
        }
        if let Some(name) = &names.total_chunks {
            if fields.get(name).is_some() {
                number_field(fields, name)?; // a hint only, but it must be a number
            }
        }
        let type_param = match &names.file_type {
            Some(name) => {
                let value = fields.get(name).unwrap_or("");
                if value.len() > MAX_TYPE || value.chars().any(char::is_control) {
                    return invalid(format!("{name} is not a MIME type"));
                }
                Some(value.to_string())
            }
            None => None,
        };
        if chunk_size == 0 {
            return invalid(format!("{} must be at least 1", names.chunk_size));
        }
        if total_size > limits.max_file_size.0 {
            return invalid(format!(
                "the file has {total_size} bytes; this route accepts at most {}",
                limits.max_file_size.0
            ));
        }
        let len = match &names.current_chunk_size {
            Some(name) => number_field(fields, name)?,
            None => expected_len(number, chunk_size, total_size)?,
        };
        if len > limits.max_chunk_size.0 {
            return invalid(format!(
                "the chunk has {len} bytes; this route accepts at most {}",
                limits.max_chunk_size.0
            ));
        }
        check_bounds(number, len, chunk_size, total_size)?;
        Ok(ChunkParams {
            part: PartRef { number, len },
            chunk_size,
            total_size,
            identifier,
            file_name,
            type_param,
        })
    }

    /// The file's MIME type: Resumable declares it as a parameter; Flow has none, so the type
    /// of the uploaded bytes (multipart part or octet request) stands in.
    pub fn file_type(&self, flavor: Flavor, body_type: Option<&str>) -> Option<String> {
        let declared = match flavor {
            Flavor::Resumable => self.type_param.as_deref(),
            Flavor::Flow => body_type,
        };
        declared
            .filter(|t| !t.is_empty() && t.len() <= MAX_TYPE && !t.chars().any(char::is_control))
            .map(str::to_string)
    }
}

fn required<'f>(fields: &'f Fields, name: &str) -> Result<&'f str, ParamError> {
    fields
        .get(name)
        .ok_or_else(|| ParamError(format!("missing parameter {name}")))
}

/// A decimal u64: digits only, no sign, no spaces.
fn number_field(fields: &Fields, name: &str) -> Result<u64, ParamError> {
    let text = required(fields, name)?;
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return invalid(format!("{name} must be a whole number, not {text:?}"));
    }
    text.parse()
        .map_err(|_| ParamError(format!("{name} is too large: {text}")))
}

fn number(fields: &Fields, name: &str) -> Result<u64, ParamError> {
    match number_field(fields, name)? {
        0 => invalid(format!("{name} counts from 1")),
        n => Ok(n),
    }
}

/// The clients' chunk arithmetic: every chunk but the last has exactly `chunk_size`
/// bytes; the last ends at `total` and holds fewer than `2 * chunk_size` bytes (the client's
/// default) or at most `chunk_size` (`forceChunkSize`).
fn check_bounds(number: u64, len: u64, chunk_size: u64, total: u64) -> Result<(), ParamError> {
    let offset = (number - 1)
        .checked_mul(chunk_size)
        .ok_or_else(|| ParamError(format!("chunk {number} lies past the end of the file")))?;
    if total == 0 {
        return if number == 1 && len == 0 {
            Ok(())
        } else {
            invalid("an empty file has exactly one empty chunk".into())
        };
    }
    if offset >= total {
        return invalid(format!(
            "chunk {number} starts at byte {offset}, past the end of a {total}-byte file"
        ));
    }
    let end = offset
        .checked_add(len)
        .filter(|end| *end <= total)
        .ok_or_else(|| ParamError(format!("chunk {number} of {len} bytes overruns the file")))?;
    let last = end == total;
    if !last && len != chunk_size {
        return invalid(format!(
            "chunk {number} has {len} bytes; every chunk but the last has {chunk_size}"
        ));
    }
    if last && len / 2 >= chunk_size {
        return invalid(format!(
            "the last chunk has {len} bytes, more than twice the chunk size {chunk_size}"
        ));
    }
    Ok(())
}

/// With no current-size parameter, the size a chunk must have (the client's default mode).
fn expected_len(number: u64, chunk_size: u64, total: u64) -> Result<u64, ParamError> {
    let count = (total / chunk_size).max(1);
    let offset = (number - 1).saturating_mul(chunk_size);
    match number.cmp(&count) {
        std::cmp::Ordering::Less => Ok(chunk_size),
        std::cmp::Ordering::Equal => Ok(total.saturating_sub(offset)),
        std::cmp::Ordering::Greater => invalid(format!("chunk {number} is past the last chunk")),
    }
}

fn check_identifier(value: &str, name: &str) -> Result<(), ParamError> {
    if value.is_empty() || value.len() > MAX_IDENTIFIER {
        return invalid(format!("{name} must have 1 to {MAX_IDENTIFIER} bytes"));
    }
    if value.chars().any(char::is_control) || has_dot_dot_segment(value) {
        return invalid(format!(
            "{name} contains control characters or a `..` path segment"
        ));
    }
    Ok(())
}

fn check_file_name(value: &str, name: &str) -> Result<(), ParamError> {
    if value.is_empty() || value.len() > MAX_FILE_NAME || value == "." || value == ".." {
        return invalid(format!(
            "{name} must be a file name of 1 to {MAX_FILE_NAME} bytes"
        ));
    }
    if value.contains(['/', '\\']) || value.chars().any(char::is_control) {
        return invalid(format!(
            "{name} must not contain path separators or control characters"
        ));
    }
    Ok(())
}

fn check_relative_path(value: &str, name: &str) -> Result<(), ParamError> {
    if value.len() > MAX_RELATIVE_PATH
        || value.chars().any(char::is_control)
        || has_dot_dot_segment(value)
    {
        return invalid(format!(
            "{name} must be a relative path of at most {MAX_RELATIVE_PATH} bytes, \
             without control characters or `..` segments"
        ));
    }
    Ok(())
}

fn has_dot_dot_segment(value: &str) -> bool {
    value.split(['/', '\\']).any(|segment| segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_chunk_may_absorb_the_remainder_or_be_short() {
        assert!(check_bounds(2, 1500, 1000, 2500).is_ok()); // default: last holds cs..2cs-1
        assert!(check_bounds(3, 500, 1000, 2500).is_ok()); // forceChunkSize: last is short
        assert!(check_bounds(1, 700, 1000, 700).is_ok()); // smaller than one chunk
        assert!(check_bounds(1, 0, 1000, 0).is_ok()); // empty file
    }

    #[test]
    fn chunks_that_do_not_fit_the_file_are_refused() {
        assert!(check_bounds(2, 999, 1000, 2500).is_err()); // a middle chunk must be full
        assert!(check_bounds(4, 500, 1000, 2500).is_err()); // past the end
        assert!(check_bounds(2, 1600, 1000, 2500).is_err()); // overruns
        assert!(check_bounds(1, 5000, 1000, 5000).is_err()); // last chunk > 2 * cs
        assert!(check_bounds(u64::MAX, 1, u64::MAX, 10).is_err()); // offset overflows
    }

    #[test]
    fn body_fields_win_over_query_fields_and_values_are_never_joined() {
        let mut fields = Fields::from_query(Some("a=query&b=only%20query"));
        fields.push_body("a".into(), "body".into());
        assert_eq!(fields.get("a"), Some("body"));
        assert_eq!(fields.get("b"), Some("only query"));
        assert_eq!(fields.merged().len(), 2);
    }

    #[test]
    fn identifiers_with_path_segments_or_control_characters_are_refused() {
        assert!(check_identifier("1234-", "id").is_ok());
        assert!(check_identifier("../../etc/passwd", "id").is_err());
        assert!(check_identifier("a\0b", "id").is_err());
        assert!(check_identifier(&"x".repeat(10_000), "id").is_err());
    }
}
