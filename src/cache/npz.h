// NumPy's .npy arrays and .npz archives (a zip of .npy files, stored or deflated; the zip side is
// libzip's), so that latent and text-encoder caches kohya-ss/sd-scripts wrote can be reused.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "src/core/tensor_io.h"
#include "src/data/buckets.h"

namespace sdt {

// One .npy file's array: little-endian bool, (u)int8, int16/32/64, float16/32/64, C order.
// Anything else is an sdt::Error naming `where`.
at::Tensor parse_npy(const std::string& where, const uint8_t* data, size_t size);
// The .npy file of a CPU tensor (format 1.0, header padded to 64 bytes as NumPy writes it).
std::string npy_bytes(const at::Tensor& tensor);

// Every array of an .npz archive, in archive order, named without ".npy".
NamedTensors read_npz(const std::string& path);
// An uncompressed archive, as np.savez writes it, to a temporary name then renamed.
void write_npz(const std::string& path, const NamedTensors& arrays);

// kohya's latent cache file of an image, SdSdxlLatentsCachingStrategy.get_latents_npz_path: the
// legacy "<stem>.npz" when it exists, else "<stem>_<W:04d>x<H:04d><suffix>.npz" with the image's
// original size; suffix "_sd" (SD 1.x/2.x) or "_sdxl".
std::string kohya_latents_npz_path(const std::string& image_path, Resolution original_size, const std::string& suffix);

// What kohya's load_latents_from_disk returns. The latents are as the VAE made them, not yet
// multiplied by its scaling factor (SD: 0.18215), unlike what a LatentsCachingStrategy returns.
struct KohyaLatents {
  at::Tensor latents;    // (C, h, w) float32
  at::Tensor flipped;    // (C, h, w) of the flipped image; undefined when the file has none (no flip_aug)
  Resolution original_size;
  CropLtrb crop_ltrb;
  at::Tensor alpha_mask;  // (H, W) float32 in [0, 1]; undefined when none
};
// kohya's single-resolution keys (SD, SDXL): latents, original_size, crop_ltrb, latents_flipped,
// alpha_mask. A file without "latents" is an sdt::Error naming it.
KohyaLatents read_kohya_latents_npz(const std::string& path);

}  // namespace sdt
