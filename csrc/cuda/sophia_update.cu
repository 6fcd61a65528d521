// CUDA kernel of the fused Sophia update, multi-tensor-apply style: the host writes a table of
// the tensors' pointers and sizes and a table of chunks (tensor, start), copies both to the
// device in one transfer, and a single launch runs one thread block per chunk over every tensor
// of the list. The per-element math is that of csrc/common/sophia_update.h, tested on the CPU twin.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/sophia_update.h"

namespace unlearn_fast {
namespace sophia {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = int64_t(1) << 14;  // 64 elements per thread per chunk
constexpr int kTensorFields = 5;                  // param, grad, exp_avg, hessian pointers; numel

template <typename scalar_t, typename acc_t, bool kHessianFromGrad, bool kSoulReference>
__global__ void sophia_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ chunks,
                              StepConstants<acc_t> c) {
  const int64_t* chunk = chunks + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* t = tensors + kTensorFields * chunk[0];
  scalar_t* p = reinterpret_cast<scalar_t*>(t[0]);
  const scalar_t* g = reinterpret_cast<const scalar_t*>(t[1]);
  acc_t* m = reinterpret_cast<acc_t*>(t[2]);
  acc_t* h = reinterpret_cast<acc_t*>(t[3]);
  const int64_t end = chunk[1] + kCudaChunk < t[4] ? chunk[1] + kCudaChunk : t[4];
  for (int64_t i = chunk[1] + threadIdx.x; i < end; i += kThreads) {
    acc_t pi = static_cast<acc_t>(p[i]);
    acc_t mi = m[i];
    acc_t hi = h[i];
    update<acc_t, kHessianFromGrad, kSoulReference>(pi, static_cast<acc_t>(g[i]), mi, hi, c);
    p[i] = static_cast<scalar_t>(pi);
    m[i] = mi;
    if (kHessianFromGrad) h[i] = hi;
  }
}

void sophia_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList hessians, double lr, double beta1, double beta2, double rho, double bs,
                        double weight_decay, double eps, bool maximize, bool hessian_from_grad,
                        bool soul_reference) {
  check_scalars(lr, beta1, beta2, rho, bs, weight_decay, eps);
  check_tensors(params, grads, exp_avgs, hessians);
  const std::vector<Chunk> chunks = plan_chunks(params, kCudaChunk);
  if (chunks.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());

  // Both tables in one pinned buffer, one asynchronous copy (the caching host allocator keeps
  // the buffer alive until the copy has run).
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  TORCH_CHECK(n_chunks <= std::numeric_limits<int>::max(), "sophia_update: too many chunks for one launch");
  at::Tensor host = at::empty({kTensorFields * n + 2 * n_chunks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* table = host.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    table[kTensorFields * i + 0] = reinterpret_cast<int64_t>(params[i].data_ptr());
    table[kTensorFields * i + 1] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    table[kTensorFields * i + 2] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
    table[kTensorFields * i + 3] = reinterpret_cast<int64_t>(hessians[i].data_ptr());
    table[kTensorFields * i + 4] = params[i].numel();
  }
  for (int64_t k = 0; k < n_chunks; ++k) {
    table[kTensorFields * n + 2 * k] = chunks[k].tensor;
    table[kTensorFields * n + 2 * k + 1] = chunks[k].start;
  }
  const at::Tensor device_table = host.to(params[0].device(), /*non_blocking=*/true);
  const int64_t* tensors_d = device_table.const_data_ptr<int64_t>();
  const int64_t* chunks_d = tensors_d + kTensorFields * n;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sophia_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto c = step_constants<acc_t>(lr, beta1, beta2, rho, bs, weight_decay, eps, maximize);
    with_flags(hessian_from_grad, soul_reference, [&](auto hess_flag, auto soul_flag) {
      sophia_kernel<scalar_t, acc_t, decltype(hess_flag)::value, decltype(soul_flag)::value>
          <<<static_cast<unsigned>(n_chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(tensors_d, chunks_d, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace sophia
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("sophia_update", &::unlearn_fast::sophia::sophia_update_cuda);
}
