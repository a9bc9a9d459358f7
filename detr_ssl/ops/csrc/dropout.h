// Dropout whose mask is a pure function of (seed, element index), so that it can be drawn on every
// thread at once, recomputed in the backward pass instead of stored, and does not depend on how many
// threads ran.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace detr_ssl {

// input * keep(seed, i) / (1 - p) for each element i of input in row-major order, where keep is 1 with
// probability 1 - p (to within 2^-32) and 0 otherwise. 0 < p < 1; CPU tensors of a floating dtype.
// The result is contiguous. Applying it to a gradient with the same (p, seed) is its backward pass.
at::Tensor seeded_dropout(const at::Tensor& input, double p, int64_t seed);

// seeded_dropout(relu(input), p, seed) in one pass: the FFN's activation and dropout. Its backward needs
// only the output (which the next linear layer keeps anyway): relu_dropout_backward.
at::Tensor seeded_relu_dropout(const at::Tensor& input, double p, int64_t seed);

// grad_output / (1 - p) where output > 0, else 0: the gradient of seeded_relu_dropout(input, p, seed)
// given its output, since an element is positive exactly where it passed both the relu and the mask.
at::Tensor relu_dropout_backward(const at::Tensor& grad_output, const at::Tensor& output, double p);

}  // namespace detr_ssl
