// The Python module resnet_fused._C: importing it loads this shared object,
// which registers the ops (schemas in ops.cpp, kernels in cpu/ and cuda/);
// the functions below are the extension's Python-only surface: what the
// binary was built with, and the cuda backend's host-side decisions (kernel
// choice, the sm80 scaled filter), inspectable without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cutlass_plan.h"
#include "epilogue.h"

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

// ---------------------------------------------------------------------------
// The cuda backend's host-side kernel choice (cutlass_plan.h), callable
// without a GPU: the CPU tests check the function the CUDA op runs.

namespace {

namespace plan = resnet_fused::cutlass_plan;

plan::DType parse_dtype(const std::string& name) {
  if (name == "float16" || name == "half") return plan::DType::kHalf;
  if (name == "bfloat16") return plan::DType::kBFloat16;
  if (name == "float32" || name == "float") return plan::DType::kFloat;
  if (name == "float64" || name == "double") return plan::DType::kDouble;
  return plan::DType::kOther;
}

std::vector<int64_t> pair_arg(const std::vector<int64_t>& v, const char* name) {
  if (v.size() == 1) return {v[0], v[0]};
  if (v.size() != 2) throw std::invalid_argument(std::string(name) + " must have 1 or 2 elements");
  return v;
}

// input_shape (N, C, H, W) and weight_shape (K, C/groups, R, S) as torch gives them.
plan::ConvShape make_shape(const std::vector<int64_t>& input_shape, const std::vector<int64_t>& weight_shape,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups, const std::string& dtype,
                           bool channels_last) {
  if (input_shape.size() != 4 || weight_shape.size() != 4) {
    throw std::invalid_argument("input_shape and weight_shape must have 4 elements");
  }
  const auto st = pair_arg(stride, "stride"), pad = pair_arg(padding, "padding"), dil = pair_arg(dilation, "dilation");
  plan::ConvShape s;
  s.N = input_shape[0], s.C = input_shape[1], s.H = input_shape[2], s.W = input_shape[3];
  s.K = weight_shape[0], s.R = weight_shape[2], s.S = weight_shape[3];
  s.stride_h = st[0], s.stride_w = st[1], s.pad_h = pad[0], s.pad_w = pad[1], s.dil_h = dil[0], s.dil_w = dil[1];
  s.groups = groups;
  s.dtype = parse_dtype(dtype);
  s.channels_last = channels_last;
  return s;
}

pybind11::dict build_dict(const plan::Build& b) {
  pybind11::dict d;
  d["sm90a"] = b.sm90a;
  d["sm80_cubins"] = b.sm80_cubins;
  return d;
}

pybind11::dict cuda_conv_plan(const std::vector<int64_t>& input_shape, const std::vector<int64_t>& weight_shape,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, int64_t groups, const std::string& dtype,
                              bool channels_last, std::pair<int, int> capability, int sm_count,
                              std::optional<bool> sm90a, std::optional<std::vector<int>> sm80_cubins, int64_t act) {
  if (act < 0 || act >= resnet_fused::kNumActKinds) {
    throw std::invalid_argument("unknown activation code " + std::to_string(act) + "; known: " +
                                resnet_fused::kActKindList);
  }
  const plan::ConvShape s =
      make_shape(input_shape, weight_shape, stride, padding, dilation, groups, dtype, channels_last);
  plan::Build b = plan::compiled_build();
  if (sm90a.has_value()) b.sm90a = *sm90a;
  if (sm80_cubins.has_value()) b.sm80_cubins = *sm80_cubins;
  const plan::Plan p = plan::plan_launch(s, plan::Device{capability.first, capability.second, sm_count}, b,
                                         static_cast<resnet_fused::ActKind>(act));
  pybind11::dict d;
  d["kernel"] = p.fused() ? pybind11::object(pybind11::str(p.name())) : pybind11::object(pybind11::none());
  d["reason"] = p.reason;
  d["convert_layout"] = p.convert_layout;
  if (p.fused()) {
    const plan::KernelConfig& k = plan::kKernels[p.kernel];
    d["tile"] = pybind11::make_tuple(k.tile_m, k.tile_n, k.tile_k);
  } else {
    d["tile"] = pybind11::none();
  }
  d["output_shape"] = pybind11::make_tuple(s.N, s.K, s.P(), s.Q());
  return d;
}

pybind11::list cuda_conv_kernels() {
  pybind11::list out;
  const plan::Build b = plan::compiled_build();
  for (const plan::KernelConfig& k : plan::kKernels) {
    pybind11::dict d;
    d["name"] = k.name;
    d["arch"] = k.arch == plan::Arch::kSm90 ? "sm90" : "sm80";
    d["dtype"] = plan::dtype_name(k.dtype);
    d["tile"] = pybind11::make_tuple(k.tile_m, k.tile_n, k.tile_k);
    d["built"] = k.arch == plan::Arch::kSm90 ? b.sm90a : !b.sm80_cubins.empty();
    out.append(d);
  }
  return out;
}

// The sm80 kernels' scaled filter, made on the host with the epilogue.h
// functions that conv_bn_act.cu's two filter passes run on the device.
// weight: the filter in KRSC order, K rows of R*S*C values; scale: the (K,)
// BN scale. Returns the 16-bit values the kernel reads, widened to float, and
// the exponent e that the epilogue undoes.
pybind11::dict cuda_sm80_scaled_filter(const std::vector<float>& weight, const std::vector<float>& scale,
                                       const std::string& dtype) {
  const plan::DType t = parse_dtype(dtype);
  if (t != plan::DType::kHalf && t != plan::DType::kBFloat16) {
    throw std::invalid_argument("dtype must be float16 or bfloat16, got " + dtype);
  }
  if (scale.empty() || weight.size() % scale.size() != 0) {
    throw std::invalid_argument("weight must hold len(scale) = " + std::to_string(scale.size()) +
                                " equal rows, got " + std::to_string(weight.size()) + " values");
  }
  const size_t inner = weight.size() / scale.size();
  // The device takes an integer max over the float bits, where NaN ranks above
  // everything: the same order here.
  float max_abs = 0.0f;
  for (size_t i = 0; i < weight.size(); ++i) {
    const float m = resnet_fused::scaled_filter_magnitude(weight[i], scale[i / inner]);
    if (!std::isnan(max_abs) && !(m <= max_abs)) max_abs = m;
  }
  const int e = resnet_fused::filter_scale_exponent(
      max_abs, t == plan::DType::kHalf ? resnet_fused::kHalfMax : resnet_fused::kBFloat16Max);
  std::vector<float> values(weight.size());
  for (size_t i = 0; i < weight.size(); ++i) {
    const float v = resnet_fused::scaled_filter_value(weight[i], scale[i / inner], e);
    values[i] = t == plan::DType::kHalf ? static_cast<float>(c10::Half(v)) : static_cast<float>(c10::BFloat16(v));
  }
  pybind11::dict d;
  d["values"] = values;
  d["exponent"] = e;
  return d;
}

#if defined(RESNET_FUSED_WITH_CUDA)
// CUTLASS's own can_implement for one kernel, on the host: None if that
// kernel is not in this build.
pybind11::object cutlass_can_implement(const std::string& kernel, const std::vector<int64_t>& input_shape,
                                       const std::vector<int64_t>& weight_shape, const std::vector<int64_t>& stride,
                                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  const int index = plan::kernel_index(kernel.c_str());
  if (index < 0) throw std::invalid_argument("unknown CUTLASS kernel " + kernel);
  const plan::ConvShape s = make_shape(input_shape, weight_shape, stride, padding, dilation, 1,
                                       plan::dtype_name(plan::kKernels[index].dtype), true);
  const int ok = resnet_fused::cutlass_can_implement(index, s);
  return ok < 0 ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::bool_(ok == 1));
}

pybind11::dict cuda_dispatch_counts() {
  const std::vector<int64_t> counts = resnet_fused::cutlass_dispatch_counts();
  pybind11::dict d;
  for (int i = 0; i < plan::kNumKernels; ++i) d[plan::kKernels[i].name] = counts[i];
  d["fallback_plan"] = counts[plan::kNumKernels];
  d["fallback_runtime"] = counts[plan::kNumKernels + 1];
  return d;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "resnet_fused C++/CUDA kernels; the ops live under torch.ops.resnet_fused";
  m.def("build_info", &build_info, "Build configuration: with_cuda, cuda_archs, cuda_version, torch_version");
  m.def("cpu_isa", [] { return std::string(resnet_fused::cpu_isa::name(resnet_fused::cpu_isa::current())); },
        "The instruction set the CPU kernels run with: baseline, avx2 or avx512 (csrc/cpu/isa.h)");
  m.def("cpu_isa_set", &resnet_fused::cpu_isa::set, py::arg("name"),
        "Run the CPU kernels with instruction set `name` from the next call on (ValueError where this build or CPU "
        "lacks it); returns the previous name");
  m.def("cpu_isa_supported", [](const std::string& name) {
    for (auto isa : {resnet_fused::cpu_isa::kBaseline, resnet_fused::cpu_isa::kAvx2, resnet_fused::cpu_isa::kAvx512}) {
      if (name == resnet_fused::cpu_isa::name(isa)) return resnet_fused::cpu_isa::supported(isa);
    }
    throw std::invalid_argument("unknown CPU instruction set '" + name + "' (baseline, avx2 or avx512)");
  }, py::arg("name"), "Whether this build and CPU run the CPU kernels with instruction set `name`");
  m.def("cuda_conv_plan", &cuda_conv_plan,
        "The cuda backend's choice for one conv_bn_act: {kernel (None = cuDNN + epilogue), reason, "
        "convert_layout, tile, output_shape}. Defaults: an H100 (capability (9, 0), 132 SMs), this build's kernels "
        "and ReLU (act: resnet_fused.ops.activation.Kind's code); like the op, it follows cuda_conv_enable_sm90.",
        py::arg("input_shape"), py::arg("weight_shape"), py::arg("stride") = std::vector<int64_t>{1, 1},
        py::arg("padding") = std::vector<int64_t>{0, 0}, py::arg("dilation") = std::vector<int64_t>{1, 1},
        py::arg("groups") = 1, py::arg("dtype") = "float16", py::arg("channels_last") = true,
        py::arg("capability") = std::pair<int, int>{9, 0}, py::arg("sm_count") = 132, py::arg("sm90a") = py::none(),
        py::arg("sm80_cubins") = py::none(), py::arg("act") = 1);
  m.def("cuda_conv_kernels", &cuda_conv_kernels, "Every CUTLASS kernel configuration and whether this build has it");
  m.def("cuda_conv_build", [] { return build_dict(plan::compiled_build()); },
        "The CUTLASS kernel families in this build: {sm90a: bool, sm80_cubins: [arch, ...]}");
  m.def("cuda_sm80_scaled_filter", &cuda_sm80_scaled_filter, py::arg("weight"), py::arg("scale"),
        py::arg("dtype") = "float16",
        "The sm80 kernels' BN-scaled 16-bit filter, computed on the host: {values (KRSC, as floats), exponent e}; "
        "the filter holds w * scale[k] * 2^-e and the epilogue multiplies by 2^e");
  m.def("cuda_conv_enable_sm90", [](bool enabled) { return plan::sm90_enabled().exchange(enabled); },
        py::arg("enabled"),
        "Let the cuda op and cuda_conv_plan pick the sm90 kernels (default) or not (tests: run the sm80 kernels on "
        "Hopper); returns the previous setting");
#if defined(RESNET_FUSED_WITH_CUDA)
  m.def("cutlass_can_implement", &cutlass_can_implement,
        "CUTLASS's own can_implement() for one kernel of this build, run on the host (None: not built)",
        py::arg("kernel"), py::arg("input_shape"), py::arg("weight_shape"), py::arg("stride") = std::vector<int64_t>{1, 1},
        py::arg("padding") = std::vector<int64_t>{0, 0}, py::arg("dilation") = std::vector<int64_t>{1, 1});
  m.def("cuda_dispatch_counts", &cuda_dispatch_counts,
        "conv_bn_act launches per CUTLASS kernel since import, and the fallbacks to cuDNN + epilogue");
#endif
}
