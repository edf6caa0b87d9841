// Argument blocks passed from the Python bindings to the per-ISA kernels.
//
// The extension never links libtorch: Python hands over raw data pointers,
// sizes and element strides, and bindings.cpp checks them before any kernel
// touches memory. All sizes and offsets are int64.
#pragma once

#include <cstdint>

namespace vae_fast {

enum class ScaleParam : int { kLogVar = 0, kLogStd = 1, kSoftplus = 2 };
enum class TargetDtype : int { kInt64 = 0, kUint8 = 1 };
enum class Likelihood : int { kBernoulli = 0, kContinuousBernoulli = 1, kGaussian = 2, kMeanSquaredError = 3, kLaplace = 4 };

// A read-only (rows, cols) operand addressed as ptr[r * row_stride + c * col_stride];
// strides may be 0 (broadcast). ptr == nullptr means "absent".
struct Strided2D {
  const void* ptr = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

// Latent block: z = mu + sigma * eps, KL(q || p) per dim and per row.
// mu, scale: (batch, dim) with unit column stride and any row stride (the halves of
// moments.chunk(2, dim=1) are read in place). eps: (samples, batch, dim) contiguous or null
// (then eps is Philox noise with counter offset + k*batch*dim + b*dim + j: the logical index,
// whatever the layout).
struct LatentArgs {
  int64_t batch = 0, dim = 0, samples = 1;
  ScaleParam param = ScaleParam::kLogVar;
  const void* mu = nullptr;
  const void* scale = nullptr;
  int64_t mu_row_stride = 0, scale_row_stride = 0;
  Strided2D prior_mu, prior_logvar;
  const void* eps = nullptr;
  uint64_t seed = 0, offset = 0;
  // forward outputs (kl_per_dim optional)
  void* z = nullptr;
  void* kl = nullptr;
  void* kl_per_dim = nullptr;
  void* log_ratio = nullptr;  // (samples, batch): log q(z_k|x) - log p(z_k) per sample and row; zeroed by the caller
  // backward inputs (each optional: a missing gradient is zero)
  const void* grad_z = nullptr;
  const void* grad_kl = nullptr;
  const void* grad_kl_per_dim = nullptr;
  // backward outputs; prior gradients are (batch, dim) before reduction to the prior's shape
  void* grad_mu = nullptr;
  void* grad_scale = nullptr;
  void* grad_prior_mu = nullptr;
  void* grad_prior_logvar = nullptr;
  int num_threads = 1;
};

// Elementwise likelihood: per row r of `rows`, sum_j log p(x[r % x_rows, j] | theta[r, j]).
// theta: (rows, dim) contiguous; x: (x_rows, dim) contiguous, rows % x_rows == 0.
struct ElementwiseLikelihoodArgs {
  int64_t rows = 0, x_rows = 0, dim = 0;
  Likelihood likelihood = Likelihood::kBernoulli;
  const void* theta = nullptr;
  const void* x = nullptr;
  Strided2D logvar;  // Gaussian log-variance / Laplace log-scale only; (rows, dim) view, may broadcast
  void* log_prob = nullptr;        // (rows,)
  void* grad_theta = nullptr;      // (rows, dim) or null
  void* grad_logvar = nullptr;     // (rows, dim), (rows,) if logvar_grad_per_row, or null (Gaussian and Laplace only)
  bool logvar_grad_per_row = false;  // grad_logvar holds each row's sum (logvar constant along the row: col_stride 0)
  double expected_upstream = 1.0;         // gradients are written multiplied by this (see ops/likelihood.py)
  int num_threads = 1;
};

// Categorical over the last dim: logits (rows, pixels, classes) contiguous,
// target (x_rows, pixels) int64 contiguous.
struct CategoricalArgs {
  int64_t rows = 0, x_rows = 0, pixels = 0, classes = 0;
  const void* logits = nullptr;
  const void* target = nullptr;    // (x_rows, pixels) class indices of target_dtype (uint8: 8-bit pixels)
  TargetDtype target_dtype = TargetDtype::kInt64;
  void* log_prob = nullptr;        // (rows,)
  void* grad_logits = nullptr;     // (rows, pixels, classes) or null
  double expected_upstream = 1.0;
  int num_threads = 1;
};

// Discretised logistic mixture (PixelCNN++): per row r and pixel p, log sum_m pi_m prod_c mass_cm.
// Parameters are read through (row, channel, mixture) element strides with pixels contiguous, so
// the slices of a packed decoder output need no copies; the gradients are written through their
// own strides (into separate tensors or into one packed gradient buffer).
struct DmolOperand {
  const void* ptr = nullptr;
  int64_t row_stride = 0, channel_stride = 0, mixture_stride = 0;
};
struct DmolGrad {
  void* ptr = nullptr;
  int64_t row_stride = 0, channel_stride = 0, mixture_stride = 0;
};

struct DmolArgs {
  int64_t rows = 0, x_rows = 0, channels = 1, mixtures = 1, pixels = 0;
  const void* x = nullptr;  // (x_rows, channels, pixels) contiguous, in [-1, 1]
  DmolOperand logit_probs, means, log_scales, coeffs;  // coeffs: 3 channels only, may be absent
  bool coeffs_tanh = false;   // coefficient = tanh(coeffs) (packed PixelCNN++ / NVAE output)
  double half_bin = 1.0 / 255.0;
  double log_scale_min = -7.0;
  void* log_prob = nullptr;  // (rows,)
  DmolGrad grad_logit_probs, grad_means, grad_log_scales, grad_coeffs;  // all null or all set (coeffs if given)
  double expected_upstream = 1.0;
  int num_threads = 1;
};

// Per-ISA entry points. Each returns the number of out-of-support x values seen
// (x outside [0, 1] for the Bernoulli family, target outside [0, classes), x outside
// [-1, 1] for the logistic mixture).
#define VF_DECLARE_ISA(isa)                                                        \
  namespace isa {                                                                  \
  void latent_forward_f32(const LatentArgs&);                                      \
  void latent_forward_f64(const LatentArgs&);                                      \
  void latent_backward_f32(const LatentArgs&);                                     \
  void latent_backward_f64(const LatentArgs&);                                     \
  int64_t elementwise_likelihood_f32(const ElementwiseLikelihoodArgs&);            \
  int64_t elementwise_likelihood_f64(const ElementwiseLikelihoodArgs&);            \
  int64_t categorical_f32(const CategoricalArgs&);                                 \
  int64_t categorical_f64(const CategoricalArgs&);                                 \
  int64_t dmol_f32(const DmolArgs&);                                               \
  int64_t dmol_f64(const DmolArgs&);                                               \
  }
VF_DECLARE_ISA(avx512)
VF_DECLARE_ISA(avx2)
VF_DECLARE_ISA(baseline)
#undef VF_DECLARE_ISA

}  // namespace vae_fast
