//! flowstep: LoRA fine-tuning of the Wan video DiT on ONNX Runtime.
//!
//! The Python package in `export/` turns the model into portable ONNX training graphs
//! (docs/DESIGN.md §3); this crate drives them: the flow-matching step math on float32 slices, the
//! ONNX Runtime sessions, the training loop, checkpoints and LoRA files.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod artifacts;
pub mod checkpoint;
pub mod data;
pub mod decode;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod executor;
pub mod fp8;
pub mod lora_io;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod render;
pub mod runtime;
pub mod sample;
pub mod scheduler;
pub mod sft;
pub mod small_file;
pub mod tensor_file;
pub mod tensorboard;
pub mod prompt_clean;
pub mod text_encoder;
pub mod timesteps;
pub mod train;
pub mod video_files;

pub use error::{Error, Result};
