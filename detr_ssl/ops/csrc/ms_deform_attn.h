// The interface both kernels implement (one per extension) and the input checks they share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace detr_ssl {

// value (N, S, heads, channels); sampling_locations (N, Lq, heads, levels, points, 2);
// attention_weights (N, Lq, heads, levels, points). Returns (N, Lq, heads * channels).
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights, const at::Tensor& grad_output);

struct Sizes {
  int64_t batch, values, heads, channels, queries, levels, points;
};

// Checks shapes, layouts and devices (not dtypes, which each kernel checks) and returns the sizes.
inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, heads, channels), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, heads, levels, points, 2), got ", sampling_locations.sizes());
  const Sizes sizes{value.size(0), value.size(1), value.size(2), value.size(3),
                    sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch && sampling_locations.size(2) == sizes.heads,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be (N, Lq, heads, levels, points) = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.levels && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (levels, 2) = (", sizes.levels, ", 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.levels,
              "level_start_index must be (levels,) = (", sizes.levels, ",), got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  for (const at::Tensor* tensor :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(tensor->is_contiguous(), "ms_deform_attn inputs must be contiguous");
    TORCH_CHECK(tensor->device() == value.device(), "ms_deform_attn inputs must be on one device, got ",
                tensor->device(), " and ", value.device());
  }
  return sizes;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& sizes) {
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.device() == value.device() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be contiguous, on value's device and of value's dtype");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch && grad_output.size(1) == sizes.queries &&
                  grad_output.size(2) == sizes.heads * sizes.channels,
              "grad_output must be (N, Lq, heads * channels), got ", grad_output.sizes());
}

}  // namespace detr_ssl
