#include "hsic/pair_select.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/parallel.hpp"
#include "common/simd.hpp"
#include "hsic/distance_row.hpp"

namespace kexue::hsic {
namespace {

constexpr std::int64_t kBlock = 128;
constexpr int kBinBits = 16;
constexpr std::int64_t kBins = std::int64_t{1} << kBinBits;
constexpr std::uint64_t kInfBits = 0x7FF0000000000000ULL;  // +inf: every distance's bit pattern is ≤ this

std::uint64_t bits_of(double v) {
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

double from_bits(std::uint64_t b) {
  double v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The bracket of bit patterns [lo, hi] (inclusive) and its 2^16 bins of width 2^shift.
struct Bracket {
  std::uint64_t lo, hi;
  int shift;
};

Bracket make_bracket(std::uint64_t lo, std::uint64_t hi) {
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<std::uint64_t>(kBins)) ++shift;
  return {lo, hi, shift};
}

struct PassResult {
  std::uint64_t below = 0;  // values < lo
  std::vector<std::uint64_t> hist;  // values inside, per bin
  std::vector<double> kept;  // values inside, while they fit
  bool overflow = false;
  double min_above = std::numeric_limits<double>::infinity();  // smallest value > hi
};

// One row block against one column block: count, bin and keep the squared distances of pairs i < j.
KEXUE_SIMD_CLONES void scan_block(const double* xi_rows, std::int64_t d, std::int64_t i0, std::int64_t i1,
                                  std::int64_t j0, const double* bt, std::int64_t w, const Bracket& br,
                                  std::size_t cap, double* row, std::int64_t* slots, PassResult& out) {
  const double lo = from_bits(br.lo), hi = from_bits(br.hi);
  const std::int64_t wp = padded_width(w);
  for (std::int64_t i = i0; i < i1; ++i) {
    squared_distances(xi_rows + (i - i0) * d, bt, d, wp, row);
    const std::int64_t start = (i0 == j0) ? (i - j0 + 1) : 0;
    std::uint64_t below = 0, inside = 0;
    double min_above = std::numeric_limits<double>::infinity();
#pragma omp simd reduction(+ : below, inside) reduction(min : min_above)
    for (std::int64_t j = start; j < w; ++j) {
      const double v = row[j];
      below += v < lo;
      inside += (v >= lo) & (v <= hi);
      min_above = std::min(min_above, v > hi ? v : std::numeric_limits<double>::infinity());
    }
    out.below += below;
    out.min_above = std::min(out.min_above, min_above);
    if (inside == 0) continue;
    // Branch-free compaction: near the median, "v >= lo" is a coin flip that a branch would mispredict.
    std::int64_t hits = 0;
    for (std::int64_t j = start; j < w; ++j) {
      const double v = row[j];
      slots[hits] = j;
      hits += (v >= lo) & (v <= hi);
    }
    for (std::int64_t h = 0; h < hits; ++h) {
      const double v = row[slots[h]];
      ++out.hist[static_cast<std::size_t>((bits_of(v) - br.lo) >> br.shift)];
      if (out.kept.size() < cap)
        out.kept.push_back(v);
      else
        out.overflow = true;
    }
  }
}

template <typename T>
void scan_pairs(const T* x, std::int64_t n, std::int64_t d, const Bracket& br, std::size_t cap,
                const std::vector<std::pair<std::int64_t, std::int64_t>>& blocks, std::size_t first,
                std::size_t stride, PassResult& out) {
  out.hist.assign(static_cast<std::size_t>(kBins), 0);
  std::vector<double> bt, rows, row(static_cast<std::size_t>(padded_width(kBlock)));
  std::vector<std::int64_t> slots(row.size());
  for (std::size_t q = first; q < blocks.size(); q += stride) {
    const std::int64_t i0 = blocks[q].first, j0 = blocks[q].second;
    const std::int64_t i1 = std::min(i0 + kBlock, n), j1 = std::min(j0 + kBlock, n);
    transpose_block<double>(x, d, j0, j1, bt);
    rows.assign(x + i0 * d, x + i1 * d);  // the row block, in double
    scan_block(rows.data(), d, i0, i1, j0, bt.data(), j1 - j0, br, cap, row.data(), slots.data(), out);
  }
}

template <typename T>
PassResult full_pass(const T* x, std::int64_t n, std::int64_t d, const Bracket& br, std::size_t buffer,
                     int threads, const std::vector<std::pair<std::int64_t, std::int64_t>>& blocks) {
  std::vector<PassResult> parts(static_cast<std::size_t>(threads));
  const std::size_t cap = buffer / static_cast<std::size_t>(threads);
  run_workers(threads, [&](int t) {
    scan_pairs(x, n, d, br, cap, blocks, static_cast<std::size_t>(t), static_cast<std::size_t>(threads),
               parts[static_cast<std::size_t>(t)]);
  });
  PassResult total = std::move(parts[0]);
  for (std::size_t t = 1; t < parts.size(); ++t) {
    total.below += parts[t].below;
    for (std::size_t b = 0; b < total.hist.size(); ++b) total.hist[b] += parts[t].hist[b];
    total.overflow = total.overflow || parts[t].overflow;
    if (!total.overflow) total.kept.insert(total.kept.end(), parts[t].kept.begin(), parts[t].kept.end());
    total.min_above = std::min(total.min_above, parts[t].min_above);
  }
  return total;
}

// A bracket from a sample of pairs that holds rank k unless the sample is off by more than 6 standard deviations.
// Its width is ≈ 6·m/√s values, so s grows with m (up to options.sample) until they fill half the buffer: then one
// pass over the pairs suffices. Sample values are kept as float (64 MB at most): they only place the bracket.
template <typename T>
Bracket sample_bracket(const T* x, std::int64_t n, std::int64_t d, std::int64_t k, double m, std::size_t buffer,
                       const PairSelectOptions& options) {
  const double wanted = std::ceil(std::pow(12.0 * m / static_cast<double>(buffer), 2));
  const std::int64_t s = std::max<std::int64_t>(
      std::min<std::int64_t>(options.sample, 1 << 16), std::min<double>(wanted, static_cast<double>(options.sample)));
  std::vector<float> values(static_cast<std::size_t>(s));
  std::uint64_t state = options.seed;
  for (std::int64_t q = 0; q < s; ++q) {
    const auto i = static_cast<std::int64_t>(splitmix64(state) % static_cast<std::uint64_t>(n));
    auto j = static_cast<std::int64_t>(splitmix64(state) % static_cast<std::uint64_t>(n - 1));
    j += j >= i;
    double acc = 0;
    for (std::int64_t c = 0; c < d; ++c) {
      const double diff = static_cast<double>(x[i * d + c]) - static_cast<double>(x[j * d + c]);
      acc += diff * diff;
    }
    values[static_cast<std::size_t>(q)] = static_cast<float>(acc);
  }
  const double p = (static_cast<double>(k) + 0.5) / m;
  const double mid = p * static_cast<double>(s), sd = std::sqrt(static_cast<double>(s) * p * (1 - p));
  const auto lo_idx = static_cast<std::int64_t>(std::floor(mid - 6 * sd)) - 1;
  const auto hi_idx = static_cast<std::int64_t>(std::ceil(mid + 6 * sd)) + 1;
  std::uint64_t lo = 0, hi = kInfBits;
  if (lo_idx >= 0) {
    std::nth_element(values.begin(), values.begin() + lo_idx, values.end());
    lo = bits_of(static_cast<double>(values[static_cast<std::size_t>(lo_idx)]));
  }
  if (hi_idx < s) {
    std::nth_element(values.begin(), values.begin() + hi_idx, values.end());
    hi = std::max(lo, bits_of(static_cast<double>(values[static_cast<std::size_t>(hi_idx)])));
  }
  return make_bracket(lo, hi);
}

}  // namespace

template <typename T>
PairSelectResult kth_pair_sq_distance(const T* x, std::int64_t n, std::int64_t d, std::int64_t k,
                                      const PairSelectOptions& options) {
  const double m = 0.5 * static_cast<double>(n) * static_cast<double>(n - 1);
  const auto blocks = upper_block_pairs(n, kBlock);
  const int threads = worker_count(options.n_threads, blocks.size());
  const auto buffer = static_cast<std::size_t>(std::max<std::int64_t>(options.buffer, threads));

  // Below 2^16 pairs keeping them all is cheapest; above, a sampled bracket keeps (and selects among) only a few.
  const bool sampled = options.sample > 0 && m > 65536.0;
  Bracket br = sampled ? sample_bracket(x, n, d, k, m, buffer, options) : make_bracket(0, kInfBits);
  for (int passes = 1;; ++passes) {
    PassResult pass = full_pass(x, n, d, br, buffer, threads, blocks);
    std::uint64_t inside = 0;
    for (std::uint64_t c : pass.hist) inside += c;
    if (static_cast<std::uint64_t>(k) < pass.below) {  // the sampled bracket starts too high: widen downwards
      br = make_bracket(0, br.lo - 1);
      continue;
    }
    const std::uint64_t r = static_cast<std::uint64_t>(k) - pass.below;  // rank among the values inside
    if (r >= inside) {  // the sampled bracket ends too low: widen upwards
      br = make_bracket(br.hi + 1, kInfBits);
      continue;
    }
    if (!pass.overflow) {  // every value inside is in memory
      auto& v = pass.kept;
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(r), v.end());
      const double value = v[r];
      const double next = (r + 1 < inside) ? *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(r) + 1, v.end())
                                           : pass.min_above;
      return {value, next, passes};
    }
    std::uint64_t cumulative = 0;
    std::size_t b = 0;
    while (cumulative + pass.hist[b] <= r) cumulative += pass.hist[b++];
    if (br.shift == 0) {  // the bin is one bit pattern: one value, and its neighbour follows from the histogram
      const double value = from_bits(br.lo + b);
      double next = pass.min_above;
      if (r + 1 < cumulative + pass.hist[b]) {
        next = value;
      } else {
        for (std::size_t c = b + 1; c < pass.hist.size(); ++c)
          if (pass.hist[c] > 0) {
            next = from_bits(br.lo + c);
            break;
          }
      }
      return {value, next, passes};
    }
    const std::uint64_t lo = br.lo + (static_cast<std::uint64_t>(b) << br.shift);
    br = make_bracket(lo, std::min(br.hi, lo + ((std::uint64_t{1} << br.shift) - 1)));
  }
}

template PairSelectResult kth_pair_sq_distance<float>(const float*, std::int64_t, std::int64_t, std::int64_t,
                                                      const PairSelectOptions&);
template PairSelectResult kth_pair_sq_distance<double>(const double*, std::int64_t, std::int64_t, std::int64_t,
                                                       const PairSelectOptions&);

}  // namespace kexue::hsic
