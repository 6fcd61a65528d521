// CUDA kernels of the fused expert-routing ops: one warp per row (WarpLanes: lane l handles
// experts l, l + 32, ...; reductions by shuffles), each warp with its row buffers in shared
// memory. The per-row algorithm is that of csrc/common/moe_routing.h, tested on the CPU twin
// (csrc/cpu/moe_routing.cpp); this file only adds the warp executor, the shared-memory layout and
// the launch. The attribution is deterministic: a block sums a fixed chunk of kRowsPerChunk rows
// (per-warp partials in shared memory, added in warp order), a second kernel adds the chunks'
// partials in chunk order. No atomics. The sums are float64 (a few adds per row) as on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/moe_routing.h"

namespace unlearn_fast {
namespace moe_routing {
namespace {

constexpr int kWarps = 4;  // warps (rows in flight) per block
constexpr int kBlockThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in

// The warp executor of the row functions (the CPU twin is SerialLanes).
struct WarpLanes {
  int lane;
  __device__ int first() const { return lane; }
  __device__ int step() const { return 32; }
  template <typename acc_t>
  __device__ acc_t max(acc_t x) const {
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc_t other = __shfl_xor_sync(kFullMask, x, offset);
      x = other > x ? other : x;
    }
    return x;
  }
  template <typename acc_t>
  __device__ acc_t sum(acc_t x) const {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
  }
  // A butterfly: `beats` is a strict total order on (value, index), so every lane ends with the
  // same pick.
  template <typename acc_t>
  __device__ Pick<acc_t> argmax(Pick<acc_t> p) const {
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc_t value = __shfl_xor_sync(kFullMask, p.value, offset);
      const int index = __shfl_xor_sync(kFullMask, p.index, offset);
      if (beats(value, index, p)) p = {value, index};
    }
    return p;
  }
  __device__ bool all(bool b) const { return __all_sync(kFullMask, b); }
  __device__ void sync() const { __syncwarp(); }
  __device__ bool leader() const { return lane == 0; }
  __device__ bool owns(int e) const { return (e & 31) == lane; }
};

// Shared memory of one warp's row buffers: score [E], select [E], group [n_group] (acc_t),
// chosen [top_k] (int), padded to 16 bytes.
template <typename acc_t>
__host__ __device__ size_t row_buffer_bytes(const Routing<acc_t>& r) {
  const size_t bytes = (2 * r.num_experts + r.n_group) * sizeof(acc_t) + r.top_k * sizeof(int);
  return (bytes + 15) / 16 * 16;
}

template <typename acc_t>
__device__ RowBuffers<acc_t> warp_row_buffers(unsigned char* base, int warp, const Routing<acc_t>& r) {
  acc_t* score = reinterpret_cast<acc_t*>(base + warp * row_buffer_bytes(r));
  acc_t* group = score + 2 * r.num_experts;
  return {score, score + r.num_experts, group, reinterpret_cast<int*>(group + r.n_group)};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    attribution_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weights, const acc_t* __restrict__ bias,
                       int64_t num_tokens, Routing<acc_t> r, double* __restrict__ partials) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = r.num_experts;
  const int warp = threadIdx.x / 32;
  const WarpLanes lanes{static_cast<int>(threadIdx.x % 32)};
  double* warp_sums = reinterpret_cast<double*>(smem);  // [kWarps, E]
  const size_t sums_bytes = (kWarps * E * sizeof(double) + 15) / 16 * 16;
  const RowBuffers<acc_t> buf = warp_row_buffers<acc_t>(smem + sums_bytes, warp, r);
  double* mine = warp_sums + warp * E;
  for (int e = lanes.first(); e < E; e += lanes.step()) mine[e] = 0.0;  // entry e: lane e % 32 only
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kRowsPerChunk;
  const int64_t row_end = row_begin + kRowsPerChunk < num_tokens ? row_begin + kRowsPerChunk : num_tokens;
  for (int64_t t = row_begin + warp; t < row_end; t += kWarps) {
    const bool valid = route_row(lanes, x + t * E, bias, r, buf);
    accumulate_row(lanes, r, buf, valid, weights[t], [mine](int e, acc_t v) { mine[e] += static_cast<double>(v); });
    lanes.sync();  // the next row overwrites the buffers
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w * E + e];  // warp order: deterministic
    partials[static_cast<int64_t>(blockIdx.x) * E + e] = total;
  }
}

template <typename acc_t>
__global__ void sum_chunks_kernel(const double* __restrict__ partials, int64_t n_chunks, int num_experts,
                                  acc_t* __restrict__ out) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  double total = 0;
  for (int64_t c = 0; c < n_chunks; ++c) total += partials[c * num_experts + e];  // chunk order, as on the CPU
  out[e] = static_cast<acc_t>(total);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    residual_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ bias, int64_t num_tokens,
                    Routing<acc_t> r, int target, acc_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = r.num_experts;
  const int warp = threadIdx.x / 32;
  const WarpLanes lanes{static_cast<int>(threadIdx.x % 32)};
  const RowBuffers<acc_t> buf = warp_row_buffers<acc_t>(smem, warp, r);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const bool valid = route_row(lanes, x + t * E, bias, r, buf);
    const acc_t residual = anchor_residual(r, buf, valid, target);
    if (lanes.leader()) out[t] = residual;
    lanes.sync();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    residual_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             const acc_t* __restrict__ bias, int64_t num_tokens, Routing<acc_t> r, int target,
                             scalar_t* __restrict__ dx) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = r.num_experts;
  const int warp = threadIdx.x / 32;
  const WarpLanes lanes{static_cast<int>(threadIdx.x % 32)};
  const RowBuffers<acc_t> buf = warp_row_buffers<acc_t>(smem, warp, r);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const bool valid = route_row(lanes, x + t * E, bias, r, buf);
    anchor_backward_row(lanes, r, buf, valid, target, grad[t], dx + t * E);
    lanes.sync();
  }
}

// Opts a kernel into more than 48 KiB of dynamic shared memory when the row buffers need it.
template <typename Kernel>
void set_shared_bytes(Kernel kernel, size_t bytes) {
  const int device = at::cuda::current_device();
  const size_t limit = at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "moe routing: ", bytes, " bytes of shared memory per block needed but the GPU has ",
              limit, "; use fewer experts or top_k");
  if (bytes > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

int64_t row_blocks(int64_t num_tokens) {
  return std::max<int64_t>(1, std::min<int64_t>((num_tokens + kWarps - 1) / kWarps, int64_t(1) << 20));
}

template <typename acc_t>
const acc_t* bias_ptr(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->const_data_ptr<acc_t>() : nullptr;
}

at::Tensor expert_attribution_cuda(const at::Tensor& logits, const at::Tensor& token_weights,
                                   const std::optional<at::Tensor>& bias, int64_t top_k, int64_t score,
                                   bool renormalize, double renorm_eps, double scaling, int64_t n_group,
                                   int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_vector(token_weights, logits, T, "token_weights");
  check_bias(bias, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::zeros({E}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return out;
  const int64_t n_chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor partials = at::empty({n_chunks, E}, out.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_expert_attribution_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const size_t shared = (kWarps * E * sizeof(double) + 15) / 16 * 16 + kWarps * row_buffer_bytes(r);
    set_shared_bytes(attribution_kernel<scalar_t, acc_t>, shared);
    attribution_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n_chunks), kBlockThreads, shared, stream>>>(
        logits.const_data_ptr<scalar_t>(), token_weights.const_data_ptr<acc_t>(), bias_ptr<acc_t>(bias), T, r,
        partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_chunks_kernel<acc_t><<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(
        partials.const_data_ptr<double>(), n_chunks, static_cast<int>(E), out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor anchor_residual_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t target,
                                int64_t top_k, int64_t score, bool renormalize, double renorm_eps, double scaling,
                                int64_t n_group, int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_bias(bias, logits);
  check_target(target, E);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_anchor_residual_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const size_t shared = kWarps * row_buffer_bytes(r);
    set_shared_bytes(residual_kernel<scalar_t, acc_t>, shared);
    residual_kernel<scalar_t, acc_t><<<static_cast<unsigned>(row_blocks(T)), kBlockThreads, shared,
                                       at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), bias_ptr<acc_t>(bias), T, r, static_cast<int>(target),
        out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor anchor_residual_backward_cuda(const at::Tensor& grad_residual, const at::Tensor& logits,
                                         const std::optional<at::Tensor>& bias, int64_t target, int64_t top_k,
                                         int64_t score, bool renormalize, double renorm_eps, double scaling,
                                         int64_t n_group, int64_t topk_group, int64_t group_score) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_vector(grad_residual, logits, T, "grad_residual");
  check_bias(bias, logits);
  check_target(target, E);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dlogits = at::empty_like(logits);
  if (T == 0) return dlogits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_anchor_residual_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Routing<acc_t> r =
        make_routing<acc_t>(E, top_k, score, renormalize, renorm_eps, scaling, n_group, topk_group, group_score);
    const size_t shared = kWarps * row_buffer_bytes(r);
    set_shared_bytes(residual_backward_kernel<scalar_t, acc_t>, shared);
    residual_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(row_blocks(T)), kBlockThreads, shared,
                                                at::cuda::getCurrentCUDAStream()>>>(
        grad_residual.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(), bias_ptr<acc_t>(bias), T, r,
        static_cast<int>(target), dlogits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dlogits;
}

}  // namespace
}  // namespace moe_routing
}  // namespace unlearn_fast

TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("moe_expert_attribution", &::unlearn_fast::moe_routing::expert_attribution_cuda);
  m.impl("moe_anchor_residual", &::unlearn_fast::moe_routing::anchor_residual_cuda);
  m.impl("moe_anchor_residual_backward", &::unlearn_fast::moe_routing::anchor_residual_backward_cuda);
}
