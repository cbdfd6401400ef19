//! Wan's VAE decoders on ONNX Runtime: latent videos to RGB frames, and the files a person
//! looks at (contact sheet, GIF, MP4). The graphs come from `python -m flowstep_export.pipeline.vae_decoder`,
//! for Wan2.1's VAE (16 latent channels, 8× spatial) or Wan2.2's (48 channels, 16×; TI2V-5B);
//! the manifest's `z_dim` and `upsampling` say which.
//!
//! The decoder streams one latent frame per call, as DiffSynth's `VideoVAE_.decode` does: the
//! `first` graph decodes latent frame 0 to one RGB frame and returns the causal feature caches;
//! the `step` graph takes the caches and one more latent frame and returns four RGB frames and
//! the new caches. Memory stays at one chunk whatever the video length.

use std::ops::Range;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use serde::Deserialize;

use crate::artifacts::{check_external_data, resolve_inside, sha256_file};
use crate::error::{Error, Result};
use crate::runtime::{SessionOptions, load_session};
use crate::tensor_file::{OutTensor, SaveDtype, encode, write_atomic};
use crate::video_files::{Mp4, write_contact_sheet, write_gif, write_mp4};

pub const MANIFEST: &str = "vae_decoder.json";
const FORMAT: &str = "flowstep.vae_decoder";
/// A decoder manifest is about 1 kB.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_CACHES: usize = 4096;
const MAX_UPSAMPLING: usize = 64;
/// Decoded RGB values per video: 2^32 float32s (16 GiB) is 40× an 81-frame 720p Wan video.
pub const MAX_DECODED_VALUES: usize = 1 << 32;

#[derive(Debug, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    z_dim: usize,
    caches: usize,
    upsampling: Upsampling,
    graphs: Graphs,
    weights: String,
    files: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Upsampling {
    time: usize,
    space: usize,
}

#[derive(Debug, Deserialize)]
struct Graphs {
    first: String,
    step: String,
}

/// Decoded RGB frames, [3, frames, height, width], values in [-1, 1] (DiffSynth's range).
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub rgb: Vec<f32>,
}

impl Video {
    /// One frame as packed RGB bytes, with DiffSynth's conversion: `(x + 1) · 127.5` clipped
    /// to [0, 255] and truncated (`vae_output_to_image`).
    pub fn frame_rgb8(&self, f: usize) -> Vec<u8> {
        let plane = self.height * self.width;
        let at = |c: usize, p: usize| self.rgb[(c * self.frames + f) * plane + p];
        (0..plane).flat_map(|p| (0..3).map(move |c| to_u8(at(c, p)))).collect()
    }
}

fn to_u8(x: f32) -> u8 {
    ((x + 1.0) * 127.5).clamp(0.0, 255.0) as u8
}

/// The two decoder sessions of a `vae_decoder.json` directory.
pub struct VaeDecoder {
    first: Session,
    step: Session,
    z_dim: usize,
    caches: usize,
    time_up: usize,
    space_up: usize,
    /// Advances by one per latent frame decoded (per tile when tiled); hidden unless set.
    progress: ProgressBar,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Manifest { path: path.to_path_buf(), reason: reason.into() }
}

/// An error's message without its leading `path: `.
fn strip_path(e: &Error, path: &Path) -> String {
    let s = e.to_string();
    s.strip_prefix(&format!("{}: ", path.display())).map(str::to_string).unwrap_or(s)
}

impl VaeDecoder {
    /// Reads `dir/vae_decoder.json`, checks that the VAE takes `latent_channels` (the model's)
    /// and every file's sha256, and loads both graphs.
    pub fn open(dir: &Path, options: &SessionOptions, latent_channels: usize) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = crate::small_file::read_text(&path, "VAE decoder manifest", MAX_MANIFEST_BYTES)
            .map_err(|e| bad(&path, format!("cannot read the VAE decoder manifest ({}); make the directory with python -m flowstep_export.pipeline.vae_decoder", strip_path(&e, &path))))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(&path, format!("not a VAE decoder manifest: {e}")))?;
        if m.format != FORMAT || m.version != 1 {
            return Err(bad(&path, format!("format {} version {}; this flowstep reads {FORMAT} version 1", m.format, m.version)));
        }
        if m.z_dim != latent_channels {
            return Err(Error::Config(format!("--vae-decoder {}: the VAE takes {} latent channels, this model makes {latent_channels}", dir.display(), m.z_dim)));
        }
        // These numbers size the decoded frames and the graphs' inputs: Wan's VAEs upsample
        // 4× in time, 8× or 16× in space, and keep a few dozen caches.
        let ranges = [("caches", m.caches, MAX_CACHES), ("upsampling.time", m.upsampling.time, MAX_UPSAMPLING), ("upsampling.space", m.upsampling.space, MAX_UPSAMPLING)];
        for (name, value, max) in ranges {
            if !(1..=max).contains(&value) {
                return Err(bad(&path, format!("{name} is {value}; expected 1 to {max}")));
            }
        }
        let place = "the VAE decoder directory";
        let mut resolved = std::collections::BTreeMap::new();
        for name in [&m.graphs.first, &m.graphs.step, &m.weights] {
            let expected = m.files.get(name).ok_or_else(|| bad(&path, format!("`files` has no sha256 for {name}")))?;
            let file = resolve_inside(dir, place, &path, name)?;
            if &sha256_file(&file)? != expected {
                return Err(bad(&file, "sha256 differs from vae_decoder.json: the file changed since the export"));
            }
            resolved.insert(name.clone(), file);
        }
        for name in [&m.graphs.first, &m.graphs.step] {
            check_external_data(&resolved[name], name, &path, &m.files)?;
        }
        let first = load_session(&resolved[&m.graphs.first], options)?;
        let step = load_session(&resolved[&m.graphs.step], options)?;
        let expected_inputs = m.caches + 1;
        if first.inputs().len() != 1 || step.inputs().len() != expected_inputs || step.outputs().len() != expected_inputs {
            return Err(bad(&path, format!("graphs do not match the manifest's {} caches", m.caches)));
        }
        Ok(Self { first, step, z_dim: m.z_dim, caches: m.caches, time_up: m.upsampling.time, space_up: m.upsampling.space, progress: ProgressBar::hidden() })
    }

    /// Reports each latent frame decoded to `bar`; [`Self::work`] counts them.
    pub fn set_progress(&mut self, bar: ProgressBar) {
        self.progress = bar;
    }

    /// Latent frames (times tiles) [`Self::decode`] runs through the graphs for one video.
    pub fn work(shape: [usize; 4], tile: Option<Tile>) -> u64 {
        let [_, f, h, w] = shape;
        let tiles = tile.map_or(1, |t| tile_spans(h, t.size[0], t.stride[0]).len() * tile_spans(w, t.size[1], t.stride[1]).len());
        (f * tiles) as u64
    }

    /// Checks that latents of `shape` [C, F, H, W] decode to at most [`MAX_DECODED_VALUES`]
    /// RGB values: called before any work, so a size that cannot be held is refused up front.
    pub fn check_shape(&self, shape: [usize; 4]) -> Result<()> {
        let [_, f, h, w] = shape;
        let frames = f.checked_sub(1).and_then(|f| f.checked_mul(self.time_up)).and_then(|n| n.checked_add(1));
        let values = [3, h, self.space_up, w, self.space_up].into_iter().try_fold(frames.unwrap_or(usize::MAX), |acc, d| acc.checked_mul(d));
        match values {
            Some(n) if n <= MAX_DECODED_VALUES => Ok(()),
            _ => Err(Error::Config(format!(
                "latents {:?} decode to more than {MAX_DECODED_VALUES} RGB values ({}× time, {}× space upsampling): too large to hold",
                &shape[1..], self.time_up, self.space_up
            ))),
        }
    }

    /// Decodes one latent video [C, F, H, W] to 1 + 4(F-1) RGB frames of sH × sW in [-1, 1]
    /// (s the spatial upsampling: 8 for Wan2.1's VAE, 16 for Wan2.2's),
    /// whole or in overlapping spatial tiles (DiffSynth's `tiled_decode`: less memory, blended
    /// seams).
    pub fn decode(&mut self, latents: &[f32], shape: [usize; 4], tile: Option<Tile>) -> Result<Video> {
        let [c, f, h, w] = shape;
        if c != self.z_dim || f == 0 || h == 0 || w == 0 {
            return Err(Error::Shape { name: "latents (VAE decoder input)".into(), expected: vec![self.z_dim, f.max(1), h.max(1), w.max(1)], got: shape.to_vec() });
        }
        self.check_shape(shape)?;
        let mut video = match tile {
            None => self.decode_window(latents, shape, 0..h, 0..w)?,
            Some(tile) => self.decode_tiled(latents, shape, tile)?,
        };
        if let Some(i) = video.rgb.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { step: 0, what: "decoded frame", value: video.rgb[i] as f64 });
        }
        video.rgb.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
        Ok(video)
    }

    /// DiffSynth's `tiled_decode`: each tile decoded alone, weighted by a mask that ramps
    /// linearly over the overlap on sides that are not the video's edge, summed, divided by
    /// the summed masks.
    fn decode_tiled(&mut self, latents: &[f32], shape: [usize; 4], tile: Tile) -> Result<Video> {
        let [_, f, h, w] = shape;
        let up = self.space_up;
        let (out_h, out_w) = (h * up, w * up);
        let frames = 1 + self.time_up * (f - 1);
        let plane = out_h * out_w;
        let mut values = vec![0.0f32; 3 * frames * plane];
        let mut weight = vec![0.0f32; plane];
        let border = [(tile.size[0] - tile.stride[0]) * up, (tile.size[1] - tile.stride[1]) * up];
        for (r0, r1) in tile_spans(h, tile.size[0], tile.stride[0]) {
            for (c0, c1) in tile_spans(w, tile.size[1], tile.stride[1]) {
                let part = self.decode_window(latents, shape, r0..r1, c0..c1)?;
                let mask_y = ramp(part.height, r0 == 0, r1 >= h, border[0]);
                let mask_x = ramp(part.width, c0 == 0, c1 >= w, border[1]);
                let (y0, x0) = (r0 * up, c0 * up);
                for (y, my) in mask_y.iter().enumerate() {
                    for (x, mx) in mask_x.iter().enumerate() {
                        let m = my.min(*mx);
                        let at = (y0 + y) * out_w + x0 + x;
                        for plane_index in 0..3 * frames {
                            values[plane_index * plane + at] += part.rgb[(plane_index * part.height + y) * part.width + x] * m;
                        }
                        weight[at] += m;
                    }
                }
            }
        }
        for (i, v) in values.iter_mut().enumerate() {
            *v /= weight[i % plane];
        }
        Ok(Video { frames, height: out_h, width: out_w, rgb: values })
    }

    /// Streams the latent window `rows` × `cols` through the graphs: unclamped frames.
    fn decode_window(&mut self, latents: &[f32], shape: [usize; 4], rows: Range<usize>, cols: Range<usize>) -> Result<Video> {
        let [c, f, h, w] = shape;
        let (th, tw) = (rows.len(), cols.len());
        let (out_h, out_w) = (th * self.space_up, tw * self.space_up);
        let frames = 1 + self.time_up * (f - 1);
        let mut rgb = vec![0.0f32; 3 * frames * out_h * out_w];
        let mut caches: Vec<DynValue> = Vec::with_capacity(self.caches);
        let mut done = 0;
        for i in 0..f {
            let mut chunk = Vec::with_capacity(c * th * tw);
            for ch in 0..c {
                for y in rows.clone() {
                    let row = ((ch * f + i) * h + y) * w;
                    chunk.extend_from_slice(&latents[row + cols.start..row + cols.end]);
                }
            }
            let latent = Tensor::from_array((vec![1, c, 1, th, tw], chunk)).map_err(Error::ort("creating the VAE latent tensor"))?;
            let during = format!("decoding latent frame {i} with the VAE decoder");
            let mut outputs = if i == 0 {
                self.first.run(vec![("latent".to_string(), SessionInputValue::from(latent))]).map_err(Error::ort(during.clone()))?
            } else {
                let mut inputs = vec![("latent".to_string(), SessionInputValue::from(latent))];
                inputs.extend(caches.drain(..).enumerate().map(|(j, v)| (format!("cache_{j}"), SessionInputValue::from(v))));
                self.step.run(inputs).map_err(Error::ort(during.clone()))?
            };
            let out = outputs.remove("frames").ok_or_else(|| Error::Config(format!("{during}: the graph has no `frames` output")))?;
            let (out_shape, values) = out.try_extract_tensor::<f32>().map_err(Error::ort(during.clone()))?;
            let n = if i == 0 { 1 } else { self.time_up };
            let expected = [1, 3, n as i64, out_h as i64, out_w as i64];
            if **out_shape != expected {
                return Err(Error::Shape { name: "frames (VAE decoder output)".into(), expected: expected.iter().map(|&d| d as usize).collect(), got: out_shape.iter().map(|&d| d as usize).collect() });
            }
            let out_plane = out_h * out_w;
            for ch in 0..3 {
                let src = &values[ch * n * out_plane..(ch + 1) * n * out_plane];
                let dst = (ch * frames + done) * out_plane;
                rgb[dst..dst + n * out_plane].copy_from_slice(src);
            }
            done += n;
            for j in 0..self.caches {
                let name = format!("cache_out_{j}");
                caches.push(outputs.remove(&name).ok_or_else(|| Error::Config(format!("{during}: the graph has no `{name}` output")))?);
            }
            self.progress.inc(1);
        }
        Ok(Video { frames, height: out_h, width: out_w, rgb })
    }
}

/// Spatial tiles in latent pixels: `size` [rows, cols], consecutive tiles `stride` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub size: [usize; 2],
    pub stride: [usize; 2],
}

impl Tile {
    /// `H,W` in latent pixels, overlapping by half.
    pub fn parse(text: &str) -> Result<Self> {
        let dims: Vec<usize> = text.split(',').map(|d| d.trim().parse()).collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Config(format!("{text}: expected H,W in latent pixels")))?;
        let [h, w] = dims[..] else { return Err(Error::Config(format!("{text}: expected two numbers H,W"))) };
        Self::half_overlap([h, w])
    }

    /// Tiles that overlap by half, as DiffSynth's defaults (30×52 every 15×26).
    pub fn half_overlap(size: [usize; 2]) -> Result<Self> {
        if size.iter().any(|&s| s < 2) {
            return Err(Error::Config(format!("each side must be at least 2 latent pixels, got {}x{}", size[0], size[1])));
        }
        Ok(Self { size, stride: size.map(|s| s / 2) })
    }
}

/// DiffSynth's tile starts along one axis of length `n`: every `stride`, skipping a start
/// whose previous tile already reaches the end; each span is cut at `n`.
fn tile_spans(n: usize, size: usize, stride: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(stride).filter(|&s| !(s >= stride && s - stride + size >= n)).map(|s| (s, (s + size).min(n))).collect()
}

/// DiffSynth's `build_1d_mask`: 1, ramping (i+1)/border up from a side that is not the edge.
fn ramp(len: usize, at_start: bool, at_end: bool, border: usize) -> Vec<f32> {
    let mut x = vec![1.0f32; len];
    for i in 0..border.min(len) {
        let v = (i + 1) as f32 / border as f32;
        if !at_start {
            x[i] = v;
        }
        if !at_end {
            x[len - 1 - i] = v;
        }
    }
    x
}

/// What [`write_videos`] writes besides the contact sheet and the GIF.
#[derive(Debug, Clone, Copy)]
pub struct VideoOptions {
    /// Frames per second of the GIF and MP4s.
    pub fps: u32,
    /// Also write the decoded frames as float32 (`videos.safetensors`; about 390 MB per
    /// 81-frame 480×832 video).
    pub save_frames: bool,
    /// Decode in spatial tiles (less memory) instead of whole.
    pub tile: Option<Tile>,
}

/// What [`write_videos`] wrote.
#[derive(Debug)]
pub struct VideoFiles {
    /// `videos.safetensors` (`frames` [N, 3, T, H, W] float32 in [-1, 1]) when asked for.
    pub tensors: Option<PathBuf>,
    /// `videos.png`: one row per video, up to [`SHEET_FRAMES`] evenly spaced frames.
    pub contact_sheet: PathBuf,
    /// `videos.gif`: the videos side by side, every frame.
    pub gif: PathBuf,
    /// `video-XXX.mp4` per video, or why there are none.
    pub mp4: Mp4,
}

/// Frames per video on the contact sheet.
pub const SHEET_FRAMES: usize = 8;

/// Decodes latent videos ([C, F, H, W] each) and writes them under `out`: a contact sheet
/// (`videos.png`), a GIF (`videos.gif`), one MP4 per video (`video-XXX.mp4`) when `ffmpeg` is
/// on PATH and, if asked, the raw frames. The function the trainer calls for its samples.
pub fn write_videos(decoder: &mut VaeDecoder, latents: &[Vec<f32>], shape: [usize; 4], out: &Path, options: VideoOptions) -> Result<VideoFiles> {
    let videos = latents.iter().map(|l| decoder.decode(l, shape, options.tile)).collect::<Result<Vec<_>>>()?;
    let first = videos.first().ok_or_else(|| Error::Config("no videos to decode".into()))?;
    let tensors = if options.save_frames {
        let path = out.join("videos.safetensors");
        let frames = OutTensor {
            name: "frames".into(),
            shape: vec![videos.len(), 3, first.frames, first.height, first.width],
            values: videos.iter().flat_map(|v| v.rgb.iter().copied()).collect(),
        };
        write_atomic(&path, &encode(&[frames], SaveDtype::F32, None)?)?;
        Some(path)
    } else {
        None
    };
    let contact_sheet = out.join("videos.png");
    write_contact_sheet(&videos, SHEET_FRAMES, &contact_sheet)?;
    let gif = out.join("videos.gif");
    write_gif(&videos, options.fps, &gif)?;
    let mp4 = write_mp4(&videos, options.fps, out, "video")?;
    Ok(VideoFiles { tensors, contact_sheet, gif, mp4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_conversion_matches_diffsynth() {
        // DiffSynth: ((x + 1) * 127.5).clip(0, 255).to(uint8), which truncates.
        assert_eq!([to_u8(-1.5), to_u8(-1.0), to_u8(0.0), to_u8(0.999), to_u8(1.0), to_u8(2.0)], [0, 0, 127, 254, 255, 255]);
    }

    #[test]
    fn tiles_follow_diffsynth() {
        // DiffSynth, 60×104 latents with its defaults (30, 52) / (15, 26).
        assert_eq!(tile_spans(60, 30, 15), vec![(0, 30), (15, 45), (30, 60)]);
        assert_eq!(tile_spans(104, 52, 26), vec![(0, 52), (26, 78), (52, 104)]);
        assert_eq!(tile_spans(6, 4, 2), vec![(0, 4), (2, 6)]);
        assert_eq!(tile_spans(3, 4, 2), vec![(0, 3)]);
        assert_eq!(ramp(6, true, false, 3), vec![1.0, 1.0, 1.0, 1.0, 2.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(ramp(5, false, true, 2), vec![0.5, 1.0, 1.0, 1.0, 1.0]);
    }
}
