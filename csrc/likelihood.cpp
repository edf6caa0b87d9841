// Fused reconstruction log-likelihood kernels with the gradient computed in the
// same pass (the Liger-Kernel cross-entropy technique): one read of (theta, x)
// gives the per-row log-likelihood and d log p / d theta, so backward is a scale.
// Gradients are written multiplied by expected_upstream, the upstream gradient the caller expects
// (e.g. -1/B under a mean loss): when it arrives, backward has nothing left to do.
//
// Per element (l = logit, t = exp(-|l|), sigmoid and softplus both from t):
//   Bernoulli:             log p = x l - softplus(l),            d/dl = x - sigmoid(l)
//   continuous Bernoulli:  log p = x l - softplus(l) + log C(l), d/dl = x - sigmoid(l) + (log C)'(l)
//       C(l) = l / tanh(l/2) (Loaiza-Ganem & Cunningham 2019, written in logits; even in l)
//   Gaussian:              log p = -1/2 ((x - m)^2 e^-lv + lv + log 2 pi)
//       d/dm = (x - m) e^-lv,   d/dlv = 1/2 ((x - m)^2 e^-lv - 1)
//   mean squared error:    log p = -1/D (x - m)^2 per element (a row sums to minus its MSE),  d/dm = 2/D (x - m)
//   Laplace (s = log b):   log p = -|x - m| e^-s - s - log 2
//       d/dm = sign(x - m) e^-s (0 at x = m, as torch.abs),   d/ds = |x - m| e^-s - 1
//   (x - m)^2 e^-lv and |x - m| e^-s map 0 * inf to 0: an exact fit under a collapsed scale adds nothing)
//   Categorical:           log p = l_x - logsumexp(l),           d/dl_c = [c == x] - softmax(l)_c
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vf_math.h"

namespace vae_fast {
namespace VF_ISA {
namespace {

constexpr int64_t kChunk = 512;
constexpr int64_t kParallelGrain = 32768;
// Work items are blocks of a row of about this many elements: a few long rows (a fused head's chunk holds one
// example; a small batch of large images) still spread over every thread. The blocking does not depend on the
// thread count: a row's sums are its blocks' partial sums added in order, the same on any number of threads; a
// row of one block (up to 16 chunks here: every MNIST / CIFAR-sized example) is summed exactly as a whole row.
constexpr int64_t kBlockElements = 16 * kChunk;

// A row's blocks (of row elements for the elementwise kernels, of pixels for the categorical one): work item i is
// block i % per_row of row i / per_row, covering [begin(i), end(i)); with more than one block a row, each item's
// sums go to partial buffers, which row_total (vf_math.h) adds up in order.
struct RowBlocks {
  int64_t length, size, per_row;
  RowBlocks(int64_t length, int64_t block) : length(length), size(std::max<int64_t>(block, 1)),
                                             per_row(length > 0 ? (length + size - 1) / size : 1) {}
  int64_t row(int64_t item) const { return item / per_row; }
  int64_t begin(int64_t item) const { return (item % per_row) * size; }
  int64_t end(int64_t item) const { return std::min(length, begin(item) + size); }
};

// log C(l) - log 2 = sum_n c_n l^(2n), c_n = 2 (2^(2n-1) - 1) B_2n / (2n (2n)!)
// (B_2n Bernoulli numbers; from 1/x - 2/sinh 2x = d/dx log(x coth x), x = l/2).
// Used for |l| < 1, where the closed form cancels; 8 terms reach fp32 rounding
// there and 16 terms fp64 rounding (the terms shrink like pi^-2n).
constexpr double kLogCSeries[16] = {
    8.33333333333333333333e-2,
    -4.86111111111111111111e-3,
    3.41710758377425044092e-4,
    -2.62483465608465608466e-5,
    2.13360456416011971568e-6,
    -1.80278953564888309156e-7,
    1.56594795318340291885e-8,
    -1.38837067837002590997e-9,
    1.25042637753154818318e-10,
    -1.14025538536091058523e-11,
    1.05029189004531669891e-12,
    -9.75487667872164449863e-14,
    9.12346795895855629582e-15,
    -8.58371969794191344226e-16,
    8.11731799460810656146e-17,
    -7.71052751052577917755e-18,
};

template <typename T>
inline void continuous_bernoulli_log_norm(T l, T t, T& log_c, T& dlog_c) {
  constexpr int kTerms = sizeof(T) == 4 ? 8 : 16;
  const T a = std::fabs(l);
  const T u = l * l;
  T series = T(kLogCSeries[kTerms - 1]);
  T dseries = T(kTerms) * T(kLogCSeries[kTerms - 1]);
  for (int n = kTerms - 2; n >= 0; --n) {
    series = series * u + T(kLogCSeries[n]);
    dseries = dseries * u + T(n + 1) * T(kLogCSeries[n]);
  }
  // Closed form for |l| >= 1 (t = exp(-|l|) <= 1/e): log|l| - log tanh(|l|/2)
  // = log(|l| (1 + t) / (1 - t)). Inputs with |l| < 1 take the series, so
  // the closed form is fed a harmless stand-in there instead of 0/0.
  const bool use_series = a < T(1);
  const T a_c = use_series ? T(1) : a;
  const T t_c = use_series ? T(0.5) : t;
  // one log and, with 1/(1 - t^2) shared by both forms below, two divisions
  const T inv_1mt2 = T(1) / (T(1) - t_c * t_c);
  const T closed = vlog(a_c * ((T(1) + t_c) * (T(1) + t_c) * inv_1mt2));  // the factor (1+t)/(1-t) is in (1, 2.2]
  // d/dl = sign(l) (1/|l| - 1/sinh|l|),  1/sinh a = 2t / (1 - t^2)
  const T dclosed = std::copysign(T(1) / a_c - T(2) * t_c * inv_1mt2, l);
  log_c = use_series ? T(kLn2) + u * series : closed;
  dlog_c = use_series ? T(2) * l * dseries : dclosed;
}

template <Likelihood L>
constexpr bool kHasScale = L == Likelihood::kGaussian || L == Likelihood::kLaplace;

// How the Gaussian log-variance (Laplace log-scale) is read along a row: one value per row (scalar or
// per-example logvar: col_stride 0), a contiguous row, or any other stride (gathered).
enum class LogVarLayout { kRowConstant, kContiguous, kStrided };

// What is written of d log p / d logvar: nothing, every element's (times expected_upstream, as the
// theta gradient), or each row's sum (a logvar constant along the row: a learned scalar or per-example
// one, whose gradient is that sum; the (rows, dim) buffer and its reduction are skipped). The row sums are
// written unscaled: backward multiplies them by the upstream gradient it receives (B values: a dot
// product for a scalar logvar, cheaper than checking whether the upstream is the expected one).
enum class LogVarGrad { kNone, kPerElement, kPerRow };

template <typename T, Likelihood L, bool WANT_GRAD, LogVarGrad LV_GRAD, LogVarLayout LV>
int64_t elementwise_impl(const ElementwiseLikelihoodArgs& a) {
  static_assert(LV_GRAD != LogVarGrad::kPerRow || LV == LogVarLayout::kRowConstant,
                "a per-row logvar gradient needs a logvar constant along the row");
  const T* __restrict theta = static_cast<const T*>(a.theta);
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict log_prob = static_cast<T*>(a.log_prob);
  T* __restrict grad_theta = static_cast<T*>(a.grad_theta);
  T* __restrict grad_logvar = static_cast<T*>(a.grad_logvar);
  const T* __restrict logvar = static_cast<const T*>(a.logvar.ptr);
  const int64_t D = a.dim;
  const T expected_upstream = T(a.expected_upstream);
  // the mean squared error's 1/D, applied once per row to the sum and folded into the gradient's factor
  const T grad_factor = L == Likelihood::kMeanSquaredError && D > 0 ? T(a.expected_upstream / double(D))
                                                                    : expected_upstream;
  const RowBlocks blocks(D, kBlockElements);
  const int64_t items = a.rows * blocks.per_row;
  const bool partial_sums = blocks.per_row > 1;
  std::vector<T> partial(partial_sums ? items : 0);
  std::vector<T> partial_lv(partial_sums && LV_GRAD == LogVarGrad::kPerRow ? items : 0);
  int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(a.num_threads) reduction(+ : bad) \
    if (a.rows * D > kParallelGrain)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = blocks.row(item), j_begin = blocks.begin(item), j_end = blocks.end(item);
    alignas(64) T lv_buf[kChunk];
    const T* __restrict th_row = theta + r * D;
    const T* __restrict x_row = x + (r % a.x_rows) * D;
    // for a row-constant logvar, e^-lv is computed once per row (an empty row reads nothing:
    // a zero-size logvar may have no storage at all)
    const bool read_row_lv = kHasScale<L> && LV == LogVarLayout::kRowConstant && D > 0;
    const T row_lv = read_row_lv ? logvar[r * a.logvar.row_stride] : T(0);
    const T row_inv_var = (kHasScale<L> && LV == LogVarLayout::kRowConstant) ? vexp(-row_lv) : T(1);
    T row_sum = T(0);
    T row_lv_grad = T(0);  // (kPerRow) sum over the row of d log p / d logvar, before the upstream factor
    int64_t row_bad = 0;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kChunk) {
      const int64_t n = std::min(kChunk, j_end - j0);
      const T* __restrict th = th_row + j0;
      const T* __restrict xs = x_row + j0;
      const T* __restrict lv = lv_buf;
      if constexpr (kHasScale<L> && LV != LogVarLayout::kRowConstant) {
        const T* lv_src = logvar + r * a.logvar.row_stride + j0 * a.logvar.col_stride;
        if constexpr (LV == LogVarLayout::kContiguous) {
          lv = lv_src;
        } else {
          for (int64_t i = 0; i < n; ++i) lv_buf[i] = lv_src[i * a.logvar.col_stride];
        }
      }
      T* __restrict g = grad_theta + r * D + j0;
      T* __restrict g_lv = grad_logvar + r * D + j0;
#pragma omp simd reduction(+ : row_sum, row_bad, row_lv_grad)
      for (int64_t i = 0; i < n; ++i) {
        const T xi = xs[i];
        const T ti = th[i];
        T value, grad;
        if constexpr (L == Likelihood::kGaussian) {
          const T lvi = LV == LogVarLayout::kRowConstant ? row_lv : lv[i];
          const T inv_var = LV == LogVarLayout::kRowConstant ? row_inv_var : vexp(-lvi);
          const T diff = xi - ti;
          const T sq = diff * diff;
          const T scaled_sq = sq == T(0) ? T(0) : sq * inv_var;
          value = T(-0.5) * (scaled_sq + lvi + T(kLog2Pi));
          grad = diff == T(0) ? T(0) : diff * inv_var;
          if constexpr (LV_GRAD == LogVarGrad::kPerElement) g_lv[i] = T(0.5) * (scaled_sq - T(1)) * expected_upstream;
          if constexpr (LV_GRAD == LogVarGrad::kPerRow) row_lv_grad += T(0.5) * (scaled_sq - T(1));
        } else if constexpr (L == Likelihood::kLaplace) {
          const T s_i = LV == LogVarLayout::kRowConstant ? row_lv : lv[i];
          const T inv_b = LV == LogVarLayout::kRowConstant ? row_inv_var : vexp(-s_i);
          const T diff = xi - ti;
          const T abs_diff = std::fabs(diff);
          const T scaled = abs_diff == T(0) ? T(0) : abs_diff * inv_b;
          value = -scaled - s_i - T(kLn2);
          grad = diff > T(0) ? inv_b : (diff < T(0) ? -inv_b : T(0));
          if constexpr (LV_GRAD == LogVarGrad::kPerElement) g_lv[i] = (scaled - T(1)) * expected_upstream;
          if constexpr (LV_GRAD == LogVarGrad::kPerRow) row_lv_grad += scaled - T(1);
        } else if constexpr (L == Likelihood::kMeanSquaredError) {
          // -(x - mean)^2 here, / D below: the Gaussian's quadratic without variance or normaliser ("MSE" losses)
          const T diff = xi - ti;
          value = -diff * diff;
          grad = T(2) * diff;
        } else {
          row_bad += (xi >= T(0) && xi <= T(1)) ? 0 : 1;  // x outside [0, 1], NaN included (a ValueError upstream)
          const T t = vexp(-std::fabs(ti));
          const T inv_one_plus_t = T(1) / (T(1) + t);
          const T softplus = (ti > T(0) ? ti : T(0)) + log1p_unit(t);
          const T sigmoid = ti >= T(0) ? inv_one_plus_t : t * inv_one_plus_t;
          value = xi * ti - softplus;
          grad = xi - sigmoid;
          if constexpr (L == Likelihood::kContinuousBernoulli) {
            T log_c, dlog_c;
            continuous_bernoulli_log_norm(ti, t, log_c, dlog_c);
            value += log_c;
            grad += dlog_c;
          }
        }
        row_sum += value;
        if constexpr (WANT_GRAD) g[i] = grad * grad_factor;
      }
    }
    // The other likelihoods' support is every number but NaN, and a NaN x makes its element's value, so the sum,
    // NaN: only such a sum sends the block's x through a NaN count (no test per element on the usual path)
    if constexpr (L == Likelihood::kGaussian || L == Likelihood::kLaplace || L == Likelihood::kMeanSquaredError) {
      if (row_sum != row_sum)
        for (int64_t j = j_begin; j < j_end; ++j) row_bad += x_row[j] != x_row[j] ? 1 : 0;
    }
    bad += row_bad;
    if (partial_sums) {
      partial[item] = row_sum;
      if constexpr (LV_GRAD == LogVarGrad::kPerRow) partial_lv[item] = row_lv_grad;
      continue;
    }
    if constexpr (L == Likelihood::kMeanSquaredError) row_sum = D > 0 ? row_sum / T(D) : T(0);
    log_prob[r] = row_sum;
    if constexpr (LV_GRAD == LogVarGrad::kPerRow) grad_logvar[r] = row_lv_grad;  // (unscaled: see LogVarGrad)
  }
  for (int64_t r = 0; partial_sums && r < a.rows; ++r) {
    const T row_sum = row_total(partial, r, blocks.per_row);
    log_prob[r] = L == Likelihood::kMeanSquaredError ? row_sum / T(D) : row_sum;
    if constexpr (LV_GRAD == LogVarGrad::kPerRow) grad_logvar[r] = row_total(partial_lv, r, blocks.per_row);
  }
  return bad;
}

template <typename T, Likelihood L, bool WANT_GRAD>
int64_t elementwise_scale_layout(const ElementwiseLikelihoodArgs& a) {
  const LogVarGrad lv_grad = a.grad_logvar == nullptr ? LogVarGrad::kNone
                             : a.logvar_grad_per_row ? LogVarGrad::kPerRow
                                                     : LogVarGrad::kPerElement;
  const LogVarLayout layout = a.logvar.col_stride == 0   ? LogVarLayout::kRowConstant
                              : a.logvar.col_stride == 1 ? LogVarLayout::kContiguous
                                                         : LogVarLayout::kStrided;
  // (the entry point allows the per-row gradient for a row-constant logvar only)
  if (lv_grad == LogVarGrad::kPerRow)
    return elementwise_impl<T, L, WANT_GRAD, LogVarGrad::kPerRow, LogVarLayout::kRowConstant>(a);
#define VF_LAYOUT(LAYOUT)                                                                                   \
  case LAYOUT:                                                                                              \
    return lv_grad == LogVarGrad::kPerElement ? elementwise_impl<T, L, WANT_GRAD, LogVarGrad::kPerElement, LAYOUT>(a) \
                                              : elementwise_impl<T, L, WANT_GRAD, LogVarGrad::kNone, LAYOUT>(a);
  switch (layout) {
    VF_LAYOUT(LogVarLayout::kRowConstant)
    VF_LAYOUT(LogVarLayout::kContiguous)
    VF_LAYOUT(LogVarLayout::kStrided)
  }
#undef VF_LAYOUT
  return 0;
}

template <typename T>
int64_t elementwise_dispatch(const ElementwiseLikelihoodArgs& a) {
  const bool grad = a.grad_theta != nullptr;
  using LL = Likelihood;
  using LV = LogVarLayout;
  switch (a.likelihood) {
    case LL::kBernoulli:
      return grad ? elementwise_impl<T, LL::kBernoulli, true, LogVarGrad::kNone, LV::kContiguous>(a)
                  : elementwise_impl<T, LL::kBernoulli, false, LogVarGrad::kNone, LV::kContiguous>(a);
    case LL::kContinuousBernoulli:
      return grad ? elementwise_impl<T, LL::kContinuousBernoulli, true, LogVarGrad::kNone, LV::kContiguous>(a)
                  : elementwise_impl<T, LL::kContinuousBernoulli, false, LogVarGrad::kNone, LV::kContiguous>(a);
    case LL::kMeanSquaredError:
      return grad ? elementwise_impl<T, LL::kMeanSquaredError, true, LogVarGrad::kNone, LV::kContiguous>(a)
                  : elementwise_impl<T, LL::kMeanSquaredError, false, LogVarGrad::kNone, LV::kContiguous>(a);
    case LL::kGaussian:
      return grad ? elementwise_scale_layout<T, LL::kGaussian, true>(a)
                  : elementwise_scale_layout<T, LL::kGaussian, false>(a);
    case LL::kLaplace:
      return grad ? elementwise_scale_layout<T, LL::kLaplace, true>(a)
                  : elementwise_scale_layout<T, LL::kLaplace, false>(a);
  }
  return 0;
}

// TargetT: the class indices' type, int64 or uint8 (8-bit images scored against 256 classes, read as they are
// rather than widened to an int64 copy).
template <typename T, typename TargetT>
int64_t categorical_impl(const CategoricalArgs& a) {
  const T* __restrict logits = static_cast<const T*>(a.logits);
  T* __restrict log_prob = static_cast<T*>(a.log_prob);
  T* __restrict grad = static_cast<T*>(a.grad_logits);
  const int64_t P = a.pixels, C = a.classes;
  const T expected_upstream = T(a.expected_upstream);
  const RowBlocks blocks(P, kBlockElements / std::max<int64_t>(C, 1));  // (blocks of pixels)
  const int64_t items = a.rows * blocks.per_row;
  const bool partial_sums = blocks.per_row > 1;
  std::vector<T> partial(partial_sums ? items : 0);
  int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(a.num_threads) reduction(+ : bad) \
    if (a.rows * P * C > kParallelGrain)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = blocks.row(item), p_begin = blocks.begin(item), p_end = blocks.end(item);
    const TargetT* __restrict target = static_cast<const TargetT*>(a.target) + (r % a.x_rows) * P;
    T row_sum = T(0);
    for (int64_t p = p_begin; p < p_end; ++p) {
      const T* __restrict l = logits + (r * P + p) * C;
      const int64_t raw_target = int64_t(target[p]);
      const bool valid = raw_target >= 0 && raw_target < C;
      bad += valid ? 0 : 1;
      const int64_t tgt = valid ? raw_target : 0;  // never index out of bounds
      // pass 1 (the row is C values, cache-resident): max, then sum of exp
      T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < C; ++c) m = l[c] > m ? l[c] : m;
      const T shift = std::isfinite(m) ? m : T(0);
      T s = T(0);
      if (grad != nullptr) {
        // one exp per logit: keep e^(l - shift) in the gradient buffer, then normalise it there
        T* __restrict g = grad + (r * P + p) * C;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) {
          g[c] = vexp(l[c] - shift);
          s += g[c];
        }
        const T scaled_inv_s = expected_upstream / s;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) g[c] = (c == tgt ? expected_upstream : T(0)) - g[c] * scaled_inv_s;
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += vexp(l[c] - shift);
      }
      row_sum += l[tgt] - (shift + vlog(s));
    }
    (partial_sums ? partial[item] : log_prob[r]) = row_sum;
  }
  for (int64_t r = 0; partial_sums && r < a.rows; ++r) log_prob[r] = row_total(partial, r, blocks.per_row);
  return bad;
}

}  // namespace

int64_t elementwise_likelihood_f32(const ElementwiseLikelihoodArgs& a) { return elementwise_dispatch<float>(a); }
int64_t elementwise_likelihood_f64(const ElementwiseLikelihoodArgs& a) { return elementwise_dispatch<double>(a); }
int64_t categorical_f32(const CategoricalArgs& a) {
  return a.target_dtype == TargetDtype::kUint8 ? categorical_impl<float, uint8_t>(a) : categorical_impl<float, int64_t>(a);
}
int64_t categorical_f64(const CategoricalArgs& a) {
  return a.target_dtype == TargetDtype::kUint8 ? categorical_impl<double, uint8_t>(a)
                                               : categorical_impl<double, int64_t>(a);
}

}  // namespace VF_ISA
}  // namespace vae_fast
