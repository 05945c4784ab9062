// The only file that includes pybind11: it turns NumPy buffers into raw pointers for the torch-free cores.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/cpu_features.hpp"
#include "common/omp_team.hpp"
#include "flows/dense_chain.hpp"
#include "hsic/hsic_stats.hpp"
#include "hsic/pair_select.hpp"
#include "infomap/infomap.hpp"
#include "jose/jose.hpp"
#include "ortho/som_gram.hpp"
#include "rope/jacobi.hpp"
#include "spectral/power_iteration.hpp"

namespace py = pybind11;
namespace ks = kexue::spectral;
namespace kh = kexue::hsic;
namespace ki = kexue::infomap;
namespace kr = kexue::rope;
namespace kf = kexue::flows;

namespace {

// Arrays may be element-misaligned (np.frombuffer at an odd offset, or a torch tensor made so: torch.frombuffer(buf,
// offset=1)); the cores load whole elements and vectors from them (undefined behaviour, UBSan: "load of misaligned
// address"): refused.
template <typename A>
const A& aligned(const A& arr, const std::string& name) {
  if (arr && !(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(name + "'s data is not aligned to its element size (a tensor or array made at a byte offset, "
                                 "e.g. torch.frombuffer(buf, offset=1)); the C++ core needs aligned data: pass a copy "
                                 "(t.clone(), or np.require(a, requirements='A'))");
  return arr;
}

template <typename T>
py::tuple power_iteration_typed(const py::list& weights, const py::list& us, const py::list& vs, int n_iters,
                                double tol, double eps, int n_threads) {
  const std::size_t count = weights.size();
  std::vector<ks::PowerIterationProblem<T>> problems;
  problems.reserve(count);
  // Keep the arrays alive (and their buffers pinned) while the GIL is released.
  std::vector<py::array_t<T>> keep;
  keep.reserve(3 * count);
  for (std::size_t i = 0; i < count; ++i) {
    auto w = py::reinterpret_borrow<py::array>(weights[i]);
    auto u = py::reinterpret_borrow<py::array>(us[i]);
    auto v = py::reinterpret_borrow<py::array>(vs[i]);
    const std::string where = "[" + std::to_string(i) + "]";
    if (w.ndim() != 2) throw py::value_error("weights" + where + " must be 2-D");
    if (!(w.flags() & py::array::c_style)) throw py::value_error("weights" + where + " must be C-contiguous");
    if (u.ndim() != 1 || u.shape(0) != w.shape(0) || !(u.flags() & py::array::c_style) || !u.writeable())
      throw py::value_error("u" + where + " must be a writeable contiguous vector of length weights.shape[0]");
    if (v.ndim() != 1 || v.shape(0) != w.shape(1) || !(v.flags() & py::array::c_style) || !v.writeable())
      throw py::value_error("v" + where + " must be a writeable contiguous vector of length weights.shape[1]");
    auto wt = aligned(py::array_t<T>::ensure(w), "w");
    auto ut = aligned(py::array_t<T>::ensure(u), "u");
    auto vt = aligned(py::array_t<T>::ensure(v), "v");
    if (!wt || !ut || !vt || !py::isinstance<py::array_t<T>>(w) || !py::isinstance<py::array_t<T>>(u) ||
        !py::isinstance<py::array_t<T>>(v))
      throw py::type_error("weights, u and v" + where + " must all have the same floating dtype");
    problems.push_back({wt.data(), w.shape(0), w.shape(1), ut.mutable_data(), vt.mutable_data()});
    keep.push_back(std::move(wt));
    keep.push_back(std::move(ut));
    keep.push_back(std::move(vt));
  }
  py::array_t<T> sigma(static_cast<py::ssize_t>(count));
  T* sigma_ptr = sigma.mutable_data();
  ks::PowerIterationOptions options;
  options.n_iters = n_iters;
  options.tol = tol;
  options.eps = eps;
  options.n_threads = n_threads;
  std::vector<int> iterations;
  {
    py::gil_scoped_release release;
    iterations = ks::power_iteration_batch<T>(problems, options, sigma_ptr);
  }
  return py::make_tuple(sigma, iterations);
}

py::tuple power_iteration(const py::list& weights, const py::list& us, const py::list& vs, int n_iters, double tol,
                          double eps, int n_threads) {
  if (weights.size() != us.size() || weights.size() != vs.size())
    throw py::value_error("weights, u and v must be lists of the same length");
  if (n_iters < 1) throw py::value_error("n_iters must be >= 1");
  if (weights.size() == 0) return py::make_tuple(py::array_t<float>(0), std::vector<int>{});
  auto first = py::reinterpret_borrow<py::array>(weights[0]);
  if (py::isinstance<py::array_t<float>>(first))
    return power_iteration_typed<float>(weights, us, vs, n_iters, tol, eps, n_threads);
  if (py::isinstance<py::array_t<double>>(first))
    return power_iteration_typed<double>(weights, us, vs, n_iters, tol, eps, n_threads);
  throw py::type_error("weights must be float32 or float64 arrays");
}

// Kernel codes 0..4 (gaussian, laplace, imq, linear, delta), each side at least one column, and a delta side one
// column of labels (the delta kernel compares first entries: with none it read a null pointer).
void check_kernels(const py::array& x, const py::array& y, int kernel_x, int kernel_y) {
  for (int k : {kernel_x, kernel_y})
    if (k < 0 || k > 4) throw py::value_error("kernel codes are 0..4 (gaussian, laplace, imq, linear, delta)");
  if (x.shape(1) < 1 || y.shape(1) < 1) throw py::value_error("x and y need at least one column each");
  if ((kernel_x == 4 && x.shape(1) != 1) || (kernel_y == 4 && y.shape(1) != 1))
    throw py::value_error("a delta kernel's side must be one column of labels [n, 1]");
}

template <typename T>
py::tuple hsic_stats_typed(const py::array& x_in, const py::array& y_in, kh::KernelParams kx, kh::KernelParams ky,
                           int n_threads) {
  auto x = aligned(py::array_t<T, py::array::c_style>::ensure(x_in), "x");
  auto y = aligned(py::array_t<T, py::array::c_style>::ensure(y_in), "y");
  if (!x || !y) throw py::type_error("x and y must be arrays of one floating dtype");
  const std::int64_t n = x.shape(0), dx = x.shape(1), dy = y.shape(1);
  const T* xp = x.data();
  const T* yp = y.data();
  kh::Stats st;
  {
    py::gil_scoped_release release;
    st = kh::streaming_stats<T>(xp, dx, yp, dy, n, kx, ky, n_threads);
  }
  py::array_t<double> rk(static_cast<py::ssize_t>(n)), rl(static_cast<py::ssize_t>(n));
  std::copy(st.rk.begin(), st.rk.end(), rk.mutable_data());
  std::copy(st.rl.begin(), st.rl.end(), rl.mutable_data());
  return py::make_tuple(st.s_kl, st.s_kk, st.s_ll, rk, rl);
}

py::tuple hsic_stats(const py::array& x, const py::array& y, int kernel_x, double sigma_x, int kernel_y,
                     double sigma_y, int n_threads) {
  if (x.ndim() != 2 || y.ndim() != 2) throw py::value_error("x and y must be 2-D arrays [n, d]");
  if (x.shape(0) != y.shape(0)) throw py::value_error("x and y must have the same number of rows");
  check_kernels(x, y, kernel_x, kernel_y);
  const kh::KernelParams kx{static_cast<kh::Kernel>(kernel_x), sigma_x};
  const kh::KernelParams ky{static_cast<kh::Kernel>(kernel_y), sigma_y};
  const bool f32 = py::isinstance<py::array_t<float>>(x) && py::isinstance<py::array_t<float>>(y);
  const bool f64 = py::isinstance<py::array_t<double>>(x) && py::isinstance<py::array_t<double>>(y);
  if (f32) return hsic_stats_typed<float>(x, y, kx, ky, n_threads);
  if (f64) return hsic_stats_typed<double>(x, y, kx, ky, n_threads);
  throw py::type_error("x and y must both be float32 or both float64 arrays");
}

using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

template <typename T>
py::tuple hsic_grad_typed(const py::array& x_in, const py::array& y_in, kh::KernelParams kx, kh::KernelParams ky,
                          const kh::GradCoefficients& g, bool need_x, bool need_y, int n_threads) {
  auto x = aligned(py::array_t<T, py::array::c_style>::ensure(x_in), "x");
  auto y = aligned(py::array_t<T, py::array::c_style>::ensure(y_in), "y");
  const std::int64_t n = x.shape(0), dx = x.shape(1), dy = y.shape(1);
  py::object gx = py::none(), gy = py::none();
  double* gxp = nullptr;
  double* gyp = nullptr;
  if (need_x) {
    py::array_t<double> a({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(dx)});
    gxp = a.mutable_data();
    gx = a;
  }
  if (need_y) {
    py::array_t<double> a({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(dy)});
    gyp = a.mutable_data();
    gy = a;
  }
  const T* xp = x.data();
  const T* yp = y.data();
  {
    py::gil_scoped_release release;
    kh::streaming_grad<T>(xp, dx, yp, dy, n, kx, ky, g, gxp, gyp, n_threads);
  }
  return py::make_tuple(gx, gy);
}

py::tuple hsic_grad(const py::array& x, const py::array& y, int kernel_x, double sigma_x, int kernel_y,
                    double sigma_y, double a, double b_k, double b_l, const F64Array& u_k, const F64Array& u_l,
                    bool need_x, bool need_y, int n_threads) {
  if (x.ndim() != 2 || y.ndim() != 2) throw py::value_error("x and y must be 2-D arrays [n, d]");
  const std::int64_t n = x.shape(0);
  if (y.shape(0) != n) throw py::value_error("x and y must have the same number of rows");
  if (u_k.ndim() != 1 || u_k.shape(0) != n || u_l.ndim() != 1 || u_l.shape(0) != n)
    throw py::value_error("u_k and u_l must be vectors of length n");
  check_kernels(x, y, kernel_x, kernel_y);
  const kh::KernelParams kx{static_cast<kh::Kernel>(kernel_x), sigma_x};
  const kh::KernelParams ky{static_cast<kh::Kernel>(kernel_y), sigma_y};
  kh::GradCoefficients g;
  g.a = a;
  g.b_k = b_k;
  g.b_l = b_l;
  g.u_k = u_k.data();
  g.u_l = u_l.data();
  if (py::isinstance<py::array_t<float>>(x) && py::isinstance<py::array_t<float>>(y))
    return hsic_grad_typed<float>(x, y, kx, ky, g, need_x, need_y, n_threads);
  if (py::isinstance<py::array_t<double>>(x) && py::isinstance<py::array_t<double>>(y))
    return hsic_grad_typed<double>(x, y, kx, ky, g, need_x, need_y, n_threads);
  throw py::type_error("x and y must both be float32 or both float64 arrays");
}

template <typename T>
py::array_t<double> permuted_cross_sums_typed(const py::array& x_in, const py::array& y_in, kh::KernelParams kx,
                                              kh::KernelParams ky, const std::int64_t* perms,
                                              std::int64_t n_perms, int n_threads) {
  auto x = aligned(py::array_t<T, py::array::c_style>::ensure(x_in), "x");
  auto y = aligned(py::array_t<T, py::array::c_style>::ensure(y_in), "y");
  const std::int64_t n = x.shape(0), dx = x.shape(1), dy = y.shape(1);
  py::array_t<double> out(static_cast<py::ssize_t>(n_perms));
  double* op = out.mutable_data();
  const T* xp = x.data();
  const T* yp = y.data();
  {
    py::gil_scoped_release release;
    kh::permuted_cross_sums<T>(xp, dx, yp, dy, n, kx, ky, perms, n_perms, op, n_threads);
  }
  return out;
}

py::array_t<double> hsic_permuted_cross_sums(
    const py::array& x, const py::array& y, int kernel_x, double sigma_x, int kernel_y, double sigma_y,
    const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& perms, int n_threads) {
  if (x.ndim() != 2 || y.ndim() != 2) throw py::value_error("x and y must be 2-D arrays [n, d]");
  const std::int64_t n = x.shape(0);
  if (y.shape(0) != n) throw py::value_error("x and y must have the same number of rows");
  if (perms.ndim() != 2 || perms.shape(1) != n) throw py::value_error("perms must be [P, n]");
  const std::int64_t* pp = perms.data();
  for (std::int64_t q = 0; q < perms.size(); ++q)  // out-of-range indices would read outside y
    if (pp[q] < 0 || pp[q] >= n) throw py::value_error("perms must hold indices in [0, n)");
  check_kernels(x, y, kernel_x, kernel_y);
  const kh::KernelParams kx{static_cast<kh::Kernel>(kernel_x), sigma_x};
  const kh::KernelParams ky{static_cast<kh::Kernel>(kernel_y), sigma_y};
  if (py::isinstance<py::array_t<float>>(x) && py::isinstance<py::array_t<float>>(y))
    return permuted_cross_sums_typed<float>(x, y, kx, ky, pp, perms.shape(0), n_threads);
  if (py::isinstance<py::array_t<double>>(x) && py::isinstance<py::array_t<double>>(y))
    return permuted_cross_sums_typed<double>(x, y, kx, ky, pp, perms.shape(0), n_threads);
  throw py::type_error("x and y must both be float32 or both float64 arrays");
}

template <typename T>
py::tuple kth_pair_typed(const py::array& x_in, std::int64_t k, const kh::PairSelectOptions& options) {
  auto x = aligned(py::array_t<T, py::array::c_style>::ensure(x_in), "x");
  const std::int64_t n = x.shape(0), d = x.shape(1);
  const T* xp = x.data();
  for (std::int64_t e = 0; e < n * d; ++e)  // NaN distances are never counted: the search for the k-th never ended
    if (!std::isfinite(xp[e])) throw py::value_error("x must be finite (no NaN or Inf)");
  kh::PairSelectResult r;
  {
    py::gil_scoped_release release;
    r = kh::kth_pair_sq_distance<T>(xp, n, d, k, options);
  }
  return py::make_tuple(r.value, r.next, r.passes);
}

py::tuple kth_pair_sq_distance(const py::array& x, std::int64_t k, std::int64_t sample, std::int64_t buffer,
                               std::uint64_t seed, int n_threads) {
  if (x.ndim() != 2 || x.shape(0) < 2) throw py::value_error("x must be a 2-D array [n, d] with n >= 2");
  const std::int64_t n = x.shape(0);
  if (k < 0 || k >= n * (n - 1) / 2) throw py::value_error("k must be in [0, n(n-1)/2)");
  if (sample < 0 || buffer < 1) throw py::value_error("sample must be >= 0 and buffer >= 1");
  kh::PairSelectOptions options;
  options.sample = sample;
  options.buffer = buffer;
  options.seed = seed;
  options.n_threads = n_threads;
  if (py::isinstance<py::array_t<float>>(x)) return kth_pair_typed<float>(x, k, options);
  if (py::isinstance<py::array_t<double>>(x)) return kth_pair_typed<double>(x, k, options);
  throw py::type_error("x must be a float32 or float64 array");
}

using I64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

ki::FlowGraph flow_graph(std::int64_t n, const F64Array& node_flow, const I64Array& source, const I64Array& target,
                         const F64Array& link_flow, bool symmetric, const py::object& teleport) {
  if (n < 1) throw py::value_error("the graph needs at least one node");
  if (node_flow.ndim() != 1 || node_flow.shape(0) != n) throw py::value_error("node_flow must have length n");
  const py::ssize_t m = source.size();
  if (source.ndim() != 1 || target.ndim() != 1 || link_flow.ndim() != 1 || target.size() != m ||
      link_flow.size() != m)
    throw py::value_error("source, target and link_flow must be vectors of one length");
  ki::FlowGraph g;
  g.n = n;
  g.symmetric = symmetric;
  g.node_flow.assign(node_flow.data(), node_flow.data() + n);
  g.source.assign(source.data(), source.data() + m);
  g.target.assign(target.data(), target.data() + m);
  g.link_flow.assign(link_flow.data(), link_flow.data() + m);
  for (py::ssize_t e = 0; e < m; ++e)
    if (g.source[e] < 0 || g.source[e] >= n || g.target[e] < 0 || g.target[e] >= n)
      throw py::value_error("link endpoints must be node indices in [0, n)");
  if (!teleport.is_none()) {  // recorded teleportation: [2, n] = (T, tau) per node
    const auto tele = teleport.cast<F64Array>();
    if (tele.ndim() != 2 || tele.shape(0) != 2 || tele.shape(1) != n)
      throw py::value_error("teleport must have shape [2, n]: teleport flow and teleport weight per node");
    g.teleport_flow.assign(tele.data(), tele.data() + n);
    g.teleport_weight.assign(tele.data() + n, tele.data() + 2 * n);
  }
  return g;
}

ki::Options infomap_options(int num_trials, std::uint64_t seed, int core_loop_limit, int tune_iteration_limit,
                            int n_threads) {
  ki::Options o;
  o.num_trials = num_trials;
  o.seed = seed;
  o.core_loop_limit = core_loop_limit;
  o.tune_iteration_limit = tune_iteration_limit;
  o.n_threads = n_threads;
  return o;
}

py::array_t<std::int64_t> paths_array(const std::vector<std::int64_t>& paths, std::int64_t depth, std::int64_t n) {
  py::array_t<std::int64_t> out({static_cast<py::ssize_t>(depth), static_cast<py::ssize_t>(n)});
  std::copy(paths.begin(), paths.end(), out.mutable_data());
  return out;
}

py::tuple infomap_two_level(std::int64_t n, const F64Array& node_flow, const I64Array& source,
                            const I64Array& target, const F64Array& link_flow, bool symmetric, int num_trials,
                            std::uint64_t seed, int core_loop_limit, int tune_iteration_limit, int n_threads,
                            const py::object& teleport) {
  ki::FlowGraph g = flow_graph(n, node_flow, source, target, link_flow, symmetric, teleport);
  const ki::Options o = infomap_options(num_trials, seed, core_loop_limit, tune_iteration_limit, n_threads);
  ki::Result r;
  {
    py::gil_scoped_release release;
    r = ki::two_level(g, o);
  }
  py::array_t<std::int64_t> modules(static_cast<py::ssize_t>(n));
  std::copy(r.modules.begin(), r.modules.end(), modules.mutable_data());
  return py::make_tuple(modules, r.codelength, r.index_codelength, r.module_codelength, r.one_level_codelength,
                        r.num_modules, r.best_trial);
}

py::tuple infomap_map_equation(std::int64_t n, const F64Array& node_flow, const I64Array& source,
                               const I64Array& target, const F64Array& link_flow, const I64Array& modules,
                               const py::object& teleport) {
  ki::FlowGraph g = flow_graph(n, node_flow, source, target, link_flow, false, teleport);
  if (modules.ndim() != 1 || modules.shape(0) != n) throw py::value_error("modules must have length n");
  std::vector<std::int64_t> mod(modules.data(), modules.data() + n);
  for (std::int64_t m : mod)
    if (m < 0 || m >= n) throw py::value_error("module ids must be in [0, n)");
  const ki::Codelength c = ki::map_equation(g, mod);
  return py::make_tuple(c.codelength, c.index_codelength, c.module_codelength);
}

py::tuple infomap_multilevel(std::int64_t n, const F64Array& node_flow, const I64Array& source,
                             const I64Array& target, const F64Array& link_flow, bool symmetric, int num_trials,
                             std::uint64_t seed, int core_loop_limit, int tune_iteration_limit, int n_threads,
                             const py::object& teleport) {
  const ki::FlowGraph g = flow_graph(n, node_flow, source, target, link_flow, symmetric, teleport);
  const ki::Options o = infomap_options(num_trials, seed, core_loop_limit, tune_iteration_limit, n_threads);
  ki::MultilevelResult r;
  {
    py::gil_scoped_release release;
    r = ki::multilevel(g, o);
  }
  return py::make_tuple(paths_array(r.paths, r.depth, n), r.codelength, r.index_codelength, r.one_level_codelength,
                        r.best_trial);
}

py::tuple infomap_tree_codelength(std::int64_t n, const F64Array& node_flow, const I64Array& source,
                                  const I64Array& target, const F64Array& link_flow, const I64Array& paths,
                                  const py::object& teleport) {
  const ki::FlowGraph g = flow_graph(n, node_flow, source, target, link_flow, false, teleport);
  if (paths.ndim() != 2 || paths.shape(1) != n) throw py::value_error("paths must have shape [depth, n]");
  const std::vector<std::int64_t> p(paths.data(), paths.data() + paths.size());
  ki::TreeCodelength c;
  try {
    c = ki::tree_codelength(g, p, paths.shape(0));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return py::make_tuple(c.codelength, c.index_codelength);
}

// ---- JoSE (csrc/jose) ----------------------------------------------------------------------------------------

py::tuple jose_encode_file(const std::string& path, std::int64_t min_count) {
  kexue::jose::EncodedFile f;
  {
    py::gil_scoped_release release;
    f = kexue::jose::encode_file(path, min_count);
  }
  py::array_t<std::int64_t> counts(static_cast<py::ssize_t>(f.counts.size()));
  std::copy(f.counts.begin(), f.counts.end(), counts.mutable_data());
  py::array_t<std::int32_t> stream(static_cast<py::ssize_t>(f.stream.size()));
  std::copy(f.stream.begin(), f.stream.end(), stream.mutable_data());
  py::list words;  // bytes: a file need not be UTF-8 (jose.c takes any bytes); Python decodes them losslessly
  for (const std::string& w : f.words) words.append(py::bytes(w));
  return py::make_tuple(words, counts, stream, f.n_docs, f.raw_tokens);
}

// The tables are written in place: a converted copy would silently drop the training, so nothing is converted.
float* jose_table(py::array& t, std::int64_t rows, int dim, const char* name) {
  if (!py::isinstance<py::array_t<float>>(t) || !(t.flags() & py::array::c_style) || t.ndim() != 2 ||
      t.shape(0) != rows || t.shape(1) != dim || !t.writeable())
    throw py::value_error(std::string(name) + " must be a writeable C-contiguous float32 array [" +
                          std::to_string(rows) + ", " + std::to_string(dim) + "]");
  aligned(t, name);
  return static_cast<float*>(t.mutable_data());
}

void jose_init_tables(py::array u, py::array v, py::array d, std::uint64_t seed) {
  if (u.ndim() != 2 || d.ndim() != 2) throw py::value_error("u and d must be 2-D");
  const std::int64_t vocab = u.shape(0), docs = d.shape(0);
  // 0 columns: no unit row to draw (the init redrew zero rows for ever)
  if (u.shape(1) < 1 || u.shape(1) > 2147483647) throw py::value_error("u must have 1 to 2^31 - 1 columns");
  const int dim = static_cast<int>(u.shape(1));
  kexue::jose::Tables tables{jose_table(u, vocab, dim, "u"), jose_table(v, vocab, dim, "v"),
                             jose_table(d, docs, dim, "d")};
  kexue::jose::init_tables(tables, vocab, docs, dim, seed);
}

// Trains on a worker thread with the GIL released; this thread wakes every `interval` seconds to call
// progress(words_done) (which may raise, e.g. KeyboardInterrupt: training then stops and the error propagates).
py::tuple jose_train(const py::array_t<std::int32_t, py::array::c_style>& stream,
                     const py::array_t<std::int64_t, py::array::c_style>& counts, std::int64_t n_docs, py::array u,
                     py::array v, py::array d, int window, int negative, int epochs, int threads, float margin,
                     float alpha, float sample, int step_rule, bool joint, bool update_words, std::uint64_t seed,
                     std::int64_t table_size, const py::object& progress, double interval, bool decay) {
  if (stream.ndim() != 1 || counts.ndim() != 1) throw py::value_error("stream and counts must be 1-D");
  if (u.ndim() != 2) throw py::value_error("u must be 2-D");
  const std::int64_t vocab = counts.shape(0);
  const int dim = static_cast<int>(u.shape(1));
  kexue::jose::Tables tables{jose_table(u, vocab, dim, "u"), jose_table(v, vocab, dim, "v"),
                             jose_table(d, n_docs, dim, "d")};
  if (step_rule != 0 && step_rule != 1) throw py::value_error("step_rule must be 0 (paper) or 1 (jose_c)");
  const std::int32_t* sp = stream.data();
  for (py::ssize_t i = 0; i < stream.shape(0); ++i)  // an id outside the vocabulary would write outside u and v
    if (sp[i] < 0 || sp[i] >= vocab) throw py::value_error("stream ids must be in [0, len(counts))");
  kexue::jose::Corpus corpus{sp, stream.shape(0), counts.data(), vocab, n_docs};
  kexue::jose::Options o;
  o.dim = dim;
  o.window = window;
  o.negative = negative;
  o.epochs = epochs;
  o.threads = threads;
  o.margin = margin;
  o.alpha = alpha;
  o.sample = sample;
  o.rule = static_cast<kexue::jose::StepRule>(step_rule);
  o.joint = joint;
  o.update_words = update_words;
  o.decay = decay;
  o.seed = seed;
  o.table_size = table_size;
  kexue::jose::Progress state;
  kexue::jose::Stats stats;
  std::exception_ptr failure;
  std::atomic<bool> finished{false};
  {
    py::gil_scoped_release release;
    std::thread worker([&] {
      try {
        stats = kexue::jose::train(corpus, o, tables, &state);
      } catch (...) {
        failure = std::current_exception();
      }
      finished = true;
    });
    const auto wait = std::chrono::duration<double>(interval > 0 ? interval : 0.5);
    while (!finished) {
      const auto t0 = std::chrono::steady_clock::now();
      while (!finished && std::chrono::steady_clock::now() - t0 < wait)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (finished) break;
      py::gil_scoped_acquire acquire;
      try {
        if (!progress.is_none()) progress(state.words.load());
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      } catch (...) {
        state.stop = true;
        {
          py::gil_scoped_release again;
          worker.join();
        }
        throw;
      }
    }
    worker.join();
  }
  if (failure) std::rethrow_exception(failure);
  if (!progress.is_none()) progress(state.words.load());
  return py::make_tuple(stats.loss, stats.updates, stats.pairs);
}
using JoseRows = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

void jose_check_rows(const JoseRows& rows, std::int64_t count, std::int64_t limit, const char* name) {
  if (rows.ndim() != 1 || rows.shape(0) != count) throw py::value_error(std::string(name) + " must be 1-D of length n");
  for (std::int64_t i = 0; i < count; ++i)
    if (rows.data()[i] < 0 || rows.data()[i] >= limit)
      throw py::value_error(std::string(name) + " holds a row index outside its table");
}

py::tuple jose_apply_steps(py::array u, py::array v, py::object d, const JoseRows& u_rows, const JoseRows& v_rows,
                           const JoseRows& neg_rows, py::object d_rows, float alpha, float margin, int step_rule,
                           bool move_words) {
  if (u.ndim() != 2 || v.ndim() != 2) throw py::value_error("u and v must be 2-D");
  const int dim = static_cast<int>(u.shape(1));
  float* up = jose_table(u, u.shape(0), dim, "u");
  float* vp = jose_table(v, v.shape(0), dim, "v");
  const std::int64_t n = u_rows.ndim() == 1 ? u_rows.shape(0) : -1;
  jose_check_rows(u_rows, n, u.shape(0), "u_rows");
  jose_check_rows(v_rows, n, v.shape(0), "v_rows");
  jose_check_rows(neg_rows, n, u.shape(0), "neg_rows");
  if (step_rule != 0 && step_rule != 1) throw py::value_error("step_rule must be 0 (paper) or 1 (jose_c)");
  const auto rule = static_cast<kexue::jose::StepRule>(step_rule);
  py::array_t<std::uint8_t> active(static_cast<py::ssize_t>(n));
  double loss;
  if (d.is_none()) {
    loss = kexue::jose::apply_separate(up, vp, u_rows.data(), v_rows.data(), neg_rows.data(), n, dim, alpha, margin,
                                       rule, move_words, active.mutable_data());
  } else {
    auto da = d.cast<py::array>();
    if (da.ndim() != 2) throw py::value_error("d must be 2-D");
    float* dp = jose_table(da, da.shape(0), dim, "d");
    auto dr = aligned(JoseRows::ensure(d_rows), "d_rows");
    if (!dr) throw py::type_error("d_rows must be an integer array");
    jose_check_rows(dr, n, da.shape(0), "d_rows");
    loss = kexue::jose::apply_joint(up, vp, dp, u_rows.data(), v_rows.data(), dr.data(), neg_rows.data(), n, dim,
                                    alpha, margin, rule, move_words, active.mutable_data());
  }
  return py::make_tuple(loss, active);
}

py::array_t<std::int32_t> jose_negative_table(const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& counts,
                                              std::int64_t table_size) {
  if (counts.ndim() != 1 || counts.shape(0) < 1) throw py::value_error("counts must be a non-empty 1-D array");
  if (table_size < 1 || table_size > (std::int64_t{1} << 26)) throw py::value_error("table_size must be in [1, 2^26]");
  kexue::jose::NegativeTable table(counts.data(), counts.shape(0), table_size);
  py::array_t<std::int32_t> out(static_cast<py::ssize_t>(table_size));
  for (std::int64_t a = 0; a < table_size; ++a) out.mutable_data()[a] = table[a];
  return out;
}
// ---- end JoSE ------------------------------------------------------------------------------------------------

// ---- Jacobi elliptic functions (rope) --------------------------------------------------------------------------
template <typename T>
py::tuple jacobi_elliptic_typed(const py::array& u_in, const py::array& m_in, int n_threads,
                                const std::optional<py::array>& mp_in) {
  auto u = aligned(py::array_t<T, py::array::c_style>::ensure(u_in), "u");
  auto m = aligned(py::array_t<T, py::array::c_style>::ensure(m_in), "m");
  py::array_t<T, py::array::c_style> mp;
  if (mp_in) mp = aligned(py::array_t<T, py::array::c_style>::ensure(*mp_in), "mp");
  std::vector<py::ssize_t> shape(u.shape(), u.shape() + u.ndim());
  std::vector<py::array_t<T>> out;
  for (int i = 0; i < 5; ++i) out.emplace_back(shape);
  T* p[5];
  for (int i = 0; i < 5; ++i) p[i] = out[i].mutable_data();
  {
    py::gil_scoped_release release;
    kr::jacobi_elliptic<T>(u.data(), m.data(), mp_in ? mp.data() : nullptr, static_cast<std::int64_t>(u.size()), p[0],
                           p[1], p[2], p[3], p[4],
                           n_threads);
  }
  return py::make_tuple(out[0], out[1], out[2], out[3], out[4]);
}

py::tuple jacobi_elliptic(const py::array& u, const py::array& m, int n_threads, const std::optional<py::array>& mp) {
  if (!u.dtype().is(m.dtype())) throw py::type_error("u and m must have the same dtype");
  if (u.ndim() != m.ndim() || !std::equal(u.shape(), u.shape() + u.ndim(), m.shape()))
    throw py::value_error("u and m must have the same shape");
  if (mp && (!mp->dtype().is(m.dtype()) || mp->ndim() != m.ndim() ||
             !std::equal(m.shape(), m.shape() + m.ndim(), mp->shape())))
    throw py::value_error("mp must have m's shape and dtype");
  if (u.dtype().is(py::dtype::of<double>())) return jacobi_elliptic_typed<double>(u, m, n_threads, mp);
  if (u.dtype().is(py::dtype::of<float>())) return jacobi_elliptic_typed<float>(u, m, n_threads, mp);
  throw py::type_error("u and m must be float32 or float64");
}

template <typename T>
py::tuple complete_integrals_typed(const py::array& m_in, int n_threads) {
  auto m = aligned(py::array_t<T, py::array::c_style>::ensure(m_in), "m");
  std::vector<py::ssize_t> shape(m.shape(), m.shape() + m.ndim());
  py::array_t<T> k(shape), e(shape);
  T* kp = k.mutable_data();
  T* ep = e.mutable_data();
  {
    py::gil_scoped_release release;
    kr::complete_integrals<T>(m.data(), static_cast<std::int64_t>(m.size()), kp, ep, n_threads);
  }
  return py::make_tuple(k, e);
}

py::tuple complete_integrals(const py::array& m, int n_threads) {
  if (m.dtype().is(py::dtype::of<double>())) return complete_integrals_typed<double>(m, n_threads);
  if (m.dtype().is(py::dtype::of<float>())) return complete_integrals_typed<float>(m, n_threads);
  throw py::type_error("m must be float32 or float64");
}
// ---- end Jacobi -------------------------------------------------------------------------------------------------

// ---- dense invertible residual block (flows/dense_chain) ----------------------------------------------------------
// Arrays must already be C-contiguous of the chain's dtype and the stated shape: outputs are written in place, so a
// converted copy would silently lose them.
template <typename T>
T* array_ptr(const py::handle& obj, const std::vector<std::int64_t>& shape, const std::string& name, bool writeable) {
  if (!py::isinstance<py::array_t<T>>(obj)) throw py::type_error(name + " must be an array of the chain's dtype");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!(arr.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
  aligned(arr, name);
  if (arr.ndim() != static_cast<py::ssize_t>(shape.size())) throw py::value_error(name + " has the wrong rank");
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (arr.shape(static_cast<py::ssize_t>(i)) != shape[i]) throw py::value_error(name + " has the wrong shape");
  if (writeable && !arr.writeable()) throw py::value_error(name + " must be writeable");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

template <typename T>
T* optional_ptr(const py::handle& obj, const std::vector<std::int64_t>& shape, const std::string& name,
                bool writeable) {
  return obj.is_none() ? nullptr : array_ptr<T>(obj, shape, name, writeable);
}

// layers: [(V, bias|None, u|None, v|None, coeff)], acts: [(kind, constant, beta)]
template <typename T>
kf::Chain<T> chain_of(std::int64_t batch, const py::list& layers, const py::list& acts) {
  kf::Chain<T> chain;
  chain.batch = batch;
  if (layers.size() == 0 || acts.size() + 1 != layers.size())
    throw py::value_error("a chain has L >= 1 layers and L - 1 activations");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    auto item = layers[i].cast<py::tuple>();
    const std::string at = "layers[" + std::to_string(i) + "]";
    auto w = py::reinterpret_borrow<py::array>(item[0]);
    if (w.ndim() != 2) throw py::value_error(at + " weight must be 2-D");
    kf::Layer<T> layer;
    layer.out = w.shape(0);
    layer.in = w.shape(1);
    layer.weight = array_ptr<T>(item[0], {layer.out, layer.in}, at + " weight", false);
    layer.bias = optional_ptr<T>(item[1], {layer.out}, at + " bias", false);
    layer.u = optional_ptr<T>(item[2], {layer.out}, at + " u", false);
    layer.v = optional_ptr<T>(item[3], {layer.in}, at + " v", false);
    if ((layer.u == nullptr) != (layer.v == nullptr)) throw py::value_error(at + ": u and v go together");
    layer.coeff = item[4].cast<double>();
    if (i > 0 && layer.in != chain.layers.back().out) throw py::value_error(at + " does not follow the layer before");
    chain.layers.push_back(layer);
  }
  chain.dim = chain.layers.front().in;
  if (chain.layers.back().out != chain.dim) throw py::value_error("the chain must map D features to D features");
  for (std::size_t i = 0; i < acts.size(); ++i) {
    auto item = acts[i].cast<py::tuple>();
    kf::Activation act;
    const int kind = item[0].cast<int>();
    if (kind < 0 || kind > 3) throw py::value_error("activation kind must be 0..3");
    act.kind = static_cast<kf::ActivationKind>(kind);
    act.constant = item[1].cast<double>();
    act.beta = item[2].cast<double>();
    chain.acts.push_back(act);
  }
  return chain;
}

template <typename T>
T* workspace_ptr(const py::handle& obj, const kf::Chain<T>& chain, std::int64_t lead, bool through_series) {
  return array_ptr<T>(obj, {kf::workspace_size<T>(chain, lead, through_series)}, "workspace", true);
}

template <typename T>
py::tuple dense_chain_forward_typed(const py::array& x, const py::array& probes, const py::list& layers,
                                    const py::list& acts, const std::vector<std::vector<double>>& inv_prob,
                                    bool through_series, const py::handle& y, const py::handle& value,
                                    const py::handle& workspace, int n_threads) {
  if (x.ndim() != 2) throw py::value_error("x must be [B, D]");
  const std::int64_t B = x.shape(0);
  const kf::Chain<T> chain = chain_of<T>(B, layers, acts);
  const std::int64_t D = chain.dim;
  const std::int64_t P = static_cast<std::int64_t>(inv_prob.size());
  if (P < 1) throw py::value_error("at least one probe");
  if (through_series)
    for (const auto& plan : inv_prob)
      if (plan.size() != inv_prob[0].size() || plan.empty())
        throw py::value_error("through the series every probe needs the same number of terms (>= 1)");
  const std::int64_t lead = through_series ? P * static_cast<std::int64_t>(inv_prob[0].size()) : P;
  const T* xp = array_ptr<T>(x, {B, D}, "x", false);
  const T* pp = array_ptr<T>(probes, {P, B, D}, "probes", false);
  T* yp = array_ptr<T>(y, {B, D}, "y", true);
  T* vp = array_ptr<T>(value, {B}, "value", true);
  T* ws = workspace_ptr<T>(workspace, chain, lead, through_series);
  kf::ForwardResult result;
  {
    py::gil_scoped_release release;
    result = kf::chain_forward<T>(chain, xp, pp, P, inv_prob, through_series, yp, vp, ws, n_threads);
  }
  return py::make_tuple(result.divisor, result.kappa, result.finite);
}

py::tuple dense_chain_forward(const py::array& x, const py::array& probes, const py::list& layers,
                              const py::list& acts, const std::vector<std::vector<double>>& inv_prob,
                              bool through_series, const py::handle& y, const py::handle& value,
                              const py::handle& workspace, int n_threads) {
  if (py::isinstance<py::array_t<float>>(x))
    return dense_chain_forward_typed<float>(x, probes, layers, acts, inv_prob, through_series, y, value, workspace,
                                            n_threads);
  if (py::isinstance<py::array_t<double>>(x))
    return dense_chain_forward_typed<double>(x, probes, layers, acts, inv_prob, through_series, y, value, workspace,
                                             n_threads);
  throw py::type_error("x must be float32 or float64");
}

template <typename T>
void dense_chain_backward_typed(const py::array& x, const py::array& probes, const py::list& layers,
                                const py::list& acts, std::int64_t lead, bool through_series,
                                const py::handle& workspace, const std::vector<double>& divisor,
                                const std::vector<double>& kappa, const py::handle& grad_y,
                                const py::handle& grad_value, const py::handle& grad_x, const py::list& grad_w,
                                const py::list& grad_b, const py::handle& grad_raw_beta, int n_threads) {
  if (x.ndim() != 2 || probes.ndim() != 3) throw py::value_error("x must be [B, D] and probes [P, B, D]");
  const std::int64_t B = x.shape(0);
  const kf::Chain<T> chain = chain_of<T>(B, layers, acts);
  const std::int64_t D = chain.dim, L = static_cast<std::int64_t>(chain.layers.size()), P = probes.shape(0);
  if (P < 1 || lead < P || lead % P != 0 || (!through_series && lead != P))
    throw py::value_error("lead must be n_probes (Neumann) or a multiple of it (through the series)");
  if (static_cast<std::int64_t>(divisor.size()) != L || static_cast<std::int64_t>(kappa.size()) != L)
    throw py::value_error("one divisor and one kappa per layer");
  if (static_cast<std::int64_t>(grad_w.size()) != L || static_cast<std::int64_t>(grad_b.size()) != L)
    throw py::value_error("one weight and one bias gradient (or None) per layer");
  const T* xp = array_ptr<T>(x, {B, D}, "x", false);
  const T* pp = array_ptr<T>(probes, {P, B, D}, "probes", false);
  const T* ws = workspace_ptr<T>(workspace, chain, lead, through_series);
  const T* gy = optional_ptr<T>(grad_y, {B, D}, "grad_y", false);
  const T* gv = optional_ptr<T>(grad_value, {B}, "grad_value", false);
  T* gx = optional_ptr<T>(grad_x, {B, D}, "grad_x", true);
  std::vector<T*> weight_grads, bias_grads;
  for (std::int64_t i = 0; i < L; ++i) {
    const auto& layer = chain.layers[i];
    weight_grads.push_back(optional_ptr<T>(grad_w[i], {layer.out, layer.in}, "grad_weight", true));
    bias_grads.push_back(optional_ptr<T>(grad_b[i], {layer.out}, "grad_bias", true));
  }
  T* gb = optional_ptr<T>(grad_raw_beta, {L - 1}, "grad_raw_beta", true);
  py::gil_scoped_release release;
  kf::chain_backward<T>(chain, xp, pp, P, lead, through_series, ws, divisor, kappa, gy, gv, gx, weight_grads,
                        bias_grads, gb, n_threads);
}

void dense_chain_backward(const py::array& x, const py::array& probes, const py::list& layers, const py::list& acts,
                          std::int64_t lead, bool through_series, const py::handle& workspace,
                          const std::vector<double>& divisor, const std::vector<double>& kappa,
                          const py::handle& grad_y, const py::handle& grad_value, const py::handle& grad_x,
                          const py::list& grad_w, const py::list& grad_b, const py::handle& grad_raw_beta,
                          int n_threads) {
  if (py::isinstance<py::array_t<float>>(x))
    return dense_chain_backward_typed<float>(x, probes, layers, acts, lead, through_series, workspace, divisor, kappa,
                                             grad_y, grad_value, grad_x, grad_w, grad_b, grad_raw_beta, n_threads);
  if (py::isinstance<py::array_t<double>>(x))
    return dense_chain_backward_typed<double>(x, probes, layers, acts, lead, through_series, workspace, divisor,
                                              kappa, grad_y, grad_value, grad_x, grad_w, grad_b, grad_raw_beta,
                                              n_threads);
  throw py::type_error("x must be float32 or float64");
}

std::int64_t dense_chain_workspace_size(const py::array& x, const py::list& layers, const py::list& acts,
                                        std::int64_t lead, bool through_series) {
  if (x.ndim() != 2) throw py::value_error("x must be [B, D]");
  if (py::isinstance<py::array_t<float>>(x))
    return kf::workspace_size<float>(chain_of<float>(x.shape(0), layers, acts), lead, through_series);
  if (py::isinstance<py::array_t<double>>(x))
    return kf::workspace_size<double>(chain_of<double>(x.shape(0), layers, acts), lead, through_series);
  throw py::type_error("x must be float32 or float64");
}
// ---- end dense chain ----------------------------------------------------------------------------------------------

// ---- SOM Gram (ortho/som_gram) --------------------------------------------------------------------------------------
void check_som_shape(std::int64_t n, std::int64_t c, std::int64_t s, double gamma) {
  if (n < 1 || c < 1 || s < 1) throw py::value_error("n, c and s must be >= 1");
  std::int64_t ncs = 0, cc = 0;  // n·c·s and c·c sized the arrays: an overflowed product let a short y through
  if (__builtin_mul_overflow(n, c, &ncs) || __builtin_mul_overflow(ncs, s, &ncs) || __builtin_mul_overflow(c, c, &cc))
    throw py::value_error("n·c·s or c·c overflows a 64-bit size");
  if (!(gamma > 0) || !std::isfinite(gamma)) throw py::value_error("gamma must be a finite number > 0");
}

void check_som_call(std::int64_t n, std::int64_t c, std::int64_t s, double gamma, double lambda1, double lambda2,
                    double eps) {
  check_som_shape(n, c, s, gamma);
  if (!(lambda1 >= 0) || !(lambda2 >= 0) || !(eps > 0)) throw py::value_error("need lambda1, lambda2 >= 0, eps > 0");
}

// One som_penalty call, its arguments checked and taken apart (with the GIL), to run later without it.
struct SomCall {
  const void* y;
  bool is_double;
  std::int64_t n, c, s;
  double gamma, lambda1, lambda2, eps;
  double* a;
  int n_threads;
  void* z;
};

template <typename T>
SomCall som_call_typed(const py::array& y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma,
                       double lambda1, double lambda2, double eps, const py::handle& a, int n_threads,
                       const py::handle& z) {
  const T* yp = array_ptr<T>(y, {n * c * s}, "y", false);
  if (!a.is_none() && !py::isinstance<py::array_t<double>>(a)) throw py::type_error("a must be a float64 array");
  double* ap = optional_ptr<double>(a, {c, c}, "a", true);
  if (!z.is_none() && !py::isinstance<py::array_t<T>>(z)) throw py::type_error("z must be an array of y's dtype");
  const std::int64_t z_size = n * c * kexue::ortho::z_stride(s, sizeof(T));
  T* zp = optional_ptr<T>(z, {z_size}, "z", true);
  if (zp != nullptr && static_cast<const void*>(zp) < static_cast<const void*>(yp + n * c * s) &&
      static_cast<const void*>(yp) < static_cast<const void*>(zp + z_size))
    throw py::value_error("z must not overlap y");
  return {yp, std::is_same<T, double>::value, n, c, s, gamma, lambda1, lambda2, eps, ap, n_threads, zp};
}

SomCall som_call(const py::array& y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, double lambda1,
                 double lambda2, double eps, const py::handle& a, int n_threads, const py::handle& z) {
  check_som_call(n, c, s, gamma, lambda1, lambda2, eps);
  if (py::isinstance<py::array_t<float>>(y))
    return som_call_typed<float>(y, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z);
  if (py::isinstance<py::array_t<double>>(y))
    return som_call_typed<double>(y, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z);
  throw py::type_error("y must be float32 or float64");
}

// R of one checked call (no Python object touched: runs without the GIL).
double run_som_call(const SomCall& k) {
  std::vector<double> gram(static_cast<std::size_t>(k.c * k.c));
  if (k.is_double)
    kexue::ortho::som_gram<double>(static_cast<const double*>(k.y), k.n, k.c, k.s, k.gamma, gram.data(),
                                   k.n_threads, static_cast<double*>(k.z));
  else
    kexue::ortho::som_gram<float>(static_cast<const float*>(k.y), k.n, k.c, k.s, k.gamma, gram.data(), k.n_threads,
                                  static_cast<float*>(k.z));
  return kexue::ortho::som_penalty(gram.data(), k.c, k.gamma, k.lambda1, k.lambda2, k.eps, k.a);
}

double som_penalty(const py::array& y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, double lambda1,
                   double lambda2, double eps, const py::handle& a, int n_threads, const py::handle& z) {
  const SomCall call = som_call(y, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z);
  py::gil_scoped_release release;
  return run_som_call(call);
}

// som_penalty over a list of argument tuples, R of each into out (float32/64 [len(calls)]): every call's arguments
// checked before any runs, then the layers back to back in one release of the GIL (SelfOrthogonality.loss()'s
// layers in one Python call: Python run between two layers' calls ran from the caches that each call had flushed).
void som_penalties(const py::list& calls, const py::handle& out) {
  const auto count = static_cast<std::int64_t>(calls.size());
  std::vector<SomCall> checked;
  checked.reserve(static_cast<std::size_t>(count));
  for (const py::handle item : calls) {
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 11)
      throw py::type_error("calls must hold tuples of som_penalty's 11 arguments");
    const auto t = py::reinterpret_borrow<py::tuple>(item);
    // y as the array it is (the tuple keeps it alive while the calls run), never a converted temporary
    if (!py::isinstance<py::array>(t[0])) throw py::type_error("y must be a float32 or float64 array");
    checked.push_back(som_call(py::reinterpret_borrow<py::array>(t[0]), t[1].cast<std::int64_t>(),
                               t[2].cast<std::int64_t>(), t[3].cast<std::int64_t>(), t[4].cast<double>(),
                               t[5].cast<double>(), t[6].cast<double>(), t[7].cast<double>(), t[8], t[9].cast<int>(),
                               t[10]));
  }
  if (!py::isinstance<py::array_t<float>>(out) && !py::isinstance<py::array_t<double>>(out))
    throw py::type_error("out must be a float32 or float64 array");
  float* out32 = py::isinstance<py::array_t<float>>(out) ? array_ptr<float>(out, {count}, "out", true) : nullptr;
  double* out64 = out32 == nullptr ? array_ptr<double>(out, {count}, "out", true) : nullptr;
  py::gil_scoped_release release;
  for (std::int64_t i = 0; i < count; ++i) {
    const double r = run_som_call(checked[static_cast<std::size_t>(i)]);
    if (out32 != nullptr)
      out32[i] = static_cast<float>(r);
    else
      out64[i] = r;
  }
}

// The checked backward without the GIL: A = scale · a in y's type, as the kernel reads it.
template <typename T>
void run_som_backward(const T* yp, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, const double* ap,
                      T* dp, int n_threads, double scale, bool add, bool from_z) {
  py::gil_scoped_release release;
  std::vector<T> scaled(static_cast<std::size_t>(c * c));
  for (std::size_t e = 0; e < scaled.size(); ++e) scaled[e] = static_cast<T>(scale * ap[e]);
  kexue::ortho::som_gram_backward<T>(yp, n, c, s, gamma, scaled.data(), dp, n_threads, add, from_z);
}

template <typename T>
void som_gram_backward_typed(const py::array& y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma,
                             const py::handle& a, const py::handle& dy, int n_threads, double scale, bool add,
                             bool from_z) {
  const T* yp = array_ptr<T>(y, {n * c * (from_z ? kexue::ortho::z_stride(s, sizeof(T)) : s)}, "y", false);
  if (!py::isinstance<py::array_t<double>>(a)) throw py::type_error("a must be a float64 array");
  const double* ap = array_ptr<double>(a, {c, c}, "a", false);
  T* dp = array_ptr<T>(dy, {n * c * s}, "dy", true);
  run_som_backward<T>(yp, n, c, s, gamma, ap, dp, n_threads, scale, add, from_z);
}

void som_gram_backward(const py::array& y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma,
                       const py::handle& a, const py::handle& dy, int n_threads, double scale, bool add, bool from_z) {
  check_som_shape(n, c, s, gamma);
  if (py::isinstance<py::array_t<float>>(y))
    return som_gram_backward_typed<float>(y, n, c, s, gamma, a, dy, n_threads, scale, add, from_z);
  if (py::isinstance<py::array_t<double>>(y))
    return som_gram_backward_typed<double>(y, n, c, s, gamma, a, dy, n_threads, scale, add, from_z);
  throw py::type_error("y must be float32 or float64");
}

// The same two calls on raw addresses, for kexue_fast.ortho.som's training-step path: there each numpy view of a
// tensor (detach, view, numpy) and each array check cost the step's host time, per layer, from cold caches (a tapped
// layer's backward hook runs between two of the model's backward ops, which have flushed them). The caller hands
// over the tensors' data_ptr() having checked what these cannot: dtype, contiguity, sizes, that the memory lives
// through the call and that outputs do not overlap inputs. Here: shapes, hyperparameters and each address's alignment.
template <typename T>
T* address(std::uintptr_t at, const char* name, bool optional) {
  if (at == 0) {
    if (optional) return nullptr;
    throw py::value_error(std::string(name) + " must be a non-null address");
  }
  if (at % alignof(T) != 0) throw py::value_error(std::string(name) + " is not aligned to its dtype");
  return reinterpret_cast<T*>(at);
}

// calls: tuples (y, is_double, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z) with y, a (float64 [c, c] or
// 0) and z (0: none) addresses; R of each into out (float64 where out_double, else float32; [len(calls)]), or with
// total their sum (summed in float64, in order) into out[0].
void som_penalties_at(const py::list& calls, std::uintptr_t out, bool out_double, bool total) {
  std::vector<SomCall> checked;
  checked.reserve(calls.size());
  for (const py::handle item : calls) {
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 12)
      throw py::type_error("calls must hold tuples of 12 arguments");
    const auto t = py::reinterpret_borrow<py::tuple>(item);
    const bool is_double = t[1].cast<bool>();
    SomCall k{nullptr, is_double, t[2].cast<std::int64_t>(), t[3].cast<std::int64_t>(), t[4].cast<std::int64_t>(),
              t[5].cast<double>(), t[6].cast<double>(), t[7].cast<double>(), t[8].cast<double>(),
              address<double>(t[9].cast<std::uintptr_t>(), "a", true), t[10].cast<int>(), nullptr};
    check_som_call(k.n, k.c, k.s, k.gamma, k.lambda1, k.lambda2, k.eps);
    const auto y_at = t[0].cast<std::uintptr_t>(), z_at = t[11].cast<std::uintptr_t>();
    k.y = is_double ? static_cast<const void*>(address<double>(y_at, "y", false))
                    : static_cast<const void*>(address<float>(y_at, "y", false));
    k.z = is_double ? static_cast<void*>(address<double>(z_at, "z", true))
                    : static_cast<void*>(address<float>(z_at, "z", true));
    checked.push_back(k);
  }
  double* out64 = out_double ? address<double>(out, "out", false) : nullptr;
  float* out32 = out_double ? nullptr : address<float>(out, "out", false);
  auto put = [&](std::size_t at, double value) {
    if (out64 != nullptr)
      out64[at] = value;
    else
      out32[at] = static_cast<float>(value);
  };
  py::gil_scoped_release release;
  double sum = 0;
  for (std::size_t i = 0; i < checked.size(); ++i) {
    const double r = run_som_call(checked[i]);
    if (total)
      sum += r;
    else
      put(i, r);
  }
  if (total) put(0, sum);
}

void som_gram_backward_at(std::uintptr_t y, bool is_double, std::int64_t n, std::int64_t c, std::int64_t s,
                          double gamma, std::uintptr_t a, std::uintptr_t dy, int n_threads, double scale, bool add,
                          bool from_z) {
  check_som_shape(n, c, s, gamma);
  const double* ap = address<double>(a, "a", false);
  if (is_double)
    return run_som_backward<double>(address<double>(y, "y", false), n, c, s, gamma, ap,
                                    address<double>(dy, "dy", false), n_threads, scale, add, from_z);
  run_som_backward<float>(address<float>(y, "y", false), n, c, s, gamma, ap, address<float>(dy, "dy", false),
                          n_threads, scale, add, from_z);
}
// ---- end SOM Gram -------------------------------------------------------------------------------------------------

py::dict build_info() {
  py::dict info;
  info["version"] = KEXUE_VERSION;
  info["build_type"] = KEXUE_BUILD_TYPE;
  info["compiler"] = KEXUE_COMPILER;
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kexue_fast's torch-free C++ cores (NumPy buffers in, NumPy buffers out).";
  m.def("power_iteration", &power_iteration, py::arg("weights"), py::arg("u"), py::arg("v"), py::arg("n_iters"),
        py::arg("tol") = -1.0, py::arg("eps") = 1e-12, py::arg("n_threads") = 0,
        "Batched power iteration over a list of C-contiguous 2-D arrays (one dtype). u (out) and v (in/out) are\n"
        "written in place. Returns (sigma, iterations_run). tol <= 0 runs exactly n_iters iterations.");
  m.def("hsic_stats", &hsic_stats, py::arg("x"), py::arg("y"), py::arg("kernel_x"), py::arg("sigma_x"),
        py::arg("kernel_y"), py::arg("sigma_y"), py::arg("n_threads") = 0,
        "Exact HSIC sufficient statistics (S_kl, S_kk, S_ll, row sums of K, row sums of L) over pairs i != j,\n"
        "without storing a Gram matrix. Kernel codes: 0 gaussian, 1 laplace, 2 imq, 3 linear, 4 delta.");
  m.def("hsic_grad", &hsic_grad, py::arg("x"), py::arg("y"), py::arg("kernel_x"), py::arg("sigma_x"),
        py::arg("kernel_y"), py::arg("sigma_y"), py::arg("a"), py::arg("b_k"), py::arg("b_l"), py::arg("u_k"),
        py::arg("u_l"), py::arg("need_x") = true, py::arg("need_y") = true, py::arg("n_threads") = 0,
        "The backward of the statistics pass: d out/d x and d out/d y (float64, or None) from a = d out/d S_kl,\n"
        "b_k, b_l = d out/d S_kk, S_ll and u_k, u_l = d out/d (row sums), recomputing the Gram rows. The\n"
        "diagonal terms (linear kernels) are left to the caller.");
  m.def("hsic_permuted_cross_sums", &hsic_permuted_cross_sums, py::arg("x"), py::arg("y"), py::arg("kernel_x"),
        py::arg("sigma_x"), py::arg("kernel_y"), py::arg("sigma_y"), py::arg("perms"), py::arg("n_threads") = 0,
        "S_kl under permutations of y: out[p] = sum_{i != j} K_ij L_{perm[p, i], perm[p, j]} for perms [P, n]\n"
        "(each K tile computed once and shared by every permutation).");
  m.def("kth_pair_sq_distance", &kth_pair_sq_distance, py::arg("x"), py::arg("k"), py::arg("sample") = 1 << 24,
        py::arg("buffer") = 1 << 23, py::arg("seed") = 0x9E3779B97F4A7C15ULL, py::arg("n_threads") = 0,
        "The k-th smallest (0-based) squared distance over the pairs i < j of the rows of x (float32/float64,\n"
        "computed in float64), exactly, without storing the pairs. Returns (value, next, passes): next is the\n"
        "(k+1)-th value (+inf if none), passes the number of full passes over the pairs.");
  m.def("infomap_two_level", &infomap_two_level, py::arg("n"), py::arg("node_flow"), py::arg("source"),
        py::arg("target"), py::arg("link_flow"), py::arg("symmetric") = false, py::arg("num_trials") = 1,
        py::arg("seed") = 123,
        py::arg("core_loop_limit") = 10, py::arg("tune_iteration_limit") = 10, py::arg("n_threads") = 1,
        py::arg("teleport") = py::none(),
        "Two-level Infomap on a flow graph (links with their flows; undirected edges given in both directions,\n"
        "symmetric=True).\n"
        "Returns (modules, codelength, index_codelength, module_codelength, one_level_codelength, num_modules,\n"
        "best_trial).");
  m.def("infomap_map_equation", &infomap_map_equation, py::arg("n"), py::arg("node_flow"), py::arg("source"),
        py::arg("target"), py::arg("link_flow"), py::arg("modules"), py::arg("teleport") = py::none(),
        "The two-level map equation of a partition: (codelength, index_codelength, module_codelength).");
  m.def("infomap_multilevel", &infomap_multilevel, py::arg("n"), py::arg("node_flow"), py::arg("source"),
        py::arg("target"), py::arg("link_flow"), py::arg("symmetric") = false, py::arg("num_trials") = 1,
        py::arg("seed") = 123, py::arg("core_loop_limit") = 10, py::arg("tune_iteration_limit") = 10,
        py::arg("n_threads") = 1, py::arg("teleport") = py::none(),
        "Hierarchical Infomap on a flow graph. Returns (paths [depth, n]: each node's child index per depth, -1 below\n"
        "its module; codelength, index_codelength, one_level_codelength, best_trial).");
  m.def("infomap_tree_codelength", &infomap_tree_codelength, py::arg("n"), py::arg("node_flow"), py::arg("source"),
        py::arg("target"), py::arg("link_flow"), py::arg("paths"), py::arg("teleport") = py::none(),
        "The multilevel map equation of a module tree given as paths [depth, n]: (codelength, index_codelength).");
  // ---- JoSE ----
  m.def("jose_encode_file", &jose_encode_file, py::arg("path"), py::arg("min_count"),
        "A one-document-per-line text file as (words as bytes, counts, stream, n_docs, raw_tokens): '</s>' first\n"
        "with the line count, then by count descending (ties by bytes descending); stream ids with 0 closing each\n"
        "line.");
  m.def("jose_init_tables", &jose_init_tables, py::arg("u"), py::arg("v"), py::arg("d"), py::arg("seed") = 0,
        "jose.c's initialization of float32 tables u [V, D], v [V, D], d [N, D] in place (seed 0: jose.c's).");
  m.def("jose_train", &jose_train, py::arg("stream"), py::arg("counts"), py::arg("n_docs"), py::arg("u"),
        py::arg("v"), py::arg("d"), py::arg("window"), py::arg("negative"), py::arg("epochs"), py::arg("threads"),
        py::arg("margin"), py::arg("alpha"), py::arg("sample"), py::arg("step_rule"), py::arg("joint"),
        py::arg("update_words"), py::arg("seed"), py::arg("table_size") = 100000000,
        py::arg("progress") = py::none(), py::arg("interval") = 0.5, py::arg("decay") = true,
        "JoSE Hogwild training of u, v, d in place (GIL released). Returns (last-epoch hinge loss sum, active\n"
        "updates, evaluated hinges).");
  m.def("jose_apply_steps", &jose_apply_steps, py::arg("u"), py::arg("v"), py::arg("d"), py::arg("u_rows"),
        py::arg("v_rows"), py::arg("neg_rows"), py::arg("d_rows"), py::arg("alpha"), py::arg("margin"),
        py::arg("step_rule"), py::arg("move_words") = true,
        "The trainer's single hinge steps applied in order to table rows (d=None: separate hinge). Returns\n"
        "(active hinge sum, active flags).");
  m.def("jose_negative_table", &jose_negative_table, py::arg("counts"), py::arg("table_size"),
        "The unigram^0.75 negative table of jose.c, materialized (for tests; table_size <= 2^26).");
  // ---- end JoSE ----
  m.def("dense_chain_forward", &dense_chain_forward, py::arg("x"), py::arg("probes"), py::arg("layers"),
        py::arg("acts"), py::arg("inv_prob"), py::arg("through_series"), py::arg("y"), py::arg("value"),
        py::arg("workspace"), py::arg("n_threads") = 0,
        "An invertible residual block with a dense branch: y, the log-det series and, in workspace, what its "
        "backward needs (csrc/flows/dense_chain.hpp). Returns (divisors, kappas, x_finite).");
  m.def("dense_chain_backward", &dense_chain_backward, py::arg("x"), py::arg("probes"), py::arg("layers"),
        py::arg("acts"), py::arg("lead"), py::arg("through_series"), py::arg("workspace"), py::arg("divisors"),
        py::arg("kappas"), py::arg("grad_y"), py::arg("grad_value"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("grad_bias"), py::arg("grad_raw_beta"), py::arg("n_threads") = 0,
        "The gradients of dense_chain_forward's outputs, written into grad_* (None: not wanted).");
  m.def("dense_chain_workspace_size", &dense_chain_workspace_size, py::arg("x"), py::arg("layers"), py::arg("acts"),
        py::arg("lead"), py::arg("through_series"), "Elements of the workspace dense_chain_forward fills.");
  m.def("som_penalty", &som_penalty, py::arg("y"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("gamma"),
        py::arg("lambda1"), py::arg("lambda2"), py::arg("eps"), py::arg("a") = py::none(), py::arg("n_threads") = 0,
        py::arg("z") = py::none(),
        "R of y read as [n, c, s] from its Gram G = Z^T Z, Z = tanh(gamma y), and into a (float64 [c, c], optional) "
        "A = gamma (Gbar + Gbar^T) at a unit upstream gradient, for som_gram_backward (csrc/ortho/som_gram.hpp); "
        "into z (y's dtype, n * c * som_z_stride(s, itemsize) elements, optional) Z itself as [n, c, som_z_stride], "
        "for som_gram_backward(from_z=True).");
  m.def("som_penalties", &som_penalties, py::arg("calls"), py::arg("out"),
        "som_penalty(*args) for each args tuple of calls, R of each into out (float32 or float64 [len(calls)]): "
        "every call's arguments checked first, then the calls back to back without the GIL.");
  m.def("som_gram_backward", &som_gram_backward, py::arg("y"), py::arg("n"), py::arg("c"), py::arg("s"),
        py::arg("gamma"), py::arg("a"), py::arg("dy"), py::arg("n_threads") = 0, py::arg("scale") = 1.0,
        py::arg("add") = false, py::arg("from_z") = false,
        "dy = (A Z_i) * (1 - Z_i^2) per sample, Z = tanh(gamma y) read as [n, c, s], A = scale * a (a: float64 "
        "[c, c], symmetric); add=True: dy += that (dy read, as a gradient to add into); from_z=True: y is Z itself "
        "(som_penalty's z, rows som_z_stride(s, itemsize) apart).");
  m.def("som_penalties_at", &som_penalties_at, py::arg("calls"), py::arg("out"), py::arg("out_double"),
        py::arg("total") = false,
        "som_penalties on addresses (kexue_fast.ortho.som's step path; the caller checks dtypes, contiguity, sizes and "
        "lifetimes): calls hold (y, is_double, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z), a and z 0 "
        "for none; R of each into out (float64 if out_double, else float32), or with total their sum into out[0].");
  m.def("som_gram_backward_at", &som_gram_backward_at, py::arg("y"), py::arg("is_double"), py::arg("n"), py::arg("c"),
        py::arg("s"), py::arg("gamma"), py::arg("a"), py::arg("dy"), py::arg("n_threads"), py::arg("scale"),
        py::arg("add"), py::arg("from_z"),
        "som_gram_backward on addresses (y, a float64 [c, c], dy; the caller checks dtypes, contiguity, sizes and "
        "lifetimes).");
  m.def("som_z_stride", [](std::int64_t s, std::int64_t itemsize) {
          if (s < 1 || (itemsize != 4 && itemsize != 8)) throw py::value_error("need s >= 1 and itemsize 4 or 8");
          return kexue::ortho::z_stride(s, itemsize);
        }, py::arg("s"), py::arg("itemsize"),
        "The row stride of som_penalty's z for rows of s positions: s, or s plus one 64-byte line where s * "
        "itemsize is a multiple of 1 KiB (rows that far apart share a few L1 sets).");
  m.def("jacobi_elliptic", &jacobi_elliptic, py::arg("u"), py::arg("m"), py::arg("n_threads") = 0,
        py::arg("mp") = py::none(),
        "(sn, cn, dn, am, zeta) of same-shape float arrays u, m (0 <= m <= 1, NaN outside), elementwise; mp: 1 - m "
        "held more exactly than it rounds (optional).");
  m.def("complete_integrals", &complete_integrals, py::arg("m"), py::arg("n_threads") = 0,
        "(K(m), E(m)) of a float array m (m <= 1, NaN above).");
  m.def("build_info", &build_info, "Compiler, build type and versions this extension was built with.");
  m.def("omp_team", &kexue::has_omp_team,
        "Whether the SOM core's threads run on the process's loaded OpenMP runtime's team (torch's libgomp; looked\n"
        "up at run time, never linked) rather than on threads of its own; KEXUE_FAST_OMP_TEAM=0 turns that off.");
  m.def("uses_avx512", &kexue::use_avx512,
        "Whether the hand-written AVX-512 paths (the SOM core's tanh and Gram tiles) run in this process: the CPU has\n"
        "AVX-512F and KEXUE_FAST_AVX512 was not '0' when first asked.");
}
