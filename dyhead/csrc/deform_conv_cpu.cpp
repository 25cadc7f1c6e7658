// CPU kernels of the modulated deformable convolution, channels-last with a zero border (see
// deform_conv.h): bilinear im2col (forward, and again for the weight gradient) and the fused
// col2im scatter + offset/mask gradient (backward).
//
// Work is done per (tap k, block of up to kBlock output pixels) in two phases:
//   1. sample phase, vectorised over the pixels of the block: sampling position, the address
//      of the top-left neighbour in the padded x, and the four (mask-weighted) bilinear weights;
//   2. channel phase, per pixel: the four neighbour rows of x are contiguous runs of channels,
//      so the loop over channels is four FMAs per element with no gathers (`omp simd`).
// The offset/mask gradient needs, per sample, only the four dot products
// d_q = sum_c grad_col[c] * x_q[c]; a third vectorised phase turns them into dy, dx, dmask.
//
// Threads (at::parallel_for, so torch.set_num_threads is respected):
//   * im2col: tasks are (image, offset group, block of output pixels); disjoint column writes.
// Both work on the chunk's output pixels [p_begin, p_begin + p_count) (DcnShape).
//   * col2im: tasks are (image, offset group, channel split); a task owns its channels of
//     grad_x, so no two threads write the same element (no atomics, deterministic result).
//     Channels are split only when there are fewer (image, group) pairs than threads; the
//     offset/mask partial sums of the splits are then added up in a second pass.
// The bodies are compiled for the baseline ISA and, on x86-64, for AVX2+FMA and AVX-512 (function
// target attributes), and the best one the CPU supports is picked at run time.
#include "deform_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace dyhead {
namespace {

#if defined(__GNUC__)
#define DYHEAD_INLINE inline __attribute__((always_inline))
#else
#define DYHEAD_INLINE inline
#endif

constexpr int64_t kBlock = 64;           // output pixels per sample block
constexpr int64_t kTaskElems = 16384;    // channel-samples per im2col task (a few microseconds)
constexpr int64_t kSerialElems = 32768;  // below this much work a kernel runs on one thread

template <typename T>
struct KernelArgs {
  DcnShape s;
  const T* x = nullptr;       // (n, H+2, W+2, C), zero border
  const T* offset = nullptr;  // (n, OG*2*kk, Ho, Wo)
  const T* mask = nullptr;    // (n, OG*kk, Ho, Wo) or nullptr (DCNv1: 1)
  T* cols = nullptr;          // im2col output / col2im input, (G, n*P, Kg)
  T* grad_x = nullptr;        // (n, H+2, W+2, C) or nullptr
  T* grad_offset = nullptr;   // (n, OG*2*kk, Ho, Wo) or nullptr
  T* grad_mask = nullptr;     // (n, OG*kk, Ho, Wo) or nullptr
  T* part = nullptr;          // (units, nsplit, 3, kk*Pc) partial sums when channels are split
  int64_t pixels_per_task = 1, blocks = 1;  // im2col tasks
  int64_t nsplit = 1, cps = 1;              // col2im tasks: channel splits, channels per split
};

// floor() as int for |v| < 2^31: truncate, then step down for negative non-integers (exact).
template <typename T>
DYHEAD_INLINE int32_t floor_i32(T v) {
  const int32_t t = static_cast<int32_t>(v);
  return t - static_cast<int32_t>(v < static_cast<T>(t));
}

template <typename T>
DYHEAD_INLINE void row_forward(T* __restrict__ dst, const T* __restrict__ r0, const T* __restrict__ r1,
                               const T* __restrict__ r2, const T* __restrict__ r3, T w0, T w1, T w2, T w3,
                               int64_t len) {
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) dst[c] = w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
}

template <typename T>
DYHEAD_INLINE void row_dots(const T* __restrict__ g, const T* __restrict__ r0, const T* __restrict__ r1,
                            const T* __restrict__ r2, const T* __restrict__ r3, int64_t len, T& d0, T& d1, T& d2,
                            T& d3) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t c = 0; c < len; ++c) {
    const T gc = g[c];
    a0 += gc * r0[c];
    a1 += gc * r1[c];
    a2 += gc * r2[c];
    a3 += gc * r3[c];
  }
  d0 += a0;
  d1 += a1;
  d2 += a2;
  d3 += a3;
}

// The four rows are distinct pixels of grad_x, so they never overlap.
template <typename T>
DYHEAD_INLINE void row_scatter(const T* __restrict__ g, T* __restrict__ o0, T* __restrict__ o1, T* __restrict__ o2,
                               T* __restrict__ o3, T s0, T s1, T s2, T s3, int64_t len) {
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    const T gc = g[c];
    o0[c] += s0 * gc;
    o1[c] += s1 * gc;
    o2[c] += s2 * gc;
    o3[c] += s3 * gc;
  }
}

// Sampling grid of a block of output pixels: ybase/xbase = top-left tap position.
template <typename T>
DYHEAD_INLINE void block_grid(const DcnShape& s, int64_t p0, int64_t len, T* ybase, T* xbase) {
  int64_t ho = p0 / s.out_w, wo = p0 - ho * s.out_w;
  for (int64_t l = 0; l < len; ++l) {
    ybase[l] = static_cast<T>(ho * s.stride_h - s.pad_h);
    xbase[l] = static_cast<T>(wo * s.stride_w - s.pad_w);
    if (++wo == s.out_w) {
      wo = 0;
      ++ho;
    }
  }
}

// im2col tasks [t0, t1): task = (image, offset group, run of output pixels).
template <typename T>
DYHEAD_INLINE void im2col_range(const KernelArgs<T>& a, int64_t t0, int64_t t1) {
  const DcnShape& s = a.s;
  const int64_t n = s.n, C = s.channels, OG = s.offset_groups, cpg = s.channels_per_offset_group();
  const int64_t cg = s.channels_per_group(), Kg = s.group_cols();
  const int64_t kk = s.taps(), P = s.out_plane(), Pc = s.p_count;
  const int32_t Wp = static_cast<int32_t>(s.width + 2), Ci = static_cast<int32_t>(C);
  const T Hf = static_cast<T>(s.height), Wf = static_cast<T>(s.width);
  T ybase[kBlock], xbase[kBlock], w0[kBlock], w1[kBlock], w2[kBlock], w3[kBlock], ones[kBlock];
  int32_t base[kBlock];
  for (int64_t l = 0; l < kBlock; ++l) ones[l] = T(1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t blk = t % a.blocks;
    const int64_t unit = t / a.blocks;  // b * OG + og
    const int64_t og = unit % OG;
    const int64_t b = unit / OG;
    const T* off = a.offset + unit * 2 * kk * P;
    const T* msk = a.mask != nullptr ? a.mask + unit * kk * P : nullptr;
    const T* xb = a.x + b * s.padded_plane() * C;
    const int64_t c0 = og * cpg, c1 = c0 + cpg;
    const int64_t q_end = std::min(Pc, (blk + 1) * a.pixels_per_task);
    for (int64_t q0 = blk * a.pixels_per_task; q0 < q_end; q0 += kBlock) {
      const int64_t L = std::min(kBlock, q_end - q0);
      const int64_t p0 = s.p_begin + q0;  // output pixel of the block's first entry
      block_grid(s, p0, L, ybase, xbase);
      for (int64_t k = 0; k < kk; ++k) {
        const T di = static_cast<T>((k / s.kw) * s.dil_h), dj = static_cast<T>((k % s.kw) * s.dil_w);
        const T* __restrict__ oy = off + 2 * k * P + p0;
        const T* __restrict__ ox = off + (2 * k + 1) * P + p0;
        const T* __restrict__ mk = msk != nullptr ? msk + k * P + p0 : ones;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const T y = ybase[l] + di + oy[l];
          const T x = xbase[l] + dj + ox[l];
          const bool in = (y > T(-1)) & (y < Hf) & (x > T(-1)) & (x < Wf);
          const T yc = in ? y : T(0), xc = in ? x : T(0);
          const int32_t hl = floor_i32(yc), wl = floor_i32(xc);
          const T lh = yc - static_cast<T>(hl), lw = xc - static_cast<T>(wl);
          const T hh = T(1) - lh, hw = T(1) - lw;
          const T m = in ? mk[l] : T(0);
          base[l] = ((hl + 1) * Wp + (wl + 1)) * Ci;
          w0[l] = hh * hw * m;
          w1[l] = hh * lw * m;
          w2[l] = lh * hw * m;
          w3[l] = lh * lw * m;
        }
        for (int64_t cs = c0; cs < c1;) {  // runs of channels inside one weight group
          const int64_t g = cs / cg;
          const int64_t ce = std::min(c1, (g + 1) * cg);
          T* dst = a.cols + ((g * n + b) * Pc + q0) * Kg + k * cg + (cs - g * cg);
          const T* xs = xb + cs;
          const int64_t rowstep = static_cast<int64_t>(Wp) * C;
          for (int64_t l = 0; l < L; ++l) {
            const T* r0 = xs + base[l];
            row_forward(dst + l * Kg, r0, r0 + C, r0 + rowstep, r0 + rowstep + C, w0[l], w1[l], w2[l], w3[l],
                        ce - cs);
          }
          cs = ce;
        }
      }
    }
  }
}

// col2im tasks [t0, t1): task = (image, offset group, channel split).
template <typename T>
DYHEAD_INLINE void col2im_range(const KernelArgs<T>& a, int64_t t0, int64_t t1) {
  const DcnShape& s = a.s;
  const int64_t n = s.n, C = s.channels, OG = s.offset_groups, cpg = s.channels_per_offset_group();
  const int64_t cg = s.channels_per_group(), Kg = s.group_cols();
  const int64_t kk = s.taps(), P = s.out_plane(), E = kk * P, Pc = s.p_count, Ec = kk * Pc;
  const int32_t Wp = static_cast<int32_t>(s.width + 2), Ci = static_cast<int32_t>(C);
  const int64_t rowstep = static_cast<int64_t>(Wp) * C;
  const T Hf = static_cast<T>(s.height), Wf = static_cast<T>(s.width);
  const bool want_coord = a.grad_offset != nullptr || a.grad_mask != nullptr;
  const bool want_input = a.grad_x != nullptr;
  const int64_t nsplit = a.nsplit, cps = a.cps;
  T ybase[kBlock], xbase[kBlock], ones[kBlock];
  T s0[kBlock], s1[kBlock], s2[kBlock], s3[kBlock];    // scatter weights (mask * bilinear, 0 outside)
  T lhs[kBlock], lws[kBlock], cok[kBlock], cm[kBlock], vin[kBlock];  // fractions, range flags, mask
  T d0[kBlock], d1[kBlock], d2[kBlock], d3[kBlock];     // dot products with the four neighbours
  int32_t base[kBlock];
  for (int64_t l = 0; l < kBlock; ++l) ones[l] = T(1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t split = t % nsplit;
    const int64_t unit = t / nsplit;
    const int64_t og = unit % OG;
    const int64_t b = unit / OG;
    const int64_t c0 = og * cpg + split * cps;
    const int64_t c1 = std::min(og * cpg + cpg, c0 + cps);
    const T* off = a.offset + unit * 2 * kk * P;
    const T* msk = a.mask != nullptr ? a.mask + unit * kk * P : nullptr;
    const T* xb = a.x + b * s.padded_plane() * C;
    T* gxb = want_input ? a.grad_x + b * s.padded_plane() * C : nullptr;
    T* goff = a.grad_offset != nullptr ? a.grad_offset + unit * 2 * E : nullptr;
    T* gmask = a.grad_mask != nullptr ? a.grad_mask + unit * E : nullptr;
    T* pout = a.part != nullptr ? a.part + (unit * nsplit + split) * 3 * Ec : nullptr;
    for (int64_t q0 = 0; q0 < Pc; q0 += kBlock) {
      const int64_t L = std::min(kBlock, Pc - q0);
      const int64_t p0 = s.p_begin + q0;  // output pixel of the block's first entry
      block_grid(s, p0, L, ybase, xbase);
      for (int64_t k = 0; k < kk; ++k) {
        const T di = static_cast<T>((k / s.kw) * s.dil_h), dj = static_cast<T>((k % s.kw) * s.dil_w);
        const T* __restrict__ oy = off + 2 * k * P + p0;
        const T* __restrict__ ox = off + (2 * k + 1) * P + p0;
        const T* __restrict__ mk = msk != nullptr ? msk + k * P + p0 : ones;
        // torchvision's coordinate gradient tests only the neighbours' validity, not -1 < y, x:
        // a sample exactly on y == -1 (zero offset on the padding row) gets the one-sided
        // derivative while its value (and input scatter) is zero.
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const T y = ybase[l] + di + oy[l];
          const T x = xbase[l] + dj + ox[l];
          const bool ok = (y >= T(-1)) & (y < Hf) & (x >= T(-1)) & (x < Wf);
          const bool in = (y > T(-1)) & (x > T(-1)) & ok;
          const T yc = ok ? y : T(0), xc = ok ? x : T(0);
          const int32_t hl = floor_i32(yc), wl = floor_i32(xc);
          const T lh = yc - static_cast<T>(hl), lw = xc - static_cast<T>(wl);
          const T hh = T(1) - lh, hw = T(1) - lw;
          const T m = mk[l];
          const T sm = in ? m : T(0);
          base[l] = ((hl + 1) * Wp + (wl + 1)) * Ci;
          s0[l] = hh * hw * sm;
          s1[l] = hh * lw * sm;
          s2[l] = lh * hw * sm;
          s3[l] = lh * lw * sm;
          lhs[l] = lh;
          lws[l] = lw;
          cok[l] = ok ? T(1) : T(0);
          cm[l] = ok ? m : T(0);
          vin[l] = in ? T(1) : T(0);
          d0[l] = d1[l] = d2[l] = d3[l] = T(0);
        }
        for (int64_t cs = c0; cs < c1;) {  // runs of channels inside one weight group
          const int64_t g = cs / cg;
          const int64_t ce = std::min(c1, (g + 1) * cg);
          const int64_t len = ce - cs;
          const T* gc = a.cols + ((g * n + b) * Pc + q0) * Kg + k * cg + (cs - g * cg);
          const T* xs = xb + cs;
          for (int64_t l = 0; l < L; ++l) {
            const T* r0 = xs + base[l];
            if (want_coord && cok[l] != T(0)) {
              row_dots(gc + l * Kg, r0, r0 + C, r0 + rowstep, r0 + rowstep + C, len, d0[l], d1[l], d2[l], d3[l]);
            }
            if (want_input && vin[l] != T(0)) {
              T* o0 = gxb + cs + base[l];
              row_scatter(gc + l * Kg, o0, o0 + C, o0 + rowstep, o0 + rowstep + C, s0[l], s1[l], s2[l], s3[l], len);
            }
          }
          cs = ce;
        }
        if (!want_coord) continue;
        // partial sums: (3, kk, Pc) per (unit, split); outputs: the pixels' entries of the full planes
        T* ry = pout != nullptr ? pout + k * Pc + q0 : (goff != nullptr ? goff + 2 * k * P + p0 : nullptr);
        T* rx = pout != nullptr ? pout + Ec + k * Pc + q0 : (goff != nullptr ? goff + (2 * k + 1) * P + p0 : nullptr);
        T* rm = pout != nullptr ? pout + 2 * Ec + k * Pc + q0 : (gmask != nullptr ? gmask + k * P + p0 : nullptr);
        if (ry != nullptr) {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            const T lh = lhs[l], lw = lws[l], hh = T(1) - lh, hw = T(1) - lw;
            ry[l] = cm[l] * (hw * (d2[l] - d0[l]) + lw * (d3[l] - d1[l]));
            rx[l] = cm[l] * (hh * (d1[l] - d0[l]) + lh * (d3[l] - d2[l]));
          }
        }
        if (rm != nullptr) {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            const T lh = lhs[l], lw = lws[l], hh = T(1) - lh, hw = T(1) - lw;
            rm[l] = vin[l] * (hh * hw * d0[l] + hh * lw * d1[l] + lh * hw * d2[l] + lh * lw * d3[l]);
          }
        }
      }
    }
  }
}

// ---- instruction-set variants ----------------------------------------------------------------------
// Only these functions get the wider ISA (target attributes, not a pragma), so no inline function
// shared with the rest of the program is ever compiled for it. DYHEAD_DCN_CPU_ISA=default|avx2|
// avx512 caps the choice (for testing every variant on one machine).
template <typename T>
using RangeFn = void (*)(const KernelArgs<T>&, int64_t, int64_t);

#define DYHEAD_DEFINE_VARIANT(SUFFIX, ATTR)                                                               \
  template <typename T>                                                                                    \
  ATTR void im2col_##SUFFIX(const KernelArgs<T>& a, int64_t t0, int64_t t1) { im2col_range<T>(a, t0, t1); } \
  template <typename T>                                                                                    \
  ATTR void col2im_##SUFFIX(const KernelArgs<T>& a, int64_t t0, int64_t t1) { col2im_range<T>(a, t0, t1); }

DYHEAD_DEFINE_VARIANT(base, )
#if defined(__GNUC__) && defined(__x86_64__)
#define DYHEAD_X86_VARIANTS 1
DYHEAD_DEFINE_VARIANT(avx2, __attribute__((target("avx2,fma"))))
DYHEAD_DEFINE_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#endif

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa cpu_isa() {
  static const Isa best = [] {
#ifdef DYHEAD_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kBase;
  }();
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("DYHEAD_DCN_CPU_ISA")) {
    const std::string v(env);
    if (v == "default" || v == "base") {
      cap = Isa::kBase;
    } else if (v == "avx2") {
      cap = Isa::kAvx2;
    }
  }
  return static_cast<int>(best) < static_cast<int>(cap) ? best : cap;
}

template <typename T>
RangeFn<T> pick(bool forward) {
#ifdef DYHEAD_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return forward ? &im2col_avx512<T> : &col2im_avx512<T>;
    case Isa::kAvx2:
      return forward ? &im2col_avx2<T> : &col2im_avx2<T>;
    default:
      break;
  }
#endif
  return forward ? &im2col_base<T> : &col2im_base<T>;
}

template <typename T>
void im2col_impl(KernelArgs<T>& a) {
  const DcnShape& s = a.s;
  const int64_t per_pixel = s.taps() * s.channels_per_offset_group();
  a.pixels_per_task = std::max<int64_t>(1, kTaskElems / per_pixel);
  a.blocks = (s.p_count + a.pixels_per_task - 1) / a.pixels_per_task;
  const int64_t tasks = s.n * s.offset_groups * a.blocks;
  const int64_t grain = s.n * s.channels * s.taps() * s.p_count <= kSerialElems ? tasks : 1;
  const RangeFn<T> fn = pick<T>(true);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

template <typename T>
void col2im_coord_impl(KernelArgs<T>& a) {
  const DcnShape& s = a.s;
  const int64_t cpg = s.channels_per_offset_group(), P = s.out_plane(), E = s.taps() * P;
  const int64_t Pc = s.p_count, Ec = s.taps() * Pc;
  const bool want_coord = a.grad_offset != nullptr || a.grad_mask != nullptr;
  const int64_t units = s.n * s.offset_groups;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t work = units * Ec * cpg;
  int64_t nsplit =
      (units >= threads || work <= kSerialElems) ? 1 : std::min<int64_t>(cpg, (threads + units - 1) / units);
  a.cps = (cpg + nsplit - 1) / nsplit;
  a.nsplit = nsplit = (cpg + a.cps - 1) / a.cps;  // no empty split

  at::Tensor partial;  // keeps the partial sums alive
  if (want_coord && nsplit > 1) {
    partial = at::empty({units, nsplit, 3, Ec}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    a.part = partial.data_ptr<T>();
  }
  const int64_t grain = work <= kSerialElems ? units * nsplit : 1;
  const RangeFn<T> fn = pick<T>(false);
  at::parallel_for(0, units * nsplit, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });

  if (a.part != nullptr) {
    const T* part = a.part;
    T* grad_offset = a.grad_offset;
    T* grad_mask = a.grad_mask;
    const int64_t p_begin = s.p_begin;
    at::parallel_for(0, units * Ec, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t idx = i0; idx < i1; ++idx) {
        const int64_t unit = idx / Ec;
        const int64_t e = idx - unit * Ec;  // k * Pc + q
        const int64_t k = e / Pc, p = p_begin + (e - k * Pc);
        T sy = 0, sx = 0, sm = 0;
        const T* src = part + unit * nsplit * 3 * Ec + e;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          sy += src[sp * 3 * Ec];
          sx += src[sp * 3 * Ec + Ec];
          sm += src[sp * 3 * Ec + 2 * Ec];
        }
        if (grad_offset != nullptr) {
          grad_offset[unit * 2 * E + 2 * k * P + p] = sy;
          grad_offset[unit * 2 * E + (2 * k + 1) * P + p] = sx;
        }
        if (grad_mask != nullptr) grad_mask[unit * E + k * P + p] = sm;
      }
    });
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void im2col_cpu(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                at::Tensor& columns, const DcnShape& s) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyhead_deform_im2col_cpu", [&] {
    KernelArgs<scalar_t> a;
    a.s = s;
    a.x = x.data_ptr<scalar_t>();
    a.offset = offset.data_ptr<scalar_t>();
    a.mask = ptr_or_null<scalar_t>(mask);
    a.cols = columns.data_ptr<scalar_t>();
    im2col_impl<scalar_t>(a);
  });
}

void col2im_coord_cpu(const at::Tensor& grad_columns, const at::Tensor& x, const at::Tensor& offset,
                      const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, at::Tensor& grad_offset,
                      at::Tensor& grad_mask, const DcnShape& s) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyhead_deform_col2im_cpu", [&] {
    KernelArgs<scalar_t> a;
    a.s = s;
    a.x = x.data_ptr<scalar_t>();
    a.offset = offset.data_ptr<scalar_t>();
    a.mask = ptr_or_null<scalar_t>(mask);
    a.cols = const_cast<scalar_t*>(grad_columns.data_ptr<scalar_t>());
    a.grad_x = ptr_or_null<scalar_t>(grad_x);
    a.grad_offset = ptr_or_null<scalar_t>(grad_offset);
    a.grad_mask = ptr_or_null<scalar_t>(grad_mask);
    col2im_coord_impl<scalar_t>(a);
  });
}

}  // namespace dyhead
