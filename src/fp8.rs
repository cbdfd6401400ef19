//! float8_e4m3fn base weights (ONNX FLOAT8E4M3FN, safetensors F8_E4M3) and their scales, as
//! ComfyUI's `*_fp8_e4m3fn` / `*_fp8_scaled` and musubi's block-wise `fp8_scaled` checkpoints
//! store them (docs/DESIGN.md §3.6): `M.weight` in fp8, `M.scale_weight` beside it, and
//! `weight ≈ fp8 · scale` with one scale per tensor, per output row or per block of a row.

/// The name of a weight's scale: `blocks.0.ffn.0.weight` -> `blocks.0.ffn.0.scale_weight`.
pub fn scale_name(weight: &str) -> Option<String> {
    weight.strip_suffix(".weight").map(|module| format!("{module}.scale_weight"))
}

/// The value of an e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; no
/// infinities, NaN at S.1111.111, largest finite ±448.
pub fn to_f32(bits: u8) -> f32 {
    if is_nan(bits) {
        return f32::NAN;
    }
    let exponent = i32::from((bits >> 3) & 0xF);
    let mantissa = f32::from(bits & 7) / 8.0;
    let magnitude = if exponent == 0 { mantissa * 2f32.powi(-6) } else { (1.0 + mantissa) * 2f32.powi(exponent - 7) };
    if bits & 0x80 != 0 { -magnitude } else { magnitude }
}

pub fn is_nan(bits: u8) -> bool {
    bits & 0x7F == 0x7F
}

/// A file's scales (`file_shape`, `values`) laid out as the export's scale input of
/// `shape` ([1] per tensor, [out, blocks, 1] per block) for a weight of `out` rows. A single
/// scale fills every block; per-row or coarser blocks fill the finer blocks they contain. A
/// finer layout than the export's cannot be represented: that is the `Err`, saying what the
/// file has.
pub fn scales_in_layout(shape: &[usize], out: usize, file_shape: &[usize], values: &[f32]) -> Result<Vec<f32>, String> {
    let want = shape.iter().product::<usize>();
    let have = values.len();
    if have == 1 {
        return Ok(vec![values[0]; want]);
    }
    let per_row = file_shape.first() == Some(&out) && have % out == 0;
    if per_row && want % have == 0 {
        let repeat = want / have;
        return Ok((0..want).map(|j| values[j / repeat]).collect());
    }
    Err(format!("has scale shape {file_shape:?}, which does not fit the export's scale shape {shape:?}"))
}

/// An fp8 weight `[out, in]` dequantized as ComfyUI and musubi do, `fp8 · scale` (in
/// float32), with `scales` one per tensor, per row or per block of a row (row-major).
pub fn dequantize(bits: &[u8], out: usize, scales: &[f32]) -> Result<Vec<f32>, String> {
    let groups = scales.len();
    let fits = out > 0 && bits.len() % out == 0 && (groups == 1 || (groups % out == 0 && (bits.len() / out) % (groups / out) == 0));
    if !fits {
        return Err(format!("has {groups} scales, which do not divide its {} values in {out} rows", bits.len()));
    }
    let per_group = bits.len() / groups;
    Ok(bits.iter().enumerate().map(|(i, &b)| to_f32(b) * scales[i / per_group]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_e4m3fn_landmarks() {
        assert_eq!(to_f32(0x00), 0.0);
        assert_eq!(to_f32(0x38), 1.0);
        assert_eq!(to_f32(0xB8), -1.0);
        assert_eq!(to_f32(0x7E), 448.0);
        assert_eq!(to_f32(0x01), 2f32.powi(-9));
        assert_eq!(to_f32(0x08), 2f32.powi(-6));
        assert!(to_f32(0x7F).is_nan() && to_f32(0xFF).is_nan());
        assert_eq!(to_f32(0x3C), 1.5);
    }

    #[test]
    fn scales_fill_finer_layouts_and_refuse_coarser() {
        assert_eq!(scales_in_layout(&[2, 4, 1], 2, &[], &[0.5]).unwrap(), vec![0.5; 8]);
        assert_eq!(scales_in_layout(&[2, 4, 1], 2, &[2, 1], &[1.0, 2.0]).unwrap(), vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(scales_in_layout(&[2, 4, 1], 2, &[2, 2, 1], &[1.0, 2.0, 3.0, 4.0]).unwrap(), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);
        assert!(scales_in_layout(&[1], 2, &[2, 4, 1], &[1.0; 8]).unwrap_err().contains("[2, 4, 1]"));
    }

    #[test]
    fn dequantizes_per_block() {
        // rows of 4 values, 2 blocks of 2 per row
        let bits = [0x38, 0x38, 0x38, 0x40, 0xB8, 0x38, 0x38, 0x38];
        let got = dequantize(&bits, 2, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(got, vec![1.0, 1.0, 2.0, 4.0, -3.0, 3.0, 4.0, 4.0]);
        assert!(dequantize(&bits, 2, &[1.0, 2.0, 3.0]).is_err());
    }
}
