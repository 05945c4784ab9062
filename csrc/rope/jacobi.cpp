#include "rope/jacobi.hpp"

#include <cfloat>
#include <cmath>
#include <limits>

#include "common/parallel.hpp"

namespace kexue::rope {
namespace {

constexpr int kLandenLevels = 8;         // Cephes ellpj stops after 8 halvings
constexpr int kAgmSteps = 12;            // quadratic convergence, as elliptic._AGM_STEPS
constexpr double kSmallM = 1e-9;         // below: first-order series in m, where also m |u| < kSmallMU
constexpr double kSmallMU = 1e-8;        // the series' next term grows as (m u)^2: past it the Landen path
// At m = 1 the closed forms tanh u, sech u. Cephes also takes the first-order series in m' for m >= 1 - 1e-10,
// wrong once m' cosh^2 u is not small; the Landen transformation is accurate there (rope/elliptic.py).
constexpr double kNearOne = 1.0;
constexpr double kMachep = DBL_EPSILON / 2;
constexpr double kPi = 3.14159265358979323846;

struct Jacobi {
  double sn, cn, dn, am, zeta;
};

// mp = 1 - m, passed when the caller holds it more exactly than 1 - m rounds (NaN: compute 1 - m here).
Jacobi jacobi_one(double u, double m, double mp) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!(m >= 0 && m <= 1)) return {nan, nan, nan, nan, nan};
  Jacobi r{};
  // The general path (for m >= 1 it runs at m = 0.5 and is overwritten below, as in the torch reference).
  // m = 1 itself: the closed forms below; with m' given, only where m' = 0 (mu of a very negative m rounds to 1)
  const bool at_one = std::isnan(mp) ? m >= kNearOne : mp <= 0;
  const double mg = at_one ? 0.5 : m;
  const double mpg = at_one ? 0.5 : (std::isnan(mp) ? 1 - mg : mp);
  double a[kLandenLevels + 1], c[kLandenLevels + 1];
  a[0] = 1;
  c[0] = std::sqrt(mg);
  double b = std::sqrt(mpg);
  int levels = 0;
  bool running = std::fabs(c[0] / a[0]) > kMachep;
  while (running && levels < kLandenLevels) {
    const double ai = a[levels];
    ++levels;
    c[levels] = (ai - b) / 2;
    a[levels] = (ai + b) / 2;
    b = std::sqrt(ai * b);
    running = std::fabs(c[levels] / a[levels]) > kMachep;
  }
  double phi = std::ldexp(a[levels] * u, levels);
  double prev = phi;
  double zeta = 0;
  for (int i = levels; i >= 1; --i) {
    const double sin_phi = std::sin(phi);
    zeta += c[i] * sin_phi;
    const double t = c[i] * sin_phi / a[i];
    prev = phi;
    phi = (std::asin(t) + phi) / 2;
  }
  r.sn = std::sin(phi);
  r.cn = std::cos(phi);
  const double dn_factor = std::cos(phi - prev);
  // DLMF 22.20(ii): the quotient loses digits when cos(phi1 - phi0) is small; the square root is then well conditioned
  // (1 - m sn^2 = m' + m cn^2: no cancellation for m near 1)
  r.dn = std::fabs(dn_factor) < 0.1 ? std::sqrt(mpg + mg * r.cn * r.cn) : r.cn / dn_factor;
  if (levels == 0) r.dn = 1;  // m = 0: phi = u
  r.am = phi;
  r.zeta = zeta;
  if (m < kSmallM && m * std::fabs(u) < kSmallMU) {  // sn = sin u - (m/4)(u - sin u cos u) cos u + O(m^2 u^2), ...
    const double sin_u = std::sin(u), cos_u = std::cos(u);
    const double ai = 0.25 * m * (u - sin_u * cos_u);
    r.sn = sin_u - ai * cos_u;
    r.cn = cos_u + ai * sin_u;
    r.am = u - ai;
    r.dn = 1 - 0.5 * m * sin_u * sin_u;
  }
  if (at_one) {  // m' = 0: sn = tanh u, cn = dn = sech u, am = gd u, Z = tanh u (DLMF 22.5(ii)); sech -> 0 and
                 // gd -> +-pi/2 past cosh's overflow (a first-order series in m' here gave 0 * inf / inf = NaN)
    const double th = std::tanh(u), sech = 1 / std::cosh(u);
    r.sn = th;
    r.am = std::atan(std::sinh(u));
    r.cn = sech;
    r.dn = sech;
    r.zeta = th;
  }
  return r;
}

void complete_one(double m, double& k, double& e) {
  if (!(m <= 1)) {
    k = e = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  double a = 1, b = std::sqrt(1 - m), weight = 0.5, s = 0.5 * m;
  for (int i = 0; i < kAgmSteps; ++i) {
    const double c = (a - b) / 2;
    const double next_b = std::sqrt(a * b);
    a = (a + b) / 2;
    b = next_b;
    weight *= 2;
    s += weight * c * c;
    if (std::fabs(c) <= DBL_EPSILON * a) break;
  }
  if (m == 1) {
    k = std::numeric_limits<double>::infinity();
    e = 1;
    return;
  }
  k = kPi / (2 * a);
  e = k * (1 - s);
}

// Contiguous chunks of at least 4096 elements per worker: the work per element is ~100 ns.
template <typename Body>
void for_chunks(std::int64_t n, int threads, Body&& body) {
  const std::int64_t min_chunk = 4096;
  const int workers = worker_count(threads, static_cast<std::size_t>((n + min_chunk - 1) / min_chunk));
  const std::int64_t per = (n + workers - 1) / workers;
  run_workers(workers, [&](int t) {
    const std::int64_t begin = t * per, end = std::min<std::int64_t>(n, begin + per);
    for (std::int64_t i = begin; i < end; ++i) body(i);
  });
}

}  // namespace

template <typename T>
void jacobi_elliptic(const T* u, const T* m, const T* mp, std::int64_t n, T* sn, T* cn, T* dn, T* am, T* zeta,
                     int threads) {
  for_chunks(n, threads, [&](std::int64_t i) {
    const double mpi = mp ? static_cast<double>(mp[i]) : std::numeric_limits<double>::quiet_NaN();
    const Jacobi r = jacobi_one(static_cast<double>(u[i]), static_cast<double>(m[i]), mpi);
    sn[i] = static_cast<T>(r.sn);
    cn[i] = static_cast<T>(r.cn);
    dn[i] = static_cast<T>(r.dn);
    am[i] = static_cast<T>(r.am);
    zeta[i] = static_cast<T>(r.zeta);
  });
}

template <typename T>
void complete_integrals(const T* m, std::int64_t n, T* k, T* e, int threads) {
  for_chunks(n, threads, [&](std::int64_t i) {
    double kd, ed;
    complete_one(static_cast<double>(m[i]), kd, ed);
    k[i] = static_cast<T>(kd);
    e[i] = static_cast<T>(ed);
  });
}

template void jacobi_elliptic<float>(const float*, const float*, const float*, std::int64_t, float*, float*, float*,
                                     float*, float*, int);
template void jacobi_elliptic<double>(const double*, const double*, const double*, std::int64_t, double*, double*,
                                      double*, double*, double*, int);
template void complete_integrals<float>(const float*, std::int64_t, float*, float*, int);
template void complete_integrals<double>(const double*, std::int64_t, double*, double*, int);

}  // namespace kexue::rope
