// Python binding of whichever kernel (CPU or CUDA) this extension is built with.
#include <torch/extension.h>

#include "ms_deform_attn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &detr_ssl::ms_deform_attn_forward, "multi-scale deformable attention, forward");
  module.def("backward", &detr_ssl::ms_deform_attn_backward,
             "multi-scale deformable attention, backward: (grad_value, grad_locations, grad_weights)");
}
