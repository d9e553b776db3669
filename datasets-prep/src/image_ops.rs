//! Decoding, pre-resizing and JPEG re-encoding of single images.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;

use crate::buffers::BufferPool;

/// Row-major HWC u8 pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pixels {
    pub height: u32,
    pub width: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    pub data: Vec<u8>,
}

/// Why an image cannot be decoded, resized or encoded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// zune-jpeg refused the JPEG (its `Display` and `Debug` are the same text).
    #[error("JPEG: {source:?}")]
    Jpeg {
        source: zune_jpeg::errors::DecodeErrors,
    },
    #[error("JPEG: no output size (missing header?)")]
    JpegNoOutputSize,
    #[error("JPEG: no header")]
    JpegNoHeader,
    #[error("JPEG: decoded {bytes} bytes for a {height}x{width}x{channels} image")]
    JpegSize {
        bytes: usize,
        height: u32,
        width: u32,
        channels: u8,
    },
    /// A PNG (or any other format but JPEG) that does not decode.
    #[error("{source}")]
    Decode { source: image::ImageError },
    #[error("{source}")]
    ResizeBuffer {
        source: fast_image_resize::ImageBufferError,
    },
    #[error("{source}")]
    Resize {
        source: fast_image_resize::ResizeError,
    },
    #[error("{source}")]
    Encode { source: image::ImageError },
    /// Checked from the header, before any pixel buffer is allocated.
    #[error(
        "{width}x{height} is {} megapixels, more than the {} megapixels this tool decodes",
        u64::from(*.width) * u64::from(*.height) / 1_000_000,
        MAX_PIXELS / 1_000_000
    )]
    TooManyPixels { height: u32, width: u32 },
    /// A JPEG too short for its claimed size: each 8x8 block takes at least one bit.
    #[error("JPEG of {bytes} bytes cannot hold a {width}x{height} image (truncated or damaged)")]
    JpegTooShort {
        bytes: usize,
        height: u32,
        width: u32,
    },
    #[error(
        "{from_w}x{from_h} resized to {to_w}x{to_h} would be a record of {bytes} bytes, more than \
         the limit of {MAX_RECORD_BYTES}: choose a smaller --short-side (or --skip-bad)"
    )]
    ResizedTooLarge {
        from_h: u32,
        from_w: u32,
        to_h: u32,
        to_w: u32,
        bytes: u64,
    },
}

/// Most pixels of an image this tool decodes (checked from the header): 100 megapixels.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Most bytes of one stored record (the pixels of one image after resizing): 64 MiB.
pub const MAX_RECORD_BYTES: u64 = 64 << 20;

/// Refuses an image of more than [`MAX_PIXELS`].
fn check_pixels(height: u32, width: u32) -> Result<(), ImageError> {
    if u64::from(height) * u64::from(width) > MAX_PIXELS {
        return Err(ImageError::TooManyPixels { height, width });
    }
    Ok(())
}

/// Name of the resize filter recorded in manifests.
pub const RESIZE_FILTER: &str = "bilinear-antialiased (Pillow BILINEAR equivalent)";

/// Decodes any JPEG or PNG into 1 (grey) or 3 (RGB) u8 channels. Alpha is dropped, 16-bit
/// samples are reduced to 8 bits, and EXIF orientation is ignored (as the reference does).
pub fn decode_image(bytes: &[u8], pool: &BufferPool) -> Result<Pixels, ImageError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg_with(bytes, pool);
    }
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Decode {
                source: image::ImageError::IoError(e),
            })
    };
    let decode_error = |source| ImageError::Decode { source };
    let (width, height) = reader()?.into_dimensions().map_err(decode_error)?;
    check_pixels(height, width)?;
    // `decode` never applies EXIF orientation; that takes an explicit call.
    let img = reader()?.decode().map_err(decode_error)?;
    Ok(from_dynamic(img))
}

/// Decodes a JPEG straight into grey or RGB with zune-jpeg (about 20% faster than going through
/// `image`'s dynamic image and conversion).
pub fn decode_jpeg(bytes: &[u8]) -> Result<Pixels, ImageError> {
    decode_jpeg_with(bytes, &BufferPool::new(0))
}

/// `decode_jpeg` into a buffer from `pool`.
pub fn decode_jpeg_with(bytes: &[u8], pool: &BufferPool) -> Result<Pixels, ImageError> {
    use zune_core::colorspace::ColorSpace;
    let mut decoder = zune_jpeg::JpegDecoder::new(std::io::Cursor::new(bytes));
    decoder
        .decode_headers()
        .map_err(|source| ImageError::Jpeg { source })?;
    let info = decoder.info().ok_or(ImageError::JpegNoHeader)?;
    let (height, width) = (u32::from(info.height), u32::from(info.width));
    check_pixels(height, width)?;
    // Any JPEG spends at least one bit on each 8x8 block of each component (of the component
    // with the least resolution: at most 4x subsampled); a file shorter than that is damaged,
    // and decoding it would give a large image of filler.
    let blocks = u64::from(height.div_ceil(32)) * u64::from(width.div_ceil(32));
    if (bytes.len() as u64).saturating_mul(8) < blocks {
        return Err(ImageError::JpegTooShort {
            bytes: bytes.len(),
            height,
            width,
        });
    }
    let grey = matches!(decoder.input_colorspace(), Some(ColorSpace::Luma));
    let out = if grey {
        ColorSpace::Luma
    } else {
        ColorSpace::RGB
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let size = (decoder.output_buffer_size()).ok_or(ImageError::JpegNoOutputSize)?;
    let mut data = pool.take(size);
    // A lenient decode can stop early and leave the rest of the buffer as it was: zeros, as from
    // a fresh buffer, and never pixels of an image decoded before (output must not depend on
    // which thread had which buffer).
    data.fill(0);
    if let Err(source) = decoder.decode_into(&mut data) {
        pool.give(data);
        return Err(ImageError::Jpeg { source });
    }
    let info = decoder.info().ok_or(ImageError::JpegNoHeader)?;
    let (height, width, channels) = (
        u32::from(info.height),
        u32::from(info.width),
        if grey { 1u8 } else { 3 },
    );
    if data.len() != (height * width) as usize * usize::from(channels) {
        return Err(ImageError::JpegSize {
            bytes: data.len(),
            height,
            width,
            channels,
        });
    }
    Ok(Pixels {
        height,
        width,
        channels,
        data,
    })
}

fn from_dynamic(img: DynamicImage) -> Pixels {
    let (width, height) = (img.width(), img.height());
    match img {
        DynamicImage::ImageLuma8(g) => Pixels {
            height,
            width,
            channels: 1,
            data: g.into_raw(),
        },
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => Pixels {
            height,
            width,
            channels: 1,
            data: img.to_luma8().into_raw(),
        },
        DynamicImage::ImageRgb8(rgb) => Pixels {
            height,
            width,
            channels: 3,
            data: rgb.into_raw(),
        },
        other => Pixels {
            height,
            width,
            channels: 3,
            data: other.to_rgb8().into_raw(),
        },
    }
}

/// The size after scaling the shorter side to `target`: the longer side is rounded half to even,
/// like Python's `round`, which the reference uses.
pub fn short_side_size(height: u32, width: u32, target: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| -> u32 {
        let v = (f64::from(long) * f64::from(target) / f64::from(short)).round_ties_even();
        (v as u32).max(1)
    };
    if height <= width {
        (target, scale(width, height))
    } else {
        (scale(height, width), target)
    }
}

/// Resizes so that the shorter side is `target` (up or down), with Pillow's antialiased
/// bilinear filter. Returns the input unchanged when it already has that size. The resized
/// pixels are written into a buffer from `pool`, and the input's buffer goes back to it.
pub fn resize_short_side(
    p: Pixels,
    target: u32,
    resizer: &mut Resizer,
    pool: &BufferPool,
) -> Result<Pixels, ImageError> {
    let (height, width) = short_side_size(p.height, p.width, target);
    if (height, width) == (p.height, p.width) {
        return Ok(p);
    }
    let bytes = u64::from(height) * u64::from(width) * u64::from(p.channels);
    if bytes > MAX_RECORD_BYTES {
        return Err(ImageError::ResizedTooLarge {
            from_h: p.height,
            from_w: p.width,
            to_h: height,
            to_w: width,
            bytes,
        });
    }
    let pixel_type = if p.channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let src = Image::from_vec_u8(p.width, p.height, p.data, pixel_type)
        .map_err(|source| ImageError::ResizeBuffer { source })?;
    let len = width as usize * height as usize * usize::from(p.channels);
    let mut dst = Image::from_vec_u8(width, height, pool.take(len), pixel_type)
        .map_err(|source| ImageError::ResizeBuffer { source })?;
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    resizer
        .resize(&src, &mut dst, &options)
        .map_err(|source| ImageError::Resize { source })?;
    pool.give(src.into_vec());
    Ok(Pixels {
        height,
        width,
        channels: p.channels,
        data: dst.into_vec(),
    })
}

/// (height, width, channels) of a JPEG, from its header alone.
pub fn jpeg_shape(bytes: &[u8]) -> Result<(u32, u32, u8), ImageError> {
    use zune_core::colorspace::ColorSpace;
    let mut decoder = zune_jpeg::JpegDecoder::new(std::io::Cursor::new(bytes));
    decoder
        .decode_headers()
        .map_err(|source| ImageError::Jpeg { source })?;
    let info = decoder.info().ok_or(ImageError::JpegNoHeader)?;
    let grey = matches!(decoder.input_colorspace(), Some(ColorSpace::Luma));
    Ok((
        u32::from(info.height),
        u32::from(info.width),
        if grey { 1 } else { 3 },
    ))
}

/// Encodes as a baseline JPEG of the given quality (1..=100).
pub fn encode_jpeg(p: &Pixels, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let color = if p.channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(&p.data, p.width, p.height, color)
        .map_err(|source| ImageError::Encode { source })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_side_rounding_matches_python() {
        assert_eq!(short_side_size(375, 500, 512), (512, 683)); // 682.67
        assert_eq!(short_side_size(500, 375, 512), (683, 512));
        assert_eq!(short_side_size(2, 5, 4), (4, 10));
        assert_eq!(short_side_size(4, 6, 2), (2, 3));
        assert_eq!(short_side_size(4, 10, 1), (1, 2)); // 2.5 rounds to even
        assert_eq!(short_side_size(4, 14, 1), (1, 4)); // 3.5 rounds to even
    }

    #[test]
    fn resizing_a_constant_image_keeps_its_value() {
        let p = Pixels {
            height: 40,
            width: 60,
            channels: 3,
            data: vec![77; 40 * 60 * 3],
        };
        let mut r = Resizer::new();
        let out = resize_short_side(p, 10, &mut r, &BufferPool::new(0)).unwrap();
        assert_eq!((out.height, out.width, out.channels), (10, 15, 3));
        assert!(out.data.iter().all(|&v| v == 77));
    }

    /// A PNG header claiming `width` x `height` RGB: signature, IHDR and an empty IDAT.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        for chunk in [ihdr, b"IDAT".to_vec()] {
            let mut crc = flate2::Crc::new();
            crc.update(&chunk);
            png.extend((chunk.len() as u32 - 4).to_be_bytes());
            png.extend(&chunk);
            png.extend(crc.sum().to_be_bytes());
        }
        png
    }

    #[test]
    fn images_over_the_pixel_limit_are_refused_from_the_header() {
        let err = decode_image(&png_header(20_000, 20_000), &BufferPool::new(0)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooManyPixels {
                    height: 20_000,
                    width: 20_000
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "20000x20000 is 400 megapixels, more than the 100 megapixels this tool decodes"
        );
        // Under the limit, the truncated file fails as a PNG, not on its size.
        let err = decode_image(&png_header(100, 100), &BufferPool::new(0)).unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
    }

    #[test]
    fn a_resize_to_a_huge_record_is_refused_before_allocating() {
        let p = Pixels {
            height: 1,
            width: 30_000,
            channels: 1,
            data: vec![0; 30_000],
        };
        let err = resize_short_side(p, 512, &mut Resizer::new(), &BufferPool::new(0)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::ResizedTooLarge {
                    to_h: 512,
                    to_w: 15_360_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--short-side"), "{err}");
    }

    #[test]
    fn jpeg_round_trip_keeps_shape_and_roughly_the_pixels() {
        let data: Vec<u8> = (0..32 * 24).map(|i| (i % 32 * 8) as u8).collect();
        let p = Pixels {
            height: 24,
            width: 32,
            channels: 1,
            data,
        };
        let bytes = encode_jpeg(&p, 95).unwrap();
        assert_eq!(jpeg_shape(&bytes).unwrap(), (24, 32, 1));
        let back = decode_jpeg(&bytes).unwrap();
        assert_eq!((back.height, back.width, back.channels), (24, 32, 1));
        let max_err = back
            .data
            .iter()
            .zip(&p.data)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max_err < 24, "max error {max_err}");
    }
}
