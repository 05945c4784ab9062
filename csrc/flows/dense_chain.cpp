// The dense invertible residual block's training step on the CPU: see dense_chain.hpp for the formulas.
#include "flows/dense_chain.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>

#include "common/fast_exp.hpp"
#include "common/gemm.hpp"
#include "common/parallel.hpp"
#include "common/simd.hpp"

namespace kexue {
namespace flows {
namespace {

using gemm::gemm;
using gemm::product;

constexpr std::int64_t kRowBlock = 64;  // rows per pass: a [64, H] buffer stays in L1/L2 between the chain's steps

template <typename T>
KEXUE_INLINE T sigmoid(T t) {
  const T e = exp_nonpositive(-std::fabs(t));
  const T inv = T(1) / (T(1) + e);
  return t >= T(0) ? inv : e * inv;
}

// a = φ(h), d = φ'(h), s = σ(βh) for LipSwish; n entries.
template <typename T>
KEXUE_INLINE void activate(const Activation& act, const T* h, T* a, T* d, T* s, std::int64_t n) {
  const T c = static_cast<T>(act.constant);
  switch (act.kind) {
    case ActivationKind::lipswish: {  // φ = h σ(βh)/1.1, φ' = σ (1 + βh(1 − σ))/1.1
      const T beta = static_cast<T>(act.beta), scale = static_cast<T>(1 / 1.1);
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) {
        const T bh = beta * h[i];
        const T sg = sigmoid(bh);
        s[i] = sg;
        a[i] = h[i] * sg * scale;
        d[i] = scale * (sg * (T(1) + bh * (T(1) - sg)));
      }
      break;
    }
    case ActivationKind::elu:
      for (std::int64_t i = 0; i < n; ++i) {
        const T em1 = std::expm1(std::min(h[i], T(0)));
        a[i] = h[i] > T(0) ? h[i] : c * em1;
        d[i] = h[i] > T(0) ? T(1) : a[i] + c;
      }
      break;
    case ActivationKind::tanh:
      for (std::int64_t i = 0; i < n; ++i) {
        a[i] = std::tanh(h[i]);
        d[i] = T(1) - a[i] * a[i];
      }
      break;
    case ActivationKind::leaky:
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) {
        a[i] = h[i] > T(0) ? h[i] : c * h[i];
        d[i] = h[i] > T(0) ? T(1) : c;
      }
      break;
  }
}

// η ← f ⊙ φ' + ez ⊙ φ'' (f = η W from the output's path, ez = Σ e ⊙ z from the surrogate's; either may be absent)
// into grad_h; returns 1.1 Σ ∂β contributions (LipSwish; q = σ(1 − σ), m = q (2 + βh(1 − 2σ))/1.1:
// φ'' = β m, ∂φ'/∂β = h m, ∂φ/∂β = h² q / 1.1).
template <typename T>
KEXUE_INLINE double activation_backward(const Activation& act, const T* f, const T* ez, const T* h, const T* a,
                                        const T* d, const T* s, T* grad_h, std::int64_t n) {
  switch (act.kind) {
    case ActivationKind::lipswish: {
      const T beta = static_cast<T>(act.beta), beta_11 = static_cast<T>(act.beta / 1.1);
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (std::int64_t i = 0; i < n; ++i) {
        const T q = s[i] * (T(1) - s[i]);
        T g = 0, part = 0;
        if (f) {
          g = f[i] * d[i];
          part = f[i] * h[i] * q;
        }
        if (ez) {
          const T em = ez[i] * (T(2) + beta * h[i] * (T(1) - T(2) * s[i])) * q;
          g += em * beta_11;
          part += em;
        }
        grad_h[i] = g;
        acc += part * h[i];
      }
      return static_cast<double>(acc);
    }
    case ActivationKind::elu:
      for (std::int64_t i = 0; i < n; ++i)
        grad_h[i] = (f ? f[i] * d[i] : T(0)) + (ez && h[i] <= T(0) ? ez[i] * d[i] : T(0));
      return 0.0;
    case ActivationKind::tanh:
      for (std::int64_t i = 0; i < n; ++i)
        grad_h[i] = (f ? f[i] * d[i] : T(0)) + (ez ? ez[i] * (T(-2) * a[i] * d[i]) : T(0));
      return 0.0;
    case ActivationKind::leaky:
      for (std::int64_t i = 0; i < n; ++i) grad_h[i] = f ? f[i] * d[i] : T(0);
      return 0.0;
  }
  return 0.0;
}

template <typename T>
struct ForwardBuffers {  // the workspace carved (dense_chain.hpp), plus y and value
  T* y = nullptr;
  T* value = nullptr;
  T* rows = nullptr;
  T* right = nullptr;  // nullptr for the Neumann gradient (r_p = v_p)
  std::vector<T*> h, a, d, s, z, uf, weight, u, v;
};

// The workspace's layout (dense_chain.hpp); its size, and with base != nullptr the views into it.
template <typename T>
std::int64_t carve(const Chain<T>& chain, std::int64_t lead, bool through_series, T* base, ForwardBuffers<T>* views) {
  const std::int64_t B = chain.batch, D = chain.dim;
  std::int64_t at = 0;
  auto take = [&](std::int64_t n) {
    T* p = base ? base + at : nullptr;
    at += n;
    return p;
  };
  T* rows = take(lead * B * D);
  T* right = through_series ? take(lead * B * D) : nullptr;
  if (views) {
    views->rows = rows;
    views->right = right;
  }
  for (std::size_t i = 0; i + 1 < chain.layers.size(); ++i) {
    const std::int64_t H = chain.layers[i].out;
    T* h = take(B * H);
    T* a = take(B * H);
    T* d = take(B * H);
    T* s = chain.acts[i].kind == ActivationKind::lipswish ? take(B * H) : nullptr;
    T* z = take(lead * B * H);
    T* uf = take(lead * B * H);
    if (views) {
      views->h.push_back(h);
      views->a.push_back(a);
      views->d.push_back(d);
      views->s.push_back(s);
      views->z.push_back(z);
      views->uf.push_back(uf);
    }
  }
  for (const Layer<T>& layer : chain.layers) {
    T* w = take(layer.out * layer.in);
    T* u = layer.u ? take(layer.out) : nullptr;
    T* v = layer.u ? take(layer.in) : nullptr;
    if (views) {
      views->weight.push_back(w);
      views->u.push_back(u);
      views->v.push_back(v);
    }
  }
  return at;
}

struct Plan {
  std::vector<double> value, row;  // c_k = (−1)^{k+1}/(k P_k) and the Neumann row's (−1)^{k+1}/P_k, k = 1..n
};

std::vector<Plan> make_plans(const std::vector<std::vector<double>>& inv_prob) {
  std::vector<Plan> plans(inv_prob.size());
  for (std::size_t p = 0; p < inv_prob.size(); ++p) {
    for (std::size_t k = 1; k <= inv_prob[p].size(); ++k) {
      const double sign = k % 2 == 1 ? 1.0 : -1.0;
      plans[p].value.push_back(sign * inv_prob[p][k - 1] / static_cast<double>(k));
      plans[p].row.push_back(sign * inv_prob[p][k - 1]);
    }
  }
  return plans;
}

template <typename T>
struct Weights {  // the effective W_i [out, in] (caller's buffer) and W_iᵀ [in, out] (ours)
  std::vector<const T*> w;
  std::vector<std::vector<T>> wt;
};

// Wᵀ [in, out] of W [out, in] (both row-major).
template <typename T>
std::vector<T> transposed(const T* w, std::int64_t out, std::int64_t in) {
  std::vector<T> wt(static_cast<std::size_t>(out * in));
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t c = 0; c < in; ++c) wt[c * out + o] = w[o * in + c];
  return wt;
}

template <typename T>
std::int64_t widest(const Chain<T>& chain) {
  std::int64_t width = chain.dim;
  for (const auto& layer : chain.layers) width = std::max({width, layer.out, layer.in});
  return width;
}

// The forward pass over rows [b0, b1): main chain, forward-mode pass per pair, the series per probe.
template <typename T>
KEXUE_SIMD_CLONES bool forward_rows(const Chain<T>& chain, const Weights<T>& weights, const T* x, const T* probes,
                                    std::int64_t n_probes, const std::vector<Plan>& plans, bool through_series,
                                    const ForwardBuffers<T>& out, std::int64_t b0, std::int64_t b1,
                                    std::vector<T>& scratch) {
  const std::int64_t L = static_cast<std::int64_t>(chain.layers.size());
  const std::int64_t B = chain.batch, D = chain.dim, R = b1 - b0, W = widest(chain);
  const std::int64_t n_series = through_series ? static_cast<std::int64_t>(plans[0].value.size()) : 1;
  scratch.resize(static_cast<std::size_t>(R * (2 * W + D * (n_probes + 2))));
  T* t0 = scratch.data();
  T* t1 = t0 + R * W;
  T* jv = t1 + R * W;        // [P, R, D]
  T* l = jv + n_probes * R * D;  // [R, D]
  T* l_next = l + R * D;

  // the chain itself; x's finiteness on the way (x·0 is NaN exactly for NaN and ±inf)
  T zero_if_finite = 0;
  const T* xr = x + b0 * D;
#pragma omp simd reduction(+ : zero_if_finite)
  for (std::int64_t i = 0; i < R * D; ++i) zero_if_finite += xr[i] * T(0);
  if (zero_if_finite != T(0)) return false;
  const T* in = xr;
  for (std::int64_t i = 0; i < L; ++i) {
    const Layer<T>& layer = chain.layers[i];
    const bool last = i == L - 1;
    T* h = last ? out.y + b0 * D : out.h[i] + b0 * layer.out;
    product<T>(R, layer.in, layer.out, in, layer.in, weights.wt[i].data(), weights.w[i], h, layer.out, false);
    if (layer.bias)
      for (std::int64_t r = 0; r < R; ++r)
#pragma omp simd
        for (std::int64_t j = 0; j < layer.out; ++j) h[r * layer.out + j] += layer.bias[j];
    if (last) {
#pragma omp simd
      for (std::int64_t j = 0; j < R * D; ++j) h[j] += xr[j];
    } else {
      T* s = out.s[i] ? out.s[i] + b0 * layer.out : nullptr;
      activate(chain.acts[i], h, out.a[i] + b0 * layer.out, out.d[i] + b0 * layer.out, s, R * layer.out);
      in = out.a[i] + b0 * layer.out;
    }
  }

  // forward mode from every pair's right vector: z_i = W_i u_{i−1}, u_i = φ'(h_i) ⊙ z_i; the last product is J r
  const std::int64_t lead = n_series * n_probes;
  for (std::int64_t q = 0; q < lead; ++q) {
    const std::int64_t p = q % n_probes, j = q / n_probes;
    const T* r;
    if (through_series) {
      T* rq = out.right + (q * B + b0) * D;
      if (j == 0) std::copy(probes + (p * B + b0) * D, probes + (p * B + b1) * D, rq);
      r = rq;
    } else {
      r = probes + (p * B + b0) * D;
    }
    const T* cur = r;
    for (std::int64_t i = 0; i + 1 < L; ++i) {
      const Layer<T>& layer = chain.layers[i];
      const std::int64_t at = (q * B + b0) * layer.out;
      T* z = out.z[i] + at;
      T* u = out.uf[i] + at;
      const T* d = out.d[i] + b0 * layer.out;
      product<T>(R, layer.in, layer.out, cur, layer.in, weights.wt[i].data(), weights.w[i], z, layer.out, false);
#pragma omp simd
      for (std::int64_t e = 0; e < R * layer.out; ++e) u[e] = z[e] * d[e];
      cur = u;
    }
    if (through_series && j > 0 && j + 1 == n_series) continue;  // J^n v is in no pair
    // J r: the next pair's right vector through the series (Jv of the probe when j = 0), else the probe's Jv
    T* dest = through_series && j + 1 < n_series ? out.right + ((q + n_probes) * B + b0) * D
                                                : jv + p * R * D;
    product<T>(R, chain.layers[L - 1].in, D, cur, chain.layers[L - 1].in, weights.wt[L - 1].data(), weights.w[L - 1],
               dest, D, false);
    if (through_series && j == 0 && n_series > 1) std::copy(dest, dest + R * D, jv + p * R * D);
  }

  // the series per probe: l_0 = v, l_k = l_{k−1} J; value Σ_k c_k l_{k−1}·(Jv), rows as the mode wants
  T* value = out.value + b0;
  std::fill(value, value + R, T(0));
  const T inv_probes = T(1) / static_cast<T>(n_probes);
  for (std::int64_t p = 0; p < n_probes; ++p) {
    const Plan& plan = plans[static_cast<std::size_t>(p)];
    const std::int64_t n = static_cast<std::int64_t>(plan.value.size());
    std::copy(probes + (p * B + b0) * D, probes + (p * B + b1) * D, l);
    // rows: Neumann Σ c'_k l_{k−1}; through the series L_j = Σ_{i<n−j} c_{i+j+1} l_i (pair j·P + p)
    const std::int64_t n_rows = through_series ? n : 1;
    for (std::int64_t j = 0; j < n_rows; ++j) {
      T* row = out.rows + ((j * n_probes + p) * B + b0) * D;
      std::fill(row, row + R * D, T(0));
    }
    const T* jvp = jv + p * R * D;
    for (std::int64_t k = 1; k <= n; ++k) {  // l holds l_{k−1}
      const T cv = static_cast<T>(plan.value[k - 1]);
      for (std::int64_t r = 0; r < R; ++r) {
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (std::int64_t e = 0; e < D; ++e) dot += l[r * D + e] * jvp[r * D + e];
        value[r] += cv * dot * inv_probes;
      }
      if (through_series) {
        for (std::int64_t j = 0; j + k <= n; ++j) {  // l_{k−1} enters L_j with c_{k+j}
          T* row = out.rows + ((j * n_probes + p) * B + b0) * D;
          const T c = static_cast<T>(plan.value[k + j - 1]);
#pragma omp simd
          for (std::int64_t e = 0; e < R * D; ++e) row[e] += c * l[e];
        }
      } else {
        T* row = out.rows + (p * B + b0) * D;
        const T c = static_cast<T>(plan.row[k - 1]);
#pragma omp simd
        for (std::int64_t e = 0; e < R * D; ++e) row[e] += c * l[e];
      }
      if (k == n) break;
      const T* cur = l;  // l J = l W_L, ⊙ φ'(h_{L−1}), · W_{L−1}, …, · W_1
      for (std::int64_t i = L - 1; i >= 0; --i) {
        const Layer<T>& layer = chain.layers[i];
        T* dst = i == 0 ? l_next : (cur == t0 ? t1 : t0);
        product<T>(R, layer.out, layer.in, cur, layer.out, weights.w[i], weights.wt[i].data(), dst, layer.in, false);
        if (i > 0) {
          const T* d = out.d[i - 1] + b0 * layer.in;
#pragma omp simd
          for (std::int64_t e = 0; e < R * layer.in; ++e) dst[e] *= d[e];
        }
        cur = dst;
      }
      std::swap(l, l_next);
    }
  }
  return true;
}

template <typename T>
struct SavedForward {  // what chain_forward wrote (read-only here)
  const T* x = nullptr;
  const T* rows = nullptr;
  const T* right = nullptr;  // the probes for the Neumann gradient
  std::vector<const T*> h, a, d, s, z, uf, weight;
  std::vector<std::vector<T>> weight_t;  // W_iᵀ [in, out]
  std::vector<double> divisor, kappa;
  std::int64_t lead = 0, n_probes = 0;
};

// Whether layer i's weight gradient is summed transposed, [in, out]: Aᵀ U with fewer input features than a vector
// holds would run the tile's scalar tail; Uᵀ A has the wide side as columns.
template <typename T>
bool sums_transposed(std::int64_t in) {
  return in < static_cast<std::int64_t>(64 / sizeof(T));
}

template <typename T>
struct Partial {  // one thread's sums over its rows, in double (a row block's weight sums, in T, added per block)
  std::vector<std::vector<double>> grad_w, grad_b;
  std::vector<double> grad_beta;  // 1.1 ∂β
  std::vector<T> scratch, block_w;
};

template <typename T>
KEXUE_INLINE void add_to(std::vector<double>& sum, const T* block, std::int64_t count) {
  double* out = sum.data();
#pragma omp simd
  for (std::int64_t e = 0; e < count; ++e) out[e] += static_cast<double>(block[e]);
}

template <typename T>
KEXUE_SIMD_CLONES void backward_rows(const Chain<T>& chain, const SavedForward<T>& saved, const T* grad_y,
                                     const T* grad_value, T* grad_x, std::int64_t b0, std::int64_t b1,
                                     Partial<T>& part) {
  const std::int64_t L = static_cast<std::int64_t>(chain.layers.size());
  const std::int64_t B = chain.batch, D = chain.dim, R = b1 - b0, W = widest(chain), lead = saved.lead;
  part.scratch.resize(static_cast<std::size_t>(R * W * (2 * lead + 3)));
  T* rho = part.scratch.data();   // [lead, R, W]
  T* e = rho + lead * R * W;      // [lead, R, W]
  T* eta = e + lead * R * W;      // [R, W]
  T* f = eta + R * W;             // [R, W]
  T* ez = f + R * W;              // [R, W]
  const bool has_rho = grad_value != nullptr;
  bool has_eta = grad_y != nullptr;
  if (has_rho) {
    const T inv_probes = T(1) / static_cast<T>(saved.n_probes);
    for (std::int64_t q = 0; q < lead; ++q)
      for (std::int64_t r = 0; r < R; ++r) {
        const T scale = grad_value[b0 + r] * inv_probes;
        const T* row = saved.rows + (q * B + b0 + r) * D;
        T* dst = rho + q * R * W + r * D;
#pragma omp simd
        for (std::int64_t c = 0; c < D; ++c) dst[c] = row[c] * scale;
      }
  }
  if (has_eta) std::copy(grad_y + b0 * D, grad_y + b1 * D, eta);
  std::int64_t width = D;  // of ρ and η: layer i's out
  for (std::int64_t i = L - 1; i >= 0; --i) {
    const Layer<T>& layer = chain.layers[i];
    const std::int64_t in = layer.in;
    part.block_w.resize(static_cast<std::size_t>(layer.out * in));
    T* gw = part.block_w.data();  // this block's ∂W_i, then added to the thread's double sum
    bool written = false;
    // ∂W_i = ηᵀ a_{i−1} + Σ_q ρ_qᵀ u_{q,i−1}: A = ηᵀ read with strides (1, width)
    const bool flip = sums_transposed<T>(in);  // gw is [in, out]: Uᵀ A
    if (has_eta) {
      const T* prev = i == 0 ? saved.x + b0 * D : saved.a[i - 1] + b0 * in;
      if (flip)
        gemm<T>(in, R, layer.out, prev, 1, in, eta, width, gw, layer.out, false);
      else
        gemm<T>(layer.out, R, in, eta, 1, width, prev, in, gw, in, false);
      written = true;
      if (layer.bias)
        for (std::int64_t r = 0; r < R; ++r) add_to(part.grad_b[i], eta + r * width, width);
    }
    if (has_rho)
      for (std::int64_t q = 0; q < lead; ++q) {
        const T* prev = i == 0 ? saved.right + (q * B + b0) * D : saved.uf[i - 1] + (q * B + b0) * in;
        if (flip)
          gemm<T>(in, R, layer.out, prev, 1, in, rho + q * R * W, width, gw, layer.out, written);
        else
          gemm<T>(layer.out, R, in, rho + q * R * W, 1, width, prev, in, gw, in, written);
        written = true;
      }
    if (written) add_to(part.grad_w[i], gw, layer.out * in);
    if (i == 0) {
      if (grad_x) {
        T* gx = grad_x + b0 * D;
        if (grad_y)
          std::copy(grad_y + b0 * D, grad_y + b1 * D, gx);
        if (has_eta)
          product<T>(R, layer.out, D, eta, width, saved.weight[0], saved.weight_t[0].data(), gx, D, grad_y != nullptr);
        else if (!grad_y)
          std::fill(gx, gx + R * D, T(0));
      }
      break;
    }
    // f = η W_i, e_q = ρ_q W_i, ρ_q ← e_q ⊙ φ'(h_{i−1}), ez = Σ_q e_q ⊙ z_{q,i−1}
    const std::int64_t j = i - 1;
    const T* d = saved.d[j] + b0 * in;
    if (has_eta) product<T>(R, layer.out, in, eta, width, saved.weight[i], saved.weight_t[i].data(), f, in, false);
    if (has_rho) {
      std::fill(ez, ez + R * in, T(0));
      for (std::int64_t q = 0; q < lead; ++q) {
        T* eq = e + q * R * W;
        product<T>(R, layer.out, in, rho + q * R * W, width, saved.weight[i], saved.weight_t[i].data(), eq, in, false);
        const T* z = saved.z[j] + (q * B + b0) * in;
#pragma omp simd
        for (std::int64_t c = 0; c < R * in; ++c) {
          ez[c] += eq[c] * z[c];
          eq[c] *= d[c];
        }
      }
      std::swap(rho, e);
    }
    const T* s = saved.s[j] ? saved.s[j] + b0 * in : nullptr;
    if (has_eta || has_rho) {
      part.grad_beta[j] += activation_backward(chain.acts[j], has_eta ? f : nullptr, has_rho ? ez : nullptr,
                                               saved.h[j] + b0 * in, saved.a[j] + b0 * in, d, s, eta, R * in);
      has_eta = true;
    }
    width = in;
  }
}

template <typename T>
Weights<T> effective_weights(const Chain<T>& chain, const std::vector<T*>& dest, std::vector<double>& divisor,
                             std::vector<double>& kappa) {
  Weights<T> weights;
  for (std::size_t i = 0; i < chain.layers.size(); ++i) {
    const Layer<T>& layer = chain.layers[i];
    const std::int64_t out = layer.out, in = layer.in;
    double delta = 1.0, k = 0.0;
    if (layer.u) {  // σ̂/c = uᵀ (V v)/c, in T as the torch path computes it
      T ratio = 0;
      const T inv_c = static_cast<T>(1.0 / layer.coeff);
      for (std::int64_t o = 0; o < out; ++o) {
        T row = 0;
        for (std::int64_t c = 0; c < in; ++c) row += layer.weight[o * in + c] * layer.v[c];
        ratio += layer.u[o] * (row * inv_c);
      }
      delta = std::max(static_cast<double>(ratio), 1.0);
      k = static_cast<double>(ratio) >= 1.0 ? 1.0 / layer.coeff : 0.0;
    }
    divisor.push_back(delta);
    kappa.push_back(k);
    T* w = dest[i];
    const T div = static_cast<T>(delta);
    for (std::int64_t e = 0; e < out * in; ++e) w[e] = layer.u ? layer.weight[e] / div : layer.weight[e];
    weights.w.push_back(w);
    weights.wt.push_back(transposed(w, out, in));
  }
  return weights;
}

// [0, B) in `threads` contiguous ranges, each walked in blocks of kRowBlock rows.
template <typename Work>
void over_rows(std::int64_t batch, int threads, Work&& work) {
  run_workers(threads, [&](int t) {
    const std::int64_t lo = batch * t / threads, hi = batch * (t + 1) / threads;
    for (std::int64_t b0 = lo; b0 < hi; b0 += kRowBlock) work(t, b0, std::min(hi, b0 + kRowBlock));
  });
}

int threads_for(std::int64_t batch, int n_threads) {
  return worker_count(n_threads, static_cast<std::size_t>((batch + kRowBlock - 1) / kRowBlock));
}

}  // namespace

template <typename T>
std::int64_t workspace_size(const Chain<T>& chain, std::int64_t lead, bool through_series) {
  return carve<T>(chain, lead, through_series, nullptr, nullptr);
}

template <typename T>
ForwardResult chain_forward(const Chain<T>& chain, const T* x, const T* probes, std::int64_t n_probes,
                            const std::vector<std::vector<double>>& inv_prob, bool through_series, T* y, T* value,
                            T* workspace, int n_threads) {
  if (chain.layers.empty() || chain.acts.size() + 1 != chain.layers.size())
    throw std::invalid_argument("a chain has L >= 1 layers and L - 1 activations");
  if (static_cast<std::int64_t>(inv_prob.size()) != n_probes || n_probes < 1)
    throw std::invalid_argument("one series plan per probe, at least one probe");
  if (through_series)
    for (const auto& plan : inv_prob)
      if (plan.size() != inv_prob[0].size() || plan.empty())
        throw std::invalid_argument("through the series every probe needs the same number of terms (>= 1)");
  const std::int64_t lead = through_series ? n_probes * static_cast<std::int64_t>(inv_prob[0].size()) : n_probes;
  ForwardBuffers<T> out;
  carve<T>(chain, lead, through_series, workspace, &out);
  out.y = y;
  out.value = value;
  for (std::size_t i = 0; i < chain.layers.size(); ++i) {
    const Layer<T>& layer = chain.layers[i];
    if (layer.u) {
      std::copy(layer.u, layer.u + layer.out, out.u[i]);
      std::copy(layer.v, layer.v + layer.in, out.v[i]);
    }
  }
  ForwardResult result;
  const Weights<T> weights = effective_weights(chain, out.weight, result.divisor, result.kappa);
  const std::vector<Plan> plans = make_plans(inv_prob);
  const int threads = threads_for(chain.batch, n_threads);
  std::vector<char> ok(static_cast<std::size_t>(threads), 1);
  std::vector<std::vector<T>> scratch(static_cast<std::size_t>(threads));
  over_rows(chain.batch, threads, [&](int t, std::int64_t b0, std::int64_t b1) {
    if (ok[t] && !forward_rows<T>(chain, weights, x, probes, n_probes, plans, through_series, out, b0, b1, scratch[t]))
      ok[t] = 0;
  });
  result.finite = std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
  return result;
}

template <typename T>
void chain_backward(const Chain<T>& chain_in, const T* x, const T* probes, std::int64_t n_probes, std::int64_t lead,
                    bool through_series, const T* workspace, const std::vector<double>& divisor,
                    const std::vector<double>& kappa, const T* grad_y, const T* grad_value, T* grad_x,
                    const std::vector<T*>& grad_weight, const std::vector<T*>& grad_bias, T* grad_raw_beta,
                    int n_threads) {
  const std::size_t L = chain_in.layers.size();
  if (divisor.size() != L || kappa.size() != L) throw std::invalid_argument("one divisor and one kappa per layer");
  ForwardBuffers<T> views;
  carve<T>(chain_in, lead, through_series, const_cast<T*>(workspace), &views);
  Chain<T> chain = chain_in;  // the forward's u, v
  for (std::size_t i = 0; i < L; ++i)
    if (chain.layers[i].u) {
      chain.layers[i].u = views.u[i];
      chain.layers[i].v = views.v[i];
    }
  SavedForward<T> saved;
  saved.x = x;
  saved.rows = views.rows;
  saved.right = through_series ? views.right : probes;
  saved.h.assign(views.h.begin(), views.h.end());
  saved.a.assign(views.a.begin(), views.a.end());
  saved.d.assign(views.d.begin(), views.d.end());
  saved.s.assign(views.s.begin(), views.s.end());
  saved.z.assign(views.z.begin(), views.z.end());
  saved.uf.assign(views.uf.begin(), views.uf.end());
  saved.weight.assign(views.weight.begin(), views.weight.end());
  for (std::size_t i = 0; i < L; ++i)  // rebuilt, not saved: O(out·in), and the workspace stays smaller
    saved.weight_t.push_back(transposed(saved.weight[i], chain.layers[i].out, chain.layers[i].in));
  saved.divisor = divisor;
  saved.kappa = kappa;
  saved.lead = lead;
  saved.n_probes = n_probes;

  const int threads = threads_for(chain.batch, n_threads);
  std::vector<Partial<T>> parts(static_cast<std::size_t>(threads));
  for (auto& part : parts) {
    for (const auto& layer : chain.layers) {
      part.grad_w.emplace_back(static_cast<std::size_t>(layer.out * layer.in), 0.0);
      part.grad_b.emplace_back(static_cast<std::size_t>(layer.out), 0.0);
    }
    part.grad_beta.assign(L - 1, 0.0);
  }
  if (grad_y || grad_value)
    over_rows(chain.batch, threads, [&](int t, std::int64_t b0, std::int64_t b1) {
      backward_rows<T>(chain, saved, grad_y, grad_value, grad_x, b0, b1, parts[t]);
    });
  else if (grad_x)
    std::fill(grad_x, grad_x + chain.batch * chain.dim, T(0));
  for (std::size_t i = 0; i < L; ++i) {
    const Layer<T>& layer = chain.layers[i];
    const std::int64_t size = layer.out * layer.in;
    std::vector<double>& g = parts[0].grad_w[i];
    for (std::size_t t = 1; t < parts.size(); ++t)
      for (std::int64_t e = 0; e < size; ++e) g[e] += parts[t].grad_w[i][e];
    if (sums_transposed<T>(layer.in)) {  // [in, out] -> [out, in]
      const std::vector<double> sum_t = g;
      for (std::int64_t o = 0; o < layer.out; ++o)
        for (std::int64_t c = 0; c < layer.in; ++c) g[o * layer.in + c] = sum_t[c * layer.out + o];
    }
    if (grad_bias[i]) {
      for (std::int64_t o = 0; o < layer.out; ++o) {
        double sum = 0;
        for (const auto& part : parts) sum += part.grad_b[i][o];
        grad_bias[i][o] = static_cast<T>(sum);
      }
    }
    if (grad_weight[i]) {
      T* gv = grad_weight[i];
      if (layer.u) {  // ∂V = (G − ⟨G, W⟩ κ u vᵀ) / δ
        double dot = 0;
        const T* w = saved.weight[i];
        for (std::int64_t e = 0; e < size; ++e) dot += g[e] * static_cast<double>(w[e]);
        const double coef = dot * saved.kappa[i], inv = 1.0 / saved.divisor[i];
        for (std::int64_t o = 0; o < layer.out; ++o)
          for (std::int64_t c = 0; c < layer.in; ++c)
            gv[o * layer.in + c] = static_cast<T>((g[o * layer.in + c] - coef * layer.u[o] * layer.v[c]) * inv);
      } else {
        for (std::int64_t e = 0; e < size; ++e) gv[e] = static_cast<T>(g[e]);
      }
    }
    if (i + 1 < L) {
      double grad = 0;
      if (chain.acts[i].kind == ActivationKind::lipswish) {
        double sum = 0;
        for (const auto& part : parts) sum += part.grad_beta[i];
        const double beta = chain.acts[i].beta;  // ∂β/∂raw = σ(raw) = 1 − e^{−β}
        grad = sum * (beta > 20 ? 1.0 : -std::expm1(-beta)) / 1.1;
      }
      if (grad_raw_beta) grad_raw_beta[i] = static_cast<T>(grad);
    }
  }
}

#define KEXUE_INSTANTIATE(T)                                                                                      \
  template std::int64_t workspace_size<T>(const Chain<T>&, std::int64_t, bool);                                  \
  template ForwardResult chain_forward<T>(const Chain<T>&, const T*, const T*, std::int64_t,                     \
                                          const std::vector<std::vector<double>>&, bool, T*, T*, T*, int);       \
  template void chain_backward<T>(const Chain<T>&, const T*, const T*, std::int64_t, std::int64_t, bool, const T*, \
                                  const std::vector<double>&, const std::vector<double>&, const T*, const T*, T*,  \
                                  const std::vector<T*>&, const std::vector<T*>&, T*, int);
KEXUE_INSTANTIATE(float)
KEXUE_INSTANTIATE(double)
#undef KEXUE_INSTANTIATE

}  // namespace flows
}  // namespace kexue
