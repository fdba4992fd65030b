// Answer extraction (reward / eval / regrade) and the three-way comparison, on code-point buffers.
// Every routine mirrors one regular expression of medvl_engine/grading.py; the comments name it.
// Scans are linear: cached "next closing tag" / "next newline" positions stop a response full of
// unclosed tags from costing O(n^2).
#include <algorithm>
#include <cstring>

#include "medvl/grader.hpp"
#include "medvl/scan.hpp"
#include "medvl/unicode.hpp"

namespace medvl {
namespace {

// str.strip(): drop str.isspace() code points at both ends.
template <class CharT>
Span strip(const CharT* s, Span span) {
  while (span.begin < span.end && is_space(s[span.begin])) ++span.begin;
  while (span.end > span.begin && is_space(s[span.end - 1])) --span.end;
  return span;
}

// re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", s, re.DOTALL): some `</think>` at index
// >= 7, then whitespace, then `<answer>` ending no later than the final `</answer>` begins.
template <class CharT>
bool format_ok(const CharT* s, std::size_t n) {
  constexpr std::size_t kShortest = 7 + 8 + 8 + 9;  // "<think></think><answer></answer>"
  if (n < kShortest || !match_at(s, 0, "<think>", 7) || !match_at(s, n - 9, "</answer>", 9)) return false;
  const std::size_t final_close = n - 9;
  for (std::size_t pos = 7;;) {
    const std::size_t j = find_literal(s, pos, final_close - 8, "</think>", 8);
    if (j == kNpos) return false;
    std::size_t k = j + 8;
    while (k < final_close && is_space(s[k])) ++k;
    if (k + 8 <= final_close && match_at(s, k, "<answer>", 8)) return true;
    pos = j + 1;
  }
}

// re.search(r"<answer>(.*?)</answer>", s) without DOTALL: the first `<answer>` whose next `</answer>`
// comes before any "\n" (only "\n": `.` matches "\r"); else the whole response. Then .strip().
template <class CharT>
Span extract_reward(const CharT* s, std::size_t n) {
  std::size_t close = 0, newline = 0;
  bool have_close = false, have_newline = false;
  for (std::size_t pos = 0;;) {
    const std::size_t p = find_literal(s, pos, n, "<answer>", 8);
    if (p == kNpos) break;
    const std::size_t body = p + 8;
    if (!have_close || close < body) {
      close = find_literal(s, body, n, "</answer>", 9);
      have_close = true;
    }
    if (close == kNpos) break;  // no later `<answer>` can close either
    if (!have_newline || newline < body) {
      newline = find_char(s, body, n, U'\n');
      have_newline = true;
    }
    if (newline == kNpos || newline >= close) return strip(s, Span{body, close});
    pos = p + 1;
  }
  return strip(s, Span{0, n});
}

// s.strip(), then re.search(r"<answer>(.*?)</answer>", s, re.DOTALL); else the stripped text.
template <class CharT>
Span extract_eval(const CharT* s, std::size_t n) {
  const Span text = strip(s, Span{0, n});
  const std::size_t p = find_literal(s, text.begin, text.end, "<answer>", 8);
  if (p != kNpos) {
    const std::size_t close = find_literal(s, p + 8, text.end, "</answer>", 9);
    if (close != kNpos) return strip(s, Span{p + 8, close});
  }
  return text;
}

// One regrade fallback pattern, e.g. "answer is:" of r"answer is:\s*(.*)\s*" under re.IGNORECASE, with
// the IGNORECASE class of each character looked up once.
class TailPattern {
 public:
  explicit TailPattern(const char* text) : size_(std::strlen(text)) {
    for (std::size_t k = 0; k < size_; ++k) {
      const char32_t p = static_cast<unsigned char>(text[k]);
      for (char32_t& member : members_[k]) member = p;
      for (const tables::IgnoreCaseClass& cls : tables::kIgnoreCase) {
        if (cls.pattern == p) std::copy(std::begin(cls.members), std::end(cls.members), members_[k]);
      }
      // Scan for the rarest character: ':' (one member) where the pattern has one, else 'w'.
      if (p == ':' || (p == 'w' && members_[anchor_][0] != ':')) anchor_ = k;
    }
  }

  // The last match of finditer(pattern, s): group(1) as a span, or false when there is none. Each
  // match takes the rest of the line and the whitespace after it, so the next search starts there.
  template <class CharT>
  bool last_match(const CharT* s, std::size_t n, Span& group) const {
    bool found = false;
    for (std::size_t pos = 0;;) {
      const std::size_t p = find(s, pos, n);
      if (p == kNpos) return found;
      std::size_t begin = p + size_;
      while (begin < n && is_space(s[begin])) ++begin;  // \s* (crosses newlines)
      std::size_t end = find_char(s, begin, n, U'\n');  // (.*)
      if (end == kNpos) end = n;
      group = Span{begin, end};
      found = true;
      pos = end;
      while (pos < n && is_space(s[pos])) ++pos;  // trailing \s*
    }
  }

 private:
  bool member(std::size_t k, char32_t c) const {
    return c == members_[k][0] || c == members_[k][1] || c == members_[k][2] || c == members_[k][3];
  }

  // Leftmost p >= from where the pattern matches: candidates come from the anchor character's positions.
  template <class CharT>
  std::size_t find(const CharT* s, std::size_t from, std::size_t n) const {
    if (n < size_ || from > n - size_) return kNpos;
    const std::size_t anchor_end = n - size_ + anchor_ + 1;
    for (std::size_t c = from + anchor_; c < anchor_end; ++c) {
      c = find_any(s, c, anchor_end, members_[anchor_]);
      if (c == kNpos) return kNpos;
      const std::size_t p = c - anchor_;
      std::size_t k = 0;
      while (k < size_ && member(k, s[p + k])) ++k;
      if (k == size_) return p;
    }
    return kNpos;
  }

  std::size_t size_;
  std::size_t anchor_ = 0;
  char32_t members_[16][4];
};

const TailPattern& tail_pattern(int index) {
  static const TailPattern patterns[] = {TailPattern("answer:"), TailPattern("answer is:"), TailPattern("answer is"),
                                         TailPattern("is:")};
  return patterns[index];
}

// text.replace(tag, "") for each tag in order (each pass left to right, non-overlapping).
void remove_tag(std::u32string& text, const char* tag) {
  const std::size_t m = std::strlen(tag);
  std::size_t out = 0;
  for (std::size_t i = 0; i < text.size();) {
    if (i + m <= text.size() && match_at(text.data(), i, tag, m)) {
      i += m;
    } else {
      text[out++] = text[i++];
    }
  }
  text.resize(out);
}

// analysis/regrade_eval_results.py: last `<answer>(.*?)</answer>` (DOTALL) stripped, its first line
// (r"\s*([^\n\r]+)") stripped; else the tail patterns; else the stripped text. Then tags removed.
template <class CharT>
Prediction extract_regrade(const CharT* s, std::size_t n) {
  Span raw;
  bool found = false;
  for (std::size_t pos = 0;;) {
    const std::size_t p = find_literal(s, pos, n, "<answer>", 8);
    if (p == kNpos) break;
    const std::size_t close = find_literal(s, p + 8, n, "</answer>", 9);
    if (close == kNpos) break;
    raw = Span{p + 8, close};
    found = true;
    pos = close + 9;
  }
  if (found) {
    const Span body = strip(s, raw);
    std::size_t line_end = body.begin;
    while (line_end < body.end && s[line_end] != '\n' && s[line_end] != '\r') ++line_end;
    raw = strip(s, Span{body.begin, line_end});
  } else {
    int tail = 0;
    for (; tail < 4; ++tail) {
      if (tail_pattern(tail).last_match(s, n, raw)) break;
    }
    raw = strip(s, tail < 4 ? raw : Span{0, n});
  }
  Prediction prediction;
  prediction.span = raw;
  if (find_char(s, raw.begin, raw.end, U'<') == kNpos) return prediction;
  prediction.owned = true;
  prediction.text.assign(s + raw.begin, s + raw.end);
  for (const char* tag : {"<think>", "</think>", "<answer>", "</answer>"}) remove_tag(prediction.text, tag);
  const Span kept = strip(prediction.text.data(), Span{0, prediction.text.size()});
  prediction.text = prediction.text.substr(kept.begin, kept.size());
  prediction.span = Span{0, prediction.text.size()};
  return prediction;
}

// Room for the lowercase of a typical prediction without touching the heap (predictions are letters
// or option texts; a longer one spills into `spill`).
struct LoweredPrediction {
  char32_t local[256];
  std::u32string spill;
  const char32_t* data = local;
  std::size_t size = 0;
};

// pred.strip().lower() into out; false when the prediction is longer than `bound` code points (its
// lowercase, never shorter, then cannot equal any target).
template <class CharT>
bool lower_into(const CharT* s, Span span, std::size_t bound, LoweredPrediction& out) {
  span = strip(s, span);
  if (span.size() > bound) return false;
  const CharT* text = s + span.begin;
  const std::size_t most = span.size() * static_cast<std::size_t>(tables::kMaxLowerExpansion);
  char32_t* dest = out.local;
  if (most > std::size(out.local)) {
    out.spill.resize(most);
    dest = out.spill.data();
  }
  std::size_t k = 0;
  for (std::size_t i = 0; i < span.size(); ++i) k += static_cast<std::size_t>(lower_at(text, span.size(), i, dest + k));
  out.data = dest;
  out.size = k;
  return true;
}

bool hits(const LoweredPrediction& pred, const ChoiceSet& choices, std::size_t k) {
  const char32_t* lowered = choices.lowered_data();
  for (const Span& form : choices[k].lowered) {
    if (form.size() == pred.size && std::equal(pred.data, pred.data + pred.size, lowered + form.begin)) return true;
  }
  return false;
}

template <class CharT>
RowResult score_typed(Mode mode, const CharT* s, std::size_t n, const RowInput& row) {
  RowResult result;
  result.format_ok = format_ok(s, n);
  if (mode == Mode::reward) {
    result.parsed.span = extract_reward(s, n);
  } else if (mode == Mode::eval) {
    result.parsed.span = extract_eval(s, n);
  } else {
    result.parsed = extract_regrade(s, n);
  }
  const ChoiceSet& choices = *row.choices;
  std::size_t bound = choices.max_lowered(row.key);
  for (std::size_t k = 0; k < row.option_count; ++k) {
    bound = std::max(bound, choices.max_lowered(row.options_begin + k));
  }
  LoweredPrediction lowered;
  const bool comparable = result.parsed.owned
                              ? lower_into(result.parsed.text.data(), result.parsed.span, bound, lowered)
                              : lower_into(s, result.parsed.span, bound, lowered);
  result.correct = comparable && hits(lowered, choices, row.key);
  if (!row.has_options) {
    result.letter = result.correct ? kLabelLetter : kNoLetter;
  } else if (comparable) {
    for (std::size_t k = 0; k < row.option_count; ++k) {
      if (hits(lowered, choices, row.options_begin + k)) {
        result.letter = static_cast<std::int32_t>(k);
        break;
      }
    }
  }
  result.reward = result.correct && (result.format_ok || mode != Mode::reward) ? 1.0f : 0.0f;
  return result;
}

}  // namespace

namespace {

void append_code_points(std::u32string& out, const Text& t) {
  if (t.kind == 1) {
    const auto* p = static_cast<const std::uint8_t*>(t.data);
    out.append(p, p + t.size);
  } else if (t.kind == 2) {
    const auto* p = static_cast<const std::uint16_t*>(t.data);
    out.append(p, p + t.size);
  } else {
    const auto* p = static_cast<const std::uint32_t*>(t.data);
    out.append(p, p + t.size);
  }
}

}  // namespace

std::size_t ChoiceSet::add(const Text& label_str, const Text& text_str) {
  const std::size_t base = chars_.size();
  append_code_points(chars_, label_str);
  chars_ += U". ";
  append_code_points(chars_, text_str);
  const char32_t* s = chars_.data();
  Choice choice;
  choice.label = strip(s, Span{base, base + label_str.size});
  choice.text = strip(s, Span{base + label_str.size + 2, chars_.size()});
  choice.combined = strip(s, Span{base, chars_.size()});
  choice.slot = lowered_size_;
  // Room for the lowercase forms: ASCII lowers one to one (most option texts), anything else may grow.
  const bool ascii = std::all_of(chars_.begin() + static_cast<std::ptrdiff_t>(base), chars_.end(),
                                 [](char32_t c) { return c < 128; });
  const std::size_t expansion = ascii ? 1 : static_cast<std::size_t>(tables::kMaxLowerExpansion);
  lowered_size_ += expansion * (choice.combined.size() + choice.label.size() + choice.text.size());
  items_.push_back(choice);
  return items_.size() - 1;
}

void ChoiceSet::prepare(std::size_t k) {
  Choice& choice = items_[k];
  const Span forms[3] = {choice.combined, choice.label, choice.text};
  std::size_t out = choice.slot;
  for (int f = 0; f < 3; ++f) {
    const std::size_t begin = out;
    const char32_t* form = chars_.data() + forms[f].begin;
    for (std::size_t i = 0; i < forms[f].size(); ++i) {
      out += static_cast<std::size_t>(lower_at(form, forms[f].size(), i, &lowered_[out]));
    }
    choice.lowered[f] = Span{begin, out};
  }
}

std::size_t ChoiceSet::max_lowered(std::size_t k) const {
  // combined holds the stripped label and text, so it is the longest of the three forms.
  return static_cast<std::size_t>(tables::kMaxLowerExpansion) * items_[k].combined.size();
}

RowResult score_row(Mode mode, const RowInput& row) {
  const Text& t = row.response;
  switch (t.kind) {
    case 1:
      return score_typed(mode, static_cast<const std::uint8_t*>(t.data), t.size, row);
    case 2:
      return score_typed(mode, static_cast<const std::uint16_t*>(t.data), t.size, row);
    default:
      return score_typed(mode, static_cast<const std::uint32_t*>(t.data), t.size, row);
  }
}

std::u32string lower_string(const std::u32string& s) {
  std::u32string out;
  char32_t lowered[2];
  for (std::size_t i = 0; i < s.size(); ++i) {
    const int count = lower_at(s.data(), s.size(), i, lowered);
    out.append(lowered, lowered + count);
  }
  return out;
}

std::u32string strip_string(const std::u32string& s) {
  const Span kept = strip(s.data(), Span{0, s.size()});
  return s.substr(kept.begin, kept.size());
}

}  // namespace medvl
