// The Self-Orthogonality regularizer's heavy part on the CPU (torch-free): the Gram G = ZᵀZ of Z = tanh(γY) and its
// backward ∂Y = (A Z) ⊙ (1 − Z²) for A = γ(Ḡ + Ḡᵀ); som_penalty forms R and A from G (the som_penalty binding in
// csrc/bindings.cpp runs both in one call for kexue_fast/ortho/som.py's _CppPenalty; G itself is not exposed).
//
// Y is read in place as [n, c, s] (c channels; the rows of Y as [b, k] are the (i, position) pairs, b = n·s): an NCHW
// convolution output is n = N, s = H·W; an [N, k] linear output is s = 1. Each sample's Z_i [c, s] (or a block of
// rows when s = 1) is computed into a cache-sized scratch and used there; som_gram also stores it into z_out where
// given (for the backward's from_z), else the backward recomputes it. G = Σ_i Z_i Z_iᵀ: for s > 1 by dot-product
// register tiles along the positions (no transposition), only the upper triangle's tiles, over chunks of up to 1024 positions (several samples side by side when s < 1024) summed
// in the input's type and added in double per chunk; for s = 1 by broadcast tiles over blocks of rows. Samples are
// split over threads, partial Grams added in thread order (deterministic for a given thread count).
#pragma once

#include <cstdint>

namespace kexue {
namespace ortho {

// The row stride of a kept Z (som_gram's z_out, the backward's from_z input, laid out [n, c, z_stride]): s, or s plus
// one 64-byte line where s elements of `elem_bytes` bytes fill a multiple of 1 KiB, whose rows would share a few L1
// sets (the backward's tiles read c such rows at once).
std::int64_t z_stride(std::int64_t s, std::int64_t elem_bytes);

// G [c, c] (double) of Z = tanh(γ y); z_out (optional, n·c·z_stride elements): Z itself, for a backward with from_z.
template <typename T>
void som_gram(const T* y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, double* gram, int n_threads,
              T* z_out = nullptr);

// dy [n, c, s] = (A Z_i) ⊙ (1 − Z_i²) per sample, Z = tanh(γ y), for a [c, c] symmetric (row-major); add: dy += that
// (dy read: a gradient of Y to add ∂R/∂Y into, in one pass); from_z: y is Z itself (som_gram's z_out, rows
// z_stride apart), no tanh.
template <typename T>
void som_gram_backward(const T* y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, const T* a, T* dy,
                       int n_threads, bool add = false, bool from_z = false);

// R = λ₁s₁² + λ₂s₂ (s₁ = Σ_{i≠j}Θ_ij, s₂ = Σ_{i≠j}Θ_ij², Θ = D⁻¹GD⁻¹, D_ii = max(√G_ii, eps)) of a symmetric Gram
// [c, c], and when a is not null A = γ(Ḡ + Ḡᵀ) [c, c] at a unit upstream gradient, Ḡ = ∂R/∂G (the backward's
// input above; kexue_fast/ortho/som.py's _GramPenalty has the same formulas in torch).
double som_penalty(const double* gram, std::int64_t c, double gamma, double lambda1, double lambda2, double eps,
                   double* a);

}  // namespace ortho
}  // namespace kexue
