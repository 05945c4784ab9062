// Jacobi elliptic functions and complete elliptic integrals, elementwise over arrays (torch-free).
// The algorithms of kexue_fast/rope/elliptic.py (Cephes' ellpj: the descending Landen transformation, with its
// first-order series for m < 1e-9, closed forms at m = 1; K and E by the arithmetic-geometric mean), in double precision
// whatever the storage type.
#pragma once

#include <cstdint>

namespace kexue::rope {

// sn, cn, dn, am = phi and the Jacobi zeta Z(u | m) of u[i], m[i], i < n, for 0 <= m <= 1 (NaN outside). mp: null,
// or mp[i] = 1 - m[i] held more exactly than 1 - m rounds (m near 1).
template <typename T>
void jacobi_elliptic(const T* u, const T* m, const T* mp, std::int64_t n, T* sn, T* cn, T* dn, T* am, T* zeta,
                     int threads);

// K(m), E(m) for m <= 1 (NaN above); K(1) = inf, E(1) = 1.
template <typename T>
void complete_integrals(const T* m, std::int64_t n, T* k, T* e, int threads);

}  // namespace kexue::rope
