// Discretised mixture of logistics (PixelCNN++, Salimans et al. 2017) fused with its
// gradient: one pass over the decoder's parameters gives each example's log-likelihood
// and d log p / d (logit_probs, means, log_scales, coeffs); nothing mixture-sized is
// allocated beyond those gradients (each thread keeps two M x 64 buffers for its current
// tile of 64 pixels, which stay in L1 while the tile's derivatives are rescaled).
//
// Per pixel, channel c, component m, with s = e^-log_scale, hb = half bin width:
//   p = s (x - mean + hb),  q = s (x - mean - hb),  d = p - q = 2 hb s
//   log mass = log sigmoid(p) + log sigmoid(-q) + log(1 - e^-d)    interior bins
//            = log sigmoid(p)                                       first bin (-inf, -1 + hb]
//            = log sigmoid(-q)                                      last bin  [1 - hb, +inf)
// (sigmoid(p) - sigmoid(q) = sigmoid(p) sigmoid(-q) (1 - e^-d): exact in every tail, where
// PixelCNN++ falls back to the density). With sp = sigmoid(-p), sq = sigmoid(q), dropping
// the terms of an edge the bin does not have:
//   d log mass / d mean      = -s (sp - sq)
//   d log mass / d log_scale = -p sp + q sq - d e^-d / (1 - e^-d)   (0 where the clamp holds)
// Mixture: a_m = logit_m + sum_c log mass_cm, log p = lse_m(a) - lse_m(logit); with the
// responsibilities r = softmax(a) and pi = softmax(logit):
//   d/dlogit_m = r_m - pi_m,  d/dmean_cm = r_m d log mass_cm / d mean_cm  (log_scale alike),
//   and through mean_g = mean + c0 x_r, mean_b = mean + c1 x_r + c2 x_g the coefficients.
// All gradients are written multiplied by expected_upstream (the caller's expected upstream gradient).
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vf_math.h"

namespace vae_fast {
namespace VF_ISA {
namespace {

constexpr int64_t kTile = 64;  // pixels per work item: M x kTile partials stay in L1
constexpr int64_t kParallelGrain = 32768;

template <typename T>
const T* operand(const DmolOperand& o, int64_t row, int64_t channel, int64_t mixture, int64_t pixel) {
  return static_cast<const T*>(o.ptr) + row * o.row_stride + channel * o.channel_stride +
         mixture * o.mixture_stride + pixel;
}

template <typename T>
T* operand(const DmolGrad& o, int64_t row, int64_t channel, int64_t mixture, int64_t pixel) {
  return static_cast<T*>(o.ptr) + row * o.row_stride + channel * o.channel_stride + mixture * o.mixture_stride +
         pixel;
}

// tanh(y) = sign(y) (1 - e^-2|y|) / (1 + e^-2|y|), through expm1 so that small y keep their digits.
template <typename T>
inline T tanh_via_expm1(T y) {
  const T em = expm1_nonpos(T(-2) * std::fabs(y));
  return std::copysign(-em / (T(2) + em), y);
}

// How a channel's mean is formed: independently, or PixelCNN++'s green (mean + c0 x_r) and
// blue (mean + c1 x_r + c2 x_g). A template parameter so that each inner loop is branch-free.
enum class ChannelRole { kIndependent, kGreen, kBlue };

// One (channel, component) row of a pixel tile: inputs, the running a_m, derivative outputs.
template <typename T>
struct DmolTile {
  int64_t n;
  const T* x;
  const T* x_red;
  const T* x_green;
  const T* mean;
  const T* log_scale;
  const T* coef_a;  // green: c0; blue: c1
  const T* coef_b;  // blue: c2
  T* mix;           // a_m += log mass
  T* grad_mean;
  T* grad_log_scale;
  T* grad_coef_a;
  T* grad_coef_b;
  T half_bin, log_scale_min;
};

// Log bin mass of each pixel of the tile, added to a_m; with WANT_GRAD its derivatives with
// respect to mean, log-scale and coefficients (not yet weighted by the responsibilities).
template <typename T, ChannelRole ROLE, bool TANH, bool WANT_GRAD>
void bin_terms(const DmolTile<T>& t) {
  const T* __restrict xs = t.x;
  const T* __restrict x_red = t.x_red;
  const T* __restrict x_green = t.x_green;
  const T* __restrict mean_in = t.mean;
  const T* __restrict ls_in = t.log_scale;
  const T* __restrict coef_a_in = t.coef_a;
  const T* __restrict coef_b_in = t.coef_b;
  T* __restrict mix = t.mix;
  T* __restrict g_mean = t.grad_mean;
  T* __restrict g_ls = t.grad_log_scale;
  T* __restrict g_coef_a = t.grad_coef_a;
  T* __restrict g_coef_b = t.grad_coef_b;
  const T hb = t.half_bin, ls_min = t.log_scale_min;
  const T lowest_edge = T(-1) + hb, highest_edge = T(1) - hb;
#pragma omp simd
  for (int64_t i = 0; i < t.n; ++i) {
    const T x = xs[i];
    T mean = mean_in[i];
    T ca = T(0), cb = T(0);
    if constexpr (ROLE != ChannelRole::kIndependent) {
      ca = TANH ? tanh_via_expm1(coef_a_in[i]) : coef_a_in[i];
      mean += ca * x_red[i];
    }
    if constexpr (ROLE == ChannelRole::kBlue) {
      cb = TANH ? tanh_via_expm1(coef_b_in[i]) : coef_b_in[i];
      mean += cb * x_green[i];
    }
    const T ls_raw = ls_in[i];
    const bool clamped = ls_raw < ls_min;  // NaN stays NaN
    const T ls = clamped ? ls_min : ls_raw;
    const T s = vexp(-ls);
    const T centered = x - mean;
    const T p = s * (centered + hb);
    const T q = s * (centered - hb);
    const T d = T(2) * hb * s;
    const bool has_upper = !(x > highest_edge);  // the bin's upper edge is finite
    const bool has_lower = !(x < lowest_edge);
    const bool interior = has_upper && has_lower;
    T log_sig_p, sp, log_sig_neg_q, sq;
    log_sigmoid_and_complement(p, log_sig_p, sp);
    log_sigmoid_and_complement(-q, log_sig_neg_q, sq);
    const T em = expm1_nonpos(-d);  // e^-d - 1 in [-1, 0]
    const T log_width = vlog(interior ? -em : T(1));
    mix[i] += (has_upper ? log_sig_p : T(0)) + (has_lower ? log_sig_neg_q : T(0)) + log_width;
    if constexpr (WANT_GRAD) {
      const T sp_e = has_upper ? sp : T(0);
      const T sq_e = has_lower ? sq : T(0);
      const T e_d = em + T(1);
      // d e^-d / (1 - e^-d) -> 1 as d -> 0; 0 once e^-d underflows (also avoids inf * 0)
      const T width_term = (interior && e_d != T(0)) ? d * e_d / (interior ? -em : T(1)) : T(0);
      const T dmean = -s * (sp_e - sq_e);
      g_mean[i] = dmean;
      g_ls[i] = clamped ? T(0) : -p * sp_e + q * sq_e - width_term;
      if constexpr (ROLE != ChannelRole::kIndependent)
        g_coef_a[i] = dmean * x_red[i] * (TANH ? T(1) - ca * ca : T(1));
      if constexpr (ROLE == ChannelRole::kBlue) g_coef_b[i] = dmean * x_green[i] * (TANH ? T(1) - cb * cb : T(1));
    }
  }
}

// CHANNELS: 1 or 3, or 0 for any number read at run time (independent channels only).
// COEFFS: PixelCNN++'s channel coupling (3 channels); TANH: coefficient = tanh(raw input).
template <typename T, int CHANNELS, bool COEFFS, bool TANH, bool WANT_GRAD>
int64_t dmol_impl(const DmolArgs& a) {
  static_assert(!COEFFS || CHANNELS == 3, "coefficients couple exactly three channels");
  const int64_t C = CHANNELS > 0 ? CHANNELS : a.channels;
  const int64_t M = a.mixtures, P = a.pixels;
  const int64_t tiles_per_row = (P + kTile - 1) / kTile;
  const int64_t work_items = a.rows * tiles_per_row;
  const T* __restrict x_all = static_cast<const T*>(a.x);
  const T hb = T(a.half_bin), ls_min = T(a.log_scale_min), expected_upstream = T(a.expected_upstream);
  std::vector<T> partial(work_items);
  int64_t bad = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(+ : bad) if (work_items * kTile * M * C > kParallelGrain)
  {
    // per tile: a_m (then e^(a_m - max)) and e^(logit_m - max) for every component
    std::vector<T> mix_buf(M * kTile), prior_buf(M * kTile);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < work_items; ++item) {
      const int64_t r = item / tiles_per_row;
      const int64_t p0 = (item % tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, P - p0);
      const T* __restrict x_row = x_all + (r % a.x_rows) * C * P + p0;
      int64_t tile_bad = 0;
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict xc = x_row + c * P;
#pragma omp simd reduction(+ : tile_bad)
        for (int64_t i = 0; i < n; ++i) tile_bad += (xc[i] >= T(-1) && xc[i] <= T(1)) ? 0 : 1;  // (NaN too)
      }
      bad += tile_bad;

      // pass 1: per component, the log bin masses of all channels and their (unnormalised) derivatives
      for (int64_t m = 0; m < M; ++m) {
        T* __restrict mix = mix_buf.data() + m * kTile;
        const T* __restrict logit = operand<T>(a.logit_probs, r, 0, m, p0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) mix[i] = logit[i];
        for (int64_t c = 0; c < C; ++c) {
          const T* __restrict x_red = x_row;
          const T* __restrict x_green = x_row + (C > 1 ? P : 0);
          const T* __restrict mean_in = operand<T>(a.means, r, c, m, p0);
          const T* __restrict ls_in = operand<T>(a.log_scales, r, c, m, p0);
          // coefficient slots: green uses slot 0 (x_r); blue slots 1 (x_r) and 2 (x_g)
          const bool coupled = COEFFS && c > 0;
          const T* __restrict coef_a = coupled ? operand<T>(a.coeffs, r, c == 1 ? 0 : 1, m, p0) : mean_in;
          const T* __restrict coef_b = coupled ? operand<T>(a.coeffs, r, 2, m, p0) : mean_in;
          T* __restrict g_mean = WANT_GRAD ? operand<T>(a.grad_means, r, c, m, p0) : nullptr;
          T* __restrict g_ls = WANT_GRAD ? operand<T>(a.grad_log_scales, r, c, m, p0) : nullptr;
          T* __restrict g_coef_a = WANT_GRAD && coupled ? operand<T>(a.grad_coeffs, r, c == 1 ? 0 : 1, m, p0) : nullptr;
          T* __restrict g_coef_b = WANT_GRAD && c == 2 && COEFFS ? operand<T>(a.grad_coeffs, r, 2, m, p0) : nullptr;
          const DmolTile<T> tile{n, x_row + c * P, x_red, x_green, mean_in, ls_in, coef_a, coef_b, mix,
                                 g_mean, g_ls, g_coef_a, g_coef_b, hb, ls_min};
          if (!coupled) {
            bin_terms<T, ChannelRole::kIndependent, TANH, WANT_GRAD>(tile);
          } else if (c == 1) {
            bin_terms<T, ChannelRole::kGreen, TANH, WANT_GRAD>(tile);
          } else {
            bin_terms<T, ChannelRole::kBlue, TANH, WANT_GRAD>(tile);
          }
        }
      }

      // pass 2: log-sum-exp over components (max-shifted) of a and of the mixture logits
      alignas(64) T max_mix[kTile], max_logit[kTile], sum_mix[kTile], sum_logit[kTile];
      std::fill(max_mix, max_mix + n, -std::numeric_limits<T>::infinity());
      std::fill(max_logit, max_logit + n, -std::numeric_limits<T>::infinity());
      std::fill(sum_mix, sum_mix + n, T(0));
      std::fill(sum_logit, sum_logit + n, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const T* __restrict mix = mix_buf.data() + m * kTile;
        const T* __restrict logit = operand<T>(a.logit_probs, r, 0, m, p0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          max_mix[i] = mix[i] > max_mix[i] ? mix[i] : max_mix[i];
          max_logit[i] = logit[i] > max_logit[i] ? logit[i] : max_logit[i];
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {  // an all -inf pixel gives -inf, not NaN
        max_mix[i] = std::isfinite(max_mix[i]) ? max_mix[i] : T(0);
        max_logit[i] = std::isfinite(max_logit[i]) ? max_logit[i] : T(0);
      }
      for (int64_t m = 0; m < M; ++m) {
        T* __restrict mix = mix_buf.data() + m * kTile;
        T* __restrict prior = prior_buf.data() + m * kTile;
        const T* __restrict logit = operand<T>(a.logit_probs, r, 0, m, p0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          mix[i] = vexp(mix[i] - max_mix[i]);
          prior[i] = vexp(logit[i] - max_logit[i]);
          sum_mix[i] += mix[i];
          sum_logit[i] += prior[i];
        }
      }
      T tile_sum = T(0);
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t i = 0; i < n; ++i) {
        tile_sum += (max_mix[i] + vlog(sum_mix[i])) - (max_logit[i] + vlog(sum_logit[i]));
        sum_mix[i] = T(1) / sum_mix[i];  // now the normalisers
        sum_logit[i] = T(1) / sum_logit[i];
      }
      partial[item] = tile_sum;

      // pass 3: scale the derivatives (still in cache) by the responsibilities (times expected_upstream,
      // the caller's expected upstream gradient)
      if constexpr (WANT_GRAD) {
        for (int64_t m = 0; m < M; ++m) {
          T* __restrict resp = mix_buf.data() + m * kTile;
          const T* __restrict prior = prior_buf.data() + m * kTile;
          T* __restrict g_logit = operand<T>(a.grad_logit_probs, r, 0, m, p0);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const T r_m = resp[i] * sum_mix[i];
            g_logit[i] = (r_m - prior[i] * sum_logit[i]) * expected_upstream;
            resp[i] = r_m * expected_upstream;
          }
          for (int64_t c = 0; c < C; ++c) {
            T* __restrict g_mean = operand<T>(a.grad_means, r, c, m, p0);
            T* __restrict g_ls = operand<T>(a.grad_log_scales, r, c, m, p0);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              g_mean[i] *= resp[i];
              g_ls[i] *= resp[i];
            }
          }
          if constexpr (COEFFS) {
            for (int64_t k = 0; k < 3; ++k) {
              T* __restrict g_coef = operand<T>(a.grad_coeffs, r, k, m, p0);
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) g_coef[i] *= resp[i];
            }
          }
        }
      }
    }
  }
  T* __restrict log_prob = static_cast<T*>(a.log_prob);
  for (int64_t r = 0; r < a.rows; ++r) {  // fixed order: the same sums for any thread count
    T row_sum = T(0);
    for (int64_t t = 0; t < tiles_per_row; ++t) row_sum += partial[r * tiles_per_row + t];
    log_prob[r] = row_sum;
  }
  return bad;
}

template <typename T, int CHANNELS, bool COEFFS, bool TANH>
int64_t dmol_grad_dispatch(const DmolArgs& a) {
  return a.grad_means.ptr != nullptr ? dmol_impl<T, CHANNELS, COEFFS, TANH, true>(a)
                                     : dmol_impl<T, CHANNELS, COEFFS, TANH, false>(a);
}

template <typename T>
int64_t dmol_dispatch(const DmolArgs& a) {
  if (a.coeffs.ptr != nullptr)
    return a.coeffs_tanh ? dmol_grad_dispatch<T, 3, true, true>(a) : dmol_grad_dispatch<T, 3, true, false>(a);
  switch (a.channels) {
    case 1: return dmol_grad_dispatch<T, 1, false, false>(a);
    case 3: return dmol_grad_dispatch<T, 3, false, false>(a);
    default: return dmol_grad_dispatch<T, 0, false, false>(a);
  }
}

}  // namespace

int64_t dmol_f32(const DmolArgs& a) { return dmol_dispatch<float>(a); }
int64_t dmol_f64(const DmolArgs& a) { return dmol_dispatch<double>(a); }

}  // namespace VF_ISA
}  // namespace vae_fast
