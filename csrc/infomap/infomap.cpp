#include "infomap/infomap.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <queue>
#include <random>
#include <stdexcept>
#include <unordered_map>

#include "common/parallel.hpp"

// A cache-line request for a random access made a few iterations early (a hint: no effect on results).
#if defined(__GNUC__) || defined(__clang__)
#define KX_PREFETCH(address) __builtin_prefetch(address)
#else
#define KX_PREFETCH(address) ((void)0)
#endif

namespace kexue::infomap {
namespace {

inline double plogp(double x) { return x > 0 ? x * std::log2(x) : 0.0; }

// A graph at one aggregation level: node flows and CSR out- and in-links without self-links (they never exit).
struct Level {
  std::int64_t n = 0;
  bool symmetric = false;  // every link's reverse carries the same flow (undirected): no in-link CSR is built
  // A sub-network (one module's nodes, for the hierarchical search) also carries, per node, the flow its links
  // send out of and bring into the sub-network (ext_out / ext_in; empty: none), and the module's own exit flow,
  // which is one more codeword in the sub-network's index codebook (exit_network).
  std::vector<double> ext_out, ext_in;
  double exit_network = 0;
  // Recorded teleportation (FlowGraph::teleport_*), per node; empty: unrecorded. teleport_total: Σ over the whole
  // graph (a sub-network keeps the whole graph's).
  std::vector<double> teleport_flow, teleport_weight;
  double teleport_total = 0;
  bool recorded() const { return !teleport_flow.empty(); }
  std::vector<double> flow, out_total, in_total;  // out_total / in_total include ext_out / ext_in
  std::vector<std::int64_t> out_ptr, out_idx, in_ptr, in_idx;
  std::vector<double> out_flow, in_flow;
};

void fill_csr(std::int64_t n, const std::vector<std::int64_t>& from, const std::vector<std::int64_t>& to,
              const std::vector<double>& f, std::vector<std::int64_t>& ptr, std::vector<std::int64_t>& idx,
              std::vector<double>& flows, std::vector<double>& total) {
  ptr.assign(static_cast<std::size_t>(n + 1), 0);
  total.assign(static_cast<std::size_t>(n), 0.0);
  for (std::int64_t u : from) ++ptr[static_cast<std::size_t>(u + 1)];
  for (std::int64_t i = 0; i < n; ++i) ptr[i + 1] += ptr[i];
  idx.resize(from.size());
  flows.resize(from.size());
  std::vector<std::int64_t> pos(ptr.begin(), ptr.end() - 1);
  for (std::size_t e = 0; e < from.size(); ++e) {
    const std::int64_t p = pos[static_cast<std::size_t>(from[e])]++;
    idx[static_cast<std::size_t>(p)] = to[e];
    flows[static_cast<std::size_t>(p)] = f[e];
    total[static_cast<std::size_t>(from[e])] += f[e];
  }
}

// A sub-network's flows out of / into it per node (added to the link totals) and its own exit flow.
void attach_external(Level& g, std::vector<double> ext_out, std::vector<double> ext_in, double exit_network) {
  if (g.symmetric) ext_in.clear();  // undirected: the flow in equals the flow out
  for (std::size_t u = 0; u < ext_out.size(); ++u) g.out_total[u] += ext_out[u];
  for (std::size_t u = 0; u < ext_in.size(); ++u) g.in_total[u] += ext_in[u];
  g.ext_out = std::move(ext_out);
  g.ext_in = std::move(ext_in);
  g.exit_network = exit_network;
}

// Links given as (source, target, flow) lists, duplicates allowed; self-links dropped.
Level make_level(std::int64_t n, std::vector<double> flow, const std::vector<std::int64_t>& src,
                 const std::vector<std::int64_t>& dst, const std::vector<double>& lf, bool symmetric,
                 std::vector<double> ext_out = {}, std::vector<double> ext_in = {}, double exit_network = 0) {
  std::vector<std::int64_t> s, t;
  std::vector<double> f;
  s.reserve(src.size());
  t.reserve(src.size());
  f.reserve(src.size());
  for (std::size_t e = 0; e < src.size(); ++e)
    if (src[e] != dst[e] && lf[e] > 0) {
      s.push_back(src[e]);
      t.push_back(dst[e]);
      f.push_back(lf[e]);
    }
  Level g;
  g.n = n;
  g.symmetric = symmetric;
  g.flow = std::move(flow);
  fill_csr(n, s, t, f, g.out_ptr, g.out_idx, g.out_flow, g.out_total);
  if (!symmetric) fill_csr(n, t, s, f, g.in_ptr, g.in_idx, g.in_flow, g.in_total);  // symmetric: in-links = out-links
  attach_external(g, std::move(ext_out), std::move(ext_in), exit_network);
  return g;
}

// Prefetches for visiting node u soon: its out-link row now, or (once the row has arrived) the modules of its first
// few link targets, which the in-row prefetches of the loops do not cover.
inline void prefetch_row(const Level& g, std::size_t u) {
  KX_PREFETCH(g.out_idx.data() + g.out_ptr[u]);  // data() +: a trailing node's empty row starts at the end
  KX_PREFETCH(g.out_flow.data() + g.out_ptr[u]);
}
inline void prefetch_first_targets(const Level& g, std::size_t u, const std::vector<std::int64_t>& mod) {
  const std::int64_t e0 = g.out_ptr[u], e1 = std::min(e0 + 8, g.out_ptr[u + 1]);
  for (std::int64_t e = e0; e < e1; ++e)
    KX_PREFETCH(&mod[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])]);
}

// A node's flow out of / into the network it is in (all of it, for a whole graph; a sub-network's ext_* too).
inline double ext_out_of(const Level& g, std::size_t u) { return g.ext_out.empty() ? 0.0 : g.ext_out[u]; }
inline double ext_in_of(const Level& g, std::size_t u) {
  if (g.symmetric) return ext_out_of(g, u);
  return g.ext_in.empty() ? 0.0 : g.ext_in[u];
}

// One module's flows and its cached plogp terms, in one cache line: the core loop reads a module per candidate.
struct Module {
  double exit = 0, enter = 0, flow = 0;
  double log_exit = 0, log_enter = 0, log_exit_flow = 0;  // plogp(exit), plogp(enter), plogp(exit + flow)
  std::int64_t size = 0;
  std::int64_t parent = 0;  // with a constraint (coarse-tuning's submodules): moves stay inside a parent

  void cache() {
    log_exit = plogp(exit);
    log_enter = plogp(enter);
    log_exit_flow = plogp(exit + flow);
  }
};

// Module bookkeeping for one level and the sums of the map-equation terms.
struct State {
  std::vector<std::int64_t> mod;
  std::vector<Module> modules;
  std::vector<std::int64_t> empty;  // ids of empty modules
  double sum_enter = 0, enter_log_enter = 0, exit_log_exit = 0, exit_flow_log = 0;
  double node_flow_log = 0;  // Σ plogp over the original nodes: constant
  double exit_network = 0;   // Level::exit_network
  // Recorded teleportation: per module, Σ T and Σ τ of its nodes (empty: unrecorded); module exit / enter include
  // teleport_exit / teleport_enter of these.
  std::vector<double> teleport_flow, teleport_weight;
  double teleport_total = 0;
  double teleport_exit(double T, double tau) const { return T * (1.0 - tau); }
  double teleport_enter(double T, double tau) const { return (teleport_total - T) * tau; }

  double index_codelength() const { return plogp(sum_enter + exit_network) - enter_log_enter - plogp(exit_network); }
  double codelength() const { return index_codelength() - exit_log_exit + exit_flow_log - node_flow_log; }
  void add_terms(const Module& m, double sign) {
    sum_enter += sign * m.enter;
    enter_log_enter += sign * m.log_enter;
    exit_log_exit += sign * m.log_exit;
    exit_flow_log += sign * m.log_exit_flow;
  }
  void recompute_terms() {
    sum_enter = enter_log_enter = exit_log_exit = exit_flow_log = 0;
    for (Module& m : modules) {
      m.cache();
      add_terms(m, 1.0);
    }
  }
};

State state_from(const Level& g, const std::vector<std::int64_t>& mod, double node_flow_log) {
  State s;
  s.node_flow_log = node_flow_log;
  s.exit_network = g.exit_network;
  s.mod = mod;
  const auto n = static_cast<std::size_t>(g.n);
  s.modules.assign(n, Module{});
  if (g.recorded()) {
    s.teleport_total = g.teleport_total;
    s.teleport_flow.assign(n, 0.0);
    s.teleport_weight.assign(n, 0.0);
    for (std::size_t u = 0; u < n; ++u) {
      s.teleport_flow[static_cast<std::size_t>(mod[u])] += g.teleport_flow[u];
      s.teleport_weight[static_cast<std::size_t>(mod[u])] += g.teleport_weight[u];
    }
  }
  for (std::size_t u = 0; u < n; ++u) {
    Module& m = s.modules[static_cast<std::size_t>(mod[u])];
    ++m.size;
    m.flow += g.flow[u];
    m.exit += ext_out_of(g, u);
    m.enter += ext_in_of(g, u);
    for (std::int64_t e = g.out_ptr[u]; e < g.out_ptr[u + 1]; ++e) {
      const auto v = static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)]);
      if (mod[v] != mod[u]) {
        m.exit += g.out_flow[static_cast<std::size_t>(e)];
        s.modules[static_cast<std::size_t>(mod[v])].enter += g.out_flow[static_cast<std::size_t>(e)];
      }
    }
  }
  if (g.recorded())
    for (std::size_t m = 0; m < n; ++m) {
      s.modules[m].exit += s.teleport_exit(s.teleport_flow[m], s.teleport_weight[m]);
      s.modules[m].enter += s.teleport_enter(s.teleport_flow[m], s.teleport_weight[m]);
    }
  for (std::size_t m = n; m-- > 0;)
    if (s.modules[m].size == 0) s.empty.push_back(static_cast<std::int64_t>(m));
  s.recompute_terms();
  return s;
}

std::vector<std::int64_t> identity(std::int64_t n) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// Flow from the node being moved to each neighbouring module, gathered per node.
struct Gathered {
  double out_to = 0, in_from = 0;
};

// Sweeps over the nodes in random order, moving each to the module that lowers L most. Returns the sweeps run.
// parent (per node, optional): only modules with the node's parent are candidates (Module::parent must be set).
int core_loop(const Level& g, State& s, std::mt19937_64& rng, const Options& o,
              const std::vector<std::int64_t>* parent = nullptr) {
  const auto n = static_cast<std::size_t>(g.n);
  std::vector<std::int64_t> order = identity(g.n), touched;
  std::vector<Gathered> gathered(n);
  std::vector<char> marked(n, 0), active(n, 0);
  // After the first sweep, only nodes next to a move (and the moved nodes) are visited again: the rest would see
  // the same neighbouring modules, so late sweeps cost what moved rather than a pass over every node.
  auto activate_around = [&](std::size_t a) {
    active[a] = 1;
    for (std::int64_t e = g.out_ptr[a]; e < g.out_ptr[a + 1]; ++e)
      active[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])] = 1;
    if (!g.symmetric)
      for (std::int64_t e = g.in_ptr[a]; e < g.in_ptr[a + 1]; ++e)
        active[static_cast<std::size_t>(g.in_idx[static_cast<std::size_t>(e)])] = 1;
  };
  int sweeps = 0;
  for (; sweeps < o.core_loop_limit; ++sweeps) {
    if (sweeps > 0) {
      order.clear();
      for (std::size_t u = 0; u < n; ++u)
        if (active[u]) order.push_back(static_cast<std::int64_t>(u));
      std::fill(active.begin(), active.end(), 0);
    }
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
    const double before = s.codelength();
    std::int64_t moved = 0;
    for (std::size_t i = 0; i < order.size(); ++i) {
      const std::int64_t alpha = order[i];
      const auto a = static_cast<std::size_t>(alpha);
      // The visiting order is random: request what later nodes will read.
      if (i + 4 < order.size()) {
        const auto a4 = static_cast<std::size_t>(order[i + 4]);
        prefetch_row(g, a4);
        KX_PREFETCH(&g.flow[a4]);
        KX_PREFETCH(&g.out_total[a4]);
        KX_PREFETCH(&s.mod[a4]);
        if (!g.symmetric) {
          KX_PREFETCH(g.in_idx.data() + g.in_ptr[a4]);
          KX_PREFETCH(g.in_flow.data() + g.in_ptr[a4]);
          KX_PREFETCH(&g.in_total[a4]);
        }
        if (parent) KX_PREFETCH(&(*parent)[a4]);
      }
      if (i + 2 < order.size()) {
        const auto a2 = static_cast<std::size_t>(order[i + 2]);
        KX_PREFETCH(&s.modules[static_cast<std::size_t>(s.mod[a2])]);
        prefetch_first_targets(g, a2, s.mod);
      }
      const std::int64_t A = s.mod[a];
      touched.clear();
      // Flow from α to each neighbouring module (out-links) and into α from it (in-links).
      auto gather = [&](const std::vector<std::int64_t>& ptr, const std::vector<std::int64_t>& idx,
                        const std::vector<double>& flows, double Gathered::*field) {
        const std::int64_t end = ptr[a + 1];
        for (std::int64_t e = ptr[a]; e < end; ++e) {
          // The neighbours' modules and their gathered slots are random accesses: request them a few links ahead.
          if (e + 8 < end) KX_PREFETCH(&s.mod[static_cast<std::size_t>(idx[static_cast<std::size_t>(e + 8)])]);
          if (e + 4 < end)
            KX_PREFETCH(&gathered[static_cast<std::size_t>(
                s.mod[static_cast<std::size_t>(idx[static_cast<std::size_t>(e + 4)])])]);
          const auto m = static_cast<std::size_t>(s.mod[static_cast<std::size_t>(idx[static_cast<std::size_t>(e)])]);
          if (!marked[m]) {
            marked[m] = 1;
            gathered[m] = Gathered{};
            touched.push_back(static_cast<std::int64_t>(m));
            KX_PREFETCH(&s.modules[m]);  // a candidate: its terms are read once the links are gathered
          }
          gathered[m].*field += flows[static_cast<std::size_t>(e)];
        }
      };
      gather(g.out_ptr, g.out_idx, g.out_flow, &Gathered::out_to);
      if (!g.symmetric) gather(g.in_ptr, g.in_idx, g.in_flow, &Gathered::in_from);
      if (g.recorded())  // teleportation links every module: also try the modules of a few random nodes, as infomap
        for (int k = 0; k < 5; ++k) {
          const auto m = static_cast<std::size_t>(s.mod[rng() % n]);
          if (!marked[m]) {
            marked[m] = 1;
            gathered[m] = Gathered{};
            touched.push_back(static_cast<std::int64_t>(m));
          }
        }
      // Symmetric links: the flow in from a module equals the flow out to it.
      auto in_from = [&](const Gathered& x) { return g.symmetric ? x.out_to : x.in_from; };
      const double p = g.flow[a], out_a = g.out_total[a], in_a = g.symmetric ? out_a : g.in_total[a];
      const auto Ai = static_cast<std::size_t>(A);
      const Module& mA = s.modules[Ai];
      const double out_to_A = marked[Ai] ? gathered[Ai].out_to : 0.0;
      const double in_from_A = marked[Ai] ? in_from(gathered[Ai]) : 0.0;
      // Recorded teleportation: α's T and τ, and the change of a module's teleport exit / enter when α joins
      // (sign +1) or leaves (−1) it; zero when unrecorded.
      const bool recorded = g.recorded();
      const double Ta = recorded ? g.teleport_flow[a] : 0.0, ta = recorded ? g.teleport_weight[a] : 0.0;
      auto tele_delta = [&](double T, double tau, double sign, double& d_exit, double& d_enter) {
        d_exit = d_enter = 0.0;
        if (!recorded) return;
        d_exit = s.teleport_exit(T + sign * Ta, tau + sign * ta) - s.teleport_exit(T, tau);
        d_enter = s.teleport_enter(T + sign * Ta, tau + sign * ta) - s.teleport_enter(T, tau);
      };
      const double TA = recorded ? s.teleport_flow[Ai] : 0.0, tA = recorded ? s.teleport_weight[Ai] : 0.0;
      double dx_A, dn_A;
      tele_delta(TA, tA, -1.0, dx_A, dn_A);
      // Module A without α.
      Module A_without = mA;
      A_without.exit = mA.exit - (out_a - out_to_A) + in_from_A + dx_A;
      A_without.enter = mA.enter - (in_a - in_from_A) + out_to_A + dn_A;
      A_without.flow = mA.flow - p;
      A_without.log_exit = plogp(A_without.exit);
      A_without.log_enter = g.symmetric ? A_without.log_exit : plogp(A_without.enter);
      A_without.log_exit_flow = plogp(A_without.exit + A_without.flow);
      // The terms without B: L(α in B) = these + B's terms with α.
      const double base_enter = s.sum_enter - mA.enter + A_without.enter;
      const double base_ell = s.enter_log_enter - mA.log_enter + A_without.log_enter;
      const double base_xlx = s.exit_log_exit - mA.log_exit + A_without.log_exit;
      const double base_xfl = s.exit_flow_log - mA.log_exit_flow + A_without.log_exit_flow;
      // B's T and τ (recorded teleportation): A_without's are A's less α's.
      auto cost_with = [&](const Module& B, double out_to_B, double in_from_B, double TB, double tB) {
        double dx, dn;
        tele_delta(TB, tB, +1.0, dx, dn);
        const double ex = B.exit + (out_a - out_to_B) - in_from_B + dx;
        const double en = B.enter + (in_a - in_from_B) - out_to_B + dn;
        const double log_ex = plogp(ex);
        const double log_en = g.symmetric ? log_ex : plogp(en);
        return plogp(s.exit_network + base_enter - B.enter + en) - (base_ell - B.log_enter + log_en) -
               (base_xlx - B.log_exit + log_ex) +
               (base_xfl - B.log_exit_flow + plogp(ex + B.flow + p));
      };
      double best = cost_with(A_without, out_to_A, in_from_A, TA - Ta, tA - ta);
      std::int64_t best_module = A;
      const std::int64_t own_parent = parent ? (*parent)[a] : 0;
      for (std::int64_t m : touched) {
        const auto mi = static_cast<std::size_t>(m);
        const Module& B = s.modules[mi];
        if (m == A || (parent && B.parent != own_parent)) continue;
        const double c = cost_with(B, gathered[mi].out_to, in_from(gathered[mi]), recorded ? s.teleport_flow[mi] : 0.0,
                                   recorded ? s.teleport_weight[mi] : 0.0);
        if (c < best - 1e-15) {
          best = c;
          best_module = m;
        }
      }
      if (mA.size > 1 && !s.empty.empty()) {  // α alone in a new module
        const double c = cost_with(Module{}, 0, 0, 0, 0);
        if (c < best - 1e-15) {
          best = c;
          best_module = s.empty.back();
        }
      }
      if (best_module != A) {
        const auto Bi = static_cast<std::size_t>(best_module);
        Module& B = s.modules[Bi];
        const bool fresh = B.size == 0;
        const double out_to_B = (!fresh && marked[Bi]) ? gathered[Bi].out_to : 0.0;
        const double in_from_B = (!fresh && marked[Bi]) ? in_from(gathered[Bi]) : 0.0;
        s.add_terms(s.modules[Ai], -1.0);
        s.add_terms(B, -1.0);
        double dx_B, dn_B;
        tele_delta(recorded ? s.teleport_flow[Bi] : 0.0, recorded ? s.teleport_weight[Bi] : 0.0, +1.0, dx_B, dn_B);
        B.exit += (out_a - out_to_B) - in_from_B + dx_B;
        B.enter += (in_a - in_from_B) - out_to_B + dn_B;
        if (recorded) {
          s.teleport_flow[Bi] += Ta;
          s.teleport_weight[Bi] += ta;
          s.teleport_flow[Ai] -= Ta;
          s.teleport_weight[Ai] -= ta;
        }
        B.flow += p;
        ++B.size;
        B.cache();
        if (fresh) {
          s.empty.pop_back();
          B.parent = own_parent;
        }
        Module& mA2 = s.modules[Ai];
        const std::int64_t size_A = mA2.size - 1;
        mA2 = A_without;
        mA2.size = size_A;
        if (size_A == 0) {
          const std::int64_t keep_parent = mA2.parent;
          mA2 = Module{};  // exact zeros, not rounding residue
          mA2.parent = keep_parent;
          if (recorded) s.teleport_flow[Ai] = s.teleport_weight[Ai] = 0.0;
          s.empty.push_back(A);
        }
        s.add_terms(mA2, 1.0);
        s.add_terms(B, 1.0);
        s.mod[a] = best_module;
        activate_around(a);
        ++moved;
      }
      for (std::int64_t m : touched) marked[static_cast<std::size_t>(m)] = 0;
    }
    s.recompute_terms();  // drop the rounding the incremental updates accumulated
    if (moved == 0 || before - s.codelength() < o.minimum_improvement) {
      ++sweeps;
      break;
    }
  }
  return sweeps;
}

// Module ids renumbered 0..M−1 (in order of first appearance); returns M.
std::int64_t renumber(std::vector<std::int64_t>& mod) {
  std::vector<std::int64_t> map(mod.size(), -1);
  std::int64_t next = 0;
  for (auto& m : mod) {
    auto& slot = map[static_cast<std::size_t>(m)];
    if (slot < 0) slot = next++;
    m = slot;
  }
  return next;
}

// The module graph: one node per module, the links between modules summed (links inside a module dropped).
Level aggregate(const Level& g, const std::vector<std::int64_t>& mod, std::int64_t num_modules) {
  const auto M = static_cast<std::size_t>(num_modules);
  const auto n = static_cast<std::size_t>(g.n);
  std::vector<double> flow(M, 0.0), ext_out, ext_in;
  for (std::size_t u = 0; u < n; ++u) flow[static_cast<std::size_t>(mod[u])] += g.flow[u];
  auto sum_by_module = [&](const std::vector<double>& per_node, std::vector<double>& per_module) {
    if (per_node.empty()) return;
    per_module.assign(M, 0.0);
    for (std::size_t u = 0; u < per_node.size(); ++u) per_module[static_cast<std::size_t>(mod[u])] += per_node[u];
  };
  sum_by_module(g.ext_out, ext_out);
  sum_by_module(g.ext_in, ext_in);
  // The nodes ordered by module (a counting sort: no per-module allocation), then each module's out-links merged
  // by target module straight into the module graph's CSR rows (rows come out in module order).
  std::vector<std::int64_t> first(M + 1, 0), nodes(n);
  for (std::size_t u = 0; u < n; ++u) ++first[static_cast<std::size_t>(mod[u]) + 1];
  for (std::size_t m = 0; m < M; ++m) first[m + 1] += first[m];
  {
    std::vector<std::int64_t> next(first.begin(), first.end() - 1);
    for (std::size_t u = 0; u < n; ++u) nodes[static_cast<std::size_t>(next[static_cast<std::size_t>(mod[u])]++)] =
        static_cast<std::int64_t>(u);
  }
  Level out;
  out.n = num_modules;
  out.symmetric = g.symmetric;
  out.flow = std::move(flow);
  out.out_ptr.assign(M + 1, 0);
  out.out_total.assign(M, 0.0);
  std::vector<double> acc(M, 0.0);
  std::vector<char> seen(M, 0);
  std::vector<std::int64_t> touched;
  for (std::size_t m = 0; m < M; ++m) {
    touched.clear();
    for (std::int64_t i = first[m]; i < first[m + 1]; ++i) {
      const auto u = static_cast<std::size_t>(nodes[static_cast<std::size_t>(i)]);
      // Members are scattered over the graph: request later members' rows and first targets' modules.
      const auto next = static_cast<std::size_t>(i);
      if (next + 4 < n) prefetch_row(g, static_cast<std::size_t>(nodes[next + 4]));
      if (next + 2 < n) prefetch_first_targets(g, static_cast<std::size_t>(nodes[next + 2]), mod);
      const std::int64_t end = g.out_ptr[u + 1];
      for (std::int64_t e = g.out_ptr[u]; e < end; ++e) {
        if (e + 8 < end) KX_PREFETCH(&mod[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e + 8)])]);
        const auto t = static_cast<std::size_t>(mod[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])]);
        if (t == m) continue;
        if (!seen[t]) {
          seen[t] = 1;
          touched.push_back(static_cast<std::int64_t>(t));
        }
        acc[t] += g.out_flow[static_cast<std::size_t>(e)];
      }
    }
    for (std::int64_t t : touched) {
      const auto ti = static_cast<std::size_t>(t);
      if (acc[ti] > 0) {  // zero-flow links carry nothing (as make_level drops them)
        out.out_idx.push_back(t);
        out.out_flow.push_back(acc[ti]);
        out.out_total[m] += acc[ti];
      }
      acc[ti] = 0.0;
      seen[ti] = 0;
    }
    out.out_ptr[m + 1] = static_cast<std::int64_t>(out.out_idx.size());
  }
  if (!g.symmetric) {  // in-links: the out-links regrouped by target (a stable counting sort, as make_level does)
    std::vector<std::int64_t> sources(out.out_idx.size());
    for (std::size_t m = 0; m < M; ++m)
      for (std::int64_t e = out.out_ptr[m]; e < out.out_ptr[m + 1]; ++e)
        sources[static_cast<std::size_t>(e)] = static_cast<std::int64_t>(m);
    fill_csr(num_modules, out.out_idx, sources, out.out_flow, out.in_ptr, out.in_idx, out.in_flow, out.in_total);
  }
  attach_external(out, std::move(ext_out), std::move(ext_in), g.exit_network);
  out.teleport_total = g.teleport_total;
  sum_by_module(g.teleport_flow, out.teleport_flow);
  sum_by_module(g.teleport_weight, out.teleport_weight);
  return out;
}

// From a partition of the original nodes: aggregate and keep merging modules level by level until nothing merges.
// Returns the final partition of the original nodes (renumbered). parent (per original node, optional): merges stay
// inside a parent module.
std::vector<std::int64_t> merge_levels(const Level& original, std::vector<std::int64_t> assign, double node_flow_log,
                                       std::mt19937_64& rng, const Options& o,
                                       const std::vector<std::int64_t>* parent = nullptr) {
  std::int64_t M = renumber(assign);
  Level level = aggregate(original, assign, M);
  while (level.n > 1) {
    State s = state_from(level, identity(level.n), node_flow_log);
    std::vector<std::int64_t> level_parent;
    if (parent) {
      level_parent.assign(static_cast<std::size_t>(level.n), 0);
      for (std::size_t u = 0; u < assign.size(); ++u)
        level_parent[static_cast<std::size_t>(assign[u])] = (*parent)[u];
      for (std::size_t m = 0; m < level_parent.size(); ++m) s.modules[m].parent = level_parent[m];
    }
    core_loop(level, s, rng, o, parent ? &level_parent : nullptr);
    std::vector<std::int64_t> mod = s.mod;
    const std::int64_t merged = renumber(mod);
    if (merged == level.n) break;
    for (auto& a : assign) a = mod[static_cast<std::size_t>(a)];
    level = aggregate(level, mod, merged);
  }
  renumber(assign);
  return assign;
}

// Coarse-tuning's submodules: the best partition of each module's nodes found without leaving the module.
// previous (optional): the last coarse round's submodules; cut along the current modules, they seed the search
// instead of singletons (most modules do not change between rounds, so most of them are already found).
std::vector<std::int64_t> submodules(const Level& original, const std::vector<std::int64_t>& modules,
                                     double node_flow_log, std::mt19937_64& rng, const Options& o,
                                     const std::vector<std::int64_t>* previous = nullptr) {
  std::vector<std::int64_t> start = identity(original.n);
  if (previous) {
    std::unordered_map<std::uint64_t, std::int64_t> ids;
    for (std::size_t u = 0; u < start.size(); ++u) {
      const std::uint64_t key =
          (static_cast<std::uint64_t>((*previous)[u]) << 32) ^ static_cast<std::uint64_t>(modules[u]);
      start[u] = ids.try_emplace(key, static_cast<std::int64_t>(ids.size())).first->second;
    }
  }
  State s = state_from(original, start, node_flow_log);
  for (std::size_t u = 0; u < modules.size(); ++u) s.modules[static_cast<std::size_t>(start[u])].parent = modules[u];
  // Submodules only seed the coarse moves: on LFR graphs (n = 10⁵) two sweeps found codelengths as low as ten,
  // in less time.
  Options quick = o;
  quick.core_loop_limit = std::min(o.core_loop_limit, 2);
  core_loop(original, s, rng, quick, &modules);
  return merge_levels(original, s.mod, node_flow_log, rng, quick, &modules);
}

double codelength_of(const Level& g, const std::vector<std::int64_t>& mod, double node_flow_log) {
  return state_from(g, mod, node_flow_log).codelength();
}

struct Trial {
  std::vector<std::int64_t> modules;
  double codelength;
};

Trial run_trial(const Level& original, double node_flow_log, std::uint64_t seed, const Options& o) {
  std::mt19937_64 rng(seed);
  // Core loop on the nodes from singletons, then merge the modules upwards.
  State s = state_from(original, identity(original.n), node_flow_log);
  core_loop(original, s, rng, o);
  std::vector<std::int64_t> best = merge_levels(original, s.mod, node_flow_log, rng, o);
  double best_length = codelength_of(original, best, node_flow_log);
  // Tuning, alternating as infomap does: fine (single nodes move between the found modules) and coarse (each module
  // is split into submodules, which then move between modules); after either, the modules merge again. Like
  // infomap, only while there are several modules.
  int idle = 0;
  std::vector<std::int64_t> previous_sub;
  auto several_modules = [&]() { return std::any_of(best.begin(), best.end(), [](std::int64_t m) { return m != 0; }); };
  for (int round = 0; round < 2 * o.tune_iteration_limit && idle < 2 && several_modules(); ++round) {
    std::vector<std::int64_t> tuned;
    if (round % 2 == 0) {
      State t = state_from(original, best, node_flow_log);
      core_loop(original, t, rng, o);
      tuned = merge_levels(original, t.mod, node_flow_log, rng, o);
    } else {
      std::vector<std::int64_t> sub = submodules(original, best, node_flow_log, rng, o,
                                                 previous_sub.empty() ? nullptr : &previous_sub);
      const std::int64_t count = renumber(sub);
      previous_sub = sub;
      Level level = aggregate(original, sub, count);
      std::vector<std::int64_t> init(static_cast<std::size_t>(count), 0);
      for (std::size_t u = 0; u < sub.size(); ++u) init[static_cast<std::size_t>(sub[u])] = best[u];
      State t = state_from(level, init, node_flow_log);
      core_loop(level, t, rng, o);
      tuned.resize(sub.size());
      for (std::size_t u = 0; u < sub.size(); ++u) tuned[u] = t.mod[static_cast<std::size_t>(sub[u])];
      tuned = merge_levels(original, tuned, node_flow_log, rng, o);
    }
    const double length = codelength_of(original, tuned, node_flow_log);
    if (length < best_length - o.minimum_improvement) {
      // Like infomap, keep tuning only while a round gains more than a relative 1e-5.
      const bool worth_another = best_length - length > o.minimum_relative_tune_improvement * best_length;
      best = std::move(tuned);
      best_length = length;
      idle = worth_another ? 0 : 2;
    } else {
      ++idle;
    }
  }
  return {std::move(best), best_length};
}

Level level_from(const FlowGraph& graph) {
  Level g = make_level(graph.n, graph.node_flow, graph.source, graph.target, graph.link_flow, graph.symmetric);
  if (!graph.teleport_flow.empty()) {
    g.teleport_flow = graph.teleport_flow;
    g.teleport_weight = graph.teleport_weight;
    g.teleport_total = std::accumulate(g.teleport_flow.begin(), g.teleport_flow.end(), 0.0);
  }
  return g;
}

double node_flow_log_of(const FlowGraph& graph) {
  double acc = 0;
  for (double p : graph.node_flow) acc += plogp(p);
  return acc;
}

// A module tree over the nodes of a level: module 0 is the root; every module's children are either all nodes
// (a leaf module) or all modules. Flows are aggregated; exit / enter count the link flow crossing each module's
// boundary.
struct Tree {
  std::vector<std::int64_t> parent, module_of;  // per module (root: −1); per node, its (leaf) module
  std::vector<char> leaf_module, alive;
  std::vector<double> flow, exit, enter, leaf_log;  // leaf_log: Σ plogp(p_α) over a leaf module's nodes
  std::vector<double> child_enter, child_enter_log;  // Σ q↶ and Σ plogp(q↶) over a module's module children

  std::size_t size() const { return parent.size(); }
  // One codebook: a leaf module codes its nodes and exit, plogp(q↷ + Σp) − plogp(q↷) − Σ plogp(p_α); a module of
  // modules codes their entries and its exit, plogp(q↷ + Σq_c↶) − plogp(q↷) − Σ plogp(q_c↶).
  double codebook(std::size_t t) const {
    return leaf_module[t] ? plogp(exit[t] + flow[t]) - plogp(exit[t]) - leaf_log[t]
                          : plogp(exit[t] + child_enter[t]) - plogp(exit[t]) - child_enter_log[t];
  }
  double codelength() const {
    double acc = 0;
    for (std::size_t t = 0; t < size(); ++t)
      if (alive[t]) acc += codebook(t);
    return acc;
  }
};

// paths[ℓ·n + u]: the child index at depth ℓ on node u's path (−1 below its module). Throws std::invalid_argument.
Tree build_tree(const Level& g, const std::vector<std::int64_t>& paths, std::int64_t depth) {
  const auto n = static_cast<std::size_t>(g.n);
  const auto D = static_cast<std::size_t>(depth);
  if (depth < 1 || paths.size() != n * D) throw std::invalid_argument("paths must have depth × n entries, depth ≥ 1");
  Tree tr;
  tr.parent = {-1};
  tr.module_of.assign(n, 0);
  std::vector<char> has_module{0};
  std::vector<std::int64_t> id(n * D, -1);
  for (std::size_t l = 0; l < D; ++l) {
    std::unordered_map<std::uint64_t, std::int64_t> ids;
    for (std::size_t u = 0; u < n; ++u) {
      const std::int64_t c = paths[l * n + u];
      if (c < 0) {
        if (l == 0) throw std::invalid_argument("every node needs a module at the top level (paths[0] ≥ 0)");
        continue;
      }
      if (l > 0 && paths[(l - 1) * n + u] < 0)
        throw std::invalid_argument("a node's path has a gap: a module index after a −1");
      if (c >= (std::int64_t{1} << 31)) throw std::invalid_argument("module indices must be < 2^31");
      const std::int64_t up = tr.module_of[u];
      const std::uint64_t key = (static_cast<std::uint64_t>(up) << 31) | static_cast<std::uint64_t>(c);
      auto [it, fresh] = ids.try_emplace(key, static_cast<std::int64_t>(tr.parent.size()));
      if (fresh) {
        tr.parent.push_back(up);
        has_module.push_back(0);
        has_module[static_cast<std::size_t>(up)] = 1;
      }
      id[l * n + u] = it->second;
      tr.module_of[u] = it->second;
    }
  }
  const std::size_t T = tr.size();
  tr.leaf_module.assign(T, 0);
  tr.alive.assign(T, 1);
  for (std::size_t u = 0; u < n; ++u) tr.leaf_module[static_cast<std::size_t>(tr.module_of[u])] = 1;
  for (std::size_t t = 0; t < T; ++t)
    if (tr.leaf_module[t] && has_module[t])
      throw std::invalid_argument("a module's children must be all nodes or all modules (a node ends its path where "
                                  "another node's path continues)");
  tr.flow.assign(T, 0.0);
  tr.exit.assign(T, 0.0);
  tr.enter.assign(T, 0.0);
  tr.leaf_log.assign(T, 0.0);
  tr.child_enter.assign(T, 0.0);
  tr.child_enter_log.assign(T, 0.0);
  for (std::size_t u = 0; u < n; ++u) {
    tr.flow[0] += g.flow[u];
    for (std::size_t l = 0; l < D && id[l * n + u] >= 0; ++l)
      tr.flow[static_cast<std::size_t>(id[l * n + u])] += g.flow[u];
    tr.leaf_log[static_cast<std::size_t>(tr.module_of[u])] += plogp(g.flow[u]);
  }
  for (std::size_t u = 0; u < n; ++u)
    for (std::int64_t e = g.out_ptr[u]; e < g.out_ptr[u + 1]; ++e) {
      const auto v = static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)]);
      const double f = g.out_flow[static_cast<std::size_t>(e)];
      for (std::size_t l = 0; l < D; ++l) {
        const std::int64_t a = id[l * n + u], b = id[l * n + v];
        if (a == b) continue;  // same module (or both paths ended)
        if (a >= 0) tr.exit[static_cast<std::size_t>(a)] += f;
        if (b >= 0) tr.enter[static_cast<std::size_t>(b)] += f;
      }
    }
  if (g.recorded()) {  // every module (the root's terms vanish: it holds all of T and τ)
    std::vector<double> tele(T, 0.0), tau(T, 0.0);
    for (std::size_t u = 0; u < n; ++u) {
      tele[0] += g.teleport_flow[u];
      tau[0] += g.teleport_weight[u];
      for (std::size_t l = 0; l < D && id[l * n + u] >= 0; ++l) {
        tele[static_cast<std::size_t>(id[l * n + u])] += g.teleport_flow[u];
        tau[static_cast<std::size_t>(id[l * n + u])] += g.teleport_weight[u];
      }
    }
    for (std::size_t t = 1; t < T; ++t) {
      tr.exit[t] += tele[t] * (1.0 - tau[t]);
      tr.enter[t] += (g.teleport_total - tele[t]) * tau[t];
    }
  }
  for (std::size_t t = 1; t < T; ++t) {
    tr.child_enter[static_cast<std::size_t>(tr.parent[t])] += tr.enter[t];
    tr.child_enter_log[static_cast<std::size_t>(tr.parent[t])] += plogp(tr.enter[t]);
  }
  return tr;
}

// infomap 2.16's last step: dissolve, largest saving first, every module of modules whose children code shorter
// as children of its parent (its codebook goes; the parent codes their entries instead of its one).
void dissolve_unprofitable_modules(Tree& tr, double minimum_improvement) {
  const std::size_t T = tr.size();
  std::vector<std::vector<std::int64_t>> children(T);
  for (std::size_t t = 1; t < T; ++t)
    children[static_cast<std::size_t>(tr.parent[t])].push_back(static_cast<std::int64_t>(t));
  std::vector<std::uint64_t> version(T, 0);
  auto saving = [&](std::size_t t) {
    const auto P = static_cast<std::size_t>(tr.parent[t]);
    const double ce = tr.child_enter[P] - tr.enter[t] + tr.child_enter[t];
    const double cel = tr.child_enter_log[P] - plogp(tr.enter[t]) + tr.child_enter_log[t];
    const double parent_after = plogp(tr.exit[P] + ce) - plogp(tr.exit[P]) - cel;
    return tr.codebook(t) + tr.codebook(P) - parent_after;
  };
  struct Candidate {
    double saving;
    std::int64_t module;
    std::uint64_t version;
    bool operator<(const Candidate& o) const {
      return saving < o.saving || (saving == o.saving && module > o.module);
    }
  };
  std::priority_queue<Candidate> heap;
  auto push = [&](std::size_t t) {
    if (t != 0 && tr.alive[t] && !tr.leaf_module[t]) heap.push({saving(t), static_cast<std::int64_t>(t), version[t]});
  };
  for (std::size_t t = 1; t < T; ++t) push(t);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const auto t = static_cast<std::size_t>(c.module);
    if (!tr.alive[t] || c.version != version[t]) continue;
    if (!(c.saving > minimum_improvement)) break;
    const auto P = static_cast<std::size_t>(tr.parent[t]);
    tr.child_enter[P] += tr.child_enter[t] - tr.enter[t];
    tr.child_enter_log[P] += tr.child_enter_log[t] - plogp(tr.enter[t]);
    tr.alive[t] = 0;
    auto& siblings = children[P];
    siblings.erase(std::find(siblings.begin(), siblings.end(), c.module));
    for (std::int64_t ch : children[t]) {
      tr.parent[static_cast<std::size_t>(ch)] = static_cast<std::int64_t>(P);
      siblings.push_back(ch);
    }
    children[t].clear();
    // P's codebook changed: so did the saving of dissolving P or any of its children.
    ++version[P];
    push(P);
    for (std::int64_t ch : siblings) {
      ++version[static_cast<std::size_t>(ch)];
      push(static_cast<std::size_t>(ch));
    }
  }
}

// The tree back as paths, each module's children ranked by decreasing flow (ties: the order they were made in).
std::vector<std::vector<std::int64_t>> tree_paths(const Tree& tr) {
  const std::size_t T = tr.size(), n = tr.module_of.size();
  std::vector<std::vector<std::int64_t>> children(T);
  for (std::size_t t = 1; t < T; ++t)
    if (tr.alive[t]) children[static_cast<std::size_t>(tr.parent[t])].push_back(static_cast<std::int64_t>(t));
  std::vector<std::int64_t> rank(T, 0), depth(T, 0);
  for (std::size_t t = 0; t < T; ++t) {
    auto& c = children[t];
    std::stable_sort(c.begin(), c.end(), [&](std::int64_t a, std::int64_t b) {
      return tr.flow[static_cast<std::size_t>(a)] > tr.flow[static_cast<std::size_t>(b)];
    });
    for (std::size_t r = 0; r < c.size(); ++r) rank[static_cast<std::size_t>(c[r])] = static_cast<std::int64_t>(r);
  }
  std::size_t D = 0;
  for (std::size_t t = 1; t < T; ++t)  // parents are made before their children
    if (tr.alive[t]) {
      depth[t] = depth[static_cast<std::size_t>(tr.parent[t])] + 1;
      D = std::max(D, static_cast<std::size_t>(depth[t]));
    }
  std::vector<std::vector<std::int64_t>> paths(D, std::vector<std::int64_t>(n, -1));
  for (std::size_t u = 0; u < n; ++u)
    for (std::int64_t t = tr.module_of[u]; t > 0; t = tr.parent[static_cast<std::size_t>(t)])
      paths[static_cast<std::size_t>(depth[static_cast<std::size_t>(t)] - 1)][u] = rank[static_cast<std::size_t>(t)];
  return paths;
}

TreeCodelength tree_codelength_of(const Level& g, const std::vector<std::int64_t>& paths, std::int64_t depth) {
  const Tree tr = build_tree(g, paths, depth);
  return {tr.codelength(), tr.codebook(0)};
}

std::vector<std::int64_t> flatten(const std::vector<std::vector<std::int64_t>>& rows) {
  std::vector<std::int64_t> flat;
  for (const auto& row : rows) flat.insert(flat.end(), row.begin(), row.end());
  return flat;
}

// One module's nodes as a sub-network: their flows, the links among them, and per node the rest of its link flow
// (to or from outside the module), which the submodules' exit and enter flows include.
Level sub_level(const Level& g, const std::vector<std::int64_t>& members, std::vector<std::int64_t>& local) {
  const std::size_t k = members.size();
  for (std::size_t i = 0; i < k; ++i) local[static_cast<std::size_t>(members[i])] = static_cast<std::int64_t>(i);
  std::vector<double> flow(k), ext_out(k), ext_in;
  std::vector<std::int64_t> src, dst;
  std::vector<double> lf;
  double exit_network = 0;
  for (std::size_t i = 0; i < k; ++i) {
    const auto u = static_cast<std::size_t>(members[i]);
    flow[i] = g.flow[u];
    double inside = 0;
    for (std::int64_t e = g.out_ptr[u]; e < g.out_ptr[u + 1]; ++e) {
      const std::int64_t j = local[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])];
      if (j < 0) continue;
      src.push_back(static_cast<std::int64_t>(i));
      dst.push_back(j);
      lf.push_back(g.out_flow[static_cast<std::size_t>(e)]);
      inside += g.out_flow[static_cast<std::size_t>(e)];
    }
    ext_out[i] = std::max(0.0, g.out_total[u] - inside);
    exit_network += ext_out[i];
  }
  if (!g.symmetric) {
    ext_in.assign(k, 0.0);
    for (std::size_t i = 0; i < k; ++i) {
      const auto u = static_cast<std::size_t>(members[i]);
      double inside = 0;
      for (std::int64_t e = g.in_ptr[u]; e < g.in_ptr[u + 1]; ++e)
        if (local[static_cast<std::size_t>(g.in_idx[static_cast<std::size_t>(e)])] >= 0)
          inside += g.in_flow[static_cast<std::size_t>(e)];
      ext_in[i] = std::max(0.0, g.in_total[u] - inside);
    }
  }
  for (std::int64_t u : members) local[static_cast<std::size_t>(u)] = -1;
  std::vector<double> tele, tau;
  if (g.recorded()) {  // the module also exits by teleportation
    double T = 0, t = 0;
    for (std::int64_t u : members) {
      tele.push_back(g.teleport_flow[static_cast<std::size_t>(u)]);
      tau.push_back(g.teleport_weight[static_cast<std::size_t>(u)]);
      T += tele.back();
      t += tau.back();
    }
    exit_network += T * (1.0 - t);
  }
  Level sub = make_level(static_cast<std::int64_t>(k), std::move(flow), src, dst, lf, g.symmetric, std::move(ext_out),
                         std::move(ext_in), exit_network);
  if (g.recorded()) {
    sub.teleport_flow = std::move(tele);
    sub.teleport_weight = std::move(tau);
    sub.teleport_total = g.teleport_total;
  }
  return sub;
}

double sum_plogp(const std::vector<double>& x) {
  double acc = 0;
  for (double v : x) acc += plogp(v);
  return acc;
}

struct Partition {
  std::vector<std::int64_t> modules;  // per node of the level, 0..count−1
  std::int64_t count = 0;
  double codelength = 0;  // two-level, the level's exit_network included
};

// infomap's top-down step for one (sub-)network: the best two-level partition, then super modules on top of it
// (a two-level search on the module graph, each module weighted by its enter flow, kept while it shortens the index
// code), flattened to the coarsest level found. Its submodules are found by recursing into each module.
Partition coarsest_partition(const Level& g, std::mt19937_64& rng, const Options& o) {
  const double node_flow_log = sum_plogp(g.flow);
  Trial t = run_trial(g, node_flow_log, rng(), o);
  Partition p;
  p.modules = std::move(t.modules);
  p.count = renumber(p.modules);
  p.codelength = t.codelength;
  if (p.count <= 1 || p.count == g.n) return p;
  double old_index = state_from(g, p.modules, node_flow_log).index_codelength();
  Level mods = aggregate(g, p.modules, p.count);
  bool merged = false;
  while (true) {
    Level super = mods;
    for (std::size_t m = 0; m < static_cast<std::size_t>(super.n); ++m) {  // the module's enter flow
      super.flow[m] = super.symmetric ? super.out_total[m] : super.in_total[m];
      if (super.recorded())
        super.flow[m] += (super.teleport_total - super.teleport_flow[m]) * super.teleport_weight[m];
    }
    const double super_flow_log = sum_plogp(super.flow);
    Trial s = run_trial(super, super_flow_log, rng(), o);
    const std::int64_t count = renumber(s.modules);
    if (count <= 1 || count == super.n || !(s.codelength < old_index - o.minimum_improvement)) break;
    old_index = state_from(super, s.modules, super_flow_log).index_codelength();
    for (auto& m : p.modules) m = s.modules[static_cast<std::size_t>(m)];
    p.count = count;
    merged = true;
    std::vector<std::int64_t> size(static_cast<std::size_t>(count), 0);
    for (std::int64_t m : s.modules) ++size[static_cast<std::size_t>(m)];
    if (std::count_if(size.begin(), size.end(), [](std::int64_t z) { return z > 1; }) <= 1) break;
    mods = aggregate(mods, s.modules, count);
  }
  if (merged) p.codelength = codelength_of(g, p.modules, node_flow_log);
  return p;
}

// The partition of a graph without structure: every node with flow in module 0, each node without flow (an isolated
// node) in a module of its own after it, as infomap leaves them (and as a partition with structure keeps them).
std::vector<std::int64_t> no_structure_modules(const std::vector<double>& flow) {
  std::vector<std::int64_t> modules(flow.size(), 0);
  std::int64_t next = 1;
  for (std::size_t u = 0; u < flow.size(); ++u)
    if (!(flow[u] > 0)) modules[u] = next++;
  return modules;
}

// Children ranked by decreasing flow (ties: first member), as infomap orders its tree.
std::vector<std::int64_t> rank_by_flow(const std::vector<std::int64_t>& modules, std::int64_t count,
                                       const std::vector<double>& flow) {
  std::vector<double> f(static_cast<std::size_t>(count), 0.0);
  for (std::size_t u = 0; u < modules.size(); ++u) f[static_cast<std::size_t>(modules[u])] += flow[u];
  std::vector<std::int64_t> order = identity(count), rank(static_cast<std::size_t>(count));
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return f[static_cast<std::size_t>(a)] > f[static_cast<std::size_t>(b)];
  });
  for (std::int64_t r = 0; r < count; ++r) rank[static_cast<std::size_t>(order[static_cast<std::size_t>(r)])] = r;
  return rank;
}

struct TreeTrial {
  std::vector<std::vector<std::int64_t>> paths;  // per depth, the child index of each node (−1 below its module)
  double codelength = 0;
};

TreeTrial multilevel_trial(const Level& g, std::uint64_t seed, const Options& o) {
  std::mt19937_64 rng(seed);
  const auto n = static_cast<std::size_t>(g.n);
  const double one_level = -sum_plogp(g.flow);
  TreeTrial out;
  Partition top = coarsest_partition(g, rng, o);
  if (top.count <= 1 || top.codelength >= one_level) {  // no structure: one module (and isolated nodes their own)
    out.paths.assign(1, no_structure_modules(g.flow));
    out.codelength = one_level;  // left at 0, this trial beat every trial that found modules
    return out;
  }
  struct Item {
    std::vector<std::int64_t> members;
    std::size_t depth;
  };
  auto place = [&](const std::vector<std::int64_t>& members, const std::vector<std::int64_t>& modules,
                   std::int64_t count, const std::vector<double>& flow, std::size_t depth, std::vector<Item>& queue) {
    const std::vector<std::int64_t> rank = rank_by_flow(modules, count, flow);
    if (out.paths.size() <= depth) out.paths.emplace_back(n, -1);
    std::vector<Item> children(static_cast<std::size_t>(count));
    for (std::size_t i = 0; i < members.size(); ++i) {
      const std::int64_t r = rank[static_cast<std::size_t>(modules[i])];
      out.paths[depth][static_cast<std::size_t>(members[i])] = r;
      children[static_cast<std::size_t>(r)].members.push_back(members[i]);
    }
    for (Item& c : children) {
      c.depth = depth + 1;
      if (c.members.size() > 2) queue.push_back(std::move(c));  // ≤ 2 nodes: no non-trivial split
    }
  };
  std::vector<Item> queue, next;
  place(identity(g.n), top.modules, top.count, g.flow, 0, queue);
  std::vector<std::int64_t> local(n, -1);
  // Level by level, like infomap's partition queue: each module's nodes are split (two-level search + super
  // modules, the coarsest kept) when that codes them shorter than one leaf codebook.
  while (!queue.empty()) {
    next.clear();
    for (Item& item : queue) {
      const Level sub = sub_level(g, item.members, local);
      const double flow = std::accumulate(sub.flow.begin(), sub.flow.end(), 0.0);
      const double leaf_codelength = plogp(sub.exit_network + flow) - plogp(sub.exit_network) - sum_plogp(sub.flow);
      const Partition part = coarsest_partition(sub, rng, o);
      if (part.count <= 1 || part.count == sub.n || !(part.codelength < leaf_codelength - o.minimum_improvement))
        continue;
      place(item.members, part.modules, part.count, sub.flow, item.depth, next);
    }
    std::swap(queue, next);
  }
  Tree tr = build_tree(g, flatten(out.paths), static_cast<std::int64_t>(out.paths.size()));
  dissolve_unprofitable_modules(tr, o.minimum_improvement);
  out.paths = tree_paths(tr);
  out.codelength = tr.codelength();
  return out;
}

std::uint64_t trial_seed(std::uint64_t seed, int t) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * static_cast<std::uint64_t>(t + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

Codelength map_equation(const FlowGraph& graph, const std::vector<std::int64_t>& modules) {
  const Level g = level_from(graph);
  std::vector<std::int64_t> mod = modules;
  renumber(mod);
  const State s = state_from(g, mod, node_flow_log_of(graph));
  const double index = s.index_codelength();
  return {s.codelength(), index, s.codelength() - index};
}

Result two_level(const FlowGraph& graph, const Options& options) {
  const Level original = level_from(graph);
  const double node_flow_log = node_flow_log_of(graph);
  const int trials = std::max(1, options.num_trials);
  std::vector<Trial> results(static_cast<std::size_t>(trials));
  // Trial t's seed depends on (seed, t) only, so results do not depend on the thread count.
  auto work = [&](int t) {
    results[static_cast<std::size_t>(t)] = run_trial(original, node_flow_log, trial_seed(options.seed, t), options);
  };
  const int threads = worker_count(options.n_threads, static_cast<std::size_t>(trials));
  run_workers(threads, [&](int w) {
    for (int t = w; t < trials; t += threads) work(t);
  });
  int best = 0;
  for (int t = 1; t < trials; ++t)
    if (results[static_cast<std::size_t>(t)].codelength < results[static_cast<std::size_t>(best)].codelength) best = t;
  Result out;
  out.best_trial = best;
  out.one_level_codelength = -node_flow_log;
  out.modules = results[static_cast<std::size_t>(best)].modules;
  if (results[static_cast<std::size_t>(best)].codelength >= out.one_level_codelength)  // no structure: one module
    out.modules = no_structure_modules(graph.node_flow);
  // Modules ordered by decreasing flow (ties by first node), as infomap lists them.
  std::int64_t M = renumber(out.modules);
  std::vector<double> flow(static_cast<std::size_t>(M), 0.0);
  for (std::size_t u = 0; u < out.modules.size(); ++u) flow[static_cast<std::size_t>(out.modules[u])] += graph.node_flow[u];
  std::vector<std::int64_t> order = identity(M), rank(static_cast<std::size_t>(M));
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return flow[static_cast<std::size_t>(a)] > flow[static_cast<std::size_t>(b)];
  });
  for (std::int64_t r = 0; r < M; ++r) rank[static_cast<std::size_t>(order[static_cast<std::size_t>(r)])] = r;
  for (auto& m : out.modules) m = rank[static_cast<std::size_t>(m)];
  out.num_modules = M;
  const Codelength c = map_equation(graph, out.modules);
  out.codelength = c.codelength;
  out.index_codelength = c.index_codelength;
  out.module_codelength = c.module_codelength;
  return out;
}

}  // namespace kexue::infomap

namespace kexue::infomap {

TreeCodelength tree_codelength(const FlowGraph& graph, const std::vector<std::int64_t>& paths, std::int64_t depth) {
  return tree_codelength_of(level_from(graph), paths, depth);
}

MultilevelResult multilevel(const FlowGraph& graph, const Options& options) {
  const Level original = level_from(graph);
  const int trials = std::max(1, options.num_trials);
  std::vector<TreeTrial> results(static_cast<std::size_t>(trials));
  const int threads = worker_count(options.n_threads, static_cast<std::size_t>(trials));
  run_workers(threads, [&](int w) {
    for (int t = w; t < trials; t += threads)
      results[static_cast<std::size_t>(t)] = multilevel_trial(original, trial_seed(options.seed, t), options);
  });
  int best = 0;
  for (int t = 1; t < trials; ++t)
    if (results[static_cast<std::size_t>(t)].codelength < results[static_cast<std::size_t>(best)].codelength) best = t;
  MultilevelResult out;
  out.best_trial = best;
  out.one_level_codelength = -node_flow_log_of(graph);
  const TreeTrial& r = results[static_cast<std::size_t>(best)];
  out.depth = static_cast<std::int64_t>(r.paths.size());
  out.paths = flatten(r.paths);
  const TreeCodelength c = tree_codelength_of(original, out.paths, out.depth);
  out.codelength = c.codelength;
  out.index_codelength = c.index_codelength;
  return out;
}

}  // namespace kexue::infomap
