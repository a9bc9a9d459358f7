// CPU kernel of seeded_dropout (see dropout.h).
//
// keep(seed, i) compares a 32-bit hash of (seed, i) with p * 2^32. The hash is two rounds of
// Wellons' "lowbias32" integer finalizer keyed by the seed's two halves: 32-bit multiplies and shifts
// only, which the compiler vectorises 8 wide with AVX2 (a 64-bit SplitMix hash vectorises poorly
// without AVX-512's 64-bit multiply). Each element's draw is independent of the others, so the loop
// splits across threads anywhere.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../dropout.h"

namespace detr_ssl {
namespace {

constexpr int64_t kGrainSize = 1 << 14;

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

inline uint32_t draw(uint64_t seed, uint64_t index) {
  const uint32_t low_key = static_cast<uint32_t>(seed), high_key = static_cast<uint32_t>(seed >> 32);
  const uint32_t high_index = static_cast<uint32_t>(index >> 32) * 0x9e3779b9u;  // 0 below 2^32 elements
  return lowbias32(lowbias32(static_cast<uint32_t>(index) ^ low_key) ^ (high_key + high_index));
}

// Functions of their own (not the parallel_for lambdas) so that the compiler sees the pointers do not alias.
// With kRelu the input goes through max(x, 0) first (NaN stays NaN, as in torch.relu).
template <bool kRelu, typename scalar_t>
void dropout_range(const scalar_t* __restrict input, scalar_t* __restrict output, int64_t begin, int64_t end,
                   uint64_t seed, uint32_t threshold, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t keep = draw(seed, static_cast<uint64_t>(i)) >= threshold ? scale : acc_t(0);
    acc_t value = static_cast<acc_t>(input[i]);
    if constexpr (kRelu) {
      value = value < acc_t(0) ? acc_t(0) : value;
    }
    output[i] = static_cast<scalar_t>(value * keep);
  }
}

template <typename scalar_t>
void relu_dropout_backward_range(const scalar_t* __restrict grad, const scalar_t* __restrict output,
                                 scalar_t* __restrict grad_input, int64_t begin, int64_t end,
                                 at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t factor = static_cast<acc_t>(output[i]) > acc_t(0) ? scale : acc_t(0);
    grad_input[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * factor);
  }
}

template <bool kRelu>
at::Tensor masked_scaling(const char* name, const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), name, ": the CPU kernel needs a CPU tensor, got ", input.device());
  TORCH_CHECK(p > 0.0 && p < 1.0, name, ": p must be in (0, 1), got ", p);
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty_like(source, at::MemoryFormat::Contiguous);
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::ldexp(p, 32), 4294967295.0));
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, source.scalar_type(), "seeded_dropout", [&] {
    const scalar_t* src = source.const_data_ptr<scalar_t>();
    scalar_t* dst = output.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<at::opmath_type<scalar_t>>(1.0 / (1.0 - p));
    at::parallel_for(0, source.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      dropout_range<kRelu>(src, dst, begin, end, key, threshold, scale);
    });
  });
  return output;
}

}  // namespace

at::Tensor seeded_dropout(const at::Tensor& input, double p, int64_t seed) {
  return masked_scaling<false>("seeded_dropout", input, p, seed);
}

at::Tensor seeded_relu_dropout(const at::Tensor& input, double p, int64_t seed) {
  return masked_scaling<true>("seeded_relu_dropout", input, p, seed);
}

at::Tensor relu_dropout_backward(const at::Tensor& grad_output, const at::Tensor& output, double p) {
  TORCH_CHECK(grad_output.device().is_cpu() && output.device().is_cpu(),
              "relu_dropout_backward: the CPU kernel needs CPU tensors");
  TORCH_CHECK(grad_output.sizes() == output.sizes() && grad_output.scalar_type() == output.scalar_type(),
              "relu_dropout_backward: grad_output and output must have the same shape and dtype");
  const at::Tensor grad = grad_output.contiguous(), kept = output.contiguous();
  at::Tensor grad_input = at::empty_like(grad, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "relu_dropout_backward", [&] {
    const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
    const scalar_t* kept_data = kept.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<at::opmath_type<scalar_t>>(1.0 / (1.0 - p));
    at::parallel_for(0, grad.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      relu_dropout_backward_range(grad_data, kept_data, dst, begin, end, scale);
    });
  });
  return grad_input;
}

}  // namespace detr_ssl
