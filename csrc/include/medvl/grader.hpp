// MedVLThinker's answer extraction and grading on plain code-point buffers (no Python objects), so
// that rows can be scored on worker threads with the GIL released. Semantics: medvl_engine/grading.py.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace medvl {

enum class Mode { reward, eval, regrade };

// Half-open [begin, end) range of code points.
struct Span {
  std::size_t begin = 0;
  std::size_t end = 0;
  std::size_t size() const { return end - begin; }
};

// A string copied out of a Python str in its own storage width (PEP 393): 1, 2 or 4 bytes per code point.
struct Text {
  const void* data = nullptr;
  std::size_t size = 0;
  int kind = 1;
};

// One comparison target, `label + ". " + text`: the three forms MedVLThinker compares against (label,
// text, "label. text", each stripped) are spans of it, and their lowercase is computed once per batch
// (a group's n answers, and every row's options, are compared against the same Choice).
struct Choice {
  Span label;
  Span text;
  Span combined;
  std::size_t slot = 0;  // where its lowercase forms go in the lowered arena
  Span lowered[3];       // combined, label, text lowered (after ChoiceSet::prepare)
};

// Every Choice of a batch, in two arenas: the code points, and their lowercase forms. add() runs with
// the GIL held; prepare(k) may run on any thread, one k per thread.
class ChoiceSet {
 public:
  std::size_t add(const Text& label, const Text& text);
  void allocate_lowered() { lowered_.resize(lowered_size_); }
  void prepare(std::size_t k);

  std::size_t size() const { return items_.size(); }
  const Choice& operator[](std::size_t k) const { return items_[k]; }
  const char32_t* lowered_data() const { return lowered_.data(); }
  // Longest lowercase any form of choice k can have: a longer prediction cannot equal it.
  std::size_t max_lowered(std::size_t k) const;

 private:
  std::u32string chars_;
  std::vector<char32_t> lowered_;
  std::size_t lowered_size_ = 0;
  std::vector<Choice> items_;
};

// The extracted prediction: a span of the response, or its own text once tags were removed from it.
struct Prediction {
  Span span;
  bool owned = false;
  std::u32string text;
};

inline constexpr std::int32_t kNoLetter = -1;
inline constexpr std::int32_t kLabelLetter = -2;  // no options for the row: the letter is its label

struct RowInput {
  Text response;
  const ChoiceSet* choices = nullptr;
  std::size_t key = 0;  // the row's own answer_label / answer
  bool has_options = false;
  std::size_t options_begin = 0;  // the row's options: choices [options_begin, options_begin + option_count)
  std::size_t option_count = 0;
};

struct RowResult {
  float reward = 0.0f;
  bool correct = false;
  bool format_ok = false;
  std::int32_t letter = kNoLetter;  // index into the row's options, kNoLetter or kLabelLetter
  Prediction parsed;
};

RowResult score_row(Mode mode, const RowInput& row);

// str.lower() and str.strip() on a code-point buffer (exposed to Python for the table tests).
std::u32string lower_string(const std::u32string& s);
std::u32string strip_string(const std::u32string& s);

}  // namespace medvl
