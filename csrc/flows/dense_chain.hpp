// One training step's worth of an invertible residual block with a dense branch, on the CPU (torch-free).
//
// g(x) = W_L φ(⋯ φ(W_1 x + b_1) ⋯) + b_L, y = x + g(x), each W_i = V_i / δ_i a spectral-normalized weight
// (δ_i = max(1, σ̂_i / c_i), σ̂_i = u_iᵀ V_i v_i) or a plain one. J = W_L D_{L−1} ⋯ D_1 W_1, D_i = diag φ'(h_i).
//
// Forward: y, the log-det estimate mean_p Σ_k c_pk v_pᵀ J^k v_p (c_pk = (−1)^{k+1} / (k P(N ≥ k)) of probe p's
// series plan), and what the backward needs: h_i, a_i, φ'(h_i), σ(βh_i) (LipSwish), and for every pair (left row
// ℓ_q, right vector r_q) of the surrogate Σ_q ℓ_qᵀ J r_q whose gradient is the estimate's gradient, the forward-mode
// vectors z_i = W_i u_{i−1}, u_i = φ'(h_i) ⊙ z_i (u_0 = r_q):
//   Neumann gradient (Residual Flows): one pair per probe, ℓ_p = Σ_k (−1)^{k+1} vᵀJ^{k−1} / P(N ≥ k), r_p = v_p;
//   through the series (i-ResNet): n pairs per probe, ℓ_j = Σ_{i<n−j} c_{i+j+1} vᵀJ^i, r_j = J^j v (one plan).
// Backward: reverse mode through the chain from ∂y and from ρ_L = ∂value · ℓ_q / P, with the closed forms of
// kexue_fast/flows/chain_neumann.py (the torch path this mirrors, operation for operation):
//   ∂W_i += ηᵀ a_{i−1} + Σ_q ρ_qᵀ u_{q,i−1},  e_q = ρ_q W_i,  ρ_q ← e_q ⊙ φ'(h_{i−1}),  ez = Σ_q e_q ⊙ z_{q,i−1},
//   η ← (η W_i) ⊙ φ'(h_{i−1}) + ez ⊙ φ''(h_{i−1}),  ∂x = ∂y + η W_1,
// and the spectral norms folded in: ∂V = (G − ⟨G, W⟩ κ u vᵀ) / δ, κ = [σ̂/c ≥ 1] / c.
// Rows are independent until the weight gradients' sums, so threads take contiguous row ranges and their partial
// sums are added in thread order (deterministic for a given thread count).
#pragma once

#include <cstdint>
#include <vector>

namespace kexue {
namespace flows {

enum class ActivationKind : int { lipswish = 0, elu = 1, tanh = 2, leaky = 3 };

struct Activation {
  ActivationKind kind = ActivationKind::lipswish;
  double constant = 0.0;  // ELU's α, LeakyReLU's slope
  double beta = 1.0;      // LipSwish's β = softplus(raw β)
};

template <typename T>
struct Layer {
  const T* weight = nullptr;  // V [out, in], row-major
  const T* bias = nullptr;    // [out] or nullptr
  const T* u = nullptr;       // the spectral norm's vectors [out] and [in], or nullptr (W = V)
  const T* v = nullptr;
  double coeff = 1.0;  // c
  std::int64_t out = 0, in = 0;
};

template <typename T>
struct Chain {
  std::int64_t batch = 0, dim = 0;  // B, D = layers.front().in = layers.back().out
  std::vector<Layer<T>> layers;     // L >= 1
  std::vector<Activation> acts;     // L - 1
};

// One caller-allocated buffer of workspace_size elements carries everything from the forward to the backward, in
// this order: ℓ_q [lead, B, D]; through the series r_q = J^j v [lead, B, D]; per hidden layer i: h_i, a_i, φ'(h_i)
// [B, H_i], σ(βh_i) [B, H_i] (LipSwish only), z_i, u_i [lead, B, H_i]; per layer: the effective W_i [out, in] and,
// with a spectral norm, the snapshot of u_i [out], v_i [in] (the power iteration may rewrite them before the
// backward). lead = P for the Neumann gradient (r_p = v_p, the probes), P·n through the series.
template <typename T>
std::int64_t workspace_size(const Chain<T>& chain, std::int64_t lead, bool through_series);

struct ForwardResult {
  std::vector<double> divisor, kappa;  // δ_i, κ_i per layer (1 and 0 without a spectral norm)
  bool finite = true;                  // every entry of x finite (nothing else is meaningful when false)
};

// x [B, D], probes [P, B, D]; inv_prob[p] = (1/P(N ≥ k))_{k=1..n_p}; through_series needs one n for every probe (pad
// with zeros). Writes y [B, D], value [B] and the workspace.
template <typename T>
ForwardResult chain_forward(const Chain<T>& chain, const T* x, const T* probes, std::int64_t n_probes,
                            const std::vector<std::vector<double>>& inv_prob, bool through_series, T* y, T* value,
                            T* workspace, int n_threads);

// The same chain (its u, v are read from the workspace's snapshot), x, probes and workspace as the forward. grad_y
// [B, D] and grad_value [B] may be nullptr (zero). Outputs: grad_x [B, D] (nullptr: not wanted), grad_weight [L] of
// [out, in] (∂V through the folded norm, or ∂W), grad_bias [L] of [out] (entries may be nullptr), grad_raw_beta
// [L − 1] (∂/∂ raw β of each LipSwish, 0 elsewhere).
template <typename T>
void chain_backward(const Chain<T>& chain, const T* x, const T* probes, std::int64_t n_probes, std::int64_t lead,
                    bool through_series, const T* workspace, const std::vector<double>& divisor,
                    const std::vector<double>& kappa, const T* grad_y, const T* grad_value, T* grad_x,
                    const std::vector<T*>& grad_weight, const std::vector<T*>& grad_bias, T* grad_raw_beta,
                    int n_threads);

}  // namespace flows
}  // namespace kexue
