// CUDA kernels of the modulated deformable convolution (layouts in ../deform_conv.h: x padded
// channels-last (n, H+2, W+2, C), columns (G, n*P, Kg)). fp32, fp64, fp16 and bf16; arithmetic and
// accumulation in at::opmath_type (fp32 for the half types). Launched on the current stream.
//
//   im2col_kernel       one thread per (image, output pixel, tap, channel), channel fastest: the
//                       reads of x and the writes of the columns are coalesced.
//   col2im_input_kernel same mapping, scatters into an fp32/fp64 grad_x with atomicAdd.
//   coord_kernel        one warp per (image, offset group, tap, output pixel): lanes stride over
//                       the channels (coalesced), the four dot products that give the offset and
//                       mask gradients are reduced with warp shuffles; no atomics.
#include "../deform_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers

#include <algorithm>

namespace dyhead {
namespace {

constexpr int kThreads = 256;

unsigned int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

struct Dims {
  int64_t n, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, OG, cpg, cg, Kg, kk, P;
  int64_t p0, Pc;  // the chunk's output pixels [p0, p0 + Pc); column rows b * Pc + (p - p0)
};

Dims make_dims(const DcnShape& s) {
  Dims d;
  d.n = s.n;
  d.C = s.channels;
  d.H = s.height;
  d.W = s.width;
  d.kh = s.kh;
  d.kw = s.kw;
  d.sh = s.stride_h;
  d.sw = s.stride_w;
  d.ph = s.pad_h;
  d.pw = s.pad_w;
  d.dh = s.dil_h;
  d.dw = s.dil_w;
  d.Ho = s.out_h;
  d.Wo = s.out_w;
  d.OG = s.offset_groups;
  d.cpg = s.channels_per_offset_group();
  d.cg = s.channels_per_group();
  d.Kg = s.group_cols();
  d.kk = s.taps();
  d.P = s.out_plane();
  d.p0 = s.p_begin;
  d.Pc = s.p_count;
  return d;
}

// floor() as int for a value known to lie in [-1, size): truncate, step down for negatives.
template <typename acc_t>
__device__ __forceinline__ int64_t floor_int(acc_t v) {
  const int64_t t = static_cast<int64_t>(v);
  return t - static_cast<int64_t>(v < static_cast<acc_t>(t));
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename scalar_t>
__global__ void im2col_kernel(const int64_t total, const Dims d, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              scalar_t* __restrict__ cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = (d.H + 2) * (d.W + 2) * d.C;
  const int64_t rowstep = (d.W + 2) * d.C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = idx % d.C;
    int64_t t = idx / d.C;
    const int64_t k = t % d.kk;
    t /= d.kk;
    const int64_t q = t % d.Pc;  // pixel within the chunk
    const int64_t b = t / d.Pc;
    const int64_t p = d.p0 + q;
    const int64_t og = c / d.cpg, g = c / d.cg;
    const int64_t ho = p / d.Wo, wo = p - ho * d.Wo;
    const int64_t i = k / d.kw, j = k - i * d.kw;
    const int64_t unit = b * d.OG + og;
    const acc_t y = static_cast<acc_t>(ho * d.sh - d.ph + i * d.dh) +
                    static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k) * d.P + p]);
    const acc_t xx = static_cast<acc_t>(wo * d.sw - d.pw + j * d.dw) +
                     static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k + 1) * d.P + p]);
    acc_t val = 0;
    if (y > acc_t(-1) && y < static_cast<acc_t>(d.H) && xx > acc_t(-1) && xx < static_cast<acc_t>(d.W)) {
      const int64_t hl = floor_int(y), wl = floor_int(xx);
      const acc_t lh = y - static_cast<acc_t>(hl), lw = xx - static_cast<acc_t>(wl);
      const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
      const scalar_t* r0 = x + b * plane + ((hl + 1) * (d.W + 2) + (wl + 1)) * d.C + c;
      val = hh * hw * static_cast<acc_t>(r0[0]) + hh * lw * static_cast<acc_t>(r0[d.C]) +
            lh * hw * static_cast<acc_t>(r0[rowstep]) + lh * lw * static_cast<acc_t>(r0[rowstep + d.C]);
      if (mask != nullptr) val *= static_cast<acc_t>(mask[(unit * d.kk + k) * d.P + p]);
    }
    cols[((g * d.n + b) * d.Pc + q) * d.Kg + k * d.cg + (c - g * d.cg)] = static_cast<scalar_t>(val);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void col2im_input_kernel(const int64_t total, const Dims d, const scalar_t* __restrict__ gcols,
                                    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                    acc_t* __restrict__ grad_x) {
  const int64_t plane = (d.H + 2) * (d.W + 2) * d.C;
  const int64_t rowstep = (d.W + 2) * d.C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = idx % d.C;
    int64_t t = idx / d.C;
    const int64_t k = t % d.kk;
    t /= d.kk;
    const int64_t q = t % d.Pc;  // pixel within the chunk
    const int64_t b = t / d.Pc;
    const int64_t p = d.p0 + q;
    const int64_t og = c / d.cpg, g = c / d.cg;
    const int64_t ho = p / d.Wo, wo = p - ho * d.Wo;
    const int64_t i = k / d.kw, j = k - i * d.kw;
    const int64_t unit = b * d.OG + og;
    const acc_t y = static_cast<acc_t>(ho * d.sh - d.ph + i * d.dh) +
                    static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k) * d.P + p]);
    const acc_t xx = static_cast<acc_t>(wo * d.sw - d.pw + j * d.dw) +
                     static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k + 1) * d.P + p]);
    if (!(y > acc_t(-1) && y < static_cast<acc_t>(d.H) && xx > acc_t(-1) && xx < static_cast<acc_t>(d.W))) {
      continue;
    }
    acc_t gv = static_cast<acc_t>(gcols[((g * d.n + b) * d.Pc + q) * d.Kg + k * d.cg + (c - g * d.cg)]);
    if (mask != nullptr) gv *= static_cast<acc_t>(mask[(unit * d.kk + k) * d.P + p]);
    const int64_t hl = floor_int(y), wl = floor_int(xx);
    const acc_t lh = y - static_cast<acc_t>(hl), lw = xx - static_cast<acc_t>(wl);
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    // The padded border absorbs the neighbours outside the image (discarded by the caller).
    acc_t* o = grad_x + b * plane + ((hl + 1) * (d.W + 2) + (wl + 1)) * d.C + c;
    atomicAdd(o, hh * hw * gv);
    atomicAdd(o + d.C, hh * lw * gv);
    atomicAdd(o + rowstep, lh * hw * gv);
    atomicAdd(o + rowstep + d.C, lh * lw * gv);
  }
}

// One warp per (image, offset group, tap, output pixel): the lanes stride over the channels of the
// offset group (coalesced reads of the grad columns and of x), the four dot products are reduced
// with warp shuffles, and lane 0 writes dy, dx and dmask. No atomics.
template <typename scalar_t, typename acc_t>
__global__ void coord_kernel(const int64_t entries, const Dims d, const scalar_t* __restrict__ gcols,
                             const scalar_t* __restrict__ x, const scalar_t* __restrict__ offset,
                             const scalar_t* __restrict__ mask, scalar_t* __restrict__ grad_offset,
                             scalar_t* __restrict__ grad_mask) {
  const int64_t plane = (d.H + 2) * (d.W + 2) * d.C;
  const int64_t rowstep = (d.W + 2) * d.C;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  // blockDim.x is a multiple of 32, so every lane of a warp has the same entry: the loop, the
  // `ok` branch and the shuffles below are warp-uniform.
  for (int64_t entry = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; entry < entries;
       entry += warps) {
    const int64_t q = entry % d.Pc;  // pixel within the chunk
    int64_t t = entry / d.Pc;
    const int64_t p = d.p0 + q;
    const int64_t k = t % d.kk;
    const int64_t unit = t / d.kk;  // b * OG + og
    const int64_t og = unit % d.OG, b = unit / d.OG;
    const int64_t ho = p / d.Wo, wo = p - ho * d.Wo;
    const int64_t i = k / d.kw, j = k - i * d.kw;
    const acc_t y = static_cast<acc_t>(ho * d.sh - d.ph + i * d.dh) +
                    static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k) * d.P + p]);
    const acc_t xx = static_cast<acc_t>(wo * d.sw - d.pw + j * d.dw) +
                     static_cast<acc_t>(offset[(unit * 2 * d.kk + 2 * k + 1) * d.P + p]);
    const acc_t m = mask != nullptr ? static_cast<acc_t>(mask[(unit * d.kk + k) * d.P + p]) : acc_t(1);
    // torchvision's coordinate gradient tests only the neighbours' validity (y == -1 still counts);
    // the mask gradient (the sample value) uses the forward range test.
    const bool ok = y >= acc_t(-1) && y < static_cast<acc_t>(d.H) && xx >= acc_t(-1) && xx < static_cast<acc_t>(d.W);
    const bool inside = ok && y > acc_t(-1) && xx > acc_t(-1);
    int64_t hl = 0, wl = 0;
    if (ok) {
      hl = floor_int(y);
      wl = floor_int(xx);
    }
    const acc_t lh = y - static_cast<acc_t>(hl), lw = xx - static_cast<acc_t>(wl);
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
    if (ok) {
      const scalar_t* r0 = x + b * plane + ((hl + 1) * (d.W + 2) + (wl + 1)) * d.C;
      const int64_t c_end = (og + 1) * d.cpg;
      for (int64_t c = og * d.cpg + lane; c < c_end; c += 32) {
        const int64_t g = c / d.cg;
        const acc_t gc = static_cast<acc_t>(gcols[((g * d.n + b) * d.Pc + q) * d.Kg + k * d.cg + (c - g * d.cg)]);
        d0 += gc * static_cast<acc_t>(r0[c]);
        d1 += gc * static_cast<acc_t>(r0[c + d.C]);
        d2 += gc * static_cast<acc_t>(r0[c + rowstep]);
        d3 += gc * static_cast<acc_t>(r0[c + rowstep + d.C]);
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      d0 += __shfl_down_sync(0xffffffffu, d0, off);
      d1 += __shfl_down_sync(0xffffffffu, d1, off);
      d2 += __shfl_down_sync(0xffffffffu, d2, off);
      d3 += __shfl_down_sync(0xffffffffu, d3, off);
    }
    if (lane == 0) {
      acc_t gy = 0, gx = 0, gm = 0;
      if (ok) {
        gy = m * (hw * (d2 - d0) + lw * (d3 - d1));
        gx = m * (hh * (d1 - d0) + lh * (d3 - d2));
        if (inside) gm = hh * hw * d0 + hh * lw * d1 + lh * hw * d2 + lh * lw * d3;
      }
      if (grad_offset != nullptr) {
        grad_offset[(unit * 2 * d.kk + 2 * k) * d.P + p] = static_cast<scalar_t>(gy);
        grad_offset[(unit * 2 * d.kk + 2 * k + 1) * d.P + p] = static_cast<scalar_t>(gx);
      }
      if (grad_mask != nullptr) grad_mask[(unit * d.kk + k) * d.P + p] = static_cast<scalar_t>(gm);
    }
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void im2col_cuda(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                 at::Tensor& columns, const DcnShape& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = make_dims(s);
  const int64_t total = d.n * d.Pc * d.kk * d.C;
  if (total == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "dyhead_deform_im2col_cuda", [&] {
                                    im2col_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
                                        total, d, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                        ptr_or_null<scalar_t>(mask), columns.data_ptr<scalar_t>());
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
}

void col2im_coord_cuda(const at::Tensor& grad_columns, const at::Tensor& x, const at::Tensor& offset,
                       const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, at::Tensor& grad_offset,
                       at::Tensor& grad_mask, const DcnShape& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = make_dims(s);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool want_coord = grad_offset.defined() || grad_mask.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "dyhead_deform_col2im_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* mask_ptr = ptr_or_null<scalar_t>(mask);
        if (grad_x.defined()) {
          TORCH_CHECK(grad_x.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                      "dyhead: grad_x buffer must have the accumulation dtype");
          const int64_t total = d.n * d.Pc * d.kk * d.C;
          if (total > 0) {
            col2im_input_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
                total, d, grad_columns.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr,
                grad_x.data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
        if (want_coord) {
          const int64_t entries = d.n * d.OG * d.kk * d.Pc;
          if (entries > 0) {
            coord_kernel<scalar_t, acc_t><<<grid_for(entries * 32), kThreads, 0, stream>>>(
                entries, d, grad_columns.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                mask_ptr, grad_offset.defined() ? grad_offset.data_ptr<scalar_t>() : nullptr,
                grad_mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      });
}

}  // namespace dyhead
