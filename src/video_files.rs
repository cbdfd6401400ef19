//! Decoded videos as files: a PNG contact sheet, an animated GIF, and MP4s through the
//! `ffmpeg` found on PATH.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, Rgba, RgbaImage};

use crate::decode::Video;
use crate::error::{Error, Result};
use crate::tensor_file::write_atomic;

const GAP: u32 = 4;
/// Widest frame in the GIF: larger videos are shrunk by a whole factor (832 -> 416), which keeps
/// a 4-sample, 81-frame GIF to a few tens of MB.
const GIF_MAX_WIDTH: usize = 480;
const BACKGROUND: Rgba<u8> = Rgba([255, 255, 255, 255]);

fn image_error(path: &Path) -> impl Fn(image::ImageError) -> Error + '_ {
    move |e| Error::io(path, std::io::Error::other(e.to_string()))
}

fn frame_image(video: &Video, f: usize) -> RgbaImage {
    let rgb = video.frame_rgb8(f);
    RgbaImage::from_fn(video.width as u32, video.height as u32, |x, y| {
        let i = 3 * (y as usize * video.width + x as usize);
        Rgba([rgb[i], rgb[i + 1], rgb[i + 2], 255])
    })
}

/// Up to `count` frame indices spread evenly from the first frame to the last.
pub fn sheet_frames(frames: usize, count: usize) -> Vec<usize> {
    if frames <= count || count < 2 {
        return (0..frames.min(count.max(1))).collect();
    }
    (0..count).map(|i| (i * (frames - 1) + (count - 1) / 2) / (count - 1)).collect()
}

/// PNG: one row per video, `count` evenly spaced frames left to right.
pub fn write_contact_sheet(videos: &[Video], count: usize, path: &Path) -> Result<()> {
    let Some(first) = videos.first() else { return Ok(()) };
    let picks = sheet_frames(first.frames, count);
    let (w, h) = (first.width as u32, first.height as u32);
    let width = picks.len() as u32 * (w + GAP) - GAP;
    let height = videos.len() as u32 * (h + GAP) - GAP;
    let mut sheet = RgbaImage::from_pixel(width, height, BACKGROUND);
    for (row, video) in videos.iter().enumerate() {
        for (col, &f) in picks.iter().enumerate() {
            image::imageops::overlay(&mut sheet, &frame_image(video, f), (col as u32 * (w + GAP)) as i64, (row as u32 * (h + GAP)) as i64);
        }
    }
    let mut png = std::io::Cursor::new(Vec::new());
    sheet.write_to(&mut png, image::ImageFormat::Png).map_err(image_error(path))?;
    write_atomic(path, &png.into_inner())
}

/// Animated GIF: the videos side by side, every frame, looping; frames wider than
/// [`GIF_MAX_WIDTH`] are shrunk.
pub fn write_gif(videos: &[Video], fps: u32, path: &Path) -> Result<()> {
    let Some(first) = videos.first() else { return Ok(()) };
    let shrink = first.width.div_ceil(GIF_MAX_WIDTH) as u32;
    let (w, h) = (first.width as u32 / shrink, first.height as u32 / shrink);
    let width = videos.len() as u32 * (w + GAP) - GAP;
    let mut gif = Vec::new();
    let mut encoder = GifEncoder::new_with_speed(&mut gif, 10);
    encoder.set_repeat(Repeat::Infinite).map_err(image_error(path))?;
    for f in 0..first.frames {
        let mut img = RgbaImage::from_pixel(width, h, BACKGROUND);
        for (i, video) in videos.iter().enumerate() {
            let mut frame = frame_image(video, f);
            if shrink > 1 {
                frame = image::imageops::resize(&frame, w, h, image::imageops::FilterType::Triangle);
            }
            image::imageops::overlay(&mut img, &frame, (i as u32 * (w + GAP)) as i64, 0);
        }
        let delay = Delay::from_numer_denom_ms(1000, fps.max(1));
        encoder.encode_frame(Frame::from_parts(img, 0, 0, delay)).map_err(image_error(path))?;
    }
    drop(encoder);
    write_atomic(path, &gif)
}

/// The MP4s written, or why none were.
#[derive(Debug)]
pub enum Mp4 {
    Written(Vec<PathBuf>),
    /// No `ffmpeg` on PATH: the message to show.
    NoFfmpeg(String),
}

/// The `ffmpeg` executable on PATH, if any.
fn find_ffmpeg() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("ffmpeg")).find(|p| p.is_file())
}

/// One H.264 MP4 per video (`{stem}-000.mp4`, ...), encoded by `ffmpeg` from raw RGB frames.
pub fn write_mp4(videos: &[Video], fps: u32, out: &Path, stem: &str) -> Result<Mp4> {
    let Some(ffmpeg) = find_ffmpeg() else {
        return Ok(Mp4::NoFfmpeg("no MP4 written: `ffmpeg` is not on PATH (install it, e.g. apt install ffmpeg; the GIF and PNG have the same frames)".into()));
    };
    let mut written = Vec::with_capacity(videos.len());
    for (i, video) in videos.iter().enumerate() {
        let path = out.join(format!("{stem}-{i:03}.mp4"));
        let temp = out.join(format!(".{stem}-{i:03}.mp4.tmp.mp4"));
        let mut child = Command::new(&ffmpeg)
            .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
            .args(["-s", &format!("{}x{}", video.width, video.height), "-r", &fps.to_string(), "-i", "-"])
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18"])
            .arg(&temp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(&ffmpeg, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            for f in 0..video.frames {
                // A write error means ffmpeg exited; its stderr below says why.
                if stdin.write_all(&video.frame_rgb8(f)).is_err() {
                    break;
                }
            }
        }
        let output = child.wait_with_output().map_err(|e| Error::io(&ffmpeg, e))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&temp);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            return Err(Error::io(&path, std::io::Error::other(format!("{} failed ({}): {last}", ffmpeg.display(), output.status))));
        }
        std::fs::rename(&temp, &path).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    Ok(Mp4::Written(written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_frames_include_first_and_last() {
        assert_eq!(sheet_frames(81, 8), vec![0, 11, 23, 34, 46, 57, 69, 80]);
        assert_eq!(sheet_frames(5, 8), vec![0, 1, 2, 3, 4]);
        assert_eq!(sheet_frames(1, 8), vec![0]);
    }

    #[test]
    fn wide_videos_are_shrunk_in_the_gif() {
        let dir = tempfile::tempdir().unwrap();
        let video = Video { frames: 2, height: 16, width: 960, rgb: vec![0.5; 3 * 2 * 16 * 960] };
        let path = dir.path().join("v.gif");
        write_gif(&[video.clone(), video], 16, &path).unwrap();
        let gif = image::ImageReader::open(&path).unwrap().decode().unwrap();
        assert_eq!((gif.width(), gif.height()), (2 * 480 + GAP, 8));
    }
}
