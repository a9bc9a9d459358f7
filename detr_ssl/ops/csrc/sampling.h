// Where one sampling point falls on one level: shared by the CPU and CUDA kernels so that both
// interpolate, pad and differentiate in exactly the same way.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSDA_INLINE __device__ __forceinline__
#else
#define MSDA_INLINE inline
#endif

namespace detr_ssl {

// The four pixels around a sampling point, in the order (y0, x0), (y0, x0 + 1), (y0 + 1, x0),
// (y0 + 1, x0 + 1). Pixels outside the level are invalid: they read as zero (zero padding) and
// receive no gradient.
template <typename acc_t>
struct Neighbours {
  int64_t pixel[4];    // y * width + x: offset from the level's first pixel, in pixels
  bool valid[4];
  acc_t weight[4];     // bilinear weight
  acc_t weight_dx[4];  // derivative of the weight with respect to the normalised x location
  acc_t weight_dy[4];  // ... and the normalised y location
};

// Bilinear neighbours of the normalised location (loc_x, loc_y) on a height x width level, as
// grid_sample(align_corners=False) defines them: the centre of pixel (i, j) lies at
// ((j + 0.5) / width, (i + 0.5) / height).
template <typename acc_t>
MSDA_INLINE Neighbours<acc_t> neighbours(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Further outside the level than this, all four neighbours are padding. At x == -1 one
  // neighbour is inside with weight 0, which still gives a gradient, as in grid_sample. Testing
  // this first also keeps huge and NaN locations away from the integer conversion below.
  const bool near = x >= static_cast<acc_t>(-1) && y >= static_cast<acc_t>(-1) &&
                    x < static_cast<acc_t>(width) && y < static_cast<acc_t>(height);
  const int64_t x0 = near ? static_cast<int64_t>(floor(x)) : 0;
  const int64_t y0 = near ? static_cast<int64_t>(floor(y)) : 0;
  const acc_t fx = near ? x - static_cast<acc_t>(x0) : static_cast<acc_t>(0);
  const acc_t fy = near ? y - static_cast<acc_t>(y0) : static_cast<acc_t>(0);

  Neighbours<acc_t> result;
  for (int k = 0; k < 4; ++k) {
    const int64_t right = k & 1, below = k >> 1;
    const int64_t xk = x0 + right, yk = y0 + below;
    const bool valid = near && xk >= 0 && xk < width && yk >= 0 && yk < height;
    const acc_t wx = right ? fx : 1 - fx;
    const acc_t wy = below ? fy : 1 - fy;
    result.valid[k] = valid;
    result.pixel[k] = valid ? yk * width + xk : 0;
    result.weight[k] = valid ? wx * wy : static_cast<acc_t>(0);
    result.weight_dx[k] = valid ? (right ? wy : -wy) * static_cast<acc_t>(width) : static_cast<acc_t>(0);
    result.weight_dy[k] = valid ? (below ? wx : -wx) * static_cast<acc_t>(height) : static_cast<acc_t>(0);
  }
  return result;
}

}  // namespace detr_ssl
