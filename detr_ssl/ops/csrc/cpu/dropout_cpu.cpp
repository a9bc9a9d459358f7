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

// A function of its own (not the parallel_for lambda) so that the compiler sees the pointers do not alias.
template <typename scalar_t>
void dropout_range(const scalar_t* __restrict input, scalar_t* __restrict output, int64_t begin, int64_t end,
                   uint64_t seed, uint32_t threshold, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t keep = draw(seed, static_cast<uint64_t>(i)) >= threshold ? scale : acc_t(0);
    output[i] = static_cast<scalar_t>(static_cast<acc_t>(input[i]) * keep);
  }
}

}  // namespace

at::Tensor seeded_dropout(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), "seeded_dropout: the CPU kernel needs a CPU tensor, got ", input.device());
  TORCH_CHECK(p > 0.0 && p < 1.0, "seeded_dropout: p must be in (0, 1), got ", p);
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty_like(source, at::MemoryFormat::Contiguous);
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::ldexp(p, 32), 4294967295.0));
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, source.scalar_type(), "seeded_dropout", [&] {
    const scalar_t* src = source.const_data_ptr<scalar_t>();
    scalar_t* dst = output.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<at::opmath_type<scalar_t>>(1.0 / (1.0 - p));
    at::parallel_for(0, source.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      dropout_range(src, dst, begin, end, key, threshold, scale);
    });
  });
  return output;
}

}  // namespace detr_ssl
