// Entries that inductor's C++ wrapper calls directly (compile_settings.direct_entries, torch's
// config.aot_inductor.custom_ops_to_c_shims): aoti_torch_cpu_<op>, as torch names the C entry of an op, with the
// op's arguments as handles (a Tensor? as a pointer to one, nullptr for None; float as double) and its output
// written to ret0. Without them each call went through the dispatcher: the op looked up by name, its arguments boxed
// and unboxed, on every call of every step.
#pragma once

#include <torch/version.h>
// torch 2.13's form (compile_settings.direct_entries declares them from 2.13 on; older torches keep the dispatcher)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#include <ATen/record_function.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#define LLMBENCH_ENTRIES 1
#define LLMBENCH_ENTRY extern "C" __attribute__((visibility("default"))) AOTITorchError

namespace llmbench_entries {
inline const at::Tensor& tensor_of(AtenTensorHandle h) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h);
}
inline c10::optional<at::Tensor> optional_of(const AtenTensorHandle* h) {
  return h ? c10::optional<at::Tensor>(tensor_of(*h)) : c10::nullopt;
}
// f() -> its output written to ret0; exceptions as torch's error code. The call is recorded under the op's name, as
// the dispatcher records it, for torch.profiler (nothing where none listens).
template <typename F>
AOTITorchError entry(const char* op, F&& f, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION(op, c10::ArrayRef<const c10::IValue>{});
    *ret0 = torch::aot_inductor::new_tensor_handle(f());
  });
}
}  // namespace llmbench_entries
#endif
