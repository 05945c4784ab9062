// JoSE spherical text embeddings (Meng et al., NeurIPS 2019): a word2vec.c-style Hogwild trainer (torch-free C++17).
//
// Tables: u (centre words, "syn0"), v (contexts, "syn1neg"), d (documents), every row on the unit sphere. The stream
// holds word ids with 0 (the vocabulary's "</s>") closing each document. Per thread, as in the official jose.c:
// sentences of at most 1000 kept words (sub-sampled with keep ratio (sqrt(c/(s·T)) + 1)·(s·T)/c), a dynamic window
// b = rand % window, negatives from the unigram^0.75 table of 1e8 entries (index 0 redrawn uniformly over 1..V−1,
// the positive's id skipped), a learning rate decayed linearly every 10k words, LCG 25214903917·x + 11 with the
// thread id as its seed. Each active hinge moves its vectors along the tangent space and renormalizes (see
// kexue_fast/jose/reference.py for the step factors of both rules and both hinges).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace kexue::jose {

enum class StepRule : int { paper = 0, jose_c = 1 };

struct Options {
  int dim = 100;
  int window = 5;
  int negative = 2;
  int epochs = 10;
  int threads = 1;  // 1: deterministic (same seed → bit-identical tables); > 1: Hogwild
  float margin = 0.15f;
  float alpha = 0.04f;
  float sample = 1e-3f;
  StepRule rule = StepRule::paper;
  bool joint = false;         // the paper's one hinge over (u, v, d) instead of the code's two
  bool update_words = true;   // false: u and v frozen, only documents move (infer_vector)
  bool decay = true;          // the learning rate decays linearly over the run; false: constant (inference)
  std::uint64_t seed = 0;     // 0 reproduces the official streams
  std::int64_t table_size = 100000000;
  int max_sentence = 1000;
};

struct Corpus {
  const std::int32_t* stream = nullptr;  // word ids in [0, vocab_size); 0 ends a document
  std::int64_t length = 0;
  const std::int64_t* counts = nullptr;  // training counts per word id (sub-sampling and negatives)
  std::int64_t vocab_size = 0;
  std::int64_t n_docs = 0;               // number of zeros in the stream
};

struct Tables {
  float* u;
  float* v;
  float* d;
};

struct Progress {
  std::atomic<std::int64_t> words{0};  // stream positions consumed, all threads and epochs
  std::atomic<bool> stop{false};       // set by the caller to end training early
};

struct Stats {
  double loss = 0;            // Σ of active hinge values over the last epoch
  std::int64_t updates = 0;   // active hinges over the last epoch
  std::int64_t pairs = 0;     // hinges evaluated over the last epoch
};

// The unigram^0.75 table of jose.c without its 4·table_size bytes: the first table slot of every word, plus a coarse
// index, so that a lookup is one bucket read and (rarely) a short binary search.
class NegativeTable {
 public:
  NegativeTable(const std::int64_t* counts, std::int64_t vocab_size, std::int64_t table_size);
  std::int32_t operator[](std::int64_t slot) const;
  std::int64_t size() const { return size_; }

 private:
  std::int64_t size_;
  std::vector<std::int64_t> first_slot_;  // first_slot_[w]: first slot holding w (non-decreasing)
  std::vector<std::int32_t> bucket_word_;  // word at slot b << kShift
  static constexpr int kShift = 10;
};

// The official initialization: one LCG stream (state 1 + seed·φ) over v's rows, then u's, then d's; each coordinate
// ((r & 0xFFFF)/65536 − 0.5)/dim, each row normalized.
void init_tables(Tables tables, std::int64_t vocab_size, std::int64_t n_docs, int dim, std::uint64_t seed);

Stats train(const Corpus& corpus, const Options& options, Tables tables, Progress* progress);

// The single steps the trainer takes, applied in order to rows of given tables (for tests and the torch bridge):
// separate: (u_table[u_rows[i]], v_table[v_rows[i]], u_table[neg_rows[i]]); joint adds d_table[d_rows[i]] (v and d
// distinct tables). active[i] receives whether hinge i was active. Returns the sum of the active hinge values.
double apply_separate(float* u_table, float* v_table, const std::int64_t* u_rows, const std::int64_t* v_rows,
                      const std::int64_t* neg_rows, std::int64_t count, int dim, float alpha, float margin,
                      StepRule rule, bool move_words, std::uint8_t* active);
double apply_joint(float* u_table, float* v_table, float* d_table, const std::int64_t* u_rows,
                   const std::int64_t* v_rows, const std::int64_t* d_rows, const std::int64_t* neg_rows,
                   std::int64_t count, int dim, float alpha, float margin, StepRule rule, bool move_words,
                   std::uint8_t* active);

// A whitespace-tokenized text file, one document per line (CR dropped, as jose.c does): the vocabulary ("</s>" first
// with the line count, then by count descending, ties by bytes descending; words below min_count dropped) and the
// stream of ids.
struct EncodedFile {
  std::vector<std::string> words;
  std::vector<std::int64_t> counts;
  std::vector<std::int32_t> stream;
  std::int64_t n_docs = 0;
  std::int64_t raw_tokens = 0;  // before min_count
};
EncodedFile encode_file(const std::string& path, std::int64_t min_count);

}  // namespace kexue::jose
