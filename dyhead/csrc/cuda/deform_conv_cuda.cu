// CUDA kernels of the modulated deformable convolution (layouts in ../deform_conv.h: x padded
// channels-last (n, H+2, W+2, C), columns (G, n*Pc, Kg)). fp32, fp64, fp16 and bf16; arithmetic and
// accumulation in at::opmath_type (fp32 for the half types). Launched on the current stream.
//
// The multiply-adds are GEMMs on the column buffer, run by cuBLAS through ATen in the driver
// (deform_conv.cpp): fp16/bf16 on the tensor cores with fp32 accumulation. A column buffer rather
// than an implicit GEMM: at DyHead's largest call (COCO P3, 2 x 256 x 100 x 168, bf16) the buffer is
// 155 MB, so writing and re-reading it costs ~0.07 ms of HBM time per pass on an H100/H200, against
// ~1 ms for the whole op, and cuBLAS runs the GEMMs near peak; an implicit GEMM would save those
// passes but needs hand-tuned tensor-core tiles per architecture. The kernels here only sample.
//
// Every kernel moves VEC channels per thread with one 16-byte access (8 fp16/bf16, 4 fp32, 2 fp64;
// one when a group's or offset group's channels, or a pointer, do not allow it), and decodes its
// indices in 32 bits (the driver keeps a chunk's columns below 2^31 elements).
//
//   sample_kernel        a team of T lanes (a power of two <= 32, T * VEC ~ the channels of one
//                        offset group) per sample (image, offset group, tap, output pixel): the
//                        position and bilinear weights once per team, VEC channels per lane.
//                        Forward: writes the columns. Backward: reads the grad columns and reduces
//                        the four dot products that give the offset and mask gradients over the
//                        team with shuffles (no atomics); when the weight gradient is wanted it
//                        then overwrites the grad columns in place with the columns (each lane reads
//                        its addresses before writing them), so no second im2col pass is needed.
//   grad_x by gather     (default) every sample is keyed by the cell (floor(y), floor(x)) of its
//                        top-left neighbour; one stable sort of the n*OG*kk*Pc keys groups the
//                        samples by cell, and each input pixel sums weight * grad column over the
//                        samples of the four cells it is a corner of, in registers. No atomics, no
//                        fp32 buffer (when the pixels come in one block), a deterministic order.
//   grad_x by atomics    (DYHEAD_DCN_CUDA_GRAD_INPUT=atomic, to measure against) the scatter into an
//                        fp32/fp64 buffer, VEC consecutive addresses per thread (float4 atomics on
//                        sm_90 and newer).
#include "../deform_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

namespace dyhead {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

unsigned int blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxBlocks));
}

// The chunk's geometry in 32 bits (make_dims checks that the counts fit). Addresses are 64-bit.
struct Dims {
  int n, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, OG, cpg, cg, Kg, kk, P;
  int p0, Pc;  // the chunk's output pixels [p0, p0 + Pc); column rows b * Pc + (p - p0)
  int units;   // samples: n * OG * kk * Pc
};

Dims make_dims(const DcnShape& s) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t col_elems = s.n * s.p_count * s.taps() * s.channels;
  TORCH_CHECK(col_elems <= kMax && s.out_plane() <= kMax,
              "dyhead::deform_conv2d (CUDA): a chunk of ", s.n, " images x ", s.p_count,
              " output pixels is too large for 32-bit indexing; lower DYHEAD_DCN_COLUMN_KB");
  Dims d;
  d.n = static_cast<int>(s.n);
  d.C = static_cast<int>(s.channels);
  d.H = static_cast<int>(s.height);
  d.W = static_cast<int>(s.width);
  d.kh = static_cast<int>(s.kh);
  d.kw = static_cast<int>(s.kw);
  d.sh = static_cast<int>(s.stride_h);
  d.sw = static_cast<int>(s.stride_w);
  d.ph = static_cast<int>(s.pad_h);
  d.pw = static_cast<int>(s.pad_w);
  d.dh = static_cast<int>(s.dil_h);
  d.dw = static_cast<int>(s.dil_w);
  d.Ho = static_cast<int>(s.out_h);
  d.Wo = static_cast<int>(s.out_w);
  d.OG = static_cast<int>(s.offset_groups);
  d.cpg = static_cast<int>(s.channels_per_offset_group());
  d.cg = static_cast<int>(s.channels_per_group());
  d.Kg = static_cast<int>(s.group_cols());
  d.kk = static_cast<int>(s.taps());
  d.P = static_cast<int>(s.out_plane());
  d.p0 = static_cast<int>(s.p_begin);
  d.Pc = static_cast<int>(s.p_count);
  d.units = static_cast<int>(s.n * s.offset_groups * s.taps() * s.p_count);
  return d;
}

// ---- device helpers -------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// floor() as int for a value known to lie in [-1, size): truncate, step down for negatives.
template <typename acc_t>
__device__ __forceinline__ int floor_int(acc_t v) {
  const int t = static_cast<int>(v);
  return t - static_cast<int>(v < static_cast<acc_t>(t));
}

// One sample: where it is (image b, offset group og, tap k, chunk pixel q), its position and mask.
template <typename acc_t>
struct Sample {
  int b, og, k, q;
  acc_t y, x, m;
};

// unit = ((b * OG + og) * kk + k) * Pc + q
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ Sample<acc_t> locate(const Dims& d, int unit, const scalar_t* __restrict__ offset,
                                                const scalar_t* __restrict__ mask) {
  Sample<acc_t> s;
  s.q = unit % d.Pc;
  const int t = unit / d.Pc;
  s.k = t % d.kk;
  const int bog = t / d.kk;
  s.og = bog % d.OG;
  s.b = bog / d.OG;
  const int p = d.p0 + s.q;
  const int ho = p / d.Wo, wo = p - ho * d.Wo;
  const int i = s.k / d.kw, j = s.k - i * d.kw;
  const int64_t dy_at = (static_cast<int64_t>(bog) * 2 * d.kk + 2 * s.k) * d.P + p;  // dx follows one plane on
  s.y = static_cast<acc_t>(ho * d.sh - d.ph + i * d.dh) + static_cast<acc_t>(offset[dy_at]);
  s.x = static_cast<acc_t>(wo * d.sw - d.pw + j * d.dw) + static_cast<acc_t>(offset[dy_at + d.P]);
  s.m = mask != nullptr ? static_cast<acc_t>(mask[(static_cast<int64_t>(bog) * d.kk + s.k) * d.P + p]) : acc_t(1);
  return s;
}

// The forward's range test: the sample reads something (a neighbour outside the image reads 0).
template <typename acc_t>
__device__ __forceinline__ bool reads_input(const Dims& d, acc_t y, acc_t x) {
  return y > acc_t(-1) && y < static_cast<acc_t>(d.H) && x > acc_t(-1) && x < static_cast<acc_t>(d.W);
}

// ---- sampling: im2col (forward) and offset/mask gradients + im2col in place (backward) ---------------

template <typename scalar_t, int VEC, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const Dims d, const int team_log2, const scalar_t* __restrict__ x,
                  const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                  const scalar_t* gcols,  // backward: grad columns (may alias cols), or nullptr
                  scalar_t* cols,         // columns to write, or nullptr
                  scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int team = 1 << team_log2;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (team - 1);
  const int per_warp = 32 >> team_log2;
  const int vecs = d.cpg / VEC;
  const int64_t plane = static_cast<int64_t>(d.H + 2) * (d.W + 2) * d.C;
  const int64_t rowstep = static_cast<int64_t>(d.W + 2) * d.C;
  const int64_t group_stride = static_cast<int64_t>(d.n) * d.Pc * d.Kg;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // The loop is warp-uniform (blockDim.x is a multiple of 32), so every lane reaches the shuffles;
  // lanes past the last sample compute on sample 0 and write nothing.
  for (int64_t first = warp * per_warp; first < d.units; first += warps * per_warp) {
    const int64_t mine = first + (lane >> team_log2);
    const bool active = mine < d.units;
    const Sample<acc_t> s = locate<scalar_t>(d, active ? static_cast<int>(mine) : 0, offset, mask);
    // torchvision's coordinate gradient tests only that the neighbours exist (y == -1 still
    // counts); the sampled value (forward, mask gradient) needs the forward's range test.
    const bool inside = reads_input(d, s.y, s.x);
    const bool ok = kBackward ? (s.y >= acc_t(-1) && s.y < static_cast<acc_t>(d.H) && s.x >= acc_t(-1) &&
                                 s.x < static_cast<acc_t>(d.W))
                              : inside;
    int hl = 0, wl = 0;
    if (ok) {
      hl = floor_int(s.y);
      wl = floor_int(s.x);
    }
    const acc_t lh = ok ? s.y - static_cast<acc_t>(hl) : acc_t(0);
    const acc_t lw = ok ? s.x - static_cast<acc_t>(wl) : acc_t(0);
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    const acc_t vm = inside ? s.m : acc_t(0);  // the value's mask factor; 0 when nothing is read
    const acc_t w0 = vm * hh * hw, w1 = vm * hh * lw, w2 = vm * lh * hw, w3 = vm * lh * lw;
    const scalar_t* r0 = x + s.b * plane + (static_cast<int64_t>(hl + 1) * (d.W + 2) + (wl + 1)) * d.C;
    const int64_t row = (static_cast<int64_t>(s.b) * d.Pc + s.q) * d.Kg + static_cast<int64_t>(s.k) * d.cg;
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
    if (active) {
      for (int v = sub; v < vecs; v += team) {
        const int c = s.og * d.cpg + v * VEC;
        const int g = c / d.cg;
        const int64_t at = g * group_stride + row + (c - g * d.cg);
        V out;
        if (ok) {
          const V a = load_vec<VEC>(r0 + c), b = load_vec<VEC>(r0 + c + d.C);
          const V e = load_vec<VEC>(r0 + c + rowstep), f = load_vec<VEC>(r0 + c + rowstep + d.C);
          if (kBackward && gcols != nullptr) {
            const V gv = load_vec<VEC>(gcols + at);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const acc_t gc = static_cast<acc_t>(gv.v[j]);
              d0 += gc * static_cast<acc_t>(a.v[j]);
              d1 += gc * static_cast<acc_t>(b.v[j]);
              d2 += gc * static_cast<acc_t>(e.v[j]);
              d3 += gc * static_cast<acc_t>(f.v[j]);
            }
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            out.v[j] = static_cast<scalar_t>(w0 * static_cast<acc_t>(a.v[j]) + w1 * static_cast<acc_t>(b.v[j]) +
                                             w2 * static_cast<acc_t>(e.v[j]) + w3 * static_cast<acc_t>(f.v[j]));
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(0);
        }
        if (cols != nullptr) store_vec<VEC>(cols + at, out);
      }
    }
    if constexpr (kBackward) {
      for (int off = team >> 1; off > 0; off >>= 1) {
        d0 += __shfl_xor_sync(0xffffffffu, d0, off);
        d1 += __shfl_xor_sync(0xffffffffu, d1, off);
        d2 += __shfl_xor_sync(0xffffffffu, d2, off);
        d3 += __shfl_xor_sync(0xffffffffu, d3, off);
      }
      if (active && sub == 0) {
        const int p = d.p0 + s.q;
        const int64_t unit_og = static_cast<int64_t>(s.b) * d.OG + s.og;
        if (grad_offset != nullptr) {
          acc_t gy = 0, gx = 0;
          if (ok) {
            gy = s.m * (hw * (d2 - d0) + lw * (d3 - d1));
            gx = s.m * (hh * (d1 - d0) + lh * (d3 - d2));
          }
          const int64_t at = (unit_og * 2 * d.kk + 2 * s.k) * d.P + p;
          grad_offset[at] = static_cast<scalar_t>(gy);
          grad_offset[at + d.P] = static_cast<scalar_t>(gx);
        }
        if (grad_mask != nullptr) {
          const acc_t gm = inside ? hh * hw * d0 + hh * lw * d1 + lh * hw * d2 + lh * lw * d3 : acc_t(0);
          grad_mask[(unit_og * d.kk + s.k) * d.P + p] = static_cast<scalar_t>(gm);
        }
      }
    }
  }
}

// ---- grad_x by gather ---------------------------------------------------------------------------------
// The cells are (floor(y) + 1, floor(x) + 1) in [0, H] x [0, W] per (image, offset group); a sample
// that reads nothing gets the key `cells` and sorts last. Corner j of a sample in cell (hl, wl) is
// the pixel (hl + j / 2, wl + j % 2), with weight m * {hh*hw, hh*lw, lh*hw, lh*lw}[j].

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    cell_keys_kernel(const Dims d, const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                     const int64_t cells, int64_t* __restrict__ keys, acc_t* __restrict__ weights,
                     int* __restrict__ rows) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < d.units;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int unit = static_cast<int>(idx);
    const Sample<acc_t> s = locate<scalar_t>(d, unit, offset, mask);
    rows[unit] = (s.b * d.Pc + s.q) * d.Kg + s.k * d.cg;  // < n * Pc * Kg <= the column count
    acc_t* w = weights + 4 * idx;
    if (reads_input(d, s.y, s.x)) {
      const int hl = floor_int(s.y), wl = floor_int(s.x);
      const acc_t lh = s.y - static_cast<acc_t>(hl), lw = s.x - static_cast<acc_t>(wl);
      const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
      keys[idx] = ((static_cast<int64_t>(s.b) * d.OG + s.og) * (d.H + 1) + (hl + 1)) * (d.W + 1) + (wl + 1);
      w[0] = s.m * hh * hw;
      w[1] = s.m * hh * lw;
      w[2] = s.m * lh * hw;
      w[3] = s.m * lh * lw;
    } else {
      keys[idx] = cells;
      w[0] = w[1] = w[2] = w[3] = acc_t(0);
    }
  }
}

// One thread per (image, input pixel, VEC channels); grad_x is channels-last (n, H, W, C), written
// (or, with `accumulate`, added to) once per element.
template <typename scalar_t, typename out_t, int VEC, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    gather_grad_input_kernel(const Dims d, const scalar_t* __restrict__ gcols, const int64_t* __restrict__ order,
                             const int64_t* __restrict__ starts, const acc_t* __restrict__ weights,
                             const int* __restrict__ rows, out_t* __restrict__ grad_x, const bool accumulate) {
  const int vecs = d.C / VEC;
  const int64_t total = static_cast<int64_t>(d.n) * d.H * d.W * vecs;
  const int64_t group_stride = static_cast<int64_t>(d.n) * d.Pc * d.Kg;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int v = static_cast<int>(idx % vecs);
    const int64_t pix = idx / vecs;  // (b * H + h) * W + w
    const int w = static_cast<int>(pix % d.W);
    const int h = static_cast<int>((pix / d.W) % d.H);
    const int b = static_cast<int>(pix / (static_cast<int64_t>(d.W) * d.H));
    const int c = v * VEC;
    const int og = c / d.cpg, g = c / d.cg;
    const scalar_t* src = gcols + g * group_stride + (c - g * d.cg);
    const int64_t cell0 = (static_cast<int64_t>(b) * d.OG + og) * (d.H + 1) * (d.W + 1);
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      // this pixel is corner `corner` of the samples whose cell is (h - corner / 2, w - corner % 2) + 1
      const int64_t key = cell0 + static_cast<int64_t>(h + 1 - corner / 2) * (d.W + 1) + (w + 1 - corner % 2);
      const int64_t end = starts[key + 1];
      for (int64_t e = starts[key]; e < end; ++e) {
        const int64_t u = order[e];
        const acc_t wt = weights[4 * u + corner];
        const Vec<scalar_t, VEC> gv = load_vec<VEC>(src + rows[u]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += wt * static_cast<acc_t>(gv.v[j]);
      }
    }
    out_t* dst = grad_x + pix * d.C + c;
    Vec<out_t, VEC> o;
    if (accumulate) o = load_vec<VEC>(dst);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o.v[j] = accumulate ? static_cast<out_t>(static_cast<acc_t>(o.v[j]) + acc[j]) : static_cast<out_t>(acc[j]);
    }
    store_vec<VEC>(dst, o);
  }
}

// ---- grad_x by atomics (the alternative, for measurements) ------------------------------------------

template <int VEC, typename acc_t>
__device__ __forceinline__ void atomic_add_vec(acc_t* p, const acc_t (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else
#endif
  {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, v[j]);
  }
}

// One thread per (sample, VEC channels of its offset group); grad_x is channels-last (n, H, W, C)
// in the accumulation dtype, zeroed by the caller.
template <typename scalar_t, int VEC, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    scatter_grad_input_kernel(const Dims d, const scalar_t* __restrict__ gcols, const scalar_t* __restrict__ offset,
                              const scalar_t* __restrict__ mask, acc_t* __restrict__ grad_x) {
  const int vecs = d.cpg / VEC;
  const int64_t total = static_cast<int64_t>(d.units) * vecs;
  const int64_t group_stride = static_cast<int64_t>(d.n) * d.Pc * d.Kg;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int v = static_cast<int>(idx % vecs);
    const Sample<acc_t> s = locate<scalar_t>(d, static_cast<int>(idx / vecs), offset, mask);
    if (!reads_input(d, s.y, s.x)) continue;
    const int hl = floor_int(s.y), wl = floor_int(s.x);
    const acc_t lh = s.y - static_cast<acc_t>(hl), lw = s.x - static_cast<acc_t>(wl);
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    const acc_t wts[4] = {s.m * hh * hw, s.m * hh * lw, s.m * lh * hw, s.m * lh * lw};
    const int c = s.og * d.cpg + v * VEC;
    const int g = c / d.cg;
    const int64_t at = g * group_stride + (static_cast<int64_t>(s.b) * d.Pc + s.q) * d.Kg +
                       static_cast<int64_t>(s.k) * d.cg + (c - g * d.cg);
    const Vec<scalar_t, VEC> gv = load_vec<VEC>(gcols + at);
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      const int py = hl + corner / 2, px = wl + corner % 2;
      if (py < 0 || py >= d.H || px < 0 || px >= d.W) continue;
      acc_t add[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) add[j] = wts[corner] * static_cast<acc_t>(gv.v[j]);
      atomic_add_vec<VEC>(grad_x + ((static_cast<int64_t>(s.b) * d.H + py) * d.W + px) * d.C + c, add);
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------------

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Channels per access: 16 bytes' worth (8 fp16/bf16, 4 fp32, 2 fp64) when that divides the channels of
// a group and of an offset group (a vector never straddles either) and every buffer (pointer, element
// size) is aligned to a whole vector; else one. Only these two widths are compiled: DyHead's channel
// counts are multiples of 8, and each width is another set of kernels to build.
struct Buf {
  const void* ptr;
  size_t elem;
};

template <typename scalar_t>
constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));

template <typename scalar_t, typename F>
void with_vec(const Dims& d, std::initializer_list<Buf> bufs, F&& f) {
  constexpr int vec = kVec<scalar_t>;
  bool fits = d.cg % vec == 0 && d.cpg % vec == 0;
  for (const Buf& b : bufs) {
    fits = fits && reinterpret_cast<uintptr_t>(b.ptr) % (static_cast<uintptr_t>(vec) * b.elem) == 0;
  }
  if (fits) {
    f(std::integral_constant<int, vec>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

template <typename scalar_t, int VEC, bool kBackward>
void launch_sample(const Dims& d, cudaStream_t stream, const scalar_t* x, const scalar_t* offset,
                   const scalar_t* mask, const scalar_t* gcols, scalar_t* cols, scalar_t* grad_offset,
                   scalar_t* grad_mask) {
  const int vecs = d.cpg / VEC;
  int team_log2 = 0;
  while ((1 << team_log2) < vecs && team_log2 < 5) ++team_log2;
  const int64_t per_warp = 32 >> team_log2;
  const int64_t warps = (d.units + per_warp - 1) / per_warp;
  sample_kernel<scalar_t, VEC, kBackward><<<blocks_for(warps * 32), kThreads, 0, stream>>>(
      d, team_log2, x, offset, mask, gcols, cols, grad_offset, grad_mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool cuda_grad_input_atomic() {
  static const bool atomic = [] {
    const char* env = std::getenv("DYHEAD_DCN_CUDA_GRAD_INPUT");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "gather") == 0) return false;
    TORCH_CHECK(std::strcmp(env, "atomic") == 0, "DYHEAD_DCN_CUDA_GRAD_INPUT must be gather or atomic, got '", env,
                "'");
    return true;
  }();
  return atomic;
}

void im2col_cuda(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                 at::Tensor& columns, const DcnShape& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = make_dims(s);
  if (d.units == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "dyhead_deform_im2col_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* cols = columns.data_ptr<scalar_t>();
    with_vec<scalar_t>(d, {{xp, sizeof(scalar_t)}, {cols, sizeof(scalar_t)}}, [&](auto vc) {
      launch_sample<scalar_t, decltype(vc)::value, false>(d, stream, xp, offset.data_ptr<scalar_t>(),
                                                          ptr_or_null<scalar_t>(mask), nullptr, cols, nullptr, nullptr);
    });
  });
}

void col2im_coord_cuda(at::Tensor& columns, const at::Tensor& x, const at::Tensor& offset,
                       const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, bool accumulate,
                       at::Tensor& grad_offset, at::Tensor& grad_mask, bool write_columns, const DcnShape& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = make_dims(s);
  if (d.units == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool want_coord = grad_offset.defined() || grad_mask.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "dyhead_deform_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* mask_ptr = ptr_or_null<scalar_t>(mask);
        const scalar_t* off_ptr = offset.data_ptr<scalar_t>();
        scalar_t* cols = columns.data_ptr<scalar_t>();
        // grad_x first: it reads the grad columns that the sampling pass below may overwrite.
        if (grad_x.defined()) {
          TORCH_CHECK(grad_x.is_contiguous() && grad_x.dim() == 4 && grad_x.size(3) == d.C,
                      "dyhead: grad_x must be a contiguous (n, H, W, C) buffer");
          const bool out_acc = grad_x.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
          TORCH_CHECK(out_acc || (grad_x.scalar_type() == x.scalar_type() && !accumulate),
                      "dyhead: grad_x must have the accumulation dtype when accumulated into");
          if (cuda_grad_input_atomic()) {
            TORCH_CHECK(out_acc && accumulate, "dyhead: the atomic grad_x path needs a zeroed accumulation buffer");
            acc_t* gx = grad_x.data_ptr<acc_t>();
            with_vec<scalar_t>(d, {{cols, sizeof(scalar_t)}, {gx, sizeof(acc_t)}}, [&](auto vc) {
              constexpr int VEC = decltype(vc)::value;
              const int64_t total = static_cast<int64_t>(d.units) * (d.cpg / VEC);
              scatter_grad_input_kernel<scalar_t, VEC><<<blocks_for(total), kThreads, 0, stream>>>(
                  d, cols, off_ptr, mask_ptr, gx);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          } else {
            const auto opts = x.options();
            const int64_t cells = static_cast<int64_t>(d.n) * d.OG * (d.H + 1) * (d.W + 1);
            at::Tensor keys = at::empty({d.units}, opts.dtype(at::kLong));
            at::Tensor weights = at::empty({int64_t(4) * d.units}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
            at::Tensor rows = at::empty({d.units}, opts.dtype(at::kInt));
            cell_keys_kernel<scalar_t><<<blocks_for(d.units), kThreads, 0, stream>>>(
                d, off_ptr, mask_ptr, cells, keys.data_ptr<int64_t>(), weights.data_ptr<acc_t>(),
                rows.data_ptr<int>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            // Stable: equal keys keep the sample order, so the sums below are deterministic.
            const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
            const at::Tensor starts = at::searchsorted(std::get<0>(sorted), at::arange(cells + 1, keys.options()));
            const at::Tensor order = std::get<1>(sorted).contiguous();
            const int64_t total = static_cast<int64_t>(d.n) * d.H * d.W * d.C;
            const auto gather = [&](auto* out) {
              using out_t = std::remove_pointer_t<decltype(out)>;
              with_vec<scalar_t>(d, {{cols, sizeof(scalar_t)}, {out, sizeof(out_t)}}, [&](auto vc) {
                constexpr int VEC = decltype(vc)::value;
                gather_grad_input_kernel<scalar_t, out_t, VEC><<<blocks_for(total / VEC), kThreads, 0, stream>>>(
                    d, cols, order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), weights.data_ptr<acc_t>(),
                    rows.data_ptr<int>(), out, accumulate);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
            };
            if (out_acc) {
              gather(grad_x.data_ptr<acc_t>());
            } else {
              gather(grad_x.data_ptr<scalar_t>());
            }
          }
        }
        if (want_coord || write_columns) {
          const scalar_t* xp = x.data_ptr<scalar_t>();
          with_vec<scalar_t>(d, {{xp, sizeof(scalar_t)}, {cols, sizeof(scalar_t)}}, [&](auto vc) {
            launch_sample<scalar_t, decltype(vc)::value, true>(
                d, stream, xp, off_ptr, mask_ptr, want_coord ? cols : nullptr, write_columns ? cols : nullptr,
                ptr_or_null<scalar_t>(grad_offset), ptr_or_null<scalar_t>(grad_mask));
          });
        }
      });
}

}  // namespace dyhead
