// Python binding of whichever kernels (CPU or CUDA) this extension is built with.
#include <torch/extension.h>

#include "ms_deform_attn.h"
#ifdef DETR_SSL_CPU_KERNELS
#include "dropout.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &detr_ssl::ms_deform_attn_forward, "multi-scale deformable attention, forward");
  module.def("backward", &detr_ssl::ms_deform_attn_backward,
             "multi-scale deformable attention, backward: (grad_value, grad_locations, grad_weights)");
#ifdef DETR_SSL_CPU_KERNELS
  module.def("seeded_dropout", &detr_ssl::seeded_dropout, "dropout with the mask a hash of (seed, index)");
  module.def("seeded_relu_dropout", &detr_ssl::seeded_relu_dropout, "seeded_dropout of relu(input), one pass");
  module.def("relu_dropout_backward", &detr_ssl::relu_dropout_backward,
             "gradient of seeded_relu_dropout from its output");
#endif
}
