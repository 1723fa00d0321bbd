// The C++ half of the PyTorch comparison (tests/io/torch_interop.py, docs/saving.md): loads a
// top-2 router and SwiGLU experts written by PyTorch, runs the layer on the file's input `x`
// and writes the router's logits and the output `y` for the script to compare.
//   torch_interop <in.safetensors> <out.safetensors>
#include <exception>
#include <iostream>
#include <vector>

#include <moe/moe.hpp>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: torch_interop <in.safetensors> <out.safetensors>\n";
    return 2;
  }
  try {
    // The widths come from the file: x is [T, D], router.weight [E, D], experts.w_gate [E*D, H].
    const moe::SafetensorsFile in = moe::read_safetensors(argv[1]);
    const auto* x_tensor = in.find("x");
    const auto* router = in.find("router.weight");
    const auto* gate = in.find("experts.w_gate");
    if (!x_tensor || !router || !gate || router->shape.size() != 2 || gate->shape.size() != 2) {
      std::cerr << "torch_interop: the input needs x, router.weight and experts.w_gate\n";
      return 2;
    }
    const moe::Matrix<float> x = moe::to_matrix<float>(*x_tensor);
    const auto E = moe::Index(router->shape[0]), D = moe::Index(router->shape[1]);
    const auto H = moe::Index(gate->shape[1]);

    auto layer = moe::MoELayer(moe::make_topk_router<float>(D, E, 2), moe::SwiGLUExperts<float>(E, D, H));
    // x travels in the same file: the one tensor no parameter reads.
    const moe::LoadReport report = moe::load(argv[1], layer, {.allow_unexpected = true});
    if (report.ignored != std::vector<std::string>{"x"}) {
      std::cerr << "torch_interop: unexpected tensors in the input\n";
      return 2;
    }
    layer.set_grad_enabled(false);
    moe::Matrix<float> y(x.rows(), D);
    layer.forward(x, y);
    const moe::Matrix<float> logits = layer.router().logits();
    const std::vector<moe::TensorView> out{{"logits", logits}, {"y", y}};
    moe::write_safetensors(argv[2], out, {{"producer", "moe-routers torch_interop"}});
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
