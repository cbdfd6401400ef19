//! TensorBoard event files (`OUT/tensorboard/events.out.tfevents.*`), written as training
//! goes: the TFRecord framing (length, masked CRC32C of the length, the record, masked
//! CRC32C of the record) around `tensorflow.Event` protocol buffers, hand-encoded for the
//! few fields used (scalars, PNG images, the session-start marker). Each record is written
//! with one `write_all` on an unbuffered file, so a reader sees it at once.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, Result};
use crate::metrics::{Observer, TrainEvent};

/// The first record of every event file: TensorBoard reads the rest as version-2 events,
/// whose stale steps it drops only at a session-start marker.
const FILE_VERSION: &str = "brain.Event:2";
const FILE_PREFIX: &str = "events.out.tfevents.";

/// `tensorflow.SessionLog.SessionStatus.START`.
const SESSION_START: u64 = 1;
/// `tensorflow.Summary.Image.colorspace` of an RGB image.
const RGB: u64 = 3;

/// The masked CRC32C of TFRecord (`tensorflow/core/lib/hash/crc32c.h`'s `Mask`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, its masked CRC, the data, the data's masked CRC (little-endian).
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// Protocol-buffer encoding of the fields used here.
mod proto {
    const VARINT: u64 = 0;
    const FIXED64: u64 = 1;
    const BYTES: u64 = 2;
    const FIXED32: u64 = 5;

    fn varint(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    fn key(buf: &mut Vec<u8>, field: u64, wire: u64) {
        varint(buf, (field << 3) | wire);
    }

    pub fn uint(buf: &mut Vec<u8>, field: u64, v: u64) {
        key(buf, field, VARINT);
        varint(buf, v);
    }

    pub fn double(buf: &mut Vec<u8>, field: u64, v: f64) {
        key(buf, field, FIXED64);
        buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(buf: &mut Vec<u8>, field: u64, v: f32) {
        key(buf, field, FIXED32);
        buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(buf: &mut Vec<u8>, field: u64, v: &[u8]) {
        key(buf, field, BYTES);
        varint(buf, v.len() as u64);
        buf.extend_from_slice(v);
    }
}

/// `tensorflow.Event` { wall_time = 1, step = 2, then one of file_version = 3,
/// summary = 5, session_log = 7 } with `what` the encoded oneof field.
fn event(step: u64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::new();
    let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    proto::double(&mut buf, 1, wall_time);
    proto::uint(&mut buf, 2, step);
    what(&mut buf);
    buf
}

/// `Summary { value = 1: Value { tag = 1, then simple_value = 2 or image = 4 } }`.
fn summary(buf: &mut Vec<u8>, tag: &str, value: impl FnOnce(&mut Vec<u8>)) {
    let mut v = Vec::new();
    proto::bytes(&mut v, 1, tag.as_bytes());
    value(&mut v);
    let mut s = Vec::new();
    proto::bytes(&mut s, 1, &v);
    proto::bytes(buf, 5, &s);
}

/// One event file of one process.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates a new event file in `dir` and writes its version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).at(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // TensorBoard reads the files of a directory in name order and never goes back: the
        // names sort by creation time, to the nanosecond (a resume may start within a second).
        let path = dir.join(format!("{FILE_PREFIX}{:010}.{:09}.flowstep.{}", now.as_secs(), now.subsec_nanos(), std::process::id()));
        let file = File::create(&path).at(&path)?;
        let mut writer = Self { path, file };
        writer.write(&event(0, |b| proto::bytes(b, 3, FILE_VERSION.as_bytes())))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file.write_all(&frame_record(event)).at(&self.path)?;
        self.file.flush().at(&self.path)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.write(&event(step, |b| summary(b, tag, |v| proto::float(v, 2, value as f32))))
    }

    /// An RGB image, `png` its encoded file.
    pub fn image(&mut self, tag: &str, step: u64, png: &[u8], width: u32, height: u32) -> Result<()> {
        let mut image = Vec::new();
        proto::uint(&mut image, 1, height as u64);
        proto::uint(&mut image, 2, width as u64);
        proto::uint(&mut image, 3, RGB);
        proto::bytes(&mut image, 4, png);
        self.write(&event(step, |b| summary(b, tag, |v| proto::bytes(v, 4, &image))))
    }

    /// `SessionLog { status = START }` at `step`: TensorBoard drops every event of the earlier
    /// files at this step or later (the steps a resumed run redoes).
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut log = Vec::new();
        proto::uint(&mut log, 1, SESSION_START);
        self.write(&event(step, |b| proto::bytes(b, 7, &log)))
    }
}

/// The run's TensorBoard log: `train/loss`, `train/lr`, `train/grad_norm` per step,
/// `eval/loss` per evaluation, `samples/<prompt>` (the decoded contact sheet) per sample set.
pub struct TensorBoard {
    writer: EventWriter,
}

impl TensorBoard {
    /// Opens a new event file in `dir` for a run starting after `start_step`. A fresh run
    /// (`start_step` 0) first removes the event files of an earlier attempt in `dir`; a
    /// resumed one marks a session start, so that the steps it redoes replace the old ones.
    pub fn open(dir: &Path, start_step: u64) -> Result<Self> {
        if start_step == 0 && dir.is_dir() {
            for entry in std::fs::read_dir(dir).at(dir)? {
                let path = entry.at(dir)?.path();
                if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(FILE_PREFIX)) {
                    std::fs::remove_file(&path).at(&path)?;
                }
            }
        }
        let mut writer = EventWriter::create(dir)?;
        if start_step > 0 {
            writer.session_start(start_step + 1)?;
        }
        Ok(Self { writer })
    }
}

impl Observer for TensorBoard {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> Result<()> {
        let w = &mut self.writer;
        match event {
            TrainEvent::Step(r) => {
                w.scalar("train/loss", r.step, r.loss)?;
                w.scalar("train/lr", r.step, r.lr)?;
                w.scalar("train/grad_norm", r.step, r.grad_norm as f64)?;
                for (role, e) in &r.experts {
                    w.scalar(&format!("train/loss_{role}"), r.step, e.loss)?;
                }
            }
            TrainEvent::Evaluated { step, loss } => w.scalar("eval/loss", *step, *loss)?,
            TrainEvent::Sampled { step, images, .. } => {
                for (name, path) in images.iter() {
                    let png = std::fs::read(path).at(path)?;
                    let (width, height) = image::image_dimensions(path).map_err(|e| crate::error::Error::io(path, std::io::Error::other(e)))?;
                    w.image(&format!("samples/{name}"), *step, &png, width, height)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C check value (RFC 3720 B.4: 32 bytes of zeros) and TFRecord's mask, checked
    /// against an independent bitwise CRC so that the crate and the mask are both pinned.
    #[test]
    fn masked_crc_matches_tfrecord() {
        fn bitwise_crc32c(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
                }
            }
            !crc
        }
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        // The mask as tensorflow/core/lib/hash/crc32c.h spells it.
        #[allow(clippy::manual_rotate)]
        for data in [&b""[..], b"123456789", b"brain.Event:2"] {
            let crc = bitwise_crc32c(data);
            assert_eq!(masked_crc32c(data), ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8));
        }
    }

    #[test]
    fn varints_and_floats_encode_as_protobuf() {
        let mut buf = Vec::new();
        proto::uint(&mut buf, 2, 300);
        proto::float(&mut buf, 2, 1.0);
        proto::bytes(&mut buf, 1, b"ab");
        assert_eq!(buf, [0x10, 0xac, 0x02, 0x15, 0x00, 0x00, 0x80, 0x3f, 0x0a, 0x02, b'a', b'b']);
    }
}
