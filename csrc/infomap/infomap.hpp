// Two-level Infomap (Rosvall & Bergstrom 2008): minimize the map equation over partitions (torch-free C++17).
//
// For a partition M of the nodes, with node visit rates p_α, module flows p_m = Σ_{α∈m} p_α and the flows q_m↶ / q_m↷
// entering / exiting module m along links (teleportation unrecorded),
//   L(M) = plogp(Σ_m q_m↶) − Σ_m plogp(q_m↶) − Σ_m plogp(q_m↷) + Σ_m plogp(q_m↷ + p_m) − Σ_α plogp(p_α),
// plogp(x) = x log₂ x; the first two terms are the index codelength, the rest the module codelength.
//
// The search follows infomap's two-level algorithm: a core loop visits the nodes in random order and moves each to
// the neighbouring (or an empty) module with the largest decrease of L (ΔL in O(degree) from the enter/exit flows),
// until a sweep improves L by less than a threshold; the modules are then aggregated into nodes and the loop repeats
// on the module graph until nothing merges. Tuning then alternates, while L improves, between fine-tuning (the core
// loop on the original nodes from the found partition) and coarse-tuning (each module split into submodules by a
// constrained search, the submodules moved between modules), merging again after each. Several trials keep the
// best; a seed makes it deterministic.
#pragma once

#include <cstdint>
#include <vector>

namespace kexue::infomap {

// Links with their flows (already normalized by the caller's flow model). For an undirected graph each edge is given
// twice, once per direction, each carrying half its flow.
struct FlowGraph {
  std::int64_t n = 0;
  bool symmetric = false;                   // undirected: every link's reverse is listed with the same flow
  std::vector<double> node_flow;            // p_α, Σ = 1
  std::vector<std::int64_t> source, target;  // one entry per directed link (self-links allowed, they never exit)
  std::vector<double> link_flow;
  // Recorded teleportation (directed; empty: unrecorded): per node, the flow T_α that teleports from it and its
  // share τ_α of the teleport targets. A module m then also exits by teleportation, T_m (1 − τ_m), and is entered by
  // it, (Σ_β T_β − T_m) τ_m, with T_m, τ_m summed over its nodes (self-teleportation is not coded).
  std::vector<double> teleport_flow, teleport_weight;
};

struct Options {
  int num_trials = 1;
  std::uint64_t seed = 123;
  int core_loop_limit = 10;            // sweeps per core loop
  int tune_iteration_limit = 10;       // fine- and coarse-tuning rounds (each)
  double minimum_improvement = 1e-10;  // a sweep or a round must improve L by more than this (bits)
  double minimum_relative_tune_improvement = 1e-5;  // tuning continues after a round that gained more than this
  int n_threads = 1;                   // trials run in parallel on up to this many threads
};

struct Result {
  std::vector<std::int64_t> modules;  // module index per node, 0..num_modules−1 (ordered by decreasing flow)
  double codelength = 0, index_codelength = 0, module_codelength = 0, one_level_codelength = 0;
  std::int64_t num_modules = 0;
  int best_trial = 0;
};

Result two_level(const FlowGraph& graph, const Options& options);

// L(M) of a given partition (modules: 0..M−1 per node), and its index and module parts.
struct Codelength {
  double codelength, index_codelength, module_codelength;
};
Codelength map_equation(const FlowGraph& graph, const std::vector<std::int64_t>& modules);

// The multilevel map equation (Rosvall & Bergstrom 2011) of a module tree: Σ over modules of each codebook's length;
// a module with node children codes them and its exit, one with module children codes their entries and its exit.
// paths[ℓ·n + u]: the child index at depth ℓ on node u's path, −1 below the module holding u (depth rows).
// index_codelength: the root's codebook. Throws std::invalid_argument on a malformed tree.
struct TreeCodelength {
  double codelength, index_codelength;
};
TreeCodelength tree_codelength(const FlowGraph& graph, const std::vector<std::int64_t>& paths, std::int64_t depth);

// Hierarchical Infomap as infomap does it: the coarsest level first (a two-level partition, then super modules
// while they shorten the index code), then each module split recursively (two-level search with the module's exit
// flow in its index codebook, plus super modules) while that codes it shorter. Children are ranked by flow.
struct MultilevelResult {
  std::int64_t depth = 0;             // module levels
  std::vector<std::int64_t> paths;    // depth × n, as in tree_codelength
  double codelength = 0, index_codelength = 0, one_level_codelength = 0;
  int best_trial = 0;
};
MultilevelResult multilevel(const FlowGraph& graph, const Options& options);

}  // namespace kexue::infomap
