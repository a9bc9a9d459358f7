// Multi-scale deformable attention on CUDA: float32, float64, float16 and bfloat16.
//
// value, output and grad_output are in scalar_t; sampling locations and attention weights come in
// acc_t (float, or double for double) and all arithmetic is in acc_t. Gradients are accumulated
// with atomic adds into acc_t buffers, and grad_value is cast to scalar_t at the end, so that
// half-precision inputs never accumulate in half precision.
//
// Both passes run one thread per (batch, query, head, channel), so consecutive threads read and
// write consecutive channels. In the backward pass a sampling point's grad_location and
// grad_weight are sums over its head's channels: groups of lanes sum them with warp shuffles,
// then one lane per group adds the group's sum to memory.
//
// The atomic adds make the backward pass nondeterministic (float sums in no fixed order), so it
// raises or warns through torch's alert under torch.use_deterministic_algorithms(True).
//
// Unlike the CPU kernel, this one does not check that spatial_shapes tile value: that would
// copy them to the host and synchronise on every call. The Python wrapper checks them, once per
// pair of shape tensors.
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../ms_deform_attn.h"
#include "../sampling.h"

namespace detr_ssl {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size: lane = thread index % 32

// Lanes that sum together: the largest power of two dividing both the channel count and the warp
// size, so that each group of lanes lies within one head (one sampling point) and one warp.
int lanes_per_sum(int64_t channels) {
  int lanes = 1;
  while (lanes < 32 && channels % (lanes * 2) == 0) lanes *= 2;
  return lanes;
}

unsigned int blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ms_deform_attn: inputs too large for one launch");
  return static_cast<unsigned int>(blocks);
}

// Sum of v over each aligned group of `lanes` lanes (a power of two up to 32), in every lane.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_lanes(acc_t v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const Sizes s, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const acc_t* __restrict__ locations,
                               const acc_t* __restrict__ weights, scalar_t* __restrict__ output) {
  // index = ((n * queries + q) * heads + m) * channels + c, which is also the output's layout.
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= s.batch * s.queries * s.heads * s.channels) return;
  const int64_t c = index % s.channels;
  const int64_t head_row = index / s.channels;
  const int64_t m = head_row % s.heads;
  const int64_t n = head_row / (s.heads * s.queries);
  const int64_t stride = s.heads * s.channels;  // between pixels of one head in value

  acc_t sum = 0;
  int64_t point = head_row * s.levels * s.points;
  for (int64_t l = 0; l < s.levels; ++l) {
    const scalar_t* level = value + ((n * s.values + starts[l]) * s.heads + m) * s.channels + c;
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    for (int64_t p = 0; p < s.points; ++p, ++point) {
      const auto near = neighbours(locations[2 * point], locations[2 * point + 1], height, width);
      acc_t sample = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (near.valid[k]) sample += near.weight[k] * static_cast<acc_t>(level[near.pixel[k] * stride]);
      }
      sum += weights[point] * sample;
    }
  }
  output[index] = static_cast<scalar_t>(sum);
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const Sizes s, const int lanes, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const acc_t* __restrict__ locations, const acc_t* __restrict__ weights,
                                const scalar_t* __restrict__ grad_output, acc_t* __restrict__ grad_value,
                                acc_t* __restrict__ grad_locations, acc_t* __restrict__ grad_weights) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  // Threads past the end stay, contributing zeros, because the warp sums need every lane. Groups
  // of lanes never mix the two kinds: lanes divides channels, hence the number of threads.
  const bool active = index < s.batch * s.queries * s.heads * s.channels;
  const int64_t c = index % s.channels;
  const int64_t head_row = index / s.channels;
  const int64_t m = head_row % s.heads;
  const int64_t n = head_row / (s.heads * s.queries);
  const int64_t stride = s.heads * s.channels;
  const acc_t grad = active ? static_cast<acc_t>(grad_output[index]) : static_cast<acc_t>(0);

  int64_t point = head_row * s.levels * s.points;
  for (int64_t l = 0; l < s.levels; ++l) {
    const int64_t offset = ((n * s.values + starts[l]) * s.heads + m) * s.channels + c;
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    for (int64_t p = 0; p < s.points; ++p, ++point) {
      acc_t weight = 0, grad_weight = 0, grad_x = 0, grad_y = 0;
      if (active) {
        const auto near = neighbours(locations[2 * point], locations[2 * point + 1], height, width);
        weight = weights[point];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!near.valid[k]) continue;
          const int64_t element = offset + near.pixel[k] * stride;
          const acc_t grad_times_value = grad * static_cast<acc_t>(value[element]);
          grad_weight += near.weight[k] * grad_times_value;
          grad_x += near.weight_dx[k] * grad_times_value;
          grad_y += near.weight_dy[k] * grad_times_value;
          atomicAdd(grad_value + element, weight * near.weight[k] * grad);
        }
      }
      grad_weight = sum_lanes(grad_weight, lanes);
      grad_x = sum_lanes(grad_x, lanes);
      grad_y = sum_lanes(grad_y, lanes);
      if (active && c % lanes == 0) {
        atomicAdd(grad_weights + point, grad_weight);
        atomicAdd(grad_locations + 2 * point, weight * grad_x);
        atomicAdd(grad_locations + 2 * point + 1, weight * grad_y);
      }
    }
  }
}

void check_cuda(const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "the CUDA kernel needs CUDA tensors, got ", value.device());
  const at::ScalarType acc = at::toOpMathType(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == acc && attention_weights.scalar_type() == acc,
              "the CUDA kernel needs sampling_locations and attention_weights in ", acc, " for ",
              value.scalar_type(), " values");
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda(value, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  const int64_t threads = output.numel();
  if (threads == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(threads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda(value, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, s);
  // See Note [Writing Nondeterministic Operations] in ATen/Context.h: the atomic adds below.
  at::globalContext().alertNotDeterministic(
      "ms_deform_attn_backward_cuda (it sums gradients with atomicAdd in no fixed order; runs are "
      "bit-reproducible on the CPU, whose kernel is deterministic)");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_value = at::zeros(value.sizes(), sampling_locations.options());  // acc_t, on value's device
  at::Tensor grad_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_weights = at::zeros_like(attention_weights);
  const int64_t threads = grad_output.numel();
  if (threads > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for(threads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          s, lanes_per_sum(s.channels), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
          attention_weights.data_ptr<acc_t>(), grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(),
          grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace detr_ssl
