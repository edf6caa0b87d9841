// Python bindings for vae_fast._C.
//
// No libtorch: Python passes data pointers (as integers), sizes and element
// strides. Every entry point validates what it is given before any kernel
// touches memory, releases the GIL, and picks the widest instruction set the
// running CPU supports (each kernel file is compiled once per ISA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <new>
#include <stdexcept>
#include <cstdlib>
#include <string>

#include "buffer_pool.h"
#include "kernels.h"

namespace py = pybind11;
using namespace vae_fast;

#if defined(__GLIBC__)
// See glibc_compat.h: a hidden stand-in for glibc 2.32's __libc_single_threaded, always "no".
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
#endif
#if defined(__GLIBCXX__) && _GLIBCXX_RELEASE >= 11
// GCC >= 11 inlines std::exception_ptr's copy and destruction (pybind11's error handling uses
// them) as calls to _M_addref / _M_release, exported only since CXXABI_1.3.13 (GCC 11; manylinux_2_28
// has 1.3.11). Local definitions through the out-of-line copy constructor and destructor that every
// libstdc++ since GCC 4.4 exports (CXXABI_1.3.3) do the same reference counting: a copy that is
// never destroyed is one reference more; destroying a bitwise copy is one reference less.
extern "C" void vf_exception_ptr_copy(void* self, const void* other) __asm__("_ZNSt15__exception_ptr13exception_ptrC1ERKS0_");
extern "C" void vf_exception_ptr_destroy(void* self) __asm__("_ZNSt15__exception_ptr13exception_ptrD1Ev");
namespace std::__exception_ptr {
void exception_ptr::_M_addref() noexcept {
  void* extra_reference;
  vf_exception_ptr_copy(&extra_reference, this);
}
void exception_ptr::_M_release() noexcept {
  void* copy = *reinterpret_cast<void**>(this);
  vf_exception_ptr_destroy(&copy);
}
}  // namespace std::__exception_ptr
#endif
#if defined(__GLIBCXX__)
// GCC 12's <vector> calls std::__throw_bad_array_new_length (GLIBCXX_3.4.29, GCC 11); a hidden
// local definition keeps the extension within GLIBCXX_3.4.24 (manylinux_2_28's libstdc++).
namespace std {
[[noreturn]] __attribute__((visibility("hidden"))) void __throw_bad_array_new_length() { throw bad_array_new_length(); }
}  // namespace std
#endif

namespace {

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}

// VAE_FAST_ISA=avx2 / baseline selects a lower instruction set than the CPU's best (tests run each kernel
// build; measurements compare them); a name the CPU cannot run, or an unknown one, keeps the detected one.
Isa requested_isa(Isa detected) {
  const char* name = std::getenv("VAE_FAST_ISA");
  if (name == nullptr) return detected;
  const std::string requested(name);
  if (requested == "baseline") return Isa::kBaseline;
  if (requested == "avx2" && detected != Isa::kBaseline) return Isa::kAvx2;
  return detected;
}

Isa active_isa() {
  static const Isa isa = requested_isa(detect_isa());
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// Calls isa::NAME_f32 / isa::NAME_f64 for the running CPU and dtype code (0 = float32, 1 = float64).
#define VF_DISPATCH(NAME, dtype, args)                                                    \
  [&]() {                                                                                 \
    switch (active_isa()) {                                                               \
      case Isa::kAvx512: return dtype == 0 ? avx512::NAME##_f32(args) : avx512::NAME##_f64(args); \
      case Isa::kAvx2: return dtype == 0 ? avx2::NAME##_f32(args) : avx2::NAME##_f64(args);       \
      default: return dtype == 0 ? baseline::NAME##_f32(args) : baseline::NAME##_f64(args);       \
    }                                                                                     \
  }()

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("vae_fast._C: " + what); }

// A check whose message is built only when it fails: passing a std::string to a function would
// construct it (a heap allocation, most with concatenations) on every check of every call.
#define VF_REQUIRE(ok, what) \
  do {                       \
    if (!(ok)) fail(what);   \
  } while (0)

// Elements a (rows x cols) operand read through (row_stride, col_stride) touches: the
// largest index + 1.
int64_t extent(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  if (rows == 0 || cols == 0) return 0;
  return (rows - 1) * row_stride + (cols - 1) * col_stride + 1;
}

// Defence in depth: each pointer arrives with the number of elements its buffer holds from
// that address on (Python reads it off the tensor's storage); no kernel touches more.
// (initializer lists: no heap allocation per call)
void check_extents(std::initializer_list<const char*> names, std::initializer_list<uintptr_t> ptrs,
                   std::initializer_list<int64_t> needed, const std::vector<int64_t>& available) {
  VF_REQUIRE(available.size() == names.size(), "expected " + std::to_string(names.size()) + " buffer extents, got " +
                                                std::to_string(available.size()));
  for (size_t i = 0; i < names.size(); ++i) {
    if (ptrs.begin()[i] == 0) continue;
    VF_REQUIRE(available[i] >= needed.begin()[i], std::string(names.begin()[i]) + " holds " + std::to_string(available[i]) +
                                           " elements but the kernel would touch " + std::to_string(needed.begin()[i]));
  }
}

const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* as_mut_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void check_dtype(int dtype) { VF_REQUIRE(dtype == 0 || dtype == 1, "dtype code must be 0 (float32) or 1 (float64)"); }

void check_threads(int n) { VF_REQUIRE(n >= 1 && n <= 4096, "num_threads must be in [1, 4096]"); }

void check_expected_upstream(double s) { VF_REQUIRE(std::isfinite(s) && s != 0, "expected_upstream must be finite and non-zero"); }

Strided2D strided(uintptr_t ptr, int64_t row_stride, int64_t col_stride, const char* name) {
  VF_REQUIRE(row_stride >= 0 && col_stride >= 0, std::string(name) + " strides must be non-negative");
  return Strided2D{as_ptr(ptr), row_stride, col_stride};
}

LatentArgs latent_args(int dtype, int param, int64_t batch, int64_t dim, int64_t samples, uintptr_t mu,
                       int64_t mu_rs, uintptr_t scale, int64_t scale_rs, uintptr_t prior_mu, int64_t pm_rs, int64_t pm_cs,
                       uintptr_t prior_logvar, int64_t plv_rs, int64_t plv_cs, uintptr_t eps,
                       uint64_t seed, uint64_t offset, int num_threads) {
  check_dtype(dtype);
  check_threads(num_threads);
  VF_REQUIRE(param >= 0 && param <= 2, "param code must be 0 (logvar), 1 (logstd) or 2 (softplus)");
  VF_REQUIRE(batch >= 0 && dim >= 0 && samples >= 0, "need batch >= 0, dim >= 0, samples >= 0");
  const bool empty = batch == 0 || dim == 0;
  VF_REQUIRE(empty || (mu != 0 && scale != 0), "mu and scale must be non-null");
  VF_REQUIRE((prior_mu == 0) == (prior_logvar == 0), "prior_mu and prior_logvar must be given together");
  VF_REQUIRE(mu_rs >= 0 && scale_rs >= 0, "mu and scale row strides must be non-negative");
  LatentArgs a;
  a.batch = batch;
  a.dim = dim;
  a.samples = samples;
  a.param = static_cast<ScaleParam>(param);
  a.mu = as_ptr(mu);
  a.scale = as_ptr(scale);
  a.mu_row_stride = mu_rs;
  a.scale_row_stride = scale_rs;
  a.prior_mu = strided(prior_mu, pm_rs, pm_cs, "prior_mu");
  a.prior_logvar = strided(prior_logvar, plv_rs, plv_cs, "prior_logvar");
  a.eps = as_ptr(eps);
  a.seed = seed;
  a.offset = offset;
  a.num_threads = num_threads;
  return a;
}

void latent_forward(int dtype, int param, int64_t batch, int64_t dim, int64_t samples, uintptr_t mu,
                    int64_t mu_rs, uintptr_t scale, int64_t scale_rs, uintptr_t prior_mu, int64_t pm_rs, int64_t pm_cs, uintptr_t prior_logvar,
                    int64_t plv_rs, int64_t plv_cs, uintptr_t eps, uint64_t seed, uint64_t offset,
                    uintptr_t z, uintptr_t kl, uintptr_t kl_per_dim, uintptr_t log_ratio, int num_threads,
                    const std::vector<int64_t>& extents) {
  LatentArgs a = latent_args(dtype, param, batch, dim, samples, mu, mu_rs, scale, scale_rs, prior_mu, pm_rs, pm_cs,
                             prior_logvar, plv_rs, plv_cs, eps, seed, offset, num_threads);
  const int64_t n = batch * dim;
  check_extents({"mu", "scale", "prior_mu", "prior_logvar", "eps", "z", "kl", "kl_per_dim", "log_ratio"},
                {mu, scale, prior_mu, prior_logvar, eps, z, kl, kl_per_dim, log_ratio},
                {extent(batch, dim, mu_rs, 1), extent(batch, dim, scale_rs, 1), extent(batch, dim, pm_rs, pm_cs), extent(batch, dim, plv_rs, plv_cs), samples * n, samples * n,
                 batch, n, samples * batch},
                extents);
  VF_REQUIRE(batch == 0 || kl != 0, "kl output must be non-null");
  VF_REQUIRE(batch == 0 || dim == 0 || samples == 0 || z != 0, "z output must be non-null");
  a.z = as_mut_ptr(z);
  a.kl = as_mut_ptr(kl);
  a.kl_per_dim = as_mut_ptr(kl_per_dim);
  a.log_ratio = as_mut_ptr(log_ratio);
  py::gil_scoped_release no_gil;
  VF_DISPATCH(latent_forward, dtype, a);
}

void latent_backward(int dtype, int param, int64_t batch, int64_t dim, int64_t samples, uintptr_t mu,
                     int64_t mu_rs, uintptr_t scale, int64_t scale_rs, uintptr_t prior_mu, int64_t pm_rs, int64_t pm_cs,
                     uintptr_t prior_logvar, int64_t plv_rs, int64_t plv_cs, uintptr_t eps, uint64_t seed,
                     uint64_t offset, uintptr_t grad_z, uintptr_t grad_kl, uintptr_t grad_kl_per_dim,
                     uintptr_t grad_mu, uintptr_t grad_scale, uintptr_t grad_prior_mu,
                     uintptr_t grad_prior_logvar, int num_threads, const std::vector<int64_t>& extents) {
  LatentArgs a = latent_args(dtype, param, batch, dim, samples, mu, mu_rs, scale, scale_rs, prior_mu, pm_rs, pm_cs,
                             prior_logvar, plv_rs, plv_cs, eps, seed, offset, num_threads);
  const int64_t n = batch * dim;
  check_extents({"mu", "scale", "prior_mu", "prior_logvar", "eps", "grad_z", "grad_kl", "grad_kl_per_dim", "grad_mu",
                 "grad_scale", "grad_prior_mu", "grad_prior_logvar"},
                {mu, scale, prior_mu, prior_logvar, eps, grad_z, grad_kl, grad_kl_per_dim, grad_mu, grad_scale,
                 grad_prior_mu, grad_prior_logvar},
                {extent(batch, dim, mu_rs, 1), extent(batch, dim, scale_rs, 1), extent(batch, dim, pm_rs, pm_cs), extent(batch, dim, plv_rs, plv_cs), samples * n, samples * n,
                 batch, n, n, n, n, n},
                extents);
  VF_REQUIRE(batch == 0 || dim == 0 || (grad_mu != 0 && grad_scale != 0), "grad_mu and grad_scale must be non-null");
  VF_REQUIRE(prior_mu != 0 || (grad_prior_mu == 0 && grad_prior_logvar == 0), "prior gradients need a prior");
  a.grad_z = as_ptr(grad_z);
  a.grad_kl = as_ptr(grad_kl);
  a.grad_kl_per_dim = as_ptr(grad_kl_per_dim);
  a.grad_mu = as_mut_ptr(grad_mu);
  a.grad_scale = as_mut_ptr(grad_scale);
  a.grad_prior_mu = as_mut_ptr(grad_prior_mu);
  a.grad_prior_logvar = as_mut_ptr(grad_prior_logvar);
  py::gil_scoped_release no_gil;
  VF_DISPATCH(latent_backward, dtype, a);
}

// the likelihoods with a scale operand (log-variance / log-scale)
bool has_scale_operand(int likelihood) {
  return likelihood == static_cast<int>(Likelihood::kGaussian) || likelihood == static_cast<int>(Likelihood::kLaplace);
}

int64_t elementwise_likelihood(int dtype, int likelihood, int64_t rows, int64_t x_rows, int64_t dim,
                               uintptr_t theta, uintptr_t x, uintptr_t logvar, int64_t lv_rs, int64_t lv_cs,
                               uintptr_t log_prob, uintptr_t grad_theta, uintptr_t grad_logvar, bool logvar_grad_per_row,
                               double expected_upstream, int num_threads, const std::vector<int64_t>& extents) {
  check_expected_upstream(expected_upstream);
  check_dtype(dtype);
  check_threads(num_threads);
  VF_REQUIRE(likelihood >= 0 && likelihood <= 4, "likelihood code must be 0, 1, 2, 3 or 4");
  VF_REQUIRE(rows >= 0 && dim >= 0 && x_rows >= 0, "sizes must be non-negative");
  VF_REQUIRE(rows == 0 || (x_rows > 0 && rows % x_rows == 0), "rows must be a multiple of x_rows");
  const bool empty = rows == 0 || dim == 0;
  VF_REQUIRE(rows == 0 || log_prob != 0, "log_prob output must be non-null");
  VF_REQUIRE(empty || (theta != 0 && x != 0), "theta and x must be non-null");
  const bool has_scale = has_scale_operand(likelihood);
  VF_REQUIRE(!has_scale || empty || logvar != 0, "the Gaussian and Laplace likelihoods need logvar (their log-scale)");
  VF_REQUIRE(has_scale || grad_logvar == 0, "grad_logvar is only for the Gaussian and Laplace likelihoods");
  VF_REQUIRE(!logvar_grad_per_row || lv_cs == 0,
             "logvar_grad_per_row needs a logvar constant along each row (column stride 0)");
  check_extents({"theta", "x", "logvar", "log_prob", "grad_theta", "grad_logvar"},
                {theta, x, logvar, log_prob, grad_theta, grad_logvar},
                {rows * dim, x_rows * dim, extent(rows, dim, lv_rs, lv_cs), rows, rows * dim,
                 logvar_grad_per_row ? rows : rows * dim},
                extents);
  ElementwiseLikelihoodArgs a;
  a.rows = rows;
  a.x_rows = x_rows;
  a.dim = dim;
  a.likelihood = static_cast<Likelihood>(likelihood);
  a.theta = as_ptr(theta);
  a.x = as_ptr(x);
  a.logvar = strided(logvar, lv_rs, lv_cs, "logvar");
  a.log_prob = as_mut_ptr(log_prob);
  a.grad_theta = as_mut_ptr(grad_theta);
  a.grad_logvar = as_mut_ptr(grad_logvar);
  a.logvar_grad_per_row = logvar_grad_per_row;
  a.expected_upstream = expected_upstream;
  a.num_threads = num_threads;
  py::gil_scoped_release no_gil;
  return VF_DISPATCH(elementwise_likelihood, dtype, a);
}

// The per-step calls (kernels/cpu.py: latent_step_forward, ...): the shapes a training step sends every
// iteration (no prior, no explicit noise, no log-variance operand, one sample row per x row), with fewer
// arguments to convert (about 30 ns each). They run the general entry points above, checks included.

void latent_step_forward(int dtype, int param, int64_t batch, int64_t dim, int64_t samples, uintptr_t mu, int64_t mu_rs,
                         int64_t mu_extent, uintptr_t scale, int64_t scale_rs, int64_t scale_extent, uint64_t seed,
                         uintptr_t z, uintptr_t kl, uintptr_t kl_per_dim, int num_threads) {
  const int64_t n = batch * dim;
  latent_forward(dtype, param, batch, dim, samples, mu, mu_rs, scale, scale_rs, 0, 0, 0, 0, 0, 0, 0, seed, 0, z, kl,
                 kl_per_dim, 0, num_threads, {mu_extent, scale_extent, 0, 0, 0, samples * n, batch, kl_per_dim ? n : 0, 0});
}

void latent_step_backward(int dtype, int param, int64_t batch, int64_t dim, int64_t samples, uintptr_t mu,
                          int64_t mu_rs, int64_t mu_extent, uintptr_t scale, int64_t scale_rs, int64_t scale_extent,
                          uint64_t seed, uintptr_t grad_z, int64_t grad_z_extent, uintptr_t grad_kl, int64_t grad_kl_extent,
                          uintptr_t grad_kl_per_dim, int64_t grad_kl_per_dim_extent, uintptr_t grad_mu,
                          uintptr_t grad_scale, int num_threads) {
  const int64_t n = batch * dim;
  latent_backward(dtype, param, batch, dim, samples, mu, mu_rs, scale, scale_rs, 0, 0, 0, 0, 0, 0, 0, seed, 0, grad_z,
                  grad_kl, grad_kl_per_dim, grad_mu, grad_scale, 0, 0, num_threads,
                  {mu_extent, scale_extent, 0, 0, 0, grad_z_extent, grad_kl_extent, grad_kl_per_dim_extent, n, n, 0, 0});
}

// scale: 0, or the address of one value (a scalar log-variance / log-scale, read with strides 0);
// fixed_scale: the Gaussian's / Laplace's log-variance / log-scale when scale is 0 (a fixed one given as a number:
// no tensor to make for it), rounded to the kernel's dtype as a tensor of it would be; ignored otherwise;
// grad_scale: 0, or (rows,) for each row's d log p / d scale (a learned scalar: backward sums them)
int64_t elementwise_step(int dtype, int likelihood, int64_t rows, int64_t dim, uintptr_t theta, int64_t theta_extent,
                         uintptr_t x, int64_t x_extent, uintptr_t scale, double fixed_scale, uintptr_t log_prob,
                         uintptr_t grad_theta, uintptr_t grad_scale, double expected_upstream, int num_threads) {
  const float fixed_scale_f32 = static_cast<float>(fixed_scale);
  if (scale == 0 && has_scale_operand(likelihood)) {
    VF_REQUIRE(grad_scale == 0, "grad_scale needs a scale operand (a fixed scale has no gradient)");
    scale = dtype == 0 ? reinterpret_cast<uintptr_t>(&fixed_scale_f32) : reinterpret_cast<uintptr_t>(&fixed_scale);
  }
  return elementwise_likelihood(dtype, likelihood, rows, rows, dim, theta, x, scale, 0, 0, log_prob, grad_theta,
                                grad_scale, grad_scale != 0, expected_upstream, num_threads,
                                {theta_extent, x_extent, scale ? 1 : 0, rows, grad_theta ? rows * dim : 0,
                                 grad_scale ? rows : 0});
}

// target_code: the class indices' dtype, a TargetDtype (vae_fast/ops/codes.py)
int64_t categorical(int dtype, int64_t rows, int64_t x_rows, int64_t pixels, int64_t classes, uintptr_t logits,
                    uintptr_t target, int target_code, uintptr_t log_prob, uintptr_t grad_logits,
                    double expected_upstream, int num_threads, const std::vector<int64_t>& extents) {
  check_expected_upstream(expected_upstream);
  VF_REQUIRE(target_code == static_cast<int>(TargetDtype::kInt64) || target_code == static_cast<int>(TargetDtype::kUint8),
             "target_code must be 0 (int64) or 1 (uint8)");
  check_dtype(dtype);
  check_threads(num_threads);
  VF_REQUIRE(rows >= 0 && x_rows >= 0 && pixels >= 0 && classes >= 1, "need non-negative sizes and classes >= 1");
  VF_REQUIRE(rows == 0 || (x_rows > 0 && rows % x_rows == 0), "rows must be a multiple of x_rows");
  VF_REQUIRE(rows == 0 || log_prob != 0, "log_prob output must be non-null");
  VF_REQUIRE(rows == 0 || pixels == 0 || (logits != 0 && target != 0), "logits and target must be non-null");
  check_extents({"logits", "target", "log_prob", "grad_logits"}, {logits, target, log_prob, grad_logits},
                {rows * pixels * classes, x_rows * pixels, rows, rows * pixels * classes}, extents);
  CategoricalArgs a;
  a.rows = rows;
  a.x_rows = x_rows;
  a.pixels = pixels;
  a.classes = classes;
  a.logits = as_ptr(logits);
  a.target = as_ptr(target);
  a.target_dtype = static_cast<TargetDtype>(target_code);
  a.log_prob = as_mut_ptr(log_prob);
  a.grad_logits = as_mut_ptr(grad_logits);
  a.expected_upstream = expected_upstream;
  a.num_threads = num_threads;
  py::gil_scoped_release no_gil;
  return VF_DISPATCH(categorical, dtype, a);
}

// One DMOL operand: (pointer, row stride, channel stride, mixture stride) in elements; pixels contiguous.
using DmolView = std::array<int64_t, 4>;

int64_t dmol_extent(const DmolView& v, int64_t rows, int64_t channels, int64_t mixtures, int64_t pixels) {
  if (rows == 0 || channels == 0 || mixtures == 0 || pixels == 0) return 0;
  return (rows - 1) * v[1] + (channels - 1) * v[2] + (mixtures - 1) * v[3] + pixels;
}

template <typename Operand>
Operand dmol_operand(const DmolView& v, const char* name) {
  VF_REQUIRE(v[1] >= 0 && v[2] >= 0 && v[3] >= 0, std::string(name) + " strides must be non-negative");
  Operand o;
  o.ptr = reinterpret_cast<decltype(o.ptr)>(static_cast<uintptr_t>(v[0]));
  o.row_stride = v[1];
  o.channel_stride = v[2];
  o.mixture_stride = v[3];
  return o;
}

int64_t dmol(int dtype, int64_t rows, int64_t x_rows, int64_t channels, int64_t mixtures, int64_t pixels,
             uintptr_t x, const DmolView& logit_probs, const DmolView& means, const DmolView& log_scales,
             const DmolView& coeffs, bool coeffs_tanh, double half_bin, double log_scale_min, uintptr_t log_prob,
             const DmolView& grad_logit_probs, const DmolView& grad_means, const DmolView& grad_log_scales,
             const DmolView& grad_coeffs, double expected_upstream, int num_threads, const std::vector<int64_t>& extents) {
  check_expected_upstream(expected_upstream);
  check_dtype(dtype);
  check_threads(num_threads);
  VF_REQUIRE(rows >= 0 && x_rows >= 0 && pixels >= 0 && channels >= 1 && mixtures >= 1,
          "need rows, x_rows, pixels >= 0 and channels, mixtures >= 1");
  VF_REQUIRE(rows == 0 || (x_rows > 0 && rows % x_rows == 0), "rows must be a multiple of x_rows");
  VF_REQUIRE(half_bin > 0 && half_bin <= 1, "half_bin must be in (0, 1]");
  VF_REQUIRE(!std::isnan(log_scale_min), "log_scale_min must not be NaN");
  const bool has_coeffs = coeffs[0] != 0;
  VF_REQUIRE(!has_coeffs || channels == 3, "coeffs need exactly 3 channels");
  const bool want_grad = grad_means[0] != 0;
  VF_REQUIRE(want_grad == (grad_logit_probs[0] != 0) && want_grad == (grad_log_scales[0] != 0) &&
              (!has_coeffs || want_grad == (grad_coeffs[0] != 0)),
          "gradient outputs must be all given or all absent");
  VF_REQUIRE(has_coeffs || grad_coeffs[0] == 0, "grad_coeffs needs coeffs");
  const bool empty = rows == 0 || pixels == 0;
  VF_REQUIRE(rows == 0 || log_prob != 0, "log_prob output must be non-null");
  VF_REQUIRE(empty || (x != 0 && logit_probs[0] != 0 && means[0] != 0 && log_scales[0] != 0),
          "x, logit_probs, means and log_scales must be non-null");
  DmolArgs a;
  a.logit_probs = dmol_operand<DmolOperand>(logit_probs, "logit_probs");
  a.means = dmol_operand<DmolOperand>(means, "means");
  a.log_scales = dmol_operand<DmolOperand>(log_scales, "log_scales");
  a.coeffs = dmol_operand<DmolOperand>(coeffs, "coeffs");
  a.grad_logit_probs = dmol_operand<DmolGrad>(grad_logit_probs, "grad_logit_probs");
  a.grad_means = dmol_operand<DmolGrad>(grad_means, "grad_means");
  a.grad_log_scales = dmol_operand<DmolGrad>(grad_log_scales, "grad_log_scales");
  a.grad_coeffs = dmol_operand<DmolGrad>(grad_coeffs, "grad_coeffs");
  const auto per_channel = [&](const DmolView& v) { return dmol_extent(v, rows, channels, mixtures, pixels); };
  const auto shared = [&](const DmolView& v) { return dmol_extent(v, rows, 1, mixtures, pixels); };
  check_extents({"x", "logit_probs", "means", "log_scales", "coeffs", "log_prob", "grad_logit_probs", "grad_means",
                 "grad_log_scales", "grad_coeffs"},
                {x, uintptr_t(logit_probs[0]), uintptr_t(means[0]), uintptr_t(log_scales[0]), uintptr_t(coeffs[0]),
                 log_prob, uintptr_t(grad_logit_probs[0]), uintptr_t(grad_means[0]), uintptr_t(grad_log_scales[0]),
                 uintptr_t(grad_coeffs[0])},
                {x_rows * channels * pixels, shared(logit_probs), per_channel(means), per_channel(log_scales),
                 per_channel(coeffs), rows, shared(grad_logit_probs), per_channel(grad_means),
                 per_channel(grad_log_scales), per_channel(grad_coeffs)},
                extents);
  a.rows = rows;
  a.x_rows = x_rows;
  a.channels = channels;
  a.mixtures = mixtures;
  a.pixels = pixels;
  a.x = as_ptr(x);
  a.coeffs_tanh = coeffs_tanh;
  a.half_bin = half_bin;
  a.log_scale_min = log_scale_min;
  a.log_prob = as_mut_ptr(log_prob);
  a.expected_upstream = expected_upstream;
  a.num_threads = num_threads;
  py::gil_scoped_release no_gil;
  return VF_DISPATCH(dmol, dtype, a);
}

// The per-step calls of the heads: contiguous operands whose extents are their sizes (numel), one sample row
// per x row. They run the general entry points above, checks included.

// logits (rows, pixels, classes), target (rows, pixels) int64 or uint8 (target_code)
int64_t categorical_step(int dtype, int64_t rows, int64_t pixels, int64_t classes, uintptr_t logits,
                         int64_t logits_extent, uintptr_t target, int target_code, int64_t target_extent,
                         uintptr_t log_prob, uintptr_t grad_logits, double expected_upstream, int num_threads) {
  return categorical(dtype, rows, rows, pixels, classes, logits, target, target_code, log_prob, grad_logits,
                     expected_upstream, num_threads, {logits_extent, target_extent, rows, grad_logits ? logits_extent : 0});
}

// The packed PixelCNN++ / NVAE layout (ops/dmol.py packed_views): params (rows, M + C * per_channel, pixels)
// with per_channel = 3M for C = 3 (M means, M log-scales, M raw coefficients) and 2M otherwise; grad_params
// (0 or the same layout) receives the gradient.
int64_t dmol_packed_step(int dtype, int64_t rows, int64_t channels, int64_t mixtures, int64_t pixels, uintptr_t x,
                         int64_t x_extent, uintptr_t params, int64_t params_extent, double half_bin,
                         double log_scale_min, uintptr_t log_prob, uintptr_t grad_params, double expected_upstream,
                         int num_threads) {
  check_dtype(dtype);
  VF_REQUIRE(rows >= 0 && pixels >= 0 && channels >= 1 && mixtures >= 1,
             "need rows, pixels >= 0 and channels, mixtures >= 1");
  const int64_t element = dtype == 0 ? 4 : 8;
  const int64_t per_channel = (channels == 3 ? 3 : 2) * mixtures;
  const int64_t row = (mixtures + channels * per_channel) * pixels;
  // (pointer, row, channel, mixture strides) of each operand inside a packed buffer at `base`
  const auto view = [&](uintptr_t base, int64_t offset, int64_t channel_stride) -> DmolView {
    return {base == 0 ? 0 : static_cast<int64_t>(base + offset * element), row, channel_stride, pixels};
  };
  const auto views = [&](uintptr_t base) {
    const int64_t means = mixtures * pixels;
    return std::array<DmolView, 4>{view(base, 0, 0), view(base, means, per_channel * pixels),
                                   view(base, means + mixtures * pixels, per_channel * pixels),
                                   channels == 3 ? view(base, means + 2 * mixtures * pixels, per_channel * pixels)
                                                 : DmolView{0, 0, 0, 0}};
  };
  const auto operands = views(params), grads = views(grad_params);
  // every operand lies within params (and every gradient within grad_params): their extents are the buffers'
  // sizes from each view's start
  const auto within = [&](const DmolView& v, uintptr_t base, int64_t extent) {
    return v[0] == 0 ? int64_t(0) : extent - (static_cast<int64_t>(v[0]) - static_cast<int64_t>(base)) / element;
  };
  std::vector<int64_t> extents{x_extent};
  for (const auto& v : operands) extents.push_back(within(v, params, params_extent));
  extents.push_back(rows);
  for (const auto& v : grads) extents.push_back(within(v, grad_params, params_extent));
  return dmol(dtype, rows, rows, channels, mixtures, pixels, x, operands[0], operands[1], operands[2], operands[3],
              /*coeffs_tanh=*/true, half_bin, log_scale_min, log_prob, grads[0], grads[1], grads[2], grads[3],
              expected_upstream, num_threads, extents);
}

// Whether all n values at ptr (element stride `stride`, float32 or float64) lie in [low, high]; false
// for a NaN. The likelihoods' backward asks it of its upstream gradient (the expected one lets it
// return the gradient saved in forward as is): one call instead of a reduction and two host reads.
template <typename T>
bool all_in_range(const T* values, int64_t n, int64_t stride, double low, double high) {
  bool inside = true;
  for (int64_t i = 0; i < n; ++i) {
    const double v = double(values[i * stride]);
    inside &= (v >= low) & (v <= high);
  }
  return inside;
}

bool values_within(int dtype, uintptr_t ptr, int64_t n, int64_t stride, double low, double high, int64_t extent) {
  check_dtype(dtype);
  VF_REQUIRE(n >= 0 && stride >= 0, "need n >= 0 and stride >= 0");
  if (n == 0) return true;
  VF_REQUIRE(ptr != 0, "values must be non-null");
  VF_REQUIRE(extent >= (n - 1) * stride + 1, "values hold " + std::to_string(extent) +
                                                 " elements but the check would read " + std::to_string((n - 1) * stride + 1));
  return dtype == 0 ? all_in_range(static_cast<const float*>(as_ptr(ptr)), n, stride, low, high)
                    : all_in_range(static_cast<const double*>(as_ptr(ptr)), n, stride, low, high);
}

// A float tensor of `shape` on a pooled buffer, as a DLPack capsule for torch.from_dlpack. A
// capsule that is never consumed still returns its buffer (the DLPack capsule protocol: the
// consumer renames it "used_dltensor" and takes over the deleter).
py::object pooled_tensor(int dtype, const std::vector<int64_t>& shape) {
  DLManagedTensor* managed = pooled_dlpack_tensor(dtype, shape.data(), int32_t(shape.size()));
  PyObject* capsule = PyCapsule_New(managed, "dltensor", [](PyObject* self) {
    if (PyCapsule_IsValid(self, "dltensor")) {
      auto* unconsumed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(self, "dltensor"));
      unconsumed->deleter(unconsumed);
    }
  });
  if (capsule == nullptr) {
    managed->deleter(managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vae_fast CPU kernels (pointer-based; no libtorch dependency)";
  m.def("isa", []() { return std::string(isa_name(active_isa())); },
        "Instruction set the kernels were dispatched to on this CPU.");
  m.def("latent_forward", &latent_forward);
  m.def("latent_backward", &latent_backward);
  m.def("elementwise_likelihood", &elementwise_likelihood);
  m.def("latent_step_forward", &latent_step_forward);
  m.def("latent_step_backward", &latent_step_backward);
  m.def("elementwise_step", &elementwise_step);
  m.def("categorical", &categorical);
  m.def("dmol", &dmol);
  m.def("categorical_step", &categorical_step);
  m.def("dmol_packed_step", &dmol_packed_step);
  m.def("values_within", &values_within, "Whether n strided float32 (0) / float64 (1) values all lie in [low, high]");
  m.def("pooled_tensor", &pooled_tensor, "DLPack capsule of a float32 (0) / float64 (1) tensor on a pooled buffer");
  m.def("buffer_cache_bytes", []() { return BufferPool::instance().cached_bytes(); });
  m.def("buffer_cache_limit", []() { return BufferPool::instance().limit(); });
  m.def("set_buffer_cache_limit", [](size_t bytes) { BufferPool::instance().set_limit(bytes); });
  m.def("release_buffer_cache", []() { BufferPool::instance().trim(); });
}
