// Modulated deformable convolution (DCNv2), shared declarations.
//
// Semantics follow torchvision.ops.deform_conv2d exactly:
//   * offset has 2 * offset_groups * kh * kw channels; for offset group g and kernel tap
//     k = i * kw + j, channel g*2*kk + 2k is dy and g*2*kk + 2k + 1 is dx;
//   * mask (already sigmoided) has offset_groups * kh * kw channels, or is absent (DCNv1);
//   * a sample at (y, x) reads bilinearly from the four neighbours, a neighbour outside the
//     image reads zero, and the sample is zero unless -1 < y < H and -1 < x < W;
//   * weight groups and offset groups are independent.
//
// Layout (channels-last, so that the CPU inner loops run over contiguous channels and vectorise,
// and the CUDA threads of a warp touch consecutive addresses):
//   x       (nb, H+2, W+2, C)   the input chunk, channels last, with a one-pixel zero border: every
//                               sample that can contribute (-1 <= y < H, -1 <= x < W) has its four
//                               neighbours at valid addresses, those outside the image reading 0,
//                               so the kernels need no per-neighbour validity tests
//   columns (G, nb * Pc, Kg)    Kg = kk * C/G; row b * Pc + (p - p_begin), column k * C/G + c' for
//                               channel c = g * C/G + c' and tap k, for the output pixels
//                               p in [p_begin, p_begin + Pc) of the chunk (P = Ho * Wo in all)
// so that for every weight group g the forward is one GEMM  out_g (nb*P, M) = columns_g @ W_g^T,
// grad columns are  grad_out_g @ W_g  and the weight gradient is  grad_out_g^T @ columns_g, a
// single contraction over nb * P (W_g is the weight permuted to (M, kk, C/G)).
// On CPU grad_x has the padded layout of x (its border is discarded); on CUDA it is unpadded
// channels-last (see col2im_coord_cuda).
#pragma once

#include <ATen/ATen.h>

namespace dyhead {

struct DcnShape {
  int64_t n = 0;  // images in the chunk the kernel is called on
  int64_t channels = 0, height = 0, width = 0;
  int64_t out_channels = 0;
  int64_t kh = 0, kw = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  int64_t out_h = 0, out_w = 0;
  int64_t groups = 1;
  int64_t offset_groups = 1;
  // The kernels work on the output pixels [p_begin, p_begin + p_count) of each image of the chunk;
  // the columns then have p_count rows per image (row b * p_count + p - p_begin).
  int64_t p_begin = 0;
  int64_t p_count = 0;

  int64_t taps() const { return kh * kw; }
  int64_t out_plane() const { return out_h * out_w; }
  int64_t in_plane() const { return height * width; }
  int64_t padded_plane() const { return (height + 2) * (width + 2); }
  int64_t channels_per_offset_group() const { return channels / offset_groups; }
  int64_t channels_per_group() const { return channels / groups; }
  int64_t group_cols() const { return taps() * channels_per_group(); }  // Kg
};

// ---- CPU kernels (deform_conv_cpu.cpp) -------------------------------------------------------
// columns (G, nb*P, Kg) <- mask-weighted bilinear samples of x (nb, H+2, W+2, C).
void im2col_cpu(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                at::Tensor& columns, const DcnShape& s);

// From grad_columns (G, nb*P, Kg): accumulate grad_x (nb, H+2, W+2, C; zeroed by the caller) by the
// bilinear scatter, and write grad_offset (nb, 2*OG*kk, Ho, Wo) / grad_mask (nb, OG*kk, Ho, Wo).
// Any of the three outputs may be undefined (not wanted).
void col2im_coord_cpu(const at::Tensor& grad_columns, const at::Tensor& x, const at::Tensor& offset,
                      const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, at::Tensor& grad_offset,
                      at::Tensor& grad_mask, const DcnShape& s);

#ifdef WITH_CUDA
// ---- CUDA kernels (cuda/deform_conv_cuda.cu) -------------------------------------------------
void im2col_cuda(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                 at::Tensor& columns, const DcnShape& s);

// From the grad columns (G, nb*P, Kg) in `columns`:
//   grad_x       (nb, H, W, C) channels-last, unpadded: overwritten (input dtype or fp32/fp64), or,
//                with `accumulate`, added to (fp32/fp64, zeroed by the caller);
//   grad_offset / grad_mask  written in the input dtype;
// then, with `write_columns`, `columns` is overwritten with im2col's columns (for the weight GEMM).
// Any of the three gradients may be undefined (not wanted).
void col2im_coord_cuda(at::Tensor& columns, const at::Tensor& x, const at::Tensor& offset,
                       const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, bool accumulate,
                       at::Tensor& grad_offset, at::Tensor& grad_mask, bool write_columns, const DcnShape& s);

// DYHEAD_DCN_CUDA_GRAD_INPUT=atomic: grad_x by the atomic scatter, which needs an fp32/fp64 buffer
// zeroed by the caller and `accumulate` (default `gather`: see the .cu file). Read once.
bool cuda_grad_input_atomic();
#endif

}  // namespace dyhead
