// Modulated deformable convolution (DCNv2): operator schema, device-independent driver
// (shape checks, batch chunking, GEMMs through ATen) and the autocast kernels.
//
// Per chunk of n images and Pc of their output pixels (all P of them unless one image's columns
// exceed the budget; layouts in deform_conv.h; G weight groups of M outputs, Kg = kk*C/G):
//   forward : x = the images as padded channels-last (n, H+2, W+2, C), once per image chunk
//             columns = im2col(x, offset, mask)                       (G, n*Pc, Kg)
//             G == 1: out[b] (M, Pc) = bias + W @ columns[b]^T         batched GEMM into the output
//             G  > 1: out_g (n*Pc, M) = bias + columns_g @ W_g^T, then transposed into the output
//   backward: grad columns = grad_out^T @ W                           (same buffer as the columns)
//             CPU : grad_x (padded), grad_offset, grad_mask += col2im_coord(grad columns, x, ...)
//                   columns = im2col(...) again
//             CUDA: grad_x (channels-last) by a gather over the grad columns, then one pass that
//                   writes grad_offset and grad_mask and leaves the columns in the same buffer
//             grad_W += grad_out @ columns                             (contraction over pixels)
// On CPU the workspace (one column buffer + the padded copies of x and grad_x) is sized to stay
// below torchvision's column buffer for the same call; on CUDA chunks are as large as the column
// budget allows (fewer, larger launches); see chunking().
#include "deform_conv.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <tuple>

namespace dyhead {
namespace {

constexpr int64_t kMaxParallelImgs = 32;

// Column buffer budget per chunk (DYHEAD_DCN_COLUMN_KB overrides both; read once). On CPU small
// chunks keep the column buffer in cache (the GEMMs stay large: rows = images * output pixels); on
// CUDA larger chunks mean fewer launches (512 MiB: COCO's P3 at batch 2 is one chunk in fp32 and
// bf16). A chunk always holds at least one image.
int64_t column_budget_bytes(bool cuda) {
  static const int64_t env_kb = [] {
    const char* env = std::getenv("DYHEAD_DCN_COLUMN_KB");
    const long long v = env != nullptr ? std::atoll(env) : 0;
    return static_cast<int64_t>(v > 0 ? v : 0);
  }();
  if (env_kb > 0) return env_kb * 1024;
  return cuda ? (int64_t(512) << 20) : (int64_t(1) << 20);
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

DcnShape make_shape(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "dyhead::deform_conv2d: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "dyhead::deform_conv2d: weight must be (Cout, C/groups, kh, kw), got ",
              weight.sizes());
  TORCH_CHECK(offset.dim() == 4, "dyhead::deform_conv2d: offset must be 4-d, got ", offset.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dyhead::deform_conv2d: stride, padding and dilation need two values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "dyhead::deform_conv2d: stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "dyhead::deform_conv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "dyhead::deform_conv2d: dilation must be positive, got ",
              dilation);
  DcnShape s;
  s.n = input.size(0);
  s.channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  TORCH_CHECK(s.kh > 0 && s.kw > 0, "dyhead::deform_conv2d: empty kernel ", weight.sizes());
  TORCH_CHECK(weight.size(1) > 0 && s.channels % weight.size(1) == 0, "dyhead::deform_conv2d: input channels (",
              s.channels, ") must be a multiple of weight.size(1) (", weight.size(1), ")");
  s.groups = s.channels / weight.size(1);
  TORCH_CHECK(s.out_channels % s.groups == 0, "dyhead::deform_conv2d: out channels (", s.out_channels,
              ") must be a multiple of groups (", s.groups, ")");
  const int64_t kk = s.taps();
  TORCH_CHECK(offset.size(1) > 0 && offset.size(1) % (2 * kk) == 0,
              "dyhead::deform_conv2d: offset channels (", offset.size(1), ") must be a multiple of 2*kh*kw (",
              2 * kk, ")");
  s.offset_groups = offset.size(1) / (2 * kk);
  TORCH_CHECK(s.channels % s.offset_groups == 0, "dyhead::deform_conv2d: input channels (", s.channels,
              ") must be a multiple of offset groups (", s.offset_groups, ")");
  s.out_h = (s.height + 2 * s.pad_h - (s.dil_h * (s.kh - 1) + 1)) / s.stride_h + 1;
  s.out_w = (s.width + 2 * s.pad_w - (s.dil_w * (s.kw - 1) + 1)) / s.stride_w + 1;
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, "dyhead::deform_conv2d: output would be empty (", s.out_h, "x", s.out_w,
              ") for input ", input.sizes(), " and kernel ", weight.sizes());
  TORCH_CHECK(offset.size(0) == s.n && offset.size(2) == s.out_h && offset.size(3) == s.out_w,
              "dyhead::deform_conv2d: offset must be (", s.n, ", ", offset.size(1), ", ", s.out_h, ", ", s.out_w,
              "), got ", offset.sizes());
  if (has(mask)) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == s.n && mask->size(1) == s.offset_groups * kk &&
                    mask->size(2) == s.out_h && mask->size(3) == s.out_w,
                "dyhead::deform_conv2d: mask must be (", s.n, ", ", s.offset_groups * kk, ", ", s.out_h, ", ",
                s.out_w, "), got ", mask->sizes());
  }
  TORCH_CHECK((s.height + 2) * (s.width + 2) * s.channels < std::numeric_limits<int32_t>::max(),
              "dyhead::deform_conv2d: one input image is too large (H * W * C must stay below 2^31)");
  return s;
}

void check_tensors(const char* what, const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->device() == ref.device(), "dyhead::", what, ": all tensors must be on one device, got ",
                ref.device(), " and ", t->device());
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), "dyhead::", what,
                ": all tensors must have one dtype (cast them, or use autocast), got ", ref.scalar_type(), " and ",
                t->scalar_type());
  }
  TORCH_CHECK(at::isFloatingType(ref.scalar_type()), "dyhead::", what, ": floating point tensors expected, got ",
              ref.scalar_type());
}

// The CPU kernels compute in float/double; half and bfloat16 CPU tensors are upcast to float.
at::ScalarType compute_dtype(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  if (t.device().is_cpu() && (dt == at::kHalf || dt == at::kBFloat16)) return at::kFloat;
  return dt;
}

// Accumulation dtype for grad_input / grad_weight (fp32 for reduced precision).
at::ScalarType acc_dtype(at::ScalarType dt) {
  return (dt == at::kHalf || dt == at::kBFloat16) ? at::kFloat : dt;
}

at::Tensor prep(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

c10::optional<at::Tensor> prep(const c10::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!has(t)) return c10::nullopt;
  return t->to(dt).contiguous();
}

// (n, C, H, W) -> (n, H+2, W+2, C) with a zero border (see deform_conv.h).
at::Tensor padded_channels_last(const at::Tensor& x) {
  at::Tensor xp = at::zeros({x.size(0), x.size(2) + 2, x.size(3) + 2, x.size(1)}, x.options());
  xp.narrow(1, 1, x.size(2)).narrow(2, 1, x.size(3)).copy_(x.permute({0, 2, 3, 1}));
  return xp;
}

c10::optional<at::Tensor> narrow_opt(const c10::optional<at::Tensor>& t, int64_t b0, int64_t n) {
  if (!has(t)) return c10::nullopt;
  return t->narrow(0, b0, n);
}

at::Tensor narrow_or_undef(const at::Tensor& t, int64_t b0, int64_t n) {
  return t.defined() ? t.narrow(0, b0, n) : at::Tensor();
}

// Chunk geometry: n images x pb output pixels per step.
// CUDA: as many images as the column budget holds. CPU: torchvision's workspace is its column
// buffer for `tv_parallel` images (its largest divisor of the batch <= 32); ours is, per image,
// the columns plus the padded channels-last copies of x and grad_x, and chunks are sized to stay
// below that and below the column budget (small chunks keep the columns in cache). When one
// image's columns alone exceed the budget, the chunk is one image and its output pixels are taken
// pb at a time, which bounds the column buffer whatever the image size.
struct Chunking {
  int64_t images;
  int64_t pixels;
};

Chunking chunking(const DcnShape& s, int64_t elem_size, bool cuda) {
  const int64_t per_pixel = s.channels * s.taps() * elem_size;  // one row of columns
  const int64_t cols = per_pixel * s.out_plane();                // per image
  if (cuda) {
    // The kernels index a chunk's columns in 32 bits.
    const int64_t budget =
        std::min(column_budget_bytes(true), int64_t(std::numeric_limits<int32_t>::max()) * elem_size);
    const int64_t nb = std::max<int64_t>(1, std::min(s.n, budget / std::max<int64_t>(1, cols)));
    int64_t pb = s.out_plane();
    if (nb == 1 && cols > budget) pb = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_pixel));
    return {nb, std::min(pb, s.out_plane())};
  }
  int64_t tv_parallel = 1;
  for (int64_t d = std::min(s.n, kMaxParallelImgs); d >= 1; --d) {
    if (s.n % d == 0) {
      tv_parallel = d;
      break;
    }
  }
  const int64_t padded = s.channels * s.padded_plane() * elem_size;
  const int64_t budget = column_budget_bytes(cuda);
  const int64_t by_tv = tv_parallel * cols / (cols + 2 * padded);
  const int64_t by_budget = budget / std::max<int64_t>(1, cols);
  int64_t nb = std::max<int64_t>(1, std::min({s.n, by_tv, by_budget}));
  // A multiple of the thread count, so that the per-image col2im tasks balance.
  const int64_t threads = at::get_num_threads();
  if (nb > threads) nb -= nb % threads;
  int64_t pb = s.out_plane();
  if (nb == 1 && cols > budget) pb = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_pixel));
  return {nb, std::min(pb, s.out_plane())};
}

void im2col(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
            at::Tensor& columns, const DcnShape& s) {
  if (input.is_cuda()) {
#ifdef WITH_CUDA
    im2col_cuda(input, offset, mask, columns, s);
#else
    TORCH_CHECK(false, "dyhead::deform_conv2d: the extension was built without CUDA; rebuild with "
                       "`dyhead build-ext --cuda on`");
#endif
  } else {
    im2col_cpu(input, offset, mask, columns, s);
  }
}

// grad columns -> grad_x, grad_offset, grad_mask (each may be undefined; the grad_x layouts are in
// deform_conv.h). On CUDA, with `write_columns`, the same pass leaves im2col's columns in `cols`;
// returns whether it did.
bool col2im_coord(at::Tensor& cols, const at::Tensor& x, const at::Tensor& offset,
                  const c10::optional<at::Tensor>& mask, at::Tensor& grad_x, bool accumulate, at::Tensor& grad_offset,
                  at::Tensor& grad_mask, bool write_columns, const DcnShape& s) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    col2im_coord_cuda(cols, x, offset, mask, grad_x, accumulate, grad_offset, grad_mask, write_columns, s);
    return write_columns;
#else
    TORCH_CHECK(false, "dyhead::deform_conv2d_backward: the extension was built without CUDA");
#endif
  }
  col2im_coord_cpu(cols, x, offset, mask, grad_x, grad_offset, grad_mask, s);
  return false;
}

bool cuda_atomic_grad_input() {
#ifdef WITH_CUDA
  return cuda_grad_input_atomic();
#else
  return false;
#endif
}

}  // namespace

at::Tensor deform_conv2d_forward(const at::Tensor& input_, const at::Tensor& offset_,
                                 const c10::optional<at::Tensor>& mask_, const at::Tensor& weight_,
                                 const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_tensors("deform_conv2d", input_,
                {&offset_, has(mask_) ? &*mask_ : nullptr, &weight_, has(bias_) ? &*bias_ : nullptr});
  c10::OptionalDeviceGuard guard(input_.device());
  const at::ScalarType dt = compute_dtype(input_);
  const at::Tensor input = input_.to(dt);  // layout handled per chunk (channels last)
  const at::Tensor offset = prep(offset_, dt);
  const c10::optional<at::Tensor> mask = prep(mask_, dt);
  const at::Tensor weight = prep(weight_, dt);
  const c10::optional<at::Tensor> bias = prep(bias_, dt);
  DcnShape s = make_shape(input, offset, mask, weight, stride, padding, dilation);
  s.p_count = s.out_plane();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_channels, "dyhead::deform_conv2d: bias must be (",
                s.out_channels, "), got ", bias->sizes());
  }
  const int64_t N = s.n, G = s.groups, M = s.out_channels / s.groups, P = s.out_plane();
  const int64_t cg = s.channels_per_group(), Kg = s.group_cols(), kk = s.taps();
  at::Tensor output = at::empty({N, s.out_channels, s.out_h, s.out_w}, input.options());
  if (N == 0) return output.to(input_.scalar_type());

  // W_g^T as (G, Kg, M) with row k * C/G + c' (the column order of the buffer).
  const at::Tensor w_t = weight.view({G, M, cg, kk}).permute({0, 3, 2, 1}).reshape({G, Kg, M});
  const at::Tensor bias_g = bias.has_value() ? bias->view({G, 1, M}) : at::Tensor();
  const Chunking ch = chunking(s, input.element_size(), input.is_cuda());
  const int64_t nb = ch.images, pb = ch.pixels;
  at::Tensor col_buf = at::empty({G * nb * pb * Kg}, input.options());
  // One group: out[b] (M, P) = W (M, Kg) @ columns[b]^T straight into the NCHW output (through a
  // small buffer when the pixels come in blocks). Several groups: one GEMM per group into a
  // (G, n*Pc, M) buffer, then transposed into the output.
  at::Tensor out_buf = (G > 1 || pb < P) ? at::empty({G * nb * pb * M}, input.options()) : at::Tensor();
  const at::Tensor w_b = G == 1 ? w_t.transpose(1, 2).expand({nb, M, Kg}) : at::Tensor();
  for (int64_t b0 = 0; b0 < N; b0 += nb) {
    const int64_t n = std::min(nb, N - b0);
    s.n = n;
    const at::Tensor x = padded_channels_last(input.narrow(0, b0, n));  // (n, H+2, W+2, C)
    const at::Tensor off_c = offset.narrow(0, b0, n);
    const c10::optional<at::Tensor> mask_c = narrow_opt(mask, b0, n);
    const at::Tensor out_n = output.narrow(0, b0, n).view({n, G, M, P});
    for (int64_t p0 = 0; p0 < P; p0 += pb) {
      const int64_t Pc = std::min(pb, P - p0);
      s.p_begin = p0;
      s.p_count = Pc;
      at::Tensor cols = col_buf.narrow(0, 0, G * n * Pc * Kg).view({G, n * Pc, Kg});
      im2col(x, off_c, mask_c, cols, s);
      if (G == 1) {
        at::Tensor out_c = Pc == P ? out_n.view({n, M, P}) : out_buf.narrow(0, 0, n * M * Pc).view({n, M, Pc});
        const at::Tensor c_t = cols.view({n, Pc, Kg}).transpose(1, 2);
        if (bias.has_value()) {
          at::baddbmm_out(out_c, bias->view({1, M, 1}), w_b.narrow(0, 0, n), c_t);
        } else {
          at::bmm_out(out_c, w_b.narrow(0, 0, n), c_t);
        }
        if (Pc != P) out_n.view({n, M, P}).narrow(2, p0, Pc).copy_(out_c);
      } else {
        at::Tensor out_g = out_buf.narrow(0, 0, G * n * Pc * M).view({G, n * Pc, M});
        if (bias.has_value()) {
          at::baddbmm_out(out_g, bias_g, cols, w_t);
        } else {
          at::bmm_out(out_g, cols, w_t);
        }
        out_n.narrow(3, p0, Pc).copy_(out_g.view({G, n, Pc, M}).permute({1, 0, 3, 2}));
      }
    }
  }
  return output.scalar_type() == input_.scalar_type() ? output : output.to(input_.scalar_type());
}

// output_mask: which of (input, offset, mask, weight, bias) gradients are wanted. Gradients that
// are not wanted (or whose tensor is absent: mask None, has_bias false) come back as empty
// tensors of shape (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& offset_,
    const c10::optional<at::Tensor>& mask_, const at::Tensor& weight_, bool has_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  check_tensors("deform_conv2d_backward", input_, {&offset_, has(mask_) ? &*mask_ : nullptr, &weight_});
  TORCH_CHECK(grad_out_.device() == input_.device(), "dyhead::deform_conv2d_backward: grad_out on ",
              grad_out_.device(), ", input on ", input_.device());
  c10::OptionalDeviceGuard guard(input_.device());
  const at::ScalarType in_dt = input_.scalar_type();
  const at::ScalarType dt = compute_dtype(input_);
  const at::ScalarType acc = acc_dtype(dt);
  const at::Tensor input = input_.to(dt);
  const at::Tensor offset = prep(offset_, dt);
  const c10::optional<at::Tensor> mask = prep(mask_, dt);
  const at::Tensor weight = prep(weight_, dt);
  const at::Tensor grad_out = grad_out_.to(dt);  // autograd may hand another dtype
  DcnShape s = make_shape(input, offset, mask, weight, stride, padding, dilation);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.n && grad_out.size(1) == s.out_channels &&
                  grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w,
              "dyhead::deform_conv2d_backward: grad_out must be (", s.n, ", ", s.out_channels, ", ", s.out_h, ", ",
              s.out_w, "), got ", grad_out.sizes());
  s.p_count = s.out_plane();

  const bool want_input = output_mask[0];
  const bool want_offset = output_mask[1];
  const bool want_mask = output_mask[2] && mask.has_value();
  const bool want_weight = output_mask[3];
  const bool want_bias = output_mask[4] && has_bias;
  const int64_t N = s.n, G = s.groups, M = s.out_channels / s.groups, P = s.out_plane();
  const int64_t cg = s.channels_per_group(), Kg = s.group_cols(), kk = s.taps();
  const auto opts = input.options();

  const auto empty = [&] { return at::empty({0}, input_.options()); };
  at::Tensor grad_input = want_input ? at::empty(input.sizes(), input_.options()) : at::Tensor();
  at::Tensor grad_offset = want_offset ? at::empty(offset.sizes(), opts) : at::Tensor();
  at::Tensor grad_mask = want_mask ? at::empty(mask->sizes(), opts) : at::Tensor();
  at::Tensor grad_wg = want_weight ? at::zeros({G, M, Kg}, opts.dtype(acc)) : at::Tensor();
  const bool want_cols_grad = want_input || want_offset || want_mask;

  if (N > 0 && (want_cols_grad || want_weight)) {
    const at::Tensor w_g = weight.view({G, M, cg, kk}).permute({0, 1, 3, 2}).reshape({G, M, Kg});
    const Chunking ch = chunking(s, input.element_size(), input.is_cuda());
    const int64_t nb = ch.images, pb = ch.pixels;
    at::Tensor col_buf = at::empty({G * nb * pb * Kg}, opts);
    // One group: the GEMMs read grad_out (n, M, P) in place (as transposed operands). Several
    // groups: grad_out is first copied to (G, n*Pc, M).
    at::Tensor go_buf = G > 1 ? at::empty({G * nb * pb * M}, opts) : at::Tensor();
    const at::Tensor w_b = G == 1 ? w_g.expand({nb, M, Kg}) : at::Tensor();
    const bool cuda = input.is_cuda();
    // grad_x of a chunk. CPU: padded, accumulated in acc over the pixel blocks. CUDA: unpadded
    // channels-last, written once in the input dtype when the pixels come in one block (the gather
    // sums in registers), else accumulated in acc.
    const bool gx_acc = !cuda || pb < P || cuda_atomic_grad_input();
    for (int64_t b0 = 0; b0 < N; b0 += nb) {
      const int64_t n = std::min(nb, N - b0);
      s.n = n;
      const at::Tensor x = padded_channels_last(input.narrow(0, b0, n));  // (n, H+2, W+2, C)
      const at::Tensor off_c = offset.narrow(0, b0, n);
      const c10::optional<at::Tensor> mask_c = narrow_opt(mask, b0, n);
      at::Tensor gx;
      if (want_input) {
        const auto gx_opts = gx_acc ? opts.dtype(acc) : opts;
        gx = cuda ? at::empty({n, s.height, s.width, s.channels}, gx_opts) : at::empty_like(x, gx_opts);
        if (gx_acc) gx.zero_();
      }
      at::Tensor goff_c = narrow_or_undef(grad_offset, b0, n);
      at::Tensor gmask_c = narrow_or_undef(grad_mask, b0, n);
      const at::Tensor go_n = grad_out.narrow(0, b0, n).view({n, G, M, P});
      for (int64_t p0 = 0; p0 < P; p0 += pb) {
        const int64_t Pc = std::min(pb, P - p0);
        s.p_begin = p0;
        s.p_count = Pc;
        at::Tensor cols = col_buf.narrow(0, 0, G * n * Pc * Kg).view({G, n * Pc, Kg});
        const at::Tensor go_nmp = go_n.view({n, s.out_channels, P}).narrow(2, p0, Pc);  // (n, M, Pc) when G == 1
        at::Tensor go;
        if (G > 1) {
          go = go_buf.narrow(0, 0, G * n * Pc * M).view({G, n * Pc, M});
          go.view({G, n, Pc, M}).copy_(go_n.narrow(3, p0, Pc).permute({1, 0, 3, 2}));
        }
        if (want_cols_grad) {
          if (G == 1) {
            at::Tensor cols3 = cols.view({n, Pc, Kg});
            at::bmm_out(cols3, go_nmp.transpose(1, 2), w_b.narrow(0, 0, n));
          } else {
            at::bmm_out(cols, go, w_g);  // grad columns (G, n*Pc, Kg)
          }
        }
        const bool have_cols = want_cols_grad && col2im_coord(cols, x, off_c, mask_c, gx, gx_acc, goff_c, gmask_c,
                                                              want_weight, s);
        if (want_weight) {
          if (!have_cols) im2col(x, off_c, mask_c, cols, s);
          if (G == 1 && cuda) {
            // One batched GEMM for the chunk's images, summed over them in acc.
            const at::Tensor per_image = at::bmm(go_nmp, cols.view({n, Pc, Kg}));  // (n, M, Kg)
            grad_wg.view({M, Kg}).add_(n == 1 ? per_image.select(0, 0) : per_image.sum({0}, false, acc));
          } else if (G == 1) {
            at::Tensor gw2 = grad_wg.view({M, Kg});
            const at::Tensor c3 = cols.view({n, Pc, Kg});
            for (int64_t b = 0; b < n; ++b) {  // sum over images of (M, Pc) @ (Pc, Kg)
              if (acc == dt) {
                gw2.addmm_(go_nmp.select(0, b), c3.select(0, b));
              } else {
                gw2.add_(at::mm(go_nmp.select(0, b), c3.select(0, b)));
              }
            }
          } else if (acc == dt) {
            grad_wg.baddbmm_(go.transpose(1, 2), cols);
          } else {
            grad_wg.add_(at::bmm(go.transpose(1, 2), cols));
          }
        }
      }
      if (want_input) {
        const at::Tensor image = cuda ? gx : gx.narrow(1, 1, s.height).narrow(2, 1, s.width);
        grad_input.narrow(0, b0, n).copy_(image.permute({0, 3, 1, 2}));
      }
    }
  }

  at::Tensor gi = want_input ? grad_input : empty();
  at::Tensor go = want_offset ? grad_offset.to(in_dt) : empty();
  at::Tensor gm = want_mask ? grad_mask.to(in_dt) : empty();
  // Results are contiguous: the fake kernel (and inductor's checks) assume so.
  at::Tensor gw = want_weight ? grad_wg.view({G, M, kk, cg}).permute({0, 1, 3, 2}).contiguous().view(weight.sizes()).to(in_dt)
                              : empty();
  at::Tensor gb = want_bias ? grad_out.sum({0, 2, 3}, /*keepdim=*/false, acc).to(in_dt) : empty();
  return std::make_tuple(gi, go, gm, gw, gb);
}

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// ---- autocast -----------------------------------------------------------------------------------
// CUDA: run in the autocast dtype (fp16 or bf16; the CUDA kernels accumulate in fp32), every
//       floating input cast to that one dtype, so the output has the autocast dtype.
// CPU : the CPU kernels are fp32/fp64 only (a bf16 gather + FMA path would be no faster here and
//       loses precision in the offset gradients), so under CPU autocast all inputs are cast to
//       float32 and the output stays float32, like the ops on autocast's fp32 list.
// fp64 tensors are left alone, as autocast does.
at::Tensor cast_for_autocast(const at::Tensor& t, at::ScalarType dt) {
  if (!t.defined() || !t.is_floating_point() || t.scalar_type() == at::kDouble) return t;
  return t.to(dt);
}

c10::optional<at::Tensor> cast_for_autocast(const c10::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!has(t)) return t;
  return cast_for_autocast(*t, dt);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& offset,
                                  const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = device == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(at::kCUDA)
                                                            : at::kFloat;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyhead::deform_conv2d", "")
                       .typed<decltype(deform_conv2d_forward)>();
  return op.call(cast_for_autocast(input, dt), cast_for_autocast(offset, dt), cast_for_autocast(mask, dt),
                 cast_for_autocast(weight, dt), cast_for_autocast(bias, dt), stride, padding, dilation);
}

}  // namespace
}  // namespace dyhead

TORCH_LIBRARY(dyhead, m) {
  m.set_python_module("dyhead.ops.native");
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_out, Tensor input, Tensor offset, Tensor? mask, Tensor weight, "
      "bool has_bias, int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_has_cuda() -> bool", &dyhead::has_cuda);
}

TORCH_LIBRARY_IMPL(dyhead, CPU, m) {
  m.impl("deform_conv2d", &dyhead::deform_conv2d_forward);
  m.impl("deform_conv2d_backward", &dyhead::deform_conv2d_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dyhead, CUDA, m) {
  m.impl("deform_conv2d", &dyhead::deform_conv2d_forward);
  m.impl("deform_conv2d_backward", &dyhead::deform_conv2d_backward);
}
#endif

TORCH_LIBRARY_IMPL(dyhead, AutocastCPU, m) {
  m.impl("deform_conv2d",
         &dyhead::deform_conv2d_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(dyhead, AutocastCUDA, m) {
  m.impl("deform_conv2d",
         &dyhead::deform_conv2d_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
