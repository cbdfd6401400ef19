//! Text prompts to `context` embeddings: Wan's umT5 encoder exported to ONNX by
//! `python -m flowstep_export.pipeline.text_encoder`, run on the CPU provider, with its
//! `tokenizer.json` read by the `tokenizers` crate. Tokenization is what DiffSynth's
//! `HuggingfaceTokenizer` does for Wan (its ftfy, HTML and whitespace cleaning:
//! [`prompt_clean`]; special tokens, truncation and padding to `text_len`, the attention
//! mask), and the embeddings past the prompt's tokens are zeroed as
//! `WanVideoUnit_PromptEmbedder` does. Prompts are encoded once, before the first step or
//! sample, and the encoder is dropped (its memory freed) before the DiT runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde::Deserialize;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::artifacts::{ModelInfo, check_external_data, resolve_inside, sha256_file};
use crate::error::{Error, Result};
use crate::prompt_clean;
use crate::runtime::{SessionOptions, load_session};

pub const MANIFEST: &str = "text_encoder.json";
const FORMAT: &str = "flowstep.text_encoder";
/// A text-encoder manifest is about 1 kB.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// umT5's tokenizer.json is 16 MiB.
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// A prompt longer than this many bytes is not a prompt (text_len tokens are kept anyway).
pub const MAX_PROMPT_BYTES: usize = 64 << 10;

#[derive(Debug, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    text_len: usize,
    dim: usize,
    dtype: String,
    pad_id: u32,
    pad_token: String,
    graph: String,
    tokenizer: String,
    files: BTreeMap<String, String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Manifest { path: path.to_path_buf(), reason: reason.into() }
}

/// The umT5 encoder session and its tokenizer, from a `text_encoder.json` directory.
pub struct TextEncoder {
    session: Session,
    tokenizer: Tokenizer,
    text_len: usize,
    dim: usize,
}

impl TextEncoder {
    /// Reads `dir/text_encoder.json`, checks every file's sha256 and that the embeddings are
    /// `model`'s `[text_len, text_dim]`, and loads the graph on the CPU provider.
    pub fn open(dir: &Path, model: &ModelInfo, threads: Option<usize>) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = crate::small_file::read_text(&path, "text encoder manifest", MAX_MANIFEST_BYTES).map_err(|e| {
            Error::Config(format!("--text-encoder {}: {e}; make the directory with python -m flowstep_export.pipeline.text_encoder", dir.display()))
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(&path, format!("not a text encoder manifest: {e}")))?;
        if m.format != FORMAT || m.version != 1 {
            return Err(bad(&path, format!("format {} version {}; this flowstep reads {FORMAT} version 1", m.format, m.version)));
        }
        if m.dtype != "float32" {
            return Err(bad(&path, format!("dtype {}; the CPU provider runs float32 encoders only", m.dtype)));
        }
        if [m.text_len, m.dim] != [model.text_len, model.text_dim] {
            return Err(Error::Config(format!(
                "--text-encoder {}: the encoder makes [{}, {}] embeddings, {} takes context [{}, {}]",
                dir.display(), m.text_len, m.dim, model.name, model.text_len, model.text_dim
            )));
        }
        let place = "the text encoder directory";
        let mut resolved: BTreeMap<&str, PathBuf> = BTreeMap::new();
        for name in m.files.keys().map(String::as_str).chain([m.graph.as_str(), m.tokenizer.as_str()]) {
            let expected = m.files.get(name).ok_or_else(|| bad(&path, format!("`files` has no sha256 for {name}")))?;
            let file = resolve_inside(dir, place, &path, name)?;
            if &sha256_file(&file)? != expected {
                return Err(bad(&file, format!("sha256 differs from {MANIFEST}: the file changed since the export")));
            }
            resolved.insert(name, file);
        }
        let tokenizer = load_tokenizer(&resolved[m.tokenizer.as_str()], &m)?;
        check_external_data(&resolved[m.graph.as_str()], &m.graph, &path, &m.files)?;
        let options = SessionOptions { threads, ..SessionOptions::cpu() };
        let session = load_session(&resolved[m.graph.as_str()], &options)?;
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != ["ids", "mask"] || outputs != ["context"] {
            return Err(bad(&path, format!("{}: inputs {inputs:?} and outputs {outputs:?}; expected [\"ids\", \"mask\"] and [\"context\"]", m.graph)));
        }
        Ok(Self { session, tokenizer, text_len: m.text_len, dim: m.dim })
    }

    /// Token ids and attention mask of `prompt`, `text_len` each, as DiffSynth's
    /// `HuggingfaceTokenizer(seq_len=text_len, clean="whitespace")` gives them.
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<i64>, Vec<i64>)> {
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(Error::Config(format!("prompt `{}…`: longer than {MAX_PROMPT_BYTES} bytes", prompt.chars().take(40).collect::<String>())));
        }
        let encoding = self.tokenizer.encode(prompt_clean::clean(prompt)?, true)
            .map_err(|e| Error::Config(format!("prompt {prompt:?}: the tokenizer failed: {e}")))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        let mask: Vec<i64> = encoding.get_attention_mask().iter().map(|&m| i64::from(m)).collect();
        if ids.len() != self.text_len || mask.len() != self.text_len {
            return Err(Error::Config(format!("prompt {prompt:?}: the tokenizer gave {} tokens, not {}", ids.len(), self.text_len)));
        }
        Ok((ids, mask))
    }

    /// `context` [text_len, dim] for `prompt`: the encoder's output, zero from the first padding
    /// token on (DiffSynth's `prompt_emb[:, seq_len:] = 0`).
    pub fn encode(&mut self, prompt: &str) -> Result<Vec<f32>> {
        let (ids, mask) = self.tokenize(prompt)?;
        let tokens = mask.iter().filter(|&&m| m > 0).count();
        let shape = vec![1, self.text_len];
        let ids = Tensor::from_array((shape.clone(), ids)).map_err(Error::ort("creating the token id tensor"))?;
        let mask = Tensor::from_array((shape, mask)).map_err(Error::ort("creating the attention mask tensor"))?;
        let during = format!("encoding the prompt {prompt:?}");
        let inputs = vec![("ids".to_string(), SessionInputValue::from(ids)), ("mask".to_string(), SessionInputValue::from(mask))];
        let outputs = self.session.run(inputs).map_err(Error::ort(during.clone()))?;
        let (shape, values) = outputs["context"].try_extract_tensor::<f32>().map_err(Error::ort(during.clone()))?;
        let expected = [1, self.text_len as i64, self.dim as i64];
        if **shape != expected {
            return Err(Error::Shape { name: "context (text encoder output)".into(), expected: vec![1, self.text_len, self.dim], got: shape.iter().map(|&d| d as usize).collect() });
        }
        let mut context = values.to_vec();
        context[tokens * self.dim..].fill(0.0);
        if let Some(i) = context.iter().position(|v| !v.is_finite()) {
            return Err(Error::Config(format!("{during}: the text encoder gave a non-finite value ({}) at token {}", context[i], i / self.dim)));
        }
        Ok(context)
    }
}

/// `tokenizer.json` with DiffSynth's settings for Wan: truncation to `text_len` tokens (special
/// tokens included) and padding to exactly `text_len` with the manifest's pad token.
fn load_tokenizer(path: &Path, m: &Manifest) -> Result<Tokenizer> {
    let text = crate::small_file::read_text(path, "tokenizer.json", MAX_TOKENIZER_BYTES)?;
    let mut tokenizer = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| bad(path, format!("not a tokenizer.json the tokenizers crate reads: {e}")))?;
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: m.text_len, ..Default::default() }))
        .map_err(|e| bad(path, format!("cannot truncate to {} tokens: {e}", m.text_len)))?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(m.text_len),
        direction: PaddingDirection::Right,
        pad_id: m.pad_id,
        pad_token: m.pad_token.clone(),
        ..Default::default()
    }));
    Ok(tokenizer)
}

/// Encodes `prompts` with the encoder in `dir` on the CPU, then drops the encoder: the returned
/// contexts are all that stays in memory.
pub fn encode_prompts(dir: &Path, prompts: &[&str], model: &ModelInfo, threads: Option<usize>) -> Result<Vec<Vec<f32>>> {
    let mut encoder = TextEncoder::open(dir, model, threads)?;
    prompts.iter().map(|p| encoder.encode(p)).collect()
}

