// Autograd of dyhead::deform_conv2d in C++ (the Autograd dispatch key), for CPU and CUDA alike.
//
// Why not torch.library.register_autograd in Python: its wrapper runs in the interpreter on every call,
// up to 250 us forward and backward together, a third of a call on the small pyramid levels of the mini
// profile (78 calls per training step with six DyHead blocks). The forward saves its inputs and the
// backward calls dyhead::deform_conv2d_backward through the dispatcher, so autocast, fake tensors and
// torch.compile see the same two ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace dyhead {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyhead::deform_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef)>();
  return op.call(input, offset, mask, weight, bias, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight, bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 5> want) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyhead::deform_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const at::Tensor&, bool, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                           std::array<bool, 5>)>();
  return op.call(grad, input, offset, mask, weight, has_bias, stride, padding, dilation, want);
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// mask and bias are optional inputs: absent ones are not variables of the node, but backward still
// returns a slot for every argument of forward.
class DeformConv2dFunction : public torch::autograd::Function<DeformConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = call_forward(input, offset, mask, weight, bias, stride, padding, dilation);
    ctx->save_for_backward({input, offset, mask.value_or(at::Tensor()), weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& offset = saved[1];
    const at::Tensor& mask = saved[2];
    const at::Tensor& weight = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the node's edges, one per tensor that was passed: absent ones have none.
    const bool has_mask = mask.defined();
    const int64_t w_edge = has_mask ? 3 : 2;
    const std::array<bool, 5> want = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_mask && ctx->needs_input_grad(2), ctx->needs_input_grad(w_edge),
                                      has_bias && ctx->needs_input_grad(w_edge + 1)};
    const at::Tensor none;
    if (!(want[0] || want[1] || want[2] || want[3] || want[4]) || !grads[0].defined()) {
      return {none, none, none, none, none, none, none, none};
    }
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    auto [gi, go, gm, gw, gb] =
        call_backward(grads[0], input, offset, opt(mask), weight, has_bias, stride, padding, dilation, want);
    return {want[0] ? gi : none, want[1] ? go : none, want[2] ? gm : none, want[3] ? gw : none,
            want[4] ? gb : none, none, none, none};
  }
};

at::Tensor deform_conv2d_autograd(const at::Tensor& input, const at::Tensor& offset,
                                  const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  return DeformConv2dFunction::apply(input, offset, mask, weight, bias, stride.vec(), padding.vec(), dilation.vec());
}

}  // namespace
}  // namespace dyhead

TORCH_LIBRARY_IMPL(dyhead, Autograd, m) {
  m.impl("deform_conv2d", &dyhead::deform_conv2d_autograd);
}
