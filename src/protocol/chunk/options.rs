//! A chunk route's own options: which library it speaks (Resumable.js or Flow.js) and the
//! parameter names its clients send.

use serde::Deserialize;

/// Resumable.js and Flow.js speak one protocol with different names; the only other
/// difference is where the file's MIME type comes from (see `ChunkParams::file_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Resumable,
    Flow,
}

/// A chunk route's options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkOptions {
    pub flavor: Flavor,
    pub names: ParamNames,
}

impl ChunkOptions {
    pub fn new(flavor: Flavor, raw: RawParamNames) -> Result<ChunkOptions, String> {
        Ok(ChunkOptions {
            flavor,
            names: ParamNames::resolve(flavor, raw)?,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::Resumable => "resumable",
            Flavor::Flow => "flow",
        }
    }
}

/// Resumable.js parameter renaming (`*ParameterName`, `parameterNamespace`). An empty string means
/// the site dropped that parameter. Flow.js only allows renaming the file field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParamNames {
    namespace: Option<String>,
    chunk_number: Option<String>,
    chunk_size: Option<String>,
    current_chunk_size: Option<String>,
    total_size: Option<String>,
    #[serde(rename = "type")]
    file_type: Option<String>,
    identifier: Option<String>,
    filename: Option<String>,
    relative_path: Option<String>,
    total_chunks: Option<String>,
    file: Option<String>,
}

/// The parameter names a route's clients send, namespace applied. `None`: not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamNames {
    pub chunk_number: String,
    pub chunk_size: String,
    pub current_chunk_size: Option<String>,
    pub total_size: String,
    pub file_type: Option<String>,
    pub identifier: String,
    pub filename: Option<String>,
    pub relative_path: Option<String>,
    pub total_chunks: Option<String>,
    /// The multipart field that carries the chunk bytes.
    pub file_field: String,
    /// Resumable.js's `parameterNamespace`, which it also puts in front of the site's own
    /// fields; Stitch takes it off again before they reach the application.
    pub namespace: String,
}

impl ParamNames {
    fn resolve(protocol: Flavor, raw: RawParamNames) -> Result<ParamNames, String> {
        let (prefix, defaults) = match protocol {
            Flavor::Resumable => ("resumable", true),
            Flavor::Flow => ("flow", false),
        };
        if protocol == Flavor::Flow {
            let renamed = [
                &raw.namespace,
                &raw.chunk_number,
                &raw.chunk_size,
                &raw.current_chunk_size,
                &raw.total_size,
                &raw.file_type,
                &raw.identifier,
                &raw.filename,
                &raw.relative_path,
                &raw.total_chunks,
            ];
            if renamed.iter().any(|v| v.is_some()) {
                return Err(
                    "Flow.js cannot rename its parameters: only `file` may be set \
                            under `parameters` for a flow route"
                        .into(),
                );
            }
        }
        let ns = raw.namespace.unwrap_or_default();
        let name = |given: Option<String>, default: &str| -> Option<String> {
            match given {
                Some(n) if n.is_empty() => None,
                Some(n) => Some(format!("{ns}{n}")),
                None => Some(format!("{ns}{prefix}{default}")),
            }
        };
        let required = |given: Option<String>, default: &str, key: &str| {
            name(given, default).ok_or_else(|| format!("parameters.{key} cannot be dropped"))
        };
        Ok(ParamNames {
            chunk_number: required(raw.chunk_number, "ChunkNumber", "chunk_number")?,
            chunk_size: required(raw.chunk_size, "ChunkSize", "chunk_size")?,
            current_chunk_size: name(raw.current_chunk_size, "CurrentChunkSize"),
            total_size: required(raw.total_size, "TotalSize", "total_size")?,
            file_type: if defaults {
                name(raw.file_type, "Type")
            } else {
                None
            },
            identifier: required(raw.identifier, "Identifier", "identifier")?,
            filename: name(raw.filename, "Filename"),
            relative_path: name(raw.relative_path, "RelativePath"),
            total_chunks: name(raw.total_chunks, "TotalChunks"),
            file_field: match raw.file.as_deref() {
                Some("") => return Err("parameters.file cannot be empty".into()),
                Some(file) => format!("{ns}{file}"),
                None => format!("{ns}file"),
            },
            namespace: ns,
        })
    }

    /// True if `name` is one of the protocol's own parameters (never an application field).
    pub fn is_protocol_param(&self, name: &str) -> bool {
        name == self.chunk_number
            || name == self.chunk_size
            || name == self.total_size
            || name == self.identifier
            || [
                &self.current_chunk_size,
                &self.file_type,
                &self.filename,
                &self.relative_path,
                &self.total_chunks,
            ]
            .iter()
            .any(|n| n.as_deref() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumable_namespace_prefixes_every_name_and_the_file_field() {
        let raw = RawParamNames {
            namespace: Some("ns_".into()),
            file_type: Some(String::new()),
            ..Default::default()
        };
        let names = ParamNames::resolve(Flavor::Resumable, raw).unwrap();
        assert_eq!(names.chunk_number, "ns_resumableChunkNumber");
        assert_eq!(names.file_field, "ns_file");
        assert_eq!(names.file_type, None);
    }

    #[test]
    fn flow_routes_refuse_renamed_parameters() {
        let raw = RawParamNames {
            chunk_number: Some("n".into()),
            ..Default::default()
        };
        assert!(ParamNames::resolve(Flavor::Flow, raw).is_err());
    }
}
