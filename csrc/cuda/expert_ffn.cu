// CUDA kernels of expert_ffn: the token gather and the two GLU passes. The matmuls (cuBLAS via
// ATen) and the order of the steps are in csrc/common/expert_ffn_driver.h; the per-element math is
// csrc/common/expert_ffn.h, tested through the C++ CPU twin (csrc/cpu/expert_ffn.cpp). Only the
// indexing lives here.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/expert_ffn.h"
#include "common/expert_ffn_driver.h"

namespace unlearn_fast {
namespace expert_ffn {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU; the grid-stride loops cover the rest.
inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

// One thread block per gathered row (grid-stride over rows), threads across the hidden size.
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ hidden, const int64_t* __restrict__ token_index,
                              scalar_t* __restrict__ x, int64_t N, int64_t H, int64_t T) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t t = token_index[n];
    CUDA_KERNEL_ASSERT(t >= 0 && t < T && "expert_ffn: token_index out of range");
    const scalar_t* src = hidden + t * H;
    scalar_t* dst = x + n * H;
    for (int64_t k = threadIdx.x; k < H; k += blockDim.x) dst[k] = src[k];
  }
}

template <typename scalar_t, typename acc_t, Activation kAct>
__global__ void glu_forward_kernel(const scalar_t* __restrict__ a, scalar_t* __restrict__ h, int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / I, i = e - n * I;
    const scalar_t* row = a + n * 2 * I;
    h[e] = static_cast<scalar_t>(glu<kAct, acc_t>(static_cast<acc_t>(row[i]), static_cast<acc_t>(row[I + i])));
  }
}

template <typename scalar_t, typename acc_t, Activation kAct>
__global__ void glu_backward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ dh,
                                    scalar_t* __restrict__ h, scalar_t* __restrict__ da, int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / I, i = e - n * I;
    const scalar_t* row = a + n * 2 * I;
    acc_t hv, dg, du;
    glu_grad<kAct, acc_t>(static_cast<acc_t>(row[i]), static_cast<acc_t>(row[I + i]), static_cast<acc_t>(dh[e]),
                              hv, dg, du);
    h[e] = static_cast<scalar_t>(hv);
    da[n * 2 * I + i] = static_cast<scalar_t>(dg);
    da[n * 2 * I + I + i] = static_cast<scalar_t>(du);
  }
}

struct CudaKernels {
  static void gather(const at::Tensor& hidden, const at::Tensor& token_index, at::Tensor& x) {
    const int64_t N = x.size(0), H = x.size(1);
    if (N == 0 || H == 0) return;
    const c10::cuda::CUDAGuard guard(hidden.device());
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(N, int64_t(1) << 16));
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (H + 31) / 32 * 32));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "expert_ffn_gather_cuda", [&] {
      gather_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          hidden.const_data_ptr<scalar_t>(), token_index.const_data_ptr<int64_t>(), x.mutable_data_ptr<scalar_t>(), N,
          H, hidden.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void glu_forward(const at::Tensor& a, at::Tensor& h, int64_t activation) {
    const int64_t N = h.size(0), I = h.size(1);
    if (N == 0 || I == 0) return;
    const c10::cuda::CUDAGuard guard(a.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "expert_ffn_glu_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_activation(activation, [&](auto act_tag) {
        glu_forward_kernel<scalar_t, acc_t, decltype(act_tag)::value>
            <<<blocks_for(N * I), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                a.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), N, I);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void glu_backward(const at::Tensor& a, const at::Tensor& dh, at::Tensor& h, at::Tensor& da,
                           int64_t activation) {
    const int64_t N = h.size(0), I = h.size(1);
    if (N == 0 || I == 0) return;
    const c10::cuda::CUDAGuard guard(a.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "expert_ffn_glu_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_activation(activation, [&](auto act_tag) {
        glu_backward_kernel<scalar_t, acc_t, decltype(act_tag)::value>
            <<<blocks_for(N * I), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                a.const_data_ptr<scalar_t>(), dh.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
                da.mutable_data_ptr<scalar_t>(), N, I);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

}  // namespace
}  // namespace expert_ffn
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  UNLEARN_FAST_REGISTER_EXPERT_FFN(m, ::unlearn_fast::expert_ffn::CudaKernels);
}
