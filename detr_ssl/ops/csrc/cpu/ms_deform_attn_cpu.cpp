// Multi-scale deformable attention on the CPU, float32 and float64.
//
// The forward pass runs (batch, query) rows in parallel: each writes its own output row. The
// backward pass runs (batch, head) pairs in parallel instead, because a pair owns a disjoint
// slice of grad_value (value[n, :, m, :]): no two threads ever add to the same element, so no
// atomics or per-thread copies of grad_value are needed. batch * heads (16 for Deformable DETR
// at batch 2) is plenty of tasks for a CPU's cores.
#include <ATen/Parallel.h>

#include <algorithm>

#include "../ms_deform_attn.h"
#include "../sampling.h"

namespace detr_ssl {
namespace {

// Rows of (heads x channels) outputs per parallel task in the forward pass.
constexpr int64_t kRowsPerTask = 16;

void check_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const Sizes& sizes) {
  TORCH_CHECK(value.device().is_cpu(), "the CPU kernel needs CPU tensors, got ", value.device());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "the CPU kernel computes in float32 or float64, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "the CPU kernel needs value, sampling_locations and attention_weights of one dtype");
  // The levels must tile value exactly, or the kernels would read outside it.
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t level = 0; level < sizes.levels; ++level) {
    TORCH_CHECK(shapes[2 * level] > 0 && shapes[2 * level + 1] > 0, "spatial_shapes must be positive");
    TORCH_CHECK(starts[level] == start, "level_start_index must be the running sum of height * width");
    start += shapes[2 * level] * shapes[2 * level + 1];
  }
  TORCH_CHECK(start == sizes.values, "spatial_shapes cover ", start, " values, but value has ", sizes.values);
}

template <typename scalar_t>
void forward_kernel(const Sizes& s, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output) {
  const int64_t stride = s.heads * s.channels;  // between pixels of one head in value
  at::parallel_for(0, s.batch * s.queries, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = n * queries + q
      const int64_t n = row / s.queries;
      for (int64_t m = 0; m < s.heads; ++m) {
        scalar_t* out = output + (row * s.heads + m) * s.channels;
        std::fill_n(out, s.channels, scalar_t(0));  // here rather than a zeros pass over the whole output
        int64_t point = (row * s.heads + m) * s.levels * s.points;
        for (int64_t l = 0; l < s.levels; ++l) {
          const scalar_t* level = value + ((n * s.values + starts[l]) * s.heads + m) * s.channels;
          for (int64_t p = 0; p < s.points; ++p, ++point) {
            const auto near = neighbours(locations[2 * point], locations[2 * point + 1], shapes[2 * l],
                                         shapes[2 * l + 1]);
            for (int k = 0; k < 4; ++k) {
              if (!near.valid[k]) continue;
              const scalar_t coef = weights[point] * near.weight[k];
              const scalar_t* v = level + near.pixel[k] * stride;
              for (int64_t c = 0; c < s.channels; ++c) out[c] += coef * v[c];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Sizes& s, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* locations, const scalar_t* weights, const scalar_t* grad_output,
                     scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights) {
  const int64_t stride = s.heads * s.channels;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.heads, m = task % s.heads;
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t row = n * s.queries + q;
        const scalar_t* grad_out = grad_output + (row * s.heads + m) * s.channels;
        int64_t point = (row * s.heads + m) * s.levels * s.points;
        for (int64_t l = 0; l < s.levels; ++l) {
          const int64_t offset = ((n * s.values + starts[l]) * s.heads + m) * s.channels;
          for (int64_t p = 0; p < s.points; ++p, ++point) {
            const auto near = neighbours(locations[2 * point], locations[2 * point + 1], shapes[2 * l],
                                         shapes[2 * l + 1]);
            const scalar_t weight = weights[point];
            scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (!near.valid[k]) continue;
              const scalar_t* v = value + offset + near.pixel[k] * stride;
              scalar_t* grad_v = grad_value + offset + near.pixel[k] * stride;
              const scalar_t coef = weight * near.weight[k];
              scalar_t dot = 0;  // grad_output . value at this neighbour
#pragma omp simd reduction(+ : dot)
              for (int64_t c = 0; c < s.channels; ++c) {
                dot += grad_out[c] * v[c];
                grad_v[c] += coef * grad_out[c];
              }
              grad_weight += near.weight[k] * dot;
              grad_x += near.weight_dx[k] * dot;
              grad_y += near.weight_dy[k] * dot;
            }
            grad_weights[point] = grad_weight;
            grad_locations[2 * point] = weight * grad_x;
            grad_locations[2 * point + 1] = weight * grad_y;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  check_grad_output(grad_output, value, s);
  at::Tensor grad_value = at::zeros_like(value);  // accumulated; the other two are written once per point
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
                              grad_weights.data_ptr<scalar_t>());
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace detr_ssl
