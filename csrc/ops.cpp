// Every resnet_fused op's schema, in one place. Kernels register per device in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake (meta) kernels for
// torch.compile are registered from Python with torch.library.register_fake.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(resnet_fused, m) {
  // Eval-mode Conv2d -> BatchNorm2d [-> + residual] [-> ReLU] in one op:
  //   out = act(conv2d(input, weight) * scale[k] + shift[k] [+ residual])
  //   scale = bn_weight / sqrt(running_var + eps), shift = bn_bias + (bias - running_mean) * scale
  // computed from the raw tensors on every call (nothing is folded or cached, so
  // nothing goes stale). bias is the conv's; bn_weight/bn_bias None mean 1/0.
  // Per-channel tensors: (K,), any floating dtype. residual: the output's shape,
  // input's dtype. The output keeps input's memory format.
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
}

// What this binary was built with, for `resnet-fused info` and bug reports:
// the macros come from setup.py.
static pybind11::dict build_info() {
  pybind11::dict info;
#ifdef RESNET_FUSED_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_archs"] = RESNET_FUSED_CUDA_ARCHS;
  info["cuda_version"] = RESNET_FUSED_CUDA_VERSION;
#else
  info["with_cuda"] = false;
  info["cuda_archs"] = pybind11::none();
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = RESNET_FUSED_TORCH_VERSION;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fused C++/CUDA kernels; the ops live under torch.ops.resnet_fused";
  m.def("build_info", &build_info, "Build configuration: with_cuda, cuda_archs, cuda_version, torch_version");
}
