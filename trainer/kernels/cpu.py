"""The CPU kernel of the fused injection: C++ (at::parallel_for), built with torch's extension
tooling on first use (~40 s with g++, then cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import functools
import shutil

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

// out[r, :] = slot[r] >= 0 ? behaviour[slot[r], :] : weight[ids[r], :]   for every row r of B*T
// (one at::embedding over all rows, then the slot rows overwritten: 31 of 512 per sample in LLaRA)
torch::Tensor inject_forward(torch::Tensor ids, torch::Tensor weight, torch::Tensor slot, torch::Tensor behaviour) {
  TORCH_CHECK(ids.is_contiguous() && weight.is_contiguous() && slot.is_contiguous() && behaviour.is_contiguous(),
              "inject: inputs must be contiguous");
  TORCH_CHECK(weight.scalar_type() == behaviour.scalar_type(), "inject: weight and behaviour dtypes differ");
  const int64_t rows = ids.numel(), H = weight.size(1), V = weight.size(0), S = behaviour.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {  // validate before writing anything
    TORCH_CHECK(sl[r] < S, "inject: slot_map names behaviour row ", sl[r], ", only ", S, " rows given");
    TORCH_CHECK(sl[r] >= 0 || (id[r] >= 0 && id[r] < V), "inject: token id ", id[r], " out of range [0, ", V, ")");
  }
  // one vectorised lookup for every row (slot rows look up a valid id, then get overwritten)
  auto safe_ids = ids.masked_fill(slot.ge(0), 0);
  auto out = at::embedding(weight, safe_ids);
  const char* b = static_cast<const char*>(behaviour.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = H * weight.element_size();
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      if (sl[r] >= 0) std::memcpy(o + r * row_bytes, b + sl[r] * row_bytes, row_bytes);
  });
  return out;
}

// grad_behaviour[s] = sum of grad rows r with slot[r] == s; grad_weight[t] = sum of grad rows r with
// slot[r] < 0 and ids[r] == t != padding_idx (only when weight_grad). Accumulated in float32; each
// thread owns a range of columns, so there are no races and no atomics. Rows are visited once.
std::vector<torch::Tensor> inject_backward(torch::Tensor grad, torch::Tensor ids, torch::Tensor slot, int64_t num_rows,
                                           int64_t vocab, int64_t padding_idx, bool weight_grad) {
  const int64_t H = grad.size(-1);
  auto g = grad.reshape({-1, H}).contiguous();
  const int64_t rows = g.size(0);
  auto f32 = g.options().dtype(torch::kFloat32);
  auto gb = torch::zeros({num_rows, H}, f32);
  auto gw = torch::zeros({weight_grad ? vocab : 0, H}, f32);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  float* b = gb.data_ptr<float>();
  float* w = weight_grad ? gw.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "inject_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, H, 256, [&](int64_t h0, int64_t h1) {
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = nullptr;
        if (sl[r] >= 0) dst = b + sl[r] * H;
        else if (w != nullptr && id[r] != padding_idx) dst = w + id[r] * H;
        if (dst == nullptr) continue;
        const scalar_t* src = gp + r * H;
        for (int64_t h = h0; h < h1; ++h) dst[h] += static_cast<float>(src[h]);
      }
    });
  });
  return {gw.to(grad.scalar_type()), gb.to(grad.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("inject_forward", &inject_forward);
  m.def("inject_backward", &inject_backward);
}
"""


class NoCompiler(RuntimeError):
    pass


@functools.cache
def extension():
    """Build (or load the cached build of) the C++ kernel."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        raise NoCompiler("the fused injection's CPU kernel needs a C++ compiler (g++), none was found on PATH; "
                         "install one (apt-get install g++) or set model.injection=reference")
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="llmrec_inject_cpu", cpp_sources=[SOURCE], extra_cflags=["-O3"], verbose=False)
