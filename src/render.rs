//! Pictures of latent videos: channels 0-2 as RGB, frames left to right (PNG) or in time
//! (GIF), upscaled with nearest-neighbour so a person can see the motion.

use std::path::Path;

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, Rgba, RgbaImage};

use crate::error::{Error, Result};
use crate::tensor_file::write_atomic;

/// A rendered grid: rows of videos, frames as columns.
pub struct Grid {
    pub videos: Vec<Vec<f32>>,
    /// [C, F, H, W]
    pub shape: [usize; 4],
    pub scale: u32,
}

fn pixel(video: &[f32], shape: [usize; 4], f: usize, y: usize, x: usize, norm: f32) -> [u8; 3] {
    let [c, frames, h, w] = shape;
    let _ = frames;
    let mut rgb = [0u8; 3];
    for (ch, out) in rgb.iter_mut().enumerate().take(c.min(3)) {
        let v = video[((ch * shape[1] + f) * h + y) * w + x] / norm;
        *out = (v.clamp(0.0, 1.0) * 255.0) as u8;
    }
    rgb
}

fn norm_of(video: &[f32], shape: [usize; 4]) -> f32 {
    let per_channel = shape[1] * shape[2] * shape[3];
    let n = per_channel * shape[0].min(3);
    video[..n].iter().fold(0.0f32, |m, v| m.max(*v)).max(1e-6)
}

impl Grid {
    fn frame_image(&self, row: usize, f: usize) -> RgbaImage {
        let [_, _, h, w] = self.shape;
        let s = self.scale;
        let video = &self.videos[row];
        let norm = norm_of(video, self.shape);
        RgbaImage::from_fn(w as u32 * s, h as u32 * s, |px, py| {
            let [r, g, b] = pixel(video, self.shape, f, (py / s) as usize, (px / s) as usize, norm);
            Rgba([r, g, b, 255])
        })
    }

    /// PNG: one row per video, frames left to right with a 2-pixel gap.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let [_, frames, h, w] = self.shape;
        let (fw, fh) = (w as u32 * self.scale, h as u32 * self.scale);
        let gap = 2;
        let width = frames as u32 * (fw + gap) - gap;
        let height = self.videos.len() as u32 * (fh + gap) - gap;
        let mut img = RgbaImage::from_pixel(width.max(1), height.max(1), Rgba([255, 255, 255, 255]));
        for row in 0..self.videos.len() {
            for f in 0..frames {
                let frame = self.frame_image(row, f);
                image::imageops::overlay(&mut img, &frame, (f as u32 * (fw + gap)) as i64, (row as u32 * (fh + gap)) as i64);
            }
        }
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
        write_atomic(path, &png.into_inner())
    }

    /// Animated GIF: all videos side by side, looping over frames.
    pub fn write_gif(&self, path: &Path) -> Result<()> {
        let [_, frames, h, w] = self.shape;
        let (fw, fh) = (w as u32 * self.scale, h as u32 * self.scale);
        let gap = 2;
        let width = self.videos.len() as u32 * (fw + gap) - gap;
        let mut gif = Vec::new();
        let mut encoder = GifEncoder::new_with_speed(&mut gif, 10);
        let fail = |e: image::ImageError| Error::io(path, std::io::Error::other(e.to_string()));
        encoder.set_repeat(Repeat::Infinite).map_err(fail)?;
        for f in 0..frames {
            let mut img = RgbaImage::from_pixel(width.max(1), fh, Rgba([255, 255, 255, 255]));
            for row in 0..self.videos.len() {
                image::imageops::overlay(&mut img, &self.frame_image(row, f), (row as u32 * (fw + gap)) as i64, 0);
            }
            encoder.encode_frame(Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(400, 1))).map_err(fail)?;
        }
        drop(encoder);
        write_atomic(path, &gif)
    }
}

/// Displacement (dx, dy) in latent pixels of the intensity centroid (sum of squares over
/// channels) from the first to the last frame: how far the brightest thing moved.
pub fn centroid_motion(video: &[f32], shape: [usize; 4]) -> (f64, f64) {
    let [c, frames, h, w] = shape;
    let centroid = |f: usize| {
        let (mut sx, mut sy, mut sw) = (0.0f64, 0.0f64, 0.0f64);
        for y in 0..h {
            for x in 0..w {
                let i: f64 = (0..c).map(|ch| (video[((ch * frames + f) * h + y) * w + x] as f64).powi(2)).sum();
                sx += i * x as f64;
                sy += i * y as f64;
                sw += i;
            }
        }
        (sx / sw.max(1e-12), sy / sw.max(1e-12))
    };
    let (a, b) = (centroid(0), centroid(frames.saturating_sub(1)));
    (b.0 - a.0, b.1 - a.1)
}

/// Mean colour of the video: channels 0-2 (R, G, B) weighted by each pixel's intensity
/// (sum of squares over channels), so the background does not dilute it.
pub fn mean_rgb(video: &[f32], shape: [usize; 4]) -> [f64; 3] {
    let [c, frames, h, w] = shape;
    let plane = frames * h * w;
    let (mut rgb, mut total) = ([0.0f64; 3], 0.0f64);
    for p in 0..plane {
        let intensity: f64 = (0..c).map(|ch| (video[ch * plane + p] as f64).powi(2)).sum();
        for (ch, acc) in rgb.iter_mut().enumerate().take(c.min(3)) {
            *acc += intensity * video[ch * plane + p] as f64;
        }
        total += intensity;
    }
    rgb.map(|v| v / total.max(1e-12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroid_follows_a_moving_dot() {
        let shape = [3, 3, 8, 8];
        let mut v = vec![0.0f32; 3 * 3 * 64];
        for (f, x) in [(0usize, 1usize), (1, 3), (2, 5)] {
            v[(f * 8 + 4) * 8 + x] = 1.0; // channel 0, row 4
        }
        let (dx, dy) = centroid_motion(&v, shape);
        assert!((dx - 4.0).abs() < 1e-9 && dy.abs() < 1e-9);
    }
}
