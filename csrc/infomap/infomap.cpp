#include "infomap/infomap.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "common/parallel.hpp"

namespace kexue::infomap {
namespace {

inline double plogp(double x) { return x > 0 ? x * std::log2(x) : 0.0; }

// A graph at one aggregation level: node flows and CSR out- and in-links without self-links (they never exit).
struct Level {
  std::int64_t n = 0;
  bool symmetric = false;  // every link's reverse carries the same flow (undirected): no in-link CSR is built
  std::vector<double> flow, out_total, in_total;
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

// Links given as (source, target, flow) lists, duplicates allowed; self-links dropped.
Level make_level(std::int64_t n, std::vector<double> flow, const std::vector<std::int64_t>& src,
                 const std::vector<std::int64_t>& dst, const std::vector<double>& lf, bool symmetric) {
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
  return g;
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

  double codelength() const {
    return plogp(sum_enter) - enter_log_enter - exit_log_exit + exit_flow_log - node_flow_log;
  }
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
  s.mod = mod;
  const auto n = static_cast<std::size_t>(g.n);
  s.modules.assign(n, Module{});
  for (std::size_t u = 0; u < n; ++u) {
    Module& m = s.modules[static_cast<std::size_t>(mod[u])];
    ++m.size;
    m.flow += g.flow[u];
    for (std::int64_t e = g.out_ptr[u]; e < g.out_ptr[u + 1]; ++e) {
      const auto v = static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)]);
      if (mod[v] != mod[u]) {
        m.exit += g.out_flow[static_cast<std::size_t>(e)];
        s.modules[static_cast<std::size_t>(mod[v])].enter += g.out_flow[static_cast<std::size_t>(e)];
      }
    }
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
    for (std::int64_t alpha : order) {
      const auto a = static_cast<std::size_t>(alpha);
      const std::int64_t A = s.mod[a];
      touched.clear();
      // Flow from α to each neighbouring module (out-links) and into α from it (in-links).
      auto gather = [&](const std::vector<std::int64_t>& ptr, const std::vector<std::int64_t>& idx,
                        const std::vector<double>& flows, double Gathered::*field) {
        for (std::int64_t e = ptr[a]; e < ptr[a + 1]; ++e) {
          const auto m = static_cast<std::size_t>(s.mod[static_cast<std::size_t>(idx[static_cast<std::size_t>(e)])]);
          if (!marked[m]) {
            marked[m] = 1;
            gathered[m] = Gathered{};
            touched.push_back(static_cast<std::int64_t>(m));
          }
          gathered[m].*field += flows[static_cast<std::size_t>(e)];
        }
      };
      gather(g.out_ptr, g.out_idx, g.out_flow, &Gathered::out_to);
      if (!g.symmetric) gather(g.in_ptr, g.in_idx, g.in_flow, &Gathered::in_from);
      // Symmetric links: the flow in from a module equals the flow out to it.
      auto in_from = [&](const Gathered& x) { return g.symmetric ? x.out_to : x.in_from; };
      const double p = g.flow[a], out_a = g.out_total[a], in_a = g.symmetric ? out_a : g.in_total[a];
      const auto Ai = static_cast<std::size_t>(A);
      const Module& mA = s.modules[Ai];
      const double out_to_A = marked[Ai] ? gathered[Ai].out_to : 0.0;
      const double in_from_A = marked[Ai] ? in_from(gathered[Ai]) : 0.0;
      // Module A without α.
      Module A_without = mA;
      A_without.exit = mA.exit - (out_a - out_to_A) + in_from_A;
      A_without.enter = mA.enter - (in_a - in_from_A) + out_to_A;
      A_without.flow = mA.flow - p;
      A_without.log_exit = plogp(A_without.exit);
      A_without.log_enter = g.symmetric ? A_without.log_exit : plogp(A_without.enter);
      A_without.log_exit_flow = plogp(A_without.exit + A_without.flow);
      // The terms without B: L(α in B) = these + B's terms with α.
      const double base_enter = s.sum_enter - mA.enter + A_without.enter;
      const double base_ell = s.enter_log_enter - mA.log_enter + A_without.log_enter;
      const double base_xlx = s.exit_log_exit - mA.log_exit + A_without.log_exit;
      const double base_xfl = s.exit_flow_log - mA.log_exit_flow + A_without.log_exit_flow;
      auto cost_with = [&](const Module& B, double out_to_B, double in_from_B) {
        const double ex = B.exit + (out_a - out_to_B) - in_from_B;
        const double en = B.enter + (in_a - in_from_B) - out_to_B;
        const double log_ex = plogp(ex);
        const double log_en = g.symmetric ? log_ex : plogp(en);
        return plogp(base_enter - B.enter + en) - (base_ell - B.log_enter + log_en) - (base_xlx - B.log_exit + log_ex) +
               (base_xfl - B.log_exit_flow + plogp(ex + B.flow + p));
      };
      double best = cost_with(A_without, out_to_A, in_from_A);
      std::int64_t best_module = A;
      const std::int64_t own_parent = parent ? (*parent)[a] : 0;
      for (std::int64_t m : touched) {
        const auto mi = static_cast<std::size_t>(m);
        const Module& B = s.modules[mi];
        if (m == A || (parent && B.parent != own_parent)) continue;
        const double c = cost_with(B, gathered[mi].out_to, in_from(gathered[mi]));
        if (c < best - 1e-15) {
          best = c;
          best_module = m;
        }
      }
      if (mA.size > 1 && !s.empty.empty()) {  // α alone in a new module
        const double c = cost_with(Module{}, 0, 0);
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
        B.exit += (out_a - out_to_B) - in_from_B;
        B.enter += (in_a - in_from_B) - out_to_B;
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
  std::vector<double> flow(M, 0.0);
  for (std::size_t u = 0; u < static_cast<std::size_t>(g.n); ++u) flow[static_cast<std::size_t>(mod[u])] += g.flow[u];
  // Bucket the nodes by module, then merge each module's out-links by target module.
  std::vector<std::int64_t> src, dst;
  std::vector<double> lf;
  std::vector<std::vector<std::int64_t>> members(M);
  for (std::size_t u = 0; u < static_cast<std::size_t>(g.n); ++u) members[static_cast<std::size_t>(mod[u])].push_back(
      static_cast<std::int64_t>(u));
  std::vector<double> acc(M, 0.0);
  std::vector<std::int64_t> touched;
  for (std::size_t m = 0; m < M; ++m) {
    touched.clear();
    for (std::int64_t u : members[m])
      for (std::int64_t e = g.out_ptr[static_cast<std::size_t>(u)]; e < g.out_ptr[static_cast<std::size_t>(u) + 1];
           ++e) {
        const auto t = static_cast<std::size_t>(mod[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])]);
        if (t == m) continue;
        if (acc[t] == 0.0) touched.push_back(static_cast<std::int64_t>(t));
        acc[t] += g.out_flow[static_cast<std::size_t>(e)];
      }
    for (std::int64_t t : touched) {
      src.push_back(static_cast<std::int64_t>(m));
      dst.push_back(t);
      lf.push_back(acc[static_cast<std::size_t>(t)]);
      acc[static_cast<std::size_t>(t)] = 0.0;
    }
  }
  return make_level(num_modules, std::move(flow), src, dst, lf, g.symmetric);
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
std::vector<std::int64_t> submodules(const Level& original, const std::vector<std::int64_t>& modules,
                                     double node_flow_log, std::mt19937_64& rng, const Options& o) {
  State s = state_from(original, identity(original.n), node_flow_log);
  for (std::size_t m = 0; m < modules.size(); ++m) s.modules[m].parent = modules[m];
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
  // is split into submodules, which then move between modules); after either, the modules merge again.
  int idle = 0;
  for (int round = 0; round < 2 * o.tune_iteration_limit && idle < 2; ++round) {
    std::vector<std::int64_t> tuned;
    if (round % 2 == 0) {
      State t = state_from(original, best, node_flow_log);
      core_loop(original, t, rng, o);
      tuned = merge_levels(original, t.mod, node_flow_log, rng, o);
    } else {
      std::vector<std::int64_t> sub = submodules(original, best, node_flow_log, rng, o);
      const std::int64_t count = renumber(sub);
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
  return make_level(graph.n, graph.node_flow, graph.source, graph.target, graph.link_flow, graph.symmetric);
}

double node_flow_log_of(const FlowGraph& graph) {
  double acc = 0;
  for (double p : graph.node_flow) acc += plogp(p);
  return acc;
}

}  // namespace

Codelength map_equation(const FlowGraph& graph, const std::vector<std::int64_t>& modules) {
  const Level g = level_from(graph);
  std::vector<std::int64_t> mod = modules;
  renumber(mod);
  const State s = state_from(g, mod, node_flow_log_of(graph));
  const double index = plogp(s.sum_enter) - s.enter_log_enter;
  return {s.codelength(), index, s.codelength() - index};
}

Result two_level(const FlowGraph& graph, const Options& options) {
  const Level original = level_from(graph);
  const double node_flow_log = node_flow_log_of(graph);
  const int trials = std::max(1, options.num_trials);
  std::vector<Trial> results(static_cast<std::size_t>(trials));
  // Trial t's seed depends on (seed, t) only, so results do not depend on the thread count.
  auto work = [&](int t) {
    std::uint64_t z = options.seed + 0x9E3779B97F4A7C15ULL * static_cast<std::uint64_t>(t + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    results[static_cast<std::size_t>(t)] = run_trial(original, node_flow_log, z ^ (z >> 31), options);
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
    std::fill(out.modules.begin(), out.modules.end(), 0);
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
