"""The C++ half of the fused injection: the `llmrec::inject` / `llmrec::inject_backward` op
definitions (TORCH_LIBRARY), their CPU kernels (at::parallel_for) and their autograd (a C++
torch::autograd::Function registered under the Autograd key, for every device), so that neither the
forward nor the backward of a training step goes through Python. Built with torch's extension
tooling on first use (~40 s with g++, then cached: trainer/model/kernels/build.py) and loaded into the
process as a plain shared library (no Python module). trainer/model/kernels/inject.py adds the fake
(meta) kernels, the CUDA (Triton) kernels and a default for other devices.

Where it is built and how concurrent or killed builds are handled (an OS lock that dies with its
holder, never torch's FileBaton left behind by a killed build): trainer/model/kernels/build.py. Build it
ahead of time with `python launch/build_kernels.py`; a machine without a C++ compiler loads a library
built once elsewhere (the ops that the CUDA kernels serve are defined here too; Triton, though, needs a C
compiler on each GPU node for its launchers: trainer/model/kernels/build.py check_triton_compiler).

at::parallel_for is a header template: without -fopenmp it compiles to a serial loop in this
library (the kernels ran on one thread until the flag was added), so the build passes -fopenmp
whenever torch itself uses OpenMP; the library then shares torch's OpenMP runtime and threads."""

from __future__ import annotations

import functools
import torch

from trainer.model.kernels.build import NoCompiler, load  # noqa: F401  (NoCompiler: raised by load_library)

SOURCE = r"""
#include <torch/library.h>
#include <torch/autograd.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <cstring>
#include <vector>

using at::Tensor;

// out[r, :] = slot[r] >= 0 ? behaviour[slot[r], :] : weight[ids[r], :]   for every row r of B*T,
// each row written once (one pass, the rows split between the threads)
Tensor inject_cpu(const Tensor& ids_, const Tensor& weight_, const Tensor& slot_, const Tensor& behaviour_,
                  int64_t /* padding_idx: used by the backward only */) {
  TORCH_CHECK(weight_.scalar_type() == behaviour_.scalar_type(), "inject: weight and behaviour dtypes differ");
  auto ids = ids_.contiguous(), weight = weight_.contiguous(), slot = slot_.contiguous(), behaviour = behaviour_.contiguous();
  const int64_t rows = ids.numel(), H = weight.size(1), V = weight.size(0), S = behaviour.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {  // validate before writing anything
    TORCH_CHECK(sl[r] < S, "inject: slot_map names behaviour row ", sl[r], ", only ", S, " rows given");
    TORCH_CHECK(sl[r] >= 0 || (id[r] >= 0 && id[r] < V), "inject: token id ", id[r], " out of range [0, ", V, ")");
  }
  auto sizes = ids.sizes().vec();
  sizes.push_back(H);
  auto out = at::empty(sizes, weight.options());
  const char* b = static_cast<const char*>(behaviour.data_ptr());
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = H * weight.element_size();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      std::memcpy(o + r * row_bytes, sl[r] >= 0 ? b + sl[r] * row_bytes : w + id[r] * row_bytes, row_bytes);
  });
  return out;
}

// grad_behaviour[s] = sum of grad rows r with slot[r] == s; grad_weight[t] = sum of grad rows r with
// slot[r] < 0 and ids[r] == t != padding_idx (only when weight_grad, else a [0, H] tensor).
// Accumulated in float32; each thread owns a range of columns, so there are no races and no atomics.
std::tuple<Tensor, Tensor> inject_backward_cpu(const Tensor& grad, const Tensor& ids_, const Tensor& slot_,
                                               int64_t num_rows, int64_t vocab, int64_t padding_idx, bool weight_grad) {
  const int64_t H = grad.size(-1);
  auto g = grad.reshape({-1, H}).contiguous();
  auto ids = ids_.contiguous(), slot = slot_.contiguous();
  const int64_t rows = g.size(0);
  auto f32 = g.options().dtype(at::kFloat);
  auto gb = at::empty({num_rows, H}, f32);  // zeroed below, each thread its own columns
  auto gw = at::zeros({weight_grad ? vocab : 0, H}, f32);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  float* b = gb.data_ptr<float>();
  float* w = weight_grad ? gw.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "inject_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    std::vector<int64_t> todo;  // the rows that are added into a gradient, in order
    for (int64_t r = 0; r < rows; ++r)
      if (sl[r] >= 0 || (w != nullptr && id[r] != padding_idx)) todo.push_back(r);
    const int64_t summed = todo.size();
    // under 2M values (LLaRA's frozen case: 248 slot rows) one thread: waking the pool costs more than it saves
    const int64_t grain = summed * H < (1 << 21) ? H : 256;
    at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
      for (int64_t s = 0; s < num_rows; ++s) std::memset(b + s * H + h0, 0, (h1 - h0) * sizeof(float));
      constexpr int64_t line = 64 / sizeof(scalar_t);
      for (int64_t i = 0; i < summed; ++i) {
        const int64_t r = todo[i];
        if (i + 1 < summed)  // the next row is elsewhere in the gradient: ask for it while adding this one
          for (int64_t h = h0; h < h1; h += line) __builtin_prefetch(gp + todo[i + 1] * H + h);
        float* dst = sl[r] >= 0 ? b + sl[r] * H : w + id[r] * H;
        const scalar_t* src = gp + r * H;
        for (int64_t h = h0; h < h1; ++h) dst[h] += static_cast<float>(src[h]);
      }
    });
  });
  return {gw.to(grad.scalar_type()), gb.to(grad.scalar_type())};
}

// The ops called through the dispatcher (so the autograd below reaches the CUDA/Triton, fake and
// default kernels registered from Python as well as the CPU ones above).
static Tensor call_inject(const Tensor& ids, const Tensor& weight, const Tensor& slot, const Tensor& behaviour,
                          int64_t padding_idx) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("llmrec::inject", "")
      .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  return op.call(ids, weight, slot, behaviour, padding_idx);
}

static std::tuple<Tensor, Tensor> call_inject_backward(const Tensor& grad, const Tensor& ids, const Tensor& slot,
                                                       c10::SymInt num_rows, c10::SymInt vocab, int64_t padding_idx,
                                                       bool weight_grad) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("llmrec::inject_backward", "")
      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, c10::SymInt,
                                        int64_t, bool)>();
  return op.call(grad, ids, slot, std::move(num_rows), std::move(vocab), padding_idx, weight_grad);
}

// Autograd: saves ids and slot_map (not the output, not the weight); the behaviour rows get the sum of
// their slots' gradients, the weight (only when it requires grad) what nn.Embedding would give it at
// the non-slot positions (nothing at padding_idx).
struct InjectFunction : public torch::autograd::Function<InjectFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& ids, const Tensor& weight,
                        const Tensor& slot, const Tensor& behaviour, int64_t padding_idx) {
    ctx->save_for_backward({ids, slot});
    ctx->saved_data["rows"] = behaviour.sym_size(0);
    ctx->saved_data["vocab"] = weight.sym_size(0);
    ctx->saved_data["padding_idx"] = padding_idx;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_inject(ids, weight, slot, behaviour, padding_idx);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool weight_grad = ctx->needs_input_grad(1), behaviour_grad = ctx->needs_input_grad(3);
    auto [gw, gb] = call_inject_backward(grads[0], saved[0], saved[1], ctx->saved_data["rows"].toSymInt(),
                                         ctx->saved_data["vocab"].toSymInt(), ctx->saved_data["padding_idx"].toInt(),
                                         weight_grad);
    return {Tensor(), weight_grad ? gw : Tensor(), Tensor(), behaviour_grad ? gb : Tensor(), Tensor()};
  }
};

Tensor inject_autograd(const Tensor& ids, const Tensor& weight, const Tensor& slot, const Tensor& behaviour,
                       int64_t padding_idx) {
  if (!(at::GradMode::is_enabled() && (weight.requires_grad() || behaviour.requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to differentiate: no autograd node at all
    return call_inject(ids, weight, slot, behaviour, padding_idx);
  }
  return InjectFunction::apply(ids, weight, slot, behaviour, padding_idx);
}

TORCH_LIBRARY(llmrec, m) {
  m.set_python_module("trainer.model.kernels.inject");  // where the fake (meta) kernels live
  m.def("inject(Tensor token_ids, Tensor weight, Tensor slot_map, Tensor behaviour, int padding_idx) -> Tensor");
  m.def("inject_backward(Tensor grad, Tensor token_ids, Tensor slot_map, SymInt num_rows, SymInt vocab, "
        "int padding_idx, bool weight_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmrec, CPU, m) {
  m.impl("inject", &inject_cpu);
  m.impl("inject_backward", &inject_backward_cpu);
}

TORCH_LIBRARY_IMPL(llmrec, Autograd, m) {
  m.impl("inject", &inject_autograd);
}
"""


@functools.cache
def load_library() -> str:
    """Load the C++ library (it defines the ops when loaded), building it first if there is no complete
    build for this source and torch; returns its path. Raises NoCompiler if it must be built and cannot."""
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    return load(SOURCE, ["-O3", *openmp], openmp)
