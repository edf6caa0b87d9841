// Fused latent kernel: one pass over (mu, scale[, prior]) gives z = mu + sigma * eps
// and the analytic KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar))).
// Backward recomputes eps from (seed, counter) instead of storing it.
//
// Math (per latent dim; lv = log sigma^2, d = lv - prior_logvar, diff = mu - prior_mu):
//   KL      = 1/2 (e^d - 1 - d) + 1/2 diff^2 e^-plv
//           = exp(d - ln 2) - 1/2 (1 + d) + 1/2 (diff e^(-plv/2))^2   (finite in fp32 up to d = 89;
//             without a prior exp(d - ln 2) = (sigma sqrt(1/2))^2)
//   diff^2 e^-plv is always formed as (diff e^(-plv/2))^2: e^-plv overflows in fp32 below
//   plv = -88.7 (narrow learned priors), and then 0 * inf was NaN where q = p; e^(-plv/2) stays
//   finite down to -177, and scaled_by() maps 0 * inf to 0 beyond.
//   dKL/dlv = exp(d - ln 2) - 1/2
//   dKL/dmu = diff e^-plv = -dKL/dprior_mu,   dKL/dplv = -dKL/dlv - 1/2 diff^2 e^-plv
// and, per sample (the IWAE log-weight's latent part; the 1/2 log 2 pi terms cancel):
//   log q(z|x) - log p(z) = sum_j 1/2 [plv - lv - eps^2 + (diff + sigma eps)^2 e^-plv]
// Compiled once per instruction set (see CMakeLists.txt); VF_ISA names the namespace.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vf_math.h"

namespace vae_fast {
namespace VF_ISA {
namespace {

// elements per tile: one noise block, and a multiple of 16 so vector loops need no scalar remainder
constexpr int64_t kChunk = 4 * kNoiseGroups - 16;
constexpr int64_t kParallelGrain = 16384;  // below this many elements, stay on one thread

// sigma and log-variance from the raw scale parameter, overflow-safe, plus (for
// backward) d sigma / d s and d logvar / d s.
template <typename T, ScaleParam P>
inline void scale_terms(T s, T& sigma, T& logvar, T& dsigma, T& dlogvar) {
  if constexpr (P == ScaleParam::kLogVar) {
    logvar = s;
    sigma = vexp(T(0.5) * s);
    dsigma = T(0.5) * sigma;
    dlogvar = T(1);
  } else if constexpr (P == ScaleParam::kLogStd) {
    logvar = T(2) * s;
    sigma = vexp(s);
    dsigma = sigma;
    dlogvar = T(2);
  } else {
    // sigma = softplus(s) = max(s, 0) + log1p(y), y = exp(-|s|).
    const T y = vexp(-std::fabs(s));
    const T log1p_y = log1p_nonneg(y);
    sigma = (s > T(0) ? s : T(0)) + log1p_y;
    // For s < 0, softplus(s) = y * q with q = log1p(y) / y -> 1 as y underflows,
    // so log sigma = s + log q stays exact where exp(s) underflows to 0.
    const T q = (y == T(0)) ? T(1) : log1p_y / (y == T(0) ? T(1) : y);
    const bool negative = s < T(0);
    logvar = T(2) * (negative ? s + vlog(q) : vlog(sigma));
    const T inv_one_plus_y = T(1) / (T(1) + y);
    dsigma = negative ? y * inv_one_plus_y : inv_one_plus_y;  // sigmoid(s)
    // dlogvar/ds = 2 sigmoid(s) / softplus(s), written without 0/0 for s -> -inf.
    dlogvar = negative ? T(2) * inv_one_plus_y / q : T(2) * inv_one_plus_y / sigma;
  }
}

// value * e^(-plv/2) with an exactly zero value giving 0 even where e^(-plv/2) overflows.
template <typename T>
inline T scaled_by(T value, T inv_prior_std) {
  return value == T(0) ? T(0) : value * inv_prior_std;
}

// 1/2 sigma^2 / prior variance = exp(d - ln 2), d = lv - prior_logvar. Without a prior it is
// (sigma sqrt(1/2))^2 from the sigma already at hand: one exp fewer per element, and still
// finite wherever exp(lv - ln 2) is (sigma sqrt(1/2) squares to at most FLT_MAX there).
template <typename T, bool HAS_PRIOR>
inline T half_variance_ratio(T sigma, T d) {
  if constexpr (HAS_PRIOR) {
    return vexp(d - T(kLn2));
  } else {
    const T s = sigma * T(0.70710678118654752440);
    return s * s;
  }
}

// Rows longer than this many tiles (8208 elements) are cut into column blocks of it, each a work item of its
// own: a batch of one or two large conv latents (an SD autoencoder's 4x64x64) still spreads over every thread.
constexpr int64_t kTilesPerColumnBlock = 27;

// The kernels walk the (batch, dim) plane in tiles that are contiguous in memory and
// in the noise stream: several whole rows when dim is small (so that even dim = 32
// fills the vector loops), or column slices of one row when dim is large. Threads
// split the work items: blocks of rows, or for long rows column blocks of one row (whose
// sums are added up in order afterwards). Tiles and work items depend only on (batch, dim),
// never on the thread count, so results are bit-identical for any number of threads.
struct Tiling {
  int64_t batch, dim, rows_per_block, cols_per_tile, cols_per_block, col_blocks;
  Tiling(int64_t b, int64_t d)
      : batch(b), dim(d), rows_per_block(d == 0 ? 1 : std::max<int64_t>(1, kChunk / d)),
        cols_per_tile(std::min(d, kChunk)),
        cols_per_block(d > kTilesPerColumnBlock * kChunk ? kTilesPerColumnBlock * kChunk : std::max<int64_t>(d, 1)),
        col_blocks((std::max<int64_t>(d, 1) + cols_per_block - 1) / cols_per_block) {}
  // work items: row blocks times column blocks (one column block per row unless rows are long; then one row a block)
  int64_t blocks() const { return (batch + rows_per_block - 1) / rows_per_block * col_blocks; }
  int64_t first_row(int64_t item) const { return item / col_blocks * rows_per_block; }
};

struct Tile {
  int64_t row0, rows, col0, cols;
  int64_t start(int64_t dim) const { return row0 * dim + col0; }  // flat offset (rows == 1 or cols == dim)
  int64_t size() const { return rows * cols; }
};

// Copies the tile's part of a broadcast (batch, dim) operand into a dense buffer.
template <typename T>
inline void gather_tile(const Strided2D& src, const Tile& tile, T* dst) {
  const T* base = static_cast<const T*>(src.ptr);
  for (int64_t r = 0; r < tile.rows; ++r) {
    const T* row = base + (tile.row0 + r) * src.row_stride + tile.col0 * src.col_stride;
    for (int64_t c = 0; c < tile.cols; ++c) dst[r * tile.cols + c] = row[c * src.col_stride];
  }
}

// The tile's part of a (batch, dim) operand with unit column stride and row stride `row_stride`:
// a pointer into it where the tile is contiguous there (one row, or rows packed back to back),
// otherwise the rows copied into `buffer` (a multi-row tile spans whole rows of a small dim, so
// the copy is at most kChunk elements that are in cache anyway).
template <typename T>
inline const T* row_tile(const T* base, int64_t row_stride, const Tile& tile, int64_t dim, T* buffer) {
  const T* first = base + tile.row0 * row_stride + tile.col0;
  if (tile.rows == 1 || row_stride == dim) return first;
  for (int64_t r = 0; r < tile.rows; ++r)
    std::copy(first + r * row_stride, first + r * row_stride + tile.cols, buffer + r * tile.cols);
  return buffer;
}

// eps of sample k over a tile (flat offset `start` within one sample): given, or Philox noise.
template <typename T>
inline const T* noise_tile(const LatentArgs& a, int64_t k, int64_t start, int64_t n, T* buffer, float* normal) {
  const int64_t flat = k * a.batch * a.dim + start;
  if (a.eps != nullptr) return static_cast<const T*>(a.eps) + flat;
  philox_normal_block(a.seed, a.offset + uint64_t(flat), n, normal);
  if constexpr (std::is_same_v<T, float>) {
    return normal;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buffer[i] = T(normal[i]);
    return buffer;
  }
}

// Runs body(tile) for every tile of a work item, in column order.
template <typename Body>
inline void for_each_tile(const Tiling& tiling, int64_t item, Body&& body) {
  const int64_t row0 = tiling.first_row(item);
  const int64_t rows = std::min(tiling.rows_per_block, tiling.batch - row0);
  const int64_t col_begin = item % tiling.col_blocks * tiling.cols_per_block;
  const int64_t col_end = std::min(tiling.dim, col_begin + tiling.cols_per_block);
  for (int64_t col0 = col_begin; col0 < col_end; col0 += tiling.cols_per_tile)
    body(Tile{row0, rows, col0, std::min(tiling.cols_per_tile, col_end - col0)});
}

// Requests the next tile's inputs (the n elements after p) while this tile's noise, pure
// arithmetic, is computed; otherwise each core alternates between computing and waiting for
// memory. A prefetch past the end of a buffer is harmless (it never faults). Measured: the
// backward (three input streams) 17 % faster; the forward (two) no faster, so it does not.
template <typename T>
inline void prefetch_next_tile(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + n + i, 0, 3);
}

template <typename T, ScaleParam P, bool HAS_PRIOR>
void forward_impl(const LatentArgs& a) {
  const T* __restrict mu = static_cast<const T*>(a.mu);
  const T* __restrict scale = static_cast<const T*>(a.scale);
  T* __restrict z = static_cast<T*>(a.z);
  T* __restrict kl_out = static_cast<T*>(a.kl);
  T* __restrict kl_dim_out = static_cast<T*>(a.kl_per_dim);
  T* __restrict log_ratio_out = static_cast<T*>(a.log_ratio);
  const int64_t Z = a.dim, K = a.samples;
  const Tiling tiling(a.batch, Z);
  // a work item's sums go to slot row * col_blocks + column block: the outputs themselves for rows of one block,
  // else partial buffers whose slots are added up per row, in order (row_total), after the parallel loop
  const int64_t col_blocks = tiling.col_blocks;
  std::vector<T> kl_partial(col_blocks > 1 ? a.batch * col_blocks : 0);
  std::vector<T> ratio_partial(col_blocks > 1 && log_ratio_out != nullptr ? K * a.batch * col_blocks : 0, T(0));
  T* kl_slots = col_blocks > 1 ? kl_partial.data() : kl_out;
  T* ratio_slots = col_blocks > 1 ? ratio_partial.data() : log_ratio_out;
#pragma omp parallel for schedule(static) num_threads(a.num_threads) if (a.batch * Z * (K + 1) > kParallelGrain)
  for (int64_t block = 0; block < tiling.blocks(); ++block) {
    const int64_t col_block = block % col_blocks;
    alignas(64) T sigma[kChunk], kl[kChunk], prior_mu[kChunk], prior_logvar[kChunk], eps_buf[kChunk];
    alignas(64) T ratio_base[kChunk], ratio_term[kChunk];
    alignas(64) T row_kl[kChunk], mu_buf[kChunk], scale_buf[kChunk];
    alignas(64) float normal[kChunk];
    std::fill(row_kl, row_kl + tiling.rows_per_block, T(0));
    for_each_tile(tiling, block, [&](const Tile& tile) {
      const int64_t start = tile.start(Z), n = tile.size();
      const T* __restrict mu_t = row_tile(mu, a.mu_row_stride, tile, Z, mu_buf);
      const T* __restrict s_t = row_tile(scale, a.scale_row_stride, tile, Z, scale_buf);
      if constexpr (HAS_PRIOR) {
        gather_tile(a.prior_mu, tile, prior_mu);
        gather_tile(a.prior_logvar, tile, prior_logvar);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        T sig, lv, unused_dsig, unused_dlv;
        scale_terms<T, P>(s_t[i], sig, lv, unused_dsig, unused_dlv);
        const T plv = HAS_PRIOR ? prior_logvar[i] : T(0);
        const T diff = HAS_PRIOR ? mu_t[i] - prior_mu[i] : mu_t[i];
        const T inv_prior_std = HAS_PRIOR ? vexp(T(-0.5) * plv) : T(1);
        const T scaled_diff = HAS_PRIOR ? scaled_by(diff, inv_prior_std) : diff;
        const T d = lv - plv;
        sigma[i] = sig;
        kl[i] = half_variance_ratio<T, HAS_PRIOR>(sig, d) - T(0.5) * (T(1) + d) + T(0.5) * scaled_diff * scaled_diff;
      }
      if (log_ratio_out != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          T sig, lv, unused_dsig, unused_dlv;
          scale_terms<T, P>(s_t[i], sig, lv, unused_dsig, unused_dlv);
          const T plv = HAS_PRIOR ? prior_logvar[i] : T(0);
          ratio_base[i] = T(0.5) * (plv - lv);
          ratio_term[i] = HAS_PRIOR ? vexp(T(-0.5) * plv) : T(1);  // 1 / prior std
        }
      }
      if (kl_dim_out != nullptr) std::copy(kl, kl + n, kl_dim_out + start);
      for (int64_t r = 0; r < tile.rows; ++r) {
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < tile.cols; ++c) sum += kl[r * tile.cols + c];
        row_kl[r] += sum;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T* __restrict eps = noise_tile<T>(a, k, start, n, eps_buf, normal);
        T* __restrict z_t = z + k * a.batch * Z + start;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) z_t[i] = mu_t[i] + sigma[i] * eps[i];
        if (log_ratio_out != nullptr) {
          T* __restrict ratio_row = ratio_slots + (k * a.batch + tile.row0) * col_blocks + col_block;
          for (int64_t r = 0; r < tile.rows; ++r) {
            T sum = T(0);
            const int64_t o = r * tile.cols;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < tile.cols; ++c) {
              const T e = eps[o + c];
              const T pz = HAS_PRIOR ? scaled_by(z_t[o + c] - prior_mu[o + c], ratio_term[o + c]) : z_t[o + c];
              sum += ratio_base[o + c] + T(0.5) * (pz * pz - e * e);
            }
            ratio_row[r * col_blocks] += sum;
          }
        }
      }
    });
    const int64_t row0 = tiling.first_row(block);
    const int64_t rows = std::min(tiling.rows_per_block, a.batch - row0);
    for (int64_t r = 0; r < rows; ++r) kl_slots[(row0 + r) * col_blocks + col_block] = row_kl[r];
  }
  if (col_blocks > 1) {
    for (int64_t r = 0; r < a.batch; ++r) kl_out[r] = row_total(kl_partial, r, col_blocks);
    for (int64_t i = 0; log_ratio_out != nullptr && i < K * a.batch; ++i)  // (slot i: sample i / batch's row)
      log_ratio_out[i] += row_total(ratio_partial, i, col_blocks);
  }
}

template <typename T, ScaleParam P, bool HAS_PRIOR>
void backward_impl(const LatentArgs& a) {
  const T* __restrict mu = static_cast<const T*>(a.mu);
  const T* __restrict scale = static_cast<const T*>(a.scale);
  const T* __restrict grad_z = static_cast<const T*>(a.grad_z);
  const T* __restrict grad_kl = static_cast<const T*>(a.grad_kl);
  const T* __restrict grad_kl_dim = static_cast<const T*>(a.grad_kl_per_dim);
  T* __restrict grad_mu = static_cast<T*>(a.grad_mu);
  T* __restrict grad_scale = static_cast<T*>(a.grad_scale);
  T* __restrict grad_prior_mu = static_cast<T*>(a.grad_prior_mu);
  T* __restrict grad_prior_logvar = static_cast<T*>(a.grad_prior_logvar);
  const int64_t Z = a.dim, K = a.samples;
  const Tiling tiling(a.batch, Z);
#pragma omp parallel for schedule(static) num_threads(a.num_threads) if (a.batch * Z * (K + 1) > kParallelGrain)
  for (int64_t block = 0; block < tiling.blocks(); ++block) {
    alignas(64) T sum_gz[kChunk], sum_gz_eps[kChunk], g_kl[kChunk], prior_mu[kChunk], prior_logvar[kChunk],
        eps_buf[kChunk], mu_buf[kChunk], scale_buf[kChunk];
    alignas(64) float normal[kChunk];
    for_each_tile(tiling, block, [&](const Tile& tile) {
      const int64_t start = tile.start(Z), n = tile.size();
      const T* __restrict mu_t = row_tile(mu, a.mu_row_stride, tile, Z, mu_buf);
      const T* __restrict s_t = row_tile(scale, a.scale_row_stride, tile, Z, scale_buf);
      prefetch_next_tile(mu_t, n);  // within a strided row the next tile follows; else a harmless hint
      prefetch_next_tile(s_t, n);
      if (grad_z != nullptr) prefetch_next_tile(grad_z + start, n);
      // 1. sum_k dL/dz_k and sum_k dL/dz_k * eps_k, eps recomputed from the stream
      std::fill(sum_gz, sum_gz + n, T(0));
      std::fill(sum_gz_eps, sum_gz_eps + n, T(0));
      for (int64_t k = 0; grad_z != nullptr && k < K; ++k) {
        const T* __restrict eps = noise_tile<T>(a, k, start, n, eps_buf, normal);
        const T* __restrict gz = grad_z + k * a.batch * Z + start;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          sum_gz[i] += gz[i];
          sum_gz_eps[i] += gz[i] * eps[i];
        }
      }
      // 2. upstream gradient of each element's KL: per-row dL/dKL plus per-dim dL/dKL_j
      for (int64_t r = 0; r < tile.rows; ++r)
        std::fill(g_kl + r * tile.cols, g_kl + (r + 1) * tile.cols,
                  grad_kl != nullptr ? grad_kl[tile.row0 + r] : T(0));
      if (grad_kl_dim != nullptr)
        for (int64_t i = 0; i < n; ++i) g_kl[i] += grad_kl_dim[start + i];
      if constexpr (HAS_PRIOR) {
        gather_tile(a.prior_mu, tile, prior_mu);
        gather_tile(a.prior_logvar, tile, prior_logvar);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        T sig, lv, dsig, dlv;
        scale_terms<T, P>(s_t[i], sig, lv, dsig, dlv);
        const T plv = HAS_PRIOR ? prior_logvar[i] : T(0);
        const T diff = HAS_PRIOR ? mu_t[i] - prior_mu[i] : mu_t[i];
        const T inv_prior_std = HAS_PRIOR ? vexp(T(-0.5) * plv) : T(1);
        const T scaled_diff = HAS_PRIOR ? scaled_by(diff, inv_prior_std) : diff;
        const T dkl_dlv = half_variance_ratio<T, HAS_PRIOR>(sig, lv - plv) - T(0.5);
        const T dkl_dmu = HAS_PRIOR ? scaled_by(scaled_diff, inv_prior_std) : diff;
        grad_mu[start + i] = sum_gz[i] + g_kl[i] * dkl_dmu;
        grad_scale[start + i] = sum_gz_eps[i] * dsig + g_kl[i] * dkl_dlv * dlv;
        if constexpr (HAS_PRIOR) {
          if (grad_prior_mu != nullptr) grad_prior_mu[start + i] = -g_kl[i] * dkl_dmu;
          if (grad_prior_logvar != nullptr)
            grad_prior_logvar[start + i] = -g_kl[i] * (dkl_dlv + T(0.5) * scaled_diff * scaled_diff);
        }
      }
    });
  }
}

template <typename T, bool FORWARD>
void dispatch(const LatentArgs& a) {
  const bool prior = a.prior_mu.ptr != nullptr;
#define VF_CASE(P)                                                           \
  case P:                                                                    \
    if (FORWARD) {                                                           \
      prior ? forward_impl<T, P, true>(a) : forward_impl<T, P, false>(a);    \
    } else {                                                                 \
      prior ? backward_impl<T, P, true>(a) : backward_impl<T, P, false>(a);  \
    }                                                                        \
    break;
  switch (a.param) {
    VF_CASE(ScaleParam::kLogVar)
    VF_CASE(ScaleParam::kLogStd)
    VF_CASE(ScaleParam::kSoftplus)
  }
#undef VF_CASE
}

}  // namespace

void latent_forward_f32(const LatentArgs& a) { dispatch<float, true>(a); }
void latent_forward_f64(const LatentArgs& a) { dispatch<double, true>(a); }
void latent_backward_f32(const LatentArgs& a) { dispatch<float, false>(a); }
void latent_backward_f64(const LatentArgs& a) { dispatch<double, false>(a); }

}  // namespace VF_ISA
}  // namespace vae_fast
