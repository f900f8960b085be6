// Autograd of the BitFit linear, registered in C++ for the Autograd key of every device (the pattern of
// lora_autograd.cpp): a Python formula adds interpreter time to every layer call, which shows at small
// sizes. The forward saves only W, never x; W gets no gradient (it is frozen by definition of the op).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>

namespace pyfastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastpeft::bias_only_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_y, const at::Tensor& weight,
                                                 std::array<bool, 2> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastpeft::bias_only_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, std::array<bool, 2>)>();
  return op.call(grad_y, weight, output_mask);
}

class BiasOnlyLinearFunction : public torch::autograd::Function<BiasOnlyLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = call_forward(x, weight, bias);
    ctx->save_for_backward({weight});  // never x: the backward does not need it
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(3);  // x, weight (always none), bias
    const at::Tensor& grad_y = grad_outputs[0];
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2)};
    if (!grad_y.defined() || !(mask[0] || mask[1])) return grads;
    auto [dx, db] = call_backward(grad_y, ctx->get_saved_variables()[0], mask);
    if (mask[0]) grads[0] = dx;
    if (mask[1]) grads[2] = db;
    return grads;
  }
};

at::Tensor bias_only_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return BiasOnlyLinearFunction::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastpeft, Autograd, m) { m.impl("bias_only_linear", &bias_only_linear_autograd); }

}  // namespace pyfastpeft
