//! The external-data files an ONNX graph names (`TensorProto.external_data`, key `location`):
//! ONNX Runtime opens them beside the graph when it loads it, so each must be a file the
//! manifest lists, and so hash-checked, or the graph is refused.
//!
//! A minimal walk of the protobuf wire format over the messages that can hold tensors: the
//! model's graph and functions, nodes, attributes (their tensors and subgraphs) and sparse
//! tensors.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Subgraphs nest (If, Loop, Scan); deeper than this is not a graph anyone exported.
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy)]
enum Message {
    Model,
    Function,
    Graph,
    Node,
    Attribute,
    SparseTensor,
    Tensor,
    Entry,
}

/// Field numbers from onnx.proto: which fields of `message` are messages worth entering.
fn child(message: Message, field: u64) -> Option<Message> {
    use Message::*;
    match (message, field) {
        (Model, 7) | (Attribute, 6) | (Attribute, 11) => Some(Graph),
        (Model, 25) => Some(Function),
        (Graph, 1) | (Function, 7) => Some(Node),
        (Node, 5) => Some(Attribute),
        (Graph, 5) | (Attribute, 5) | (Attribute, 10) | (SparseTensor, 1) | (SparseTensor, 2) => Some(Tensor),
        (Graph, 15) | (Attribute, 22) | (Attribute, 23) => Some(SparseTensor),
        (Tensor, 13) => Some(Entry),
        _ => None,
    }
}

fn varint(buf: &[u8], pos: &mut usize) -> std::result::Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Walks one message; pushes every external-data `location` into `out`. For an `Entry`,
/// returns its (key, value).
fn walk(buf: &[u8], message: Message, depth: usize, out: &mut Vec<String>) -> std::result::Result<Option<(String, String)>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("messages nested deeper than {MAX_DEPTH}"));
    }
    let (mut key, mut value) = (None, None);
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let (field, wire) = (tag >> 3, tag & 7);
        let skip = match wire {
            0 => {
                varint(buf, &mut pos)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| "length out of range")?;
                let end = pos.checked_add(len).filter(|&e| e <= buf.len()).ok_or("a field runs past the end of the file")?;
                let body = &buf[pos..end];
                pos = end;
                match (message, field) {
                    (Message::Entry, 1) => key = Some(String::from_utf8_lossy(body).into_owned()),
                    (Message::Entry, 2) => value = Some(String::from_utf8_lossy(body).into_owned()),
                    _ => {
                        if let Some(inner) = child(message, field)
                            && let Some((k, v)) = walk(body, inner, depth + 1, out)?
                            && k == "location"
                        {
                            out.push(v);
                        }
                    }
                }
                0
            }
            other => return Err(format!("protobuf wire type {other} is not used by ONNX")),
        };
        pos = pos.checked_add(skip).filter(|&p| p <= buf.len()).ok_or("a field runs past the end of the file")?;
    }
    Ok(key.zip(value))
}

/// The external-data locations `bytes` (an ONNX ModelProto) names, sorted, each once.
pub fn locations(bytes: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    walk(bytes, Message::Model, 0, &mut out)?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Refuses graph `name` (at `path`, listed by `manifest`) if it names an external-data file
/// that `files` (the manifest's sha256 list) does not list: ONNX Runtime would load it unchecked.
pub fn check_listed(path: &Path, name: &str, manifest: &Path, files: &BTreeMap<String, String>) -> Result<()> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: read only; a graph changing under the check fails its sha256 at load instead.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    let bad = |reason: String| Error::Manifest { path: manifest.to_path_buf(), reason };
    let found = locations(&bytes).map_err(|e| bad(format!("{name}: cannot load it as an ONNX graph ({e})")))?;
    let folder = Path::new(name).parent().unwrap_or(Path::new(""));
    for location in found {
        let listed = folder.join(&location);
        if !files.contains_key(listed.to_string_lossy().as_ref()) {
            return Err(bad(format!(
                "{name} loads external data from `{location}`, which `files` does not list (no sha256); every file a graph reads must be listed"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn finds_locations_in_initializers_and_subgraphs() {
        let entry = |k: &str, v: &str| field(13, &[field(1, k.as_bytes()), field(2, v.as_bytes())].concat());
        let tensor = [field(8, b"w"), entry("location", "w.bin"), entry("offset", "0")].concat();
        let subgraph = field(5, &[field(8, b"x"), entry("location", "../up.bin")].concat());
        let node = field(1, &field(5, &field(6, &subgraph)));
        let graph = [field(5, &tensor), node].concat();
        let model = [vec![0x08, 0x07], field(7, &graph)].concat(); // ir_version 7, graph
        assert_eq!(locations(&model), Ok(vec!["../up.bin".to_string(), "w.bin".to_string()]));
        assert!(locations(&model[..model.len() - 1]).is_err(), "a truncated graph is an error");
    }
}
