#include "infomap/infomap.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <thread>

namespace kexue::infomap {
namespace {

inline double plogp(double x) { return x > 0 ? x * std::log2(x) : 0.0; }

// A graph at one aggregation level: node flows and CSR out- and in-links without self-links (they never exit).
struct Level {
  std::int64_t n = 0;
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
                 const std::vector<std::int64_t>& dst, const std::vector<double>& lf) {
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
  g.flow = std::move(flow);
  fill_csr(n, s, t, f, g.out_ptr, g.out_idx, g.out_flow, g.out_total);
  fill_csr(n, t, s, f, g.in_ptr, g.in_idx, g.in_flow, g.in_total);
  return g;
}

// Module bookkeeping for one level and the map-equation terms that change with moves.
struct State {
  std::vector<std::int64_t> mod, size;
  std::vector<double> exit, enter, flow;
  std::vector<std::int64_t> empty;  // ids of empty modules
  double sum_enter = 0, enter_log_enter = 0, exit_log_exit = 0, exit_flow_log = 0;
  double node_flow_log = 0;  // Σ plogp over the original nodes: constant

  double codelength() const {
    return plogp(sum_enter) - enter_log_enter - exit_log_exit + exit_flow_log - node_flow_log;
  }
  void recompute_terms() {
    sum_enter = enter_log_enter = exit_log_exit = exit_flow_log = 0;
    for (std::size_t m = 0; m < exit.size(); ++m) {
      sum_enter += enter[m];
      enter_log_enter += plogp(enter[m]);
      exit_log_exit += plogp(exit[m]);
      exit_flow_log += plogp(exit[m] + flow[m]);
    }
  }
};

State state_from(const Level& g, const std::vector<std::int64_t>& mod, double node_flow_log) {
  State s;
  s.node_flow_log = node_flow_log;
  s.mod = mod;
  const auto n = static_cast<std::size_t>(g.n);
  s.size.assign(n, 0);
  s.exit.assign(n, 0.0);
  s.enter.assign(n, 0.0);
  s.flow.assign(n, 0.0);
  for (std::size_t u = 0; u < n; ++u) {
    const auto m = static_cast<std::size_t>(mod[u]);
    ++s.size[m];
    s.flow[m] += g.flow[u];
    for (std::int64_t e = g.out_ptr[u]; e < g.out_ptr[u + 1]; ++e) {
      const auto v = static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)]);
      if (mod[v] != mod[u]) {
        s.exit[m] += g.out_flow[static_cast<std::size_t>(e)];
        s.enter[static_cast<std::size_t>(mod[v])] += g.out_flow[static_cast<std::size_t>(e)];
      }
    }
  }
  for (std::size_t m = n; m-- > 0;)
    if (s.size[m] == 0) s.empty.push_back(static_cast<std::int64_t>(m));
  s.recompute_terms();
  return s;
}

std::vector<std::int64_t> identity(std::int64_t n) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// Sweeps over the nodes in random order, moving each to the module that lowers L most. Returns the sweeps run.
int core_loop(const Level& g, State& s, std::mt19937_64& rng, const Options& o) {
  const auto n = static_cast<std::size_t>(g.n);
  std::vector<std::int64_t> order = identity(g.n), touched;
  std::vector<double> out_to(n, 0.0), in_from(n, 0.0);
  std::vector<char> marked(n, 0);
  int sweeps = 0;
  for (; sweeps < o.core_loop_limit; ++sweeps) {
    for (std::size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
    const double before = s.codelength();
    std::int64_t moved = 0;
    for (std::int64_t alpha : order) {
      const auto a = static_cast<std::size_t>(alpha);
      const std::int64_t A = s.mod[a];
      touched.clear();
      auto touch = [&](std::int64_t m) {
        if (!marked[static_cast<std::size_t>(m)]) {
          marked[static_cast<std::size_t>(m)] = 1;
          out_to[static_cast<std::size_t>(m)] = in_from[static_cast<std::size_t>(m)] = 0;
          touched.push_back(m);
        }
      };
      for (std::int64_t e = g.out_ptr[a]; e < g.out_ptr[a + 1]; ++e) {
        const std::int64_t m = s.mod[static_cast<std::size_t>(g.out_idx[static_cast<std::size_t>(e)])];
        touch(m);
        out_to[static_cast<std::size_t>(m)] += g.out_flow[static_cast<std::size_t>(e)];
      }
      for (std::int64_t e = g.in_ptr[a]; e < g.in_ptr[a + 1]; ++e) {
        const std::int64_t m = s.mod[static_cast<std::size_t>(g.in_idx[static_cast<std::size_t>(e)])];
        touch(m);
        in_from[static_cast<std::size_t>(m)] += g.in_flow[static_cast<std::size_t>(e)];
      }
      const double p = g.flow[a], out_a = g.out_total[a], in_a = g.in_total[a];
      const auto Ai = static_cast<std::size_t>(A);
      const double out_to_A = marked[Ai] ? out_to[Ai] : 0.0, in_from_A = marked[Ai] ? in_from[Ai] : 0.0;
      // Module A without α.
      const double exit_A = s.exit[Ai] - (out_a - out_to_A) + in_from_A;
      const double enter_A = s.enter[Ai] - (in_a - in_from_A) + out_to_A;
      const double flow_A = s.flow[Ai] - p;
      const double base_enter = s.sum_enter - s.enter[Ai] + enter_A;
      const double base_ell = s.enter_log_enter - plogp(s.enter[Ai]) + plogp(enter_A);
      const double base_xlx = s.exit_log_exit - plogp(s.exit[Ai]) + plogp(exit_A);
      const double base_xfl = s.exit_flow_log - plogp(s.exit[Ai] + s.flow[Ai]) + plogp(exit_A + flow_A);
      // L with α joined to module B (B == A gives the current L).
      auto cost_with = [&](double exit_B, double enter_B, double flow_B, double out_to_B, double in_from_B,
                           double& ex, double& en) {
        ex = exit_B + (out_a - out_to_B) - in_from_B;
        en = enter_B + (in_a - in_from_B) - out_to_B;
        return plogp(base_enter - enter_B + en) - (base_ell - plogp(enter_B) + plogp(en)) -
               (base_xlx - plogp(exit_B) + plogp(ex)) +
               (base_xfl - plogp(exit_B + flow_B) + plogp(ex + flow_B + p));
      };
      double ex, en;
      double best = cost_with(exit_A, enter_A, flow_A, out_to_A, in_from_A, ex, en);
      std::int64_t best_module = A;
      for (std::int64_t m : touched) {
        if (m == A) continue;
        const auto mi = static_cast<std::size_t>(m);
        const double c = cost_with(s.exit[mi], s.enter[mi], s.flow[mi], out_to[mi], in_from[mi], ex, en);
        if (c < best - 1e-15) {
          best = c;
          best_module = m;
        }
      }
      if (s.size[Ai] > 1 && !s.empty.empty()) {  // α alone in a new module
        const double c = cost_with(0, 0, 0, 0, 0, ex, en);
        if (c < best - 1e-15) {
          best = c;
          best_module = s.empty.back();
        }
      }
      if (best_module != A) {
        const auto B = static_cast<std::size_t>(best_module);
        const bool fresh = s.size[B] == 0;
        const double out_to_B = (!fresh && marked[B]) ? out_to[B] : 0.0;
        const double in_from_B = (!fresh && marked[B]) ? in_from[B] : 0.0;
        const double exit_B = s.exit[B] + (out_a - out_to_B) - in_from_B;
        const double enter_B = s.enter[B] + (in_a - in_from_B) - out_to_B;
        s.sum_enter += (enter_A - s.enter[Ai]) + (enter_B - s.enter[B]);
        s.enter_log_enter += plogp(enter_A) - plogp(s.enter[Ai]) + plogp(enter_B) - plogp(s.enter[B]);
        s.exit_log_exit += plogp(exit_A) - plogp(s.exit[Ai]) + plogp(exit_B) - plogp(s.exit[B]);
        s.exit_flow_log += plogp(exit_A + flow_A) - plogp(s.exit[Ai] + s.flow[Ai]) +
                           plogp(exit_B + s.flow[B] + p) - plogp(s.exit[B] + s.flow[B]);
        s.exit[Ai] = exit_A;
        s.enter[Ai] = enter_A;
        s.flow[Ai] = flow_A;
        s.exit[B] = exit_B;
        s.enter[B] = enter_B;
        s.flow[B] += p;
        if (fresh) s.empty.pop_back();
        --s.size[Ai];
        ++s.size[B];
        if (s.size[Ai] == 0) {
          s.exit[Ai] = s.enter[Ai] = s.flow[Ai] = 0;  // exact zeros, not rounding residue
          s.empty.push_back(A);
        }
        s.mod[a] = best_module;
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
  return make_level(num_modules, std::move(flow), src, dst, lf);
}

// From a partition of the original nodes: aggregate and keep merging modules level by level until nothing merges.
// Returns the final partition of the original nodes (renumbered).
std::vector<std::int64_t> merge_levels(const Level& original, std::vector<std::int64_t> assign, double node_flow_log,
                                       std::mt19937_64& rng, const Options& o) {
  std::int64_t M = renumber(assign);
  Level level = aggregate(original, assign, M);
  while (level.n > 1) {
    State s = state_from(level, identity(level.n), node_flow_log);
    core_loop(level, s, rng, o);
    std::vector<std::int64_t> mod = s.mod;
    const std::int64_t merged = renumber(mod);
    if (merged == level.n) break;
    for (auto& a : assign) a = mod[static_cast<std::size_t>(a)];
    level = aggregate(level, mod, merged);
  }
  renumber(assign);
  return assign;
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
  // Fine-tuning: single nodes move between the found modules, then the modules merge again.
  for (int round = 0; round < o.tune_iteration_limit; ++round) {
    State t = state_from(original, best, node_flow_log);
    core_loop(original, t, rng, o);
    std::vector<std::int64_t> tuned = merge_levels(original, t.mod, node_flow_log, rng, o);
    const double length = codelength_of(original, tuned, node_flow_log);
    if (length < best_length - o.minimum_improvement) {
      best = std::move(tuned);
      best_length = length;
    } else {
      break;
    }
  }
  return {std::move(best), best_length};
}

Level level_from(const FlowGraph& graph) {
  return make_level(graph.n, graph.node_flow, graph.source, graph.target, graph.link_flow);
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
  const int threads = std::max(1, std::min(options.n_threads, trials));
  if (threads == 1) {
    for (int t = 0; t < trials; ++t) work(t);
  } else {
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w)
      pool.emplace_back([&, w] {
        for (int t = w; t < trials; t += threads) work(t);
      });
    for (auto& th : pool) th.join();
  }
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
