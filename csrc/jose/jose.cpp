// The JoSE trainer: see jose.hpp for the algorithm and kexue_fast/jose/reference.py for the update algebra.
#include "jose/jose.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <stdexcept>
#include <unordered_map>

#include "common/parallel.hpp"
#include "common/simd.hpp"

#if defined(__GNUC__)
#define KEXUE_INLINE __attribute__((always_inline)) inline
#else
#define KEXUE_INLINE inline
#endif

namespace kexue::jose {

namespace {

constexpr std::uint64_t kLcgMul = 25214903917ULL;
constexpr std::uint64_t kLcgAdd = 11ULL;
constexpr std::uint64_t kSeedMix = 0x9E3779B97F4A7C15ULL;  // seed 0 leaves jose.c's streams unchanged

KEXUE_INLINE std::uint64_t lcg(std::uint64_t& state) {
  state = state * kLcgMul + kLcgAdd;
  return state;
}

KEXUE_INLINE float dot(const float* a, const float* b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// x ← (x + a·(p·x − q·y)) / ‖x + a·(p·x − q·y)‖: every tangent step has this form (p, q scalars, y fixed); the
// step and the squared norm share one pass.
KEXUE_INLINE void step_along(float* x, const float* y, float p, float q, float a, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < n; ++c) {
    const float z = x[c] + a * (p * x[c] - q * y[c]);
    x[c] = z;
    s += z * z;
  }
  const float inv = 1.f / std::sqrt(s);
#pragma omp simd
  for (int c = 0; c < n; ++c) x[c] *= inv;
}

// x ← (x + a·e) / ‖x + a·e‖
KEXUE_INLINE void step_by(float* x, const float* e, float a, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < n; ++c) {
    const float z = x[c] + a * e[c];
    x[c] = z;
    s += z * z;
  }
  const float inv = 1.f / std::sqrt(s);
#pragma omp simd
  for (int c = 0; c < n; ++c) x[c] *= inv;
}

// x / y clamped to [−1, 1]: the paper rule's ratios (u' − u)ᵀv / ‖u − u'‖ and u'ᵀs / ‖s‖ lie there (Cauchy–Schwarz,
// unit rows), but computed from rows another Hogwild thread is rewriting (u' = u, its two reads a write apart, gives
// x ≠ 0 over ‖u − u'‖ = 0) or from nearly cancelling sums they can blow up and turn a row into NaN.
KEXUE_INLINE float unit_ratio(float x, float y) { return std::min(1.f, std::max(-1.f, x / y)); }

// The separate hinge max(0, m − uᵀv + u'ᵀv): u, u' and v move unless frozen (infer: only v, the document, moves).
KEXUE_INLINE bool separate_step(float* u, float* v, float* un, float* e, int n, float alpha, float margin,
                                StepRule rule, bool move_words, double& loss) {
  const float f = dot(u, v, n), h = dot(un, v, n);
  if (!(f - h < margin)) return false;
  loss += margin - (f - h);
  float dist2 = 0.f;
#pragma omp simd reduction(+ : dist2)
  for (int c = 0; c < n; ++c) {
    e[c] = u[c] - f * v[c] + h * v[c] - un[c];
    const float diff = u[c] - un[c];
    dist2 += diff * diff;
  }
  if (move_words) {
    step_along(u, v, -f, -1.f, alpha * (1.f - f), n);  // u += α(1 − f)(v − f u)
    const float c_neg = rule == StepRule::jose_c ? 2.f * h : 1.f + h;
    step_along(un, v, h, 1.f, alpha * c_neg, n);  // u' += α c (h u' − v)
  }
  const float c_ctx = rule == StepRule::jose_c
                          ? 1.f - (f - h)
                          : 1.f + unit_ratio(h - f, std::max(std::sqrt(dist2), std::numeric_limits<float>::min()));
  step_by(v, e, alpha * c_ctx, n);
  return true;
}

// The joint hinge max(0, m − uᵀv − uᵀd + u'ᵀv + u'ᵀd); scratch holds 3n floats.
KEXUE_INLINE bool joint_step(float* u, float* v, float* d, float* un, float* scratch, int n, float alpha,
                             float margin, StepRule rule, bool move_words, double& loss) {
  const float f = dot(u, v, n), g = dot(u, d, n), h = dot(un, v, n), k = dot(un, d, n);
  const float gap = f + g - h - k;
  if (!(gap < margin)) return false;
  loss += margin - gap;
  float* s = scratch;
  float* ev = scratch + n;
  float* ed = scratch + 2 * n;
  float s2 = 0.f, dist2 = 0.f;
#pragma omp simd reduction(+ : s2, dist2)
  for (int c = 0; c < n; ++c) {
    s[c] = v[c] + d[c];
    const float diff = u[c] - un[c];
    ev[c] = diff - (f - h) * v[c];
    ed[c] = diff - (g - k) * d[c];
    s2 += s[c] * s[c];
    dist2 += diff * diff;
  }
  constexpr float tiny = std::numeric_limits<float>::min();
  const float s_norm = std::max(std::sqrt(s2), tiny), dist = std::max(std::sqrt(dist2), tiny);
  if (move_words) {
    step_along(u, s, -(f + g), -1.f, alpha * (1.f - unit_ratio(f + g, s_norm)), n);
    const float c_neg = rule == StepRule::jose_c ? 2.f * unit_ratio(h + k, s_norm) : 1.f + unit_ratio(h + k, s_norm);
    step_along(un, s, h + k, 1.f, alpha * c_neg, n);
    const float c_v = rule == StepRule::jose_c ? 1.f - (f - h) : 1.f + unit_ratio(h - f, dist);
    step_by(v, ev, alpha * c_v, n);
  }
  const float c_d = rule == StepRule::jose_c ? 1.f - (g - k) : 1.f + unit_ratio(k - g, dist);
  step_by(d, ed, alpha * c_d, n);
  return true;
}

KEXUE_INLINE void prefetch_row(const float* row, int n) {
#if defined(__GNUC__)
  for (int c = 0; c < n; c += 16) __builtin_prefetch(row + c);
#else
  (void)row;
  (void)n;
#endif
}

struct Shared {
  const Corpus& corpus;
  const Options& opt;
  Tables tables;
  Progress* progress;
  const NegativeTable& negatives;
  std::vector<float> keep;                  // sub-sampling threshold per word (jose.c's float arithmetic)
  std::vector<std::int64_t> doc_ends;       // stream positions of the zeros
  std::int64_t schedule_words;              // epochs · length
};

struct ThreadResult {
  double loss = 0;
  std::int64_t updates = 0, pairs = 0;
};

KEXUE_SIMD_CLONES
void train_thread(const Shared& sh, int t, int n_threads, ThreadResult& result) {
  const Options& opt = sh.opt;
  const Corpus& corpus = sh.corpus;
  const int n = opt.dim, window = opt.window;
  const std::int64_t vocab = corpus.vocab_size, table_size = sh.negatives.size();
  float* const U = sh.tables.u;
  float* const V = sh.tables.v;
  float* const D = sh.tables.d;
  const std::int64_t start = corpus.length / n_threads * t;
  const std::int64_t chunk_words = corpus.length / n_threads;
  auto doc_at = [&](std::int64_t pos) {
    return static_cast<std::int64_t>(std::lower_bound(sh.doc_ends.begin(), sh.doc_ends.end(), pos) -
                                     sh.doc_ends.begin());
  };
  std::uint64_t rng = static_cast<std::uint64_t>(t) + opt.seed * kSeedMix;
  std::vector<std::int32_t> sen(static_cast<std::size_t>(opt.max_sentence));
  std::vector<float> scratch(3 * static_cast<std::size_t>(n));
  float* e = scratch.data();
  std::vector<std::int64_t> targets(static_cast<std::size_t>(opt.negative) * (2 * static_cast<std::size_t>(window) + 1));
  const float starting_alpha = opt.alpha;
  float alpha = starting_alpha;
  std::int64_t pos = start, doc = doc_at(start), sentence_doc = doc;
  std::int64_t word_count = 0, last_word_count = 0, sentence_length = 0, sentence_position = 0;
  int local_iter = opt.epochs;
  bool eof = false;
  double loss = 0;
  std::int64_t updates = 0, pairs = 0;

  auto draw_negative = [&](std::int64_t word) -> std::int64_t {
    const std::uint64_t r = lcg(rng);
    std::int64_t target = sh.negatives[static_cast<std::int64_t>((r >> 16) % static_cast<std::uint64_t>(table_size))];
    if (target == 0) target = static_cast<std::int64_t>(r % static_cast<std::uint64_t>(vocab - 1)) + 1;
    return target == word ? -1 : target;
  };

  while (true) {
    if (word_count - last_word_count > 10000) {
      const std::int64_t done = sh.progress->words.fetch_add(word_count - last_word_count) +
                                (word_count - last_word_count);
      last_word_count = word_count;
      if (opt.decay) {
        alpha = starting_alpha * (1 - done / static_cast<float>(sh.schedule_words + 1));
        if (alpha < starting_alpha * 0.0001) alpha = static_cast<float>(starting_alpha * 0.0001);
      }
      if (sh.progress->stop.load(std::memory_order_relaxed)) break;
    }
    if (sentence_length == 0) {
      sentence_doc = doc;
      while (true) {
        if (pos >= corpus.length) {
          eof = true;
          break;
        }
        const std::int32_t w = corpus.stream[pos++];
        ++word_count;
        if (w == 0) {
          ++doc;
          break;
        }
        if (opt.sample > 0) {
          const std::uint64_t r = lcg(rng);
          if (sh.keep[static_cast<std::size_t>(w)] < (r & 0xFFFF) / 65536.f) continue;
        }
        sen[static_cast<std::size_t>(sentence_length++)] = w;
        if (sentence_length >= opt.max_sentence) break;
      }
      sentence_position = 0;
    }
    if (eof || word_count > chunk_words) {
      sh.progress->words.fetch_add(word_count - last_word_count);
      if (--local_iter == 0) break;
      word_count = last_word_count = sentence_length = 0;
      pos = start;
      doc = doc_at(start);
      eof = false;
      loss = 0;
      updates = pairs = 0;
      continue;
    }
    // jose.c trains its previous sentence's first word on an empty sentence; we skip it.
    if (sentence_length == 0) continue;
    const std::int64_t word = sen[static_cast<std::size_t>(sentence_position)];
    const std::int64_t b = static_cast<std::int64_t>(lcg(rng) % static_cast<std::uint64_t>(window));
    // Draw the word's negatives up front, in jose.c's order (contexts in window order, then the document's), and
    // prefetch their rows: the random rows are the cache misses of this loop.
    const bool contexts = opt.joint || opt.update_words;
    std::size_t drawn = 0;
    if (contexts) {
      for (std::int64_t a = b; a < window * 2 + 1 - b; ++a) {
        const std::int64_t c = sentence_position - window + a;
        if (a == window || c < 0 || c >= sentence_length) continue;
        prefetch_row(V + static_cast<std::int64_t>(sen[static_cast<std::size_t>(c)]) * n, n);
        for (int k = 0; k < opt.negative; ++k) targets[drawn++] = draw_negative(word);
      }
    }
    const std::size_t doc_first = drawn;
    if (!opt.joint)
      for (int k = 0; k < opt.negative; ++k) targets[drawn++] = draw_negative(word);
    for (std::size_t i = 0; i < drawn; ++i)
      if (targets[i] >= 0) prefetch_row(U + targets[i] * n, n);
    std::size_t next = 0;
    if (contexts) {
      for (std::int64_t a = b; a < window * 2 + 1 - b; ++a) {
        const std::int64_t c = sentence_position - window + a;
        if (a == window || c < 0 || c >= sentence_length) continue;
        const std::int64_t last_word = sen[static_cast<std::size_t>(c)];
        for (int k = 0; k < opt.negative; ++k) {
          const std::int64_t target = targets[next++];
          if (target < 0) continue;
          ++pairs;
          bool active;
          if (opt.joint) {
            active = joint_step(U + word * n, V + last_word * n, D + sentence_doc * n, U + target * n, e, n, alpha,
                                opt.margin, opt.rule, opt.update_words, loss);
          } else {  // jose.c: the window word plays u, the centre word's context vector v
            active = separate_step(U + last_word * n, V + word * n, U + target * n, e, n, alpha, opt.margin,
                                   opt.rule, true, loss);
          }
          updates += active;
        }
      }
    }
    for (next = doc_first; next < drawn; ++next) {
      const std::int64_t target = targets[next];
      if (target < 0) continue;
      ++pairs;
      updates += separate_step(U + word * n, D + sentence_doc * n, U + target * n, e, n, alpha, opt.margin,
                               opt.rule, opt.update_words, loss);
    }
    if (++sentence_position >= sentence_length) sentence_length = 0;
  }
  result.loss = loss;
  result.updates = updates;
  result.pairs = pairs;
}

}  // namespace

NegativeTable::NegativeTable(const std::int64_t* counts, std::int64_t vocab_size, std::int64_t table_size)
    : size_(table_size) {
  if (vocab_size < 1 || table_size < 1) throw std::invalid_argument("empty vocabulary or table");
  // jose.c's loop over table slots (table[a] = i; if (a / size > d1) { i++; d1 += share(i); }), replayed in its double
  // arithmetic word by word instead of slot by slot (O(V + size / 1024), where the slot loop ran its 1e8 steps on every
  // fit and inference call): word i + 1 starts after the first slot a past the previous advance with
  // a / size > d1 (d1 = share(0) + … + share(i), summed in the same order), at most one advance per slot.
  double total = 0;
  for (std::int64_t a = 0; a < vocab_size; ++a) {
    if (counts[a] < 0) throw std::invalid_argument("counts must be >= 0");
    total += std::pow(static_cast<double>(counts[a]), 0.75);
  }
  if (!(total > 0) || !std::isfinite(total))  // d1 would be NaN, and casting it to a slot undefined
    throw std::invalid_argument("counts must hold a positive count");
  const double size = static_cast<double>(table_size);
  first_slot_.assign(static_cast<std::size_t>(vocab_size), table_size);
  first_slot_[0] = 0;
  double d1 = std::pow(static_cast<double>(counts[0]), 0.75) / total;
  std::int64_t next = 0;  // the first slot that may advance (one advance per slot)
  for (std::int64_t i = 0; i + 1 < vocab_size; ++i) {
    // the first a >= next with a / size > d1: the predicate is monotone in a; start near d1·size and step
    std::int64_t a = std::max(next, static_cast<std::int64_t>(std::min(d1 * size, size)));
    while (a > next && (a - 1) / size > d1) --a;
    while (a < table_size && !(a / size > d1)) ++a;
    if (a >= table_size) break;  // the later words get no slot
    first_slot_[static_cast<std::size_t>(i + 1)] = a + 1;
    next = a + 1;
    d1 += std::pow(static_cast<double>(counts[i + 1]), 0.75) / total;
  }
  const std::int64_t buckets = ((table_size - 1) >> kShift) + 1;
  bucket_word_.resize(static_cast<std::size_t>(buckets));
  std::int64_t w = 0;  // the word at slot b << kShift: the last with first_slot_ <= that slot
  for (std::int64_t b = 0; b < buckets; ++b) {
    const std::int64_t slot = b << kShift;
    while (w + 1 < vocab_size && first_slot_[static_cast<std::size_t>(w + 1)] <= slot) ++w;
    bucket_word_[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(w);
  }
}

std::int32_t NegativeTable::operator[](std::int64_t slot) const {
  const std::int64_t b = slot >> kShift;
  std::int32_t lo = bucket_word_[static_cast<std::size_t>(b)];
  const std::int64_t next = b + 1;
  std::int32_t hi = next < static_cast<std::int64_t>(bucket_word_.size())
                        ? bucket_word_[static_cast<std::size_t>(next)]
                        : static_cast<std::int32_t>(first_slot_.size() - 1);
  if (lo == hi) return lo;
  // last word w in [lo, hi] with first_slot_[w] ≤ slot
  while (lo < hi) {
    const std::int32_t mid = lo + (hi - lo + 1) / 2;
    if (first_slot_[static_cast<std::size_t>(mid)] <= slot)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

void init_tables(Tables tables, std::int64_t vocab_size, std::int64_t n_docs, int dim, std::uint64_t seed) {
  std::uint64_t rng = 1 + seed * kSeedMix;
  auto fill = [&](float* table, std::int64_t rows) {
    for (std::int64_t a = 0; a < rows; ++a) {
      float* row = table + a * dim;
      float norm = 0.f;
      while (norm == 0.f) {  // a zero row (1 in 65536 draws when dim = 1) would be NaN for good: drawn again
        for (int c = 0; c < dim; ++c) {
          row[c] = static_cast<float>(((lcg(rng) & 0xFFFF) / 65536.f - 0.5) / dim);
          norm += row[c] * row[c];
        }
      }
      const double scale = std::sqrt(static_cast<double>(norm));
      for (int c = 0; c < dim; ++c) row[c] = static_cast<float>(row[c] / scale);
    }
  };
  fill(tables.v, vocab_size);
  fill(tables.u, vocab_size);
  fill(tables.d, n_docs);
}

namespace {

void renormalize_rows(float* table, std::int64_t rows, int dim) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = table + r * dim;
    double norm = 0;
    for (int c = 0; c < dim; ++c) norm += static_cast<double>(row[c]) * row[c];
    if (!(norm > 0) || !std::isfinite(norm)) continue;  // left as is: no direction to keep
    const double scale = 1 / std::sqrt(norm);
    for (int c = 0; c < dim; ++c) row[c] = static_cast<float>(row[c] * scale);
  }
}

}  // namespace

Stats train(const Corpus& corpus, const Options& opt, Tables tables, Progress* progress) {
  if (corpus.vocab_size < 2) throw std::invalid_argument("the vocabulary needs at least one word besides </s>");
  if (opt.dim < 1 || opt.window < 1 || opt.negative < 1 || opt.epochs < 1 || opt.max_sentence < 1)
    throw std::invalid_argument("dim, window, negative, epochs and max_sentence must be >= 1");
  std::int64_t train_words = 0;
  for (std::int64_t w = 0; w < corpus.vocab_size; ++w) train_words += corpus.counts[w];
  NegativeTable negatives(corpus.counts, corpus.vocab_size, opt.table_size);
  Progress local_progress;
  Shared sh{corpus, opt, tables, progress ? progress : &local_progress, negatives, {}, {}, 0};
  sh.keep.resize(static_cast<std::size_t>(corpus.vocab_size));
  const float st = opt.sample * static_cast<float>(train_words);
  for (std::int64_t w = 0; w < corpus.vocab_size; ++w) {
    const std::int64_t cn = std::max<std::int64_t>(corpus.counts[w], 1);
    sh.keep[static_cast<std::size_t>(w)] =
        static_cast<float>((std::sqrt(static_cast<double>(cn / st)) + 1) * st / static_cast<double>(cn));
  }
  for (std::int64_t p = 0; p < corpus.length; ++p)
    if (corpus.stream[p] == 0) sh.doc_ends.push_back(p);
  // tokens after the last 0 would train against document row n_docs, one past d's end
  if (corpus.length > 0 && corpus.stream[corpus.length - 1] != 0)
    throw std::invalid_argument("the stream must end with 0 (the end of its last document)");
  if (static_cast<std::int64_t>(sh.doc_ends.size()) != corpus.n_docs)
    throw std::invalid_argument("n_docs must equal the number of zeros in the stream");
  sh.schedule_words = static_cast<std::int64_t>(opt.epochs) * corpus.length;
  const int threads = worker_count(opt.threads, static_cast<std::size_t>(std::max<std::int64_t>(corpus.length, 1)));
  std::vector<ThreadResult> results(static_cast<std::size_t>(threads));
  run_workers(threads, [&](int t) { train_thread(sh, t, threads, results[static_cast<std::size_t>(t)]); });
  if (threads > 1) {
    // Hogwild leaves a few rows off the sphere (measured up to 5e-4): a step writes x + a·e, then scales it by
    // 1/‖x + a·e‖, and another thread's step on the same row can land between the two passes. One pass puts every
    // row back; with one thread the rows are already unit to rounding and stay bit-identical to the steps.
    renormalize_rows(tables.u, corpus.vocab_size, opt.dim);
    renormalize_rows(tables.v, corpus.vocab_size, opt.dim);
    renormalize_rows(tables.d, corpus.n_docs, opt.dim);
  }
  Stats stats;
  for (const auto& r : results) {
    stats.loss += r.loss;
    stats.updates += r.updates;
    stats.pairs += r.pairs;
  }
  return stats;
}

KEXUE_SIMD_CLONES
double apply_separate(float* u_table, float* v_table, const std::int64_t* u_rows, const std::int64_t* v_rows,
                      const std::int64_t* neg_rows, std::int64_t count, int dim, float alpha, float margin,
                      StepRule rule, bool move_words, std::uint8_t* active) {
  std::vector<float> e(static_cast<std::size_t>(dim));
  double loss = 0;
  for (std::int64_t i = 0; i < count; ++i)
    active[i] = separate_step(u_table + u_rows[i] * dim, v_table + v_rows[i] * dim, u_table + neg_rows[i] * dim,
                              e.data(), dim, alpha, margin, rule, move_words, loss);
  return loss;
}

KEXUE_SIMD_CLONES
double apply_joint(float* u_table, float* v_table, float* d_table, const std::int64_t* u_rows,
                   const std::int64_t* v_rows, const std::int64_t* d_rows, const std::int64_t* neg_rows,
                   std::int64_t count, int dim, float alpha, float margin, StepRule rule, bool move_words,
                   std::uint8_t* active) {
  std::vector<float> scratch(3 * static_cast<std::size_t>(dim));
  double loss = 0;
  for (std::int64_t i = 0; i < count; ++i)
    active[i] = joint_step(u_table + u_rows[i] * dim, v_table + v_rows[i] * dim, d_table + d_rows[i] * dim,
                           u_table + neg_rows[i] * dim, scratch.data(), dim, alpha, margin, rule, move_words, loss);
  return loss;
}

EncodedFile encode_file(const std::string& path, std::int64_t min_count) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw std::runtime_error("cannot open " + path);
  std::unordered_map<std::string, std::int32_t> index;
  std::vector<std::string> words{"</s>"};
  std::vector<std::int64_t> counts{0};
  std::vector<std::int32_t> raw;  // first-pass ids, 0 closing each line
  index.emplace("</s>", 0);
  std::string word;
  bool line_open = false;
  std::int64_t line = 1;
  auto flush_word = [&]() {
    if (word.empty()) return;
    if (word == "</s>")  // jose.c (like word2vec) would read it as an end of document, shifting every later one
      throw std::invalid_argument(path + ", line " + std::to_string(line) +
                                  ": the literal token </s> is the end-of-document marker; remove it from the corpus");
    auto [it, fresh] = index.emplace(word, static_cast<std::int32_t>(words.size()));
    if (fresh) {
      words.push_back(word);
      counts.push_back(0);
    }
    ++counts[static_cast<std::size_t>(it->second)];
    raw.push_back(it->second);
    word.clear();
  };
  std::vector<char> buffer(1 << 20);
  std::size_t got;
  while ((got = std::fread(buffer.data(), 1, buffer.size(), file.get())) > 0) {
    for (std::size_t i = 0; i < got; ++i) {
      const char ch = buffer[i];
      if (ch == '\r') continue;
      if (ch == ' ' || ch == '\t' || ch == '\n') {
        flush_word();
        if (ch == '\n') {
          raw.push_back(0);
          ++counts[0];
          line_open = false;
          ++line;
        }
        continue;
      }
      word.push_back(ch);
      line_open = true;
    }
  }
  flush_word();
  if (line_open) {  // a last line without its newline is still a document
    raw.push_back(0);
    ++counts[0];
  }
  EncodedFile out;
  out.raw_tokens = static_cast<std::int64_t>(raw.size()) - counts[0];
  std::vector<std::int32_t> order(words.size() > 0 ? words.size() - 1 : 0);
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int32_t>(i + 1);
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    if (counts[static_cast<std::size_t>(a)] != counts[static_cast<std::size_t>(b)])
      return counts[static_cast<std::size_t>(a)] > counts[static_cast<std::size_t>(b)];
    return words[static_cast<std::size_t>(a)] > words[static_cast<std::size_t>(b)];
  });
  std::vector<std::int32_t> remap(words.size(), -1);
  remap[0] = 0;
  out.words.push_back("</s>");
  out.counts.push_back(counts[0]);
  for (std::int32_t old : order) {
    if (counts[static_cast<std::size_t>(old)] < min_count) continue;
    remap[static_cast<std::size_t>(old)] = static_cast<std::int32_t>(out.words.size());
    out.words.push_back(std::move(words[static_cast<std::size_t>(old)]));
    out.counts.push_back(counts[static_cast<std::size_t>(old)]);
  }
  out.stream.reserve(raw.size());
  for (std::int32_t id : raw) {
    const std::int32_t mapped = remap[static_cast<std::size_t>(id)];
    if (mapped >= 0) out.stream.push_back(mapped);
  }
  out.n_docs = counts[0];
  return out;
}

}  // namespace kexue::jose
